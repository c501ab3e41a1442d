"""A stage's HTTP side, as Kubernetes and Prometheus see it: the ASGI app `StageService.run`
serves, asked in memory (no broker, no server)."""

from __future__ import annotations

import asyncio

import httpx
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from voicejury_contracts import Stage
from voicejury_runtime.settings import StageSettings
from voicejury_runtime.stage import StageService


def get(path: str) -> httpx.Response:
    service = StageService(Stage.SCORER, StageSettings(log_json=False))

    async def ask() -> httpx.Response:
        transport = httpx.ASGITransport(app=service.asgi())
        async with httpx.AsyncClient(transport=transport, base_url="http://stage") as client:
            return await client.get(path)

    return asyncio.run(ask())


def test_metrics_say_their_exposition_format() -> None:
    """Prometheus 3 refuses a scrape without a Content-Type it knows (no fallback format
    unless configured): every stage's metrics would be missing."""
    r = get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"] == CONTENT_TYPE_LATEST
    names = {family.name for family in text_string_to_metric_families(r.text)}
    assert {"voicejury_stage_deliveries", "voicejury_stage_seconds"} <= names


def test_readiness_answers_json_naming_the_reason() -> None:
    r = get("/readyz")
    assert (r.status_code, r.headers["content-type"]) == (503, "application/json")
    assert r.json() == {"ready": False, "reason": "starting"}
