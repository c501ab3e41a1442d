"""Uploads refused before their bodies are read: no API key (401), the per-replica bound on
concurrent uploads (503) and the per-tenant one (429). The backlog bounds are exercised
against PostgreSQL in test_gateway_api.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import MutableMapping
from types import SimpleNamespace
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from voicejury_gateway.admission import AdmissionMiddleware
from voicejury_gateway.auth import ADMITTED_TENANT
from voicejury_gateway.settings import AuthMode

KEYS = {"key-a": "tenant-a", "key-b": "tenant-b"}


def _services(max_uploads: int, per_tenant: int) -> Any:
    async def count_active(tenant: str | None = None) -> int:
        return 0

    async def tenant_for_key(key: str) -> str | None:
        return KEYS.get(key)

    return SimpleNamespace(
        settings=SimpleNamespace(
            gateway_auth_mode=AuthMode.API_KEY,
            gateway_max_concurrent_uploads=max_uploads,
            gateway_max_uploads_per_tenant=per_tenant,
            gateway_max_backlog=9,
            gateway_max_active_jobs_per_tenant=9,
        ),
        repo=SimpleNamespace(count_active=count_active, tenant_for_key=tenant_for_key),
        rejected=Counter("rejected", "", ["code"], registry=CollectorRegistry()),
    )


class Gate:
    """Holds every admitted request inside the app (as if its body were still arriving)
    until released; records which requests had their body read and by which tenant."""

    def __init__(self, max_uploads: int, per_tenant: int) -> None:
        self.release = asyncio.Event()
        self.entered = asyncio.Event()
        self.inside: list[str] = []
        self.read: list[str] = []
        self.admission = AdmissionMiddleware(self.app)
        self.state = SimpleNamespace(services=_services(max_uploads, per_tenant))

    async def app(self, scope: Any, receive: Any, send: Any) -> None:  # the FastAPI app
        self.inside.append(scope["state"][ADMITTED_TENANT])
        self.entered.set()
        await receive()
        await self.release.wait()
        await send({"type": "http.response.start", "status": 202, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def request(
        self, name: str, key: str | None, path: str = "/v1/jobs"
    ) -> tuple[int, dict[str, Any]]:
        sent: list[MutableMapping[str, Any]] = []

        async def receive() -> dict[str, Any]:
            self.read.append(name)
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: MutableMapping[str, Any]) -> None:
            sent.append(message)

        headers = [(b"authorization", f"Bearer {key}".encode())] if key else []
        scope = {
            "type": "http",
            "method": "POST",
            "path": path,
            "headers": headers,
            "app": SimpleNamespace(state=self.state),
        }
        await self.admission(scope, receive, send)
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        return sent[0]["status"], (json.loads(body) if body else {})

    async def hold(self, name: str, key: str, path: str = "/v1/jobs") -> asyncio.Task[Any]:
        """Starts a request and waits until it is inside the app."""
        self.entered.clear()
        task = asyncio.create_task(self.request(name, key, path))
        await asyncio.wait_for(self.entered.wait(), timeout=5)
        return task


async def test_uploads_past_the_replicas_bound_get_503_without_their_body_being_read() -> None:
    gate = Gate(max_uploads=2, per_tenant=2)
    first = await gate.hold("first", "key-a")
    second = await gate.hold("second", "key-b", "/v1/references")
    status, problem = await gate.request("third", "key-b")
    assert (status, problem["code"]) == (503, "uploads_saturated")
    assert "third" not in gate.read
    gate.release.set()
    assert [s for s, _ in await asyncio.gather(first, second)] == [202, 202]
    assert (await gate.request("fourth", "key-a"))[0] == 202  # the bound frees with the uploads


async def test_one_tenant_cannot_take_every_upload_slot() -> None:
    gate = Gate(max_uploads=4, per_tenant=2)
    held = [await gate.hold(f"a{i}", "key-a") for i in range(2)]
    status, problem = await gate.request("a2", "key-a")
    assert (status, problem["code"]) == (429, "too_many_uploads")
    assert "a2" not in gate.read
    other = await gate.hold("b0", "key-b")  # another tenant still gets in
    gate.release.set()
    assert [s for s, _ in await asyncio.gather(*held, other)] == [202, 202, 202]
    assert gate.inside == ["tenant-a", "tenant-a", "tenant-b"]


async def test_callers_without_a_valid_key_are_refused_before_holding_a_slot() -> None:
    """Anonymous uploads could otherwise fill every slot and lock every tenant out."""
    gate = Gate(max_uploads=1, per_tenant=1)
    for name, key, code in (
        ("anonymous", None, "unauthenticated"),
        ("forged", "key-x", "invalid_api_key"),
    ):
        status, problem = await gate.request(name, key)
        assert (status, problem["code"]) == (401, code)
        assert name not in gate.read
    held = await gate.hold("tenant", "key-a")  # the one slot was never taken
    gate.release.set()
    assert (await held)[0] == 202


async def test_a_backlog_refusal_gives_its_slot_back() -> None:
    gate = Gate(max_uploads=1, per_tenant=1)
    active = {"tenant-a": 9}

    async def count_active(tenant: str | None = None) -> int:
        return active.get(tenant or "", 0) if tenant else sum(active.values())

    gate.state.services.repo.count_active = count_active
    gate.state.services.settings.gateway_max_backlog = 100
    status, problem = await gate.request("full", "key-a")
    assert (status, problem["code"]) == (429, "too_many_active_jobs")
    assert "full" not in gate.read
    assert (gate.admission.in_flight, dict(gate.admission.in_flight_by_tenant)) == (0, {})
    held = await gate.hold("other", "key-b")  # the one slot is free
    gate.release.set()
    assert (await held)[0] == 202
