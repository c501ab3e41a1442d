"""What every fault test does to the system: submit, watch the bus, publish raw events.

Stages are watched on NATS itself (a core subscription to the stream's `progress` subject),
not through SSE: a fault aimed at "mid-job" lands milliseconds after the stage starts.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import nats
from nats.js.api import PubAck

from tests.chaos.checker import Checker, wait_consumers_idle
from tests.conftest import AUDIO
from voicejury_devstack.stack import LocalStack

SHORT_CLIP = AUDIO / "vocadito_10.wav"  # 9 s
LONG_CLIP = AUDIO / "vocadito_1.wav"  # 33 s: pitch takes long enough to be caught mid-work

# Short ack waits and backoffs make redeliveries observable in seconds (as in tests/e2e).
CHAOS_ENV: dict[str, str] = {
    "VJ_ACK_WAIT_S": "6",
    "VJ_HEARTBEAT_S": "1.5",
    "VJ_CANCEL_POLL_S": "0.5",
    "VJ_RETRY_BACKOFF_S": "[1, 2, 4, 8]",
    "VJ_GATEWAY_SSE_KEEPALIVE_S": "2",
    "VJ_GATEWAY_RECORDER_ACK_WAIT_S": "6",
    "VJ_ASR_MAX_NEW_TOKENS": "24",
}

ProgressFilter = Callable[[dict[str, Any]], bool]


@dataclass
class Harness:
    stack: LocalStack
    client: httpx.Client

    @property
    def checker(self) -> Checker:
        return Checker(self.stack, self.client)

    @property
    def stream(self) -> str:
        return f"{self.stack.namespace.upper()}_JOBS"

    def subject(self, suffix: str) -> str:
        return f"{self.stack.namespace}.{suffix}"

    # -- REST ---------------------------------------------------------------------------

    def post_job(self, performance: Path = SHORT_CLIP, **form: str) -> httpx.Response:
        """Submits `performance` against itself (the e2e tests' setting: short, known)."""
        reference = performance
        fields = {"performance_kind": "vocals", "reference_kind": "vocals", **form}
        with performance.open("rb") as perf, reference.open("rb") as ref:
            return self.client.post(
                "/v1/jobs",
                files={
                    "performance": (performance.name, perf, "audio/wav"),
                    "reference": (reference.name, ref, "audio/wav"),
                },
                data=fields,
            )

    def submit(self, performance: Path = SHORT_CLIP, **form: str) -> str:
        r = self.post_job(performance, **form)
        assert r.status_code == 202, r.text
        job_id: str = r.json()["job_id"]
        return job_id

    def job(self, job_id: str) -> dict[str, Any]:
        r = self.client.get(f"/v1/jobs/{job_id}")
        r.raise_for_status()
        body: dict[str, Any] = r.json()
        return body

    # -- the bus ------------------------------------------------------------------------

    def submit_and_wait_for(
        self,
        stage: str,
        performance: Path = SHORT_CLIP,
        *,
        when: ProgressFilter | None = None,
        timeout_s: float = 120.0,
        **form: str,
    ) -> str:
        """Submits a job and returns once `stage` reports progress for it (`when` narrows)."""

        async def run() -> str:
            async with self.progress_watch() as progress:
                job_id = await asyncio.to_thread(self.submit, performance, **form)
                await progress.wait(job_id, stage, when, timeout_s)
                return job_id

        return asyncio.run(run())

    def submit_and_kill(
        self,
        stage: str,
        performance: Path = SHORT_CLIP,
        *,
        when: ProgressFilter | None = None,
        occurrence: int = 1,
        timeout_s: float = 120.0,
        **form: str,
    ) -> str:
        """Submits a job and SIGKILLs `stage` on its `occurrence`-th progress report for it
        (`when` narrows), from the coroutine that saw the report: closing the subscription
        and leaving the event loop first would give a fast stage time to finish."""
        job_id, _ = self.submit_and_signal(
            stage,
            signal.SIGKILL,
            performance,
            when=when,
            occurrence=occurrence,
            timeout_s=timeout_s,
            **form,
        )
        return job_id

    def submit_and_signal(
        self,
        stage: str,
        sig: signal.Signals,
        performance: Path = SHORT_CLIP,
        *,
        when: ProgressFilter | None = None,
        occurrence: int = 1,
        timeout_s: float = 120.0,
        **form: str,
    ) -> tuple[str, float]:
        """As `submit_and_kill`, with `sig`; returns the job and the wall-clock time (Unix
        s, JetStream's clock on this machine) just after the signal was sent. SIGKILL goes
        to the process group and is reaped; any other signal to the process alone (as a
        kubelet's SIGTERM), which is left to exit in its own time."""

        async def run() -> tuple[str, float]:
            async with self.progress_watch() as progress:
                job_id = await asyncio.to_thread(self.submit, performance, **form)
                await progress.wait(job_id, stage, when, timeout_s, occurrence=occurrence)
                if sig == signal.SIGKILL:
                    self.stack.kill(stage, signal.SIGKILL)
                else:
                    self.stack.process(stage).send_signal(sig)
                return job_id, time.time()

        return asyncio.run(run())

    def progress_watch(self) -> ProgressWatch:
        return ProgressWatch(self.stack.nats_url, self.subject("progress"))

    def publish_raw(self, suffix: str, data: bytes, msg_id: str | None = None) -> PubAck:
        """Publishes straight onto the job stream, as a buggy or replaying producer would."""

        async def run() -> PubAck:
            nc = await nats.connect(self.stack.nats_url)
            try:
                headers = {"Nats-Msg-Id": msg_id} if msg_id else None
                return await nc.jetstream().publish(
                    self.subject(suffix), data, stream=self.stream, headers=headers
                )
            finally:
                await nc.close()

        return asyncio.run(run())

    def wait_consumers_idle(self, timeout_s: float = 120.0) -> None:
        """Waits until no consumer has a message left to deliver or to acknowledge."""
        wait_consumers_idle(self.stack, timeout_s)

    def set_ack_wait(self, stage: str, ack_wait_s: float) -> float:
        """Changes the stage consumer's ack wait on the server; returns the previous one.

        Restarting the stage with another `VJ_ACK_WAIT_S` does not do it: the durable
        consumer keeps the configuration it was created with.
        """

        async def run() -> float:
            nc = await nats.connect(self.stack.nats_url)
            try:
                js = nc.jetstream()
                info = await js.consumer_info(self.stream, f"{self.stack.namespace}-{stage}")
                previous = float(info.config.ack_wait or 0)
                await js.add_consumer(self.stream, replace(info.config, ack_wait=ack_wait_s))
                return previous
            finally:
                await nc.close()

        return asyncio.run(run())

    def stage_deliveries(self, stage: str) -> dict[str, float]:
        """The stage process's `voicejury_stage_deliveries_total`, by outcome (since start)."""
        text = httpx.get(f"{self.stack.http_url(stage)}/metrics", timeout=5).text
        out: dict[str, float] = {}
        pattern = re.compile(r"^voicejury_stage_deliveries_total\{([^}]*)\}\s+(\S+)$", re.M)
        for labels, value in pattern.findall(text):
            outcome = re.search(r'outcome="([^"]*)"', labels)
            if outcome:
                out[outcome.group(1)] = float(value)
        return out


class ProgressWatch:
    """A core NATS subscription to the progress subject, opened before the job starts."""

    def __init__(self, nats_url: str, subject: str) -> None:
        self.nats_url = nats_url
        self.subject = subject
        self.seen: list[dict[str, Any]] = []
        self._changed = asyncio.Event()
        self._nc: Any = None

    async def __aenter__(self) -> ProgressWatch:
        self._nc = await nats.connect(self.nats_url)

        async def on_msg(msg: Any) -> None:
            self.seen.append(json.loads(msg.data))
            self._changed.set()

        await self._nc.subscribe(self.subject, cb=on_msg)
        await self._nc.flush()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._nc.close()

    async def wait(
        self,
        job_id: str,
        stage: str | None,
        when: ProgressFilter | None,
        timeout_s: float,
        *,
        after: int = 0,
        occurrence: int = 1,
    ) -> dict[str, Any]:
        """The `occurrence`-th progress of `job_id` (by `stage`, any when None) among
        `seen[after:]`."""
        deadline = time.monotonic() + timeout_s
        while True:
            matching = [
                event
                for event in self.seen[after:]
                if event["job_id"] == job_id
                and stage in (None, event["stage"])
                and (when is None or when(event))
            ]
            if len(matching) >= occurrence:
                return matching[occurrence - 1]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{stage} never reported progress on {job_id}: {self.seen}")
            self._changed.clear()
            with suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=remaining)


@contextmanager
def restarted_with(stack: LocalStack, name: str, overrides: Mapping[str, str]) -> Iterator[None]:
    """Runs `name` with extra settings inside the block, and as planned again after it."""
    stack.restart(name, env_overrides=overrides)
    try:
        yield
    finally:
        stack.restart(name, env_overrides={})


def new_job_id() -> str:
    return str(uuid.uuid4())
