"""Under VJ_LOG_JSON a stage's log is one JSON object per line, FastStream's own lines and
uvicorn's included, and every line about a delivery names its job: what a log pipeline
parses and what an operator filters a job's story by."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest

from tests.conftest import NATS_URL, delete_namespace, reference_submitted
from voicejury_contracts import ReferenceSubmitted, Stage

pytestmark = pytest.mark.integration


async def test_every_line_a_stage_logs_is_json_and_a_deliverys_lines_name_its_job(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    from voicejury_runtime.settings import StageSettings
    from voicejury_runtime.stage import StageService

    monkeypatch.setenv("VJ_LOG_JSON", "true")
    # The process's own way in: the ASGI app uvicorn runs (FastStream's app lines).
    service = StageService(Stage.SEPARATOR, StageSettings(retry_backoff_s=(0.1,)))
    app = service.asgi()
    event = reference_submitted()
    done = asyncio.Event()

    async def handler(event: Any, ctx: Any) -> list[Any]:
        logging.getLogger("tests.handler").info("separating")
        if ctx.attempt == 1:
            raise RuntimeError("flaky")  # a retry: the runtime's warning, with a traceback
        done.set()
        return []

    service.handles(ReferenceSubmitted)(handler)
    try:
        await app._startup()
        await service.bus.publish(event)
        await asyncio.wait_for(done.wait(), timeout=30)
    finally:
        await app._shutdown()  # waits for the delivery to end: its `Processed` is logged
        await delete_namespace(NATS_URL, env["VJ_NAMESPACE"])

    out, err = capfd.readouterr()
    lines = [line for line in (out + err).splitlines() if line.strip()]
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}")
    assert all(r["service"] == "separator" for r in records)
    messages = [r["msg"] for r in records]
    assert "FastStream app starting..." in messages, messages
    job = str(event.job_id)
    about_the_job = [r for r in records if r.get("job_id") == job]
    said = [r["msg"] for r in about_the_job]
    # Both deliveries, from FastStream's first line about each to its last.
    assert said.count("Received") == said.count("Processed") == 2, said
    assert said.count("separating") == 2, said
    (retry,) = [r for r in about_the_job if r["msg"].startswith("transient failure")]
    assert "RuntimeError: flaky" in retry["exc"]
    assert {r.get("stage") for r in about_the_job if r["logger"] == "tests.handler"} == {
        "separator"
    }
    received = next(r for r in about_the_job if r["msg"] == "Received")
    # FastStream's fields come along.
    assert received["stream"] == f"{env['VJ_NAMESPACE'].upper()}_JOBS", received
    # A line about no message names no job.
    assert "job_id" not in next(r for r in records if r["msg"] == "FastStream app starting...")
