"""Uploads refused before their bodies are read: the per-replica bound on concurrent
uploads (the backlog bound is exercised against PostgreSQL in test_gateway_api.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import MutableMapping
from types import SimpleNamespace
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from voicejury_gateway.admission import AdmissionMiddleware


def _services(max_uploads: int) -> Any:
    async def count_active() -> int:
        return 0

    return SimpleNamespace(
        settings=SimpleNamespace(gateway_max_concurrent_uploads=max_uploads, gateway_max_backlog=9),
        repo=SimpleNamespace(count_active=count_active),
        rejected=Counter("rejected", "", ["code"], registry=CollectorRegistry()),
    )


async def test_uploads_past_the_replicas_bound_get_503_without_their_body_being_read() -> None:
    release = asyncio.Event()
    both_in = asyncio.Event()
    entered = 0

    async def app(scope: Any, receive: Any, send: Any) -> None:  # the FastAPI app, reading
        nonlocal entered
        entered += 1
        if entered == 2:
            both_in.set()
        await release.wait()
        await send({"type": "http.response.start", "status": 202, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    admission = AdmissionMiddleware(app)
    state = SimpleNamespace(services=_services(max_uploads=2))
    read: list[str] = []

    async def request(name: str, path: str = "/v1/jobs") -> tuple[int, dict[str, Any]]:
        sent: list[MutableMapping[str, Any]] = []

        async def receive() -> dict[str, Any]:
            read.append(name)
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: MutableMapping[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "method": "POST",
            "path": path,
            "headers": [],
            "app": SimpleNamespace(state=state),
        }
        await admission(scope, receive, send)
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        return sent[0]["status"], (json.loads(body) if body else {})

    first = asyncio.create_task(request("first"))
    second = asyncio.create_task(request("second", "/v1/references"))
    await asyncio.wait_for(both_in.wait(), timeout=5)
    status, problem = await request("third")
    assert (status, problem["code"]) == (503, "uploads_saturated")
    assert "third" not in read
    release.set()
    assert [s for s, _ in await asyncio.gather(first, second)] == [202, 202]
    assert (await request("fourth"))[0] == 202  # the bound frees with the uploads
