"""A job cancelled while a stage works on it leaves nothing behind: not the outputs (never
published) and not the objects the stage stored after the cancel swept the job's audio."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tests.conftest import NATS_URL, delete_namespace, reference_submitted
from voicejury_contracts import ReferenceSubmitted, Stage, StageProgress
from voicejury_runtime.store import job_key

pytestmark = pytest.mark.integration


async def test_a_stage_finishing_after_the_cancel_publishes_nothing_and_keeps_no_audio(
    env: dict[str, str],
) -> None:
    from voicejury_runtime.settings import StageSettings
    from voicejury_runtime.stage import StageService

    service = StageService(Stage.SEPARATOR, StageSettings())
    event = reference_submitted()
    job = event.job_id
    before, after = job_key(job, "separator", "early.wav"), job_key(job, "separator", "late.wav")
    stored_early = asyncio.Event()
    release = asyncio.Event()

    async def handler(event: Any, ctx: Any) -> list[Any]:
        await ctx.store.put_bytes(before, b"early", "audio/wav")
        stored_early.set()
        await release.wait()
        # Past the cancel's sweep: a stem written by a stage that had not looked yet.
        await ctx.store.put_bytes(after, b"late", "audio/wav")
        return [StageProgress(job_id=job, stage=Stage.SEPARATOR, fraction=1, attempt=1, seq=9)]

    service.handles(ReferenceSubmitted)(handler)
    try:
        await service._on_start()
        await service.broker.start()
        await service.bus.publish(event)
        await asyncio.wait_for(stored_early.wait(), timeout=30)
        # What DELETE /v1/jobs/{id} does: the flag, then the sweep of the job's objects.
        await service.bus.cancel(job)
        assert await service.store.delete_prefix(job_key(job)) == 1
        release.set()
        stream, durable = service.bus.topology.stream.name, f"{env['VJ_NAMESPACE']}-separator"
        deadline = time.monotonic() + 30
        while (await service.bus.js.consumer_info(stream, durable)).num_ack_pending:
            assert time.monotonic() < deadline, "the delivery was never settled"
            await asyncio.sleep(0.2)
        assert await service.store.stat(after) is None
        assert await service.store.stat(before) is None
        effects = await service.bus.flag_get(service.bus.effects_bucket, f"{job}.separator")
        assert effects is None  # nothing was published as its effect
        assert service.deliveries.labels(Stage.SEPARATOR, "cancelled")._value.get() == 1
    finally:
        release.set()
        await service.broker.stop()
        await delete_namespace(NATS_URL, env["VJ_NAMESPACE"])


async def test_a_stage_failing_because_the_cancel_swept_its_input_ends_cancelled_not_retried(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """DELETE sweeps the job's objects at once; the stage sees the cancel flag only at its
    next poll. Its work failing on the swept input in between is the cancel: acked as
    cancelled with the job's objects swept again, never retried (a retry would find the
    flag, ack untouched and leave what the first attempt stored)."""
    from voicejury_runtime import stage as runtime_stage
    from voicejury_runtime.settings import StageSettings
    from voicejury_runtime.stage import StageService

    released: list[int] = []  # cached GPU memory given back, whatever the outcome
    monkeypatch.setattr(runtime_stage, "release_accelerator_memory", lambda: released.append(1))
    # The watcher must not see the flag first: this is the window between two polls.
    service = StageService(Stage.SEPARATOR, StageSettings(cancel_poll_s=600))
    event = reference_submitted()
    job = event.job_id
    stem, original = job_key(job, "separator", "stem.wav"), job_key(job, "input", "original.wav")
    stored_stem = asyncio.Event()
    release = asyncio.Event()
    calls: list[int] = []

    async def handler(event: Any, ctx: Any) -> list[Any]:
        calls.append(ctx.attempt)
        await ctx.store.put_bytes(stem, b"stem", "audio/wav")
        stored_stem.set()
        await release.wait()
        ref = await ctx.store.stat(original)
        if ref is None:  # what reading a swept input raises, as any S3 client error would
            raise RuntimeError(f"NoSuchKey: {original}")
        return []

    service.handles(ReferenceSubmitted)(handler)
    try:
        await service._on_start()
        await service.broker.start()
        await service.store.put_bytes(original, b"input", "audio/wav")
        await service.bus.publish(event)
        await asyncio.wait_for(stored_stem.wait(), timeout=30)
        await service.bus.cancel(job)
        assert await service.store.delete_prefix(job_key(job)) == 2
        # The first attempt's stem, written before the sweep, is gone; write it back as a
        # stage would have after the sweep.
        await service.store.put_bytes(stem, b"stem", "audio/wav")
        release.set()
        stream, durable = service.bus.topology.stream.name, f"{env['VJ_NAMESPACE']}-separator"
        deadline = time.monotonic() + 30
        while (info := await service.bus.js.consumer_info(stream, durable)).num_ack_pending:
            assert time.monotonic() < deadline, "the delivery was never settled"
            await asyncio.sleep(0.2)
        assert info.num_redelivered == 0
        assert calls == [1]
        assert await service.store.stat(stem) is None
        assert service.deliveries.labels(Stage.SEPARATOR, "cancelled")._value.get() == 1
        assert service.deliveries.labels(Stage.SEPARATOR, "retry")._value.get() == 0
        assert released == [1]
    finally:
        release.set()
        await service.broker.stop()
        await delete_namespace(NATS_URL, env["VJ_NAMESPACE"])
