"""Every delivery is settled, whatever fails around the handler, on a real nats-server.

With manual acks, a delivery neither acked nor nak'd waits out the whole ack wait, and at
the last attempt ends with no `JobFailed` from the stage: the job would then fail as a
crash, without its error. Here the broker's flag store or a failure's own publish fails,
as they do while nats-server is busy or reconnecting.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
import pytest

from tests.conftest import NATS_URL, delete_namespace, reference_submitted
from voicejury_contracts import Event, ReferenceSubmitted, Stage
from voicejury_runtime.errors import PermanentStageError

pytestmark = pytest.mark.integration

Handler = Callable[[Any, Any], Awaitable[list[Any]]]


class Run:
    """One stage (ack wait 6 s, backoff 1 s) on one event; what it did, over time."""

    def __init__(self, *, effects_reads_failing: int, failure_publishes_failing: int) -> None:
        from voicejury_runtime.settings import StageSettings
        from voicejury_runtime.stage import StageService

        self.service = StageService(
            Stage.SEPARATOR,
            StageSettings(
                ack_wait_s=6, heartbeat_s=2, cancel_poll_s=1, max_deliver=2, retry_backoff_s=(1.0,)
            ),
        )
        self.t0 = time.monotonic()
        self.deliveries: list[float] = []  # when each delivery read the effects flag
        self.failed: list[dict[str, Any]] = []
        bus = self.service.bus
        read, publish = bus.flag_get, bus.publish
        reads_failing = [effects_reads_failing]
        publishes_failing = [failure_publishes_failing]

        async def flaky_read(bucket: str, key: str) -> Any:
            if bucket == bus.effects_bucket:
                self.deliveries.append(time.monotonic() - self.t0)
                if reads_failing[0]:
                    reads_failing[0] -= 1
                    raise nats.errors.TimeoutError
            return await read(bucket, key)

        async def flaky_publish(event: Event, **kwargs: Any) -> Any:
            if event.SUBJECT == "job.failed" and publishes_failing[0]:
                publishes_failing[0] -= 1
                raise nats.errors.TimeoutError
            return await publish(event, **kwargs)

        bus.flag_get = flaky_read  # type: ignore[method-assign]
        bus.publish = flaky_publish  # type: ignore[method-assign]

    async def start(self, handler: Handler, env: dict[str, str]) -> None:
        self.service.handles(ReferenceSubmitted)(handler)
        await self.service._on_start()
        nc = self.service.broker.config.connection_state.connection

        async def on_failed(msg: Any) -> None:
            self.failed.append(json.loads(msg.data))

        await nc.subscribe(f"{env['VJ_NAMESPACE']}.job.failed", cb=on_failed)
        await self.service.broker.start()
        await self.service.bus.publish(reference_submitted())

    async def until(self, done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 20.0
        while not done():
            assert time.monotonic() < deadline, "timed out"
            await asyncio.sleep(0.1)

    def outcomes(self, *names: str) -> dict[str, float]:
        counter = self.service.deliveries
        return {n: counter.labels(Stage.SEPARATOR, n)._value.get() for n in names}


@pytest.fixture
async def runs(env: dict[str, str]) -> Any:
    started: list[Run] = []
    yield started
    for run in started:
        await run.service.broker.stop()
    await delete_namespace(NATS_URL, env["VJ_NAMESPACE"])


async def test_a_check_before_the_handler_failing_is_retried_after_the_backoff(
    env: dict[str, str], runs: list[Run]
) -> None:
    run = Run(effects_reads_failing=1, failure_publishes_failing=0)
    runs.append(run)
    handled: list[int] = []

    async def handler(event: Any, ctx: Any) -> list[Any]:
        handled.append(ctx.attempt)
        return []

    await run.start(handler, env)
    await run.until(lambda: bool(handled))
    first, second = run.deliveries[:2]
    assert second - first < 4.0  # the 1 s backoff, not the 6 s ack wait
    assert handled == [2]
    assert run.outcomes("retry", "ok") == {"retry": 1, "ok": 1}


async def test_a_check_failing_at_every_attempt_fails_the_job_with_its_error(
    env: dict[str, str], runs: list[Run]
) -> None:
    run = Run(effects_reads_failing=99, failure_publishes_failing=0)
    runs.append(run)

    async def handler(event: Any, ctx: Any) -> list[Any]:
        raise AssertionError("never reached")

    await run.start(handler, env)
    await run.until(lambda: bool(run.failed))
    (failed,) = run.failed
    assert (failed["code"], failed["stage"], failed["attempts"]) == (
        "retries_exhausted",
        "separator",
        2,
    )
    assert "TimeoutError" in failed["message"]


async def test_a_permanent_error_whose_failure_publish_fails_once_still_fails_the_job_once(
    env: dict[str, str], runs: list[Run]
) -> None:
    run = Run(effects_reads_failing=0, failure_publishes_failing=1)
    runs.append(run)
    handled: list[int] = []

    async def handler(event: Any, ctx: Any) -> list[Any]:
        handled.append(ctx.attempt)
        raise PermanentStageError("not audio", code="invalid_audio")

    await run.start(handler, env)
    await run.until(lambda: bool(run.failed))
    await asyncio.sleep(2.0)  # a second delivery, were there one, would have come by now
    assert [f["code"] for f in run.failed] == ["invalid_audio"]
    assert handled == [1]  # the work did not run again
    assert run.outcomes("failed") == {"failed": 1}


async def test_work_handed_back_at_shutdown_stops_at_its_next_checkpoint(
    env: dict[str, str], runs: list[Run]
) -> None:
    """The process waits for its worker threads before it exits: a thread left working on
    a message already handed back would hold the pod until its grace period ends."""
    run = Run(effects_reads_failing=0, failure_publishes_failing=0)
    started, stopped = threading.Event(), threading.Event()
    windows: list[int] = []

    def work(ctx: Any) -> None:  # a transcription: a checkpoint between windows
        started.set()
        try:
            for window in range(100):
                ctx.should_stop()
                windows.append(window)
                time.sleep(0.1)
        finally:
            stopped.set()

    async def handler(event: Any, ctx: Any) -> list[Any]:
        await ctx.run_blocking(work, ctx)
        return []

    try:
        await run.start(handler, env)
        await run.until(started.is_set)
        await run.service.broker.stop()  # SIGTERM past the grace period
        assert await asyncio.to_thread(stopped.wait, 3.0)
        assert len(windows) < 100  # stopped, not finished (it runs on through the grace period)
    finally:
        await delete_namespace(NATS_URL, env["VJ_NAMESPACE"])
