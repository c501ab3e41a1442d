"""The fault suite's judge: classifies every job submitted around a fault.

A job is

- **ok** when it completed with one result, or failed with a code, a message and a stage
  that the fault warrants (the test says which codes);
- **lost** when it is not terminal within the bound;
- **duplicated** when the stream holds more than one copy of any stage's output for it
  (`job.scored`, ...: each (job, stage) must have one committed effect), more than one
  terminal event of any kind (`job.completed`, `job.failed` and `job.cancelled` counted
  together), or its event log (what SSE replays) has more than one terminal event;
- **unexpected** otherwise (a failure the fault does not explain, a completed job without
  a result, a failure without its code/message/stage, a terminal event in the stream that
  contradicts the REST status).

The evidence comes from the three places a client or an operator would look: the REST API
(status, error, per-stage attempts), the JetStream stream (what each stage published, after
`Nats-Msg-Id` deduplication) and PostgreSQL's event log (the SSE replay source). The stream
is counted once every consumer of the pipeline is idle, so that a straggler (a redelivered
copy still running when the job turned terminal) is counted too.

Each check named after a fault is a row of the results table, written with the test's
pass or failure once the test has ended (`tests/chaos/conftest.py`), whatever the order of
the test's own assertions.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import asyncpg
import httpx
import nats
from nats.js.errors import NotFoundError

from voicejury_contracts import REDRIVE_HEADER
from voicejury_devstack.stack import LocalStack

TERMINAL = frozenset({"completed", "failed", "cancelled"})
# The subject that announces each terminal status: a job has at most one of them in all.
TERMINAL_SUBJECTS: Mapping[str, str] = {
    "job.completed": "completed",
    "job.failed": "failed",
    "job.cancelled": "cancelled",
}
# The subject each stage publishes its one effect on.
STAGE_OUTPUTS: Mapping[str, str] = {
    "separator": "stems.separated",
    "pitch": "analysis.pitch",
    "asr": "analysis.transcript",
    "scorer": "job.scored",
    "jury": "job.completed",
}

_EFFECT_SUBJECTS = frozenset({*STAGE_OUTPUTS.values(), *TERMINAL_SUBJECTS})
# Every consumer of the pipeline (the stages' and the gateway's recorder).
PIPELINE_CONSUMERS = ("separator", "pitch", "asr", "scorer", "jury", "gateway")


class Outcome(StrEnum):
    OK = "ok"
    LOST = "lost"
    DUPLICATED = "duplicated"
    UNEXPECTED = "unexpected"


@dataclass(frozen=True)
class JobVerdict:
    job_id: str
    outcome: Outcome
    status: str | None
    error: dict[str, Any] | None
    attempts: dict[str, int]
    detail: str = ""


@dataclass
class FaultReport:
    """One fault's verdicts; `row()` is its line in docs/reliability.md."""

    fault: str
    verdicts: list[JobVerdict]
    refused: int = 0
    notes: list[str] = field(default_factory=list)

    def count(self, outcome: Outcome) -> int:
        return sum(v.outcome is outcome for v in self.verdicts)

    @property
    def failed_with_code(self) -> Counter[str]:
        return Counter(
            str(v.error["code"])
            for v in self.verdicts
            if v.outcome is Outcome.OK and v.status == "failed" and v.error
        )

    def verdict(self, job_id: str) -> JobVerdict:
        return next(v for v in self.verdicts if v.job_id == job_id)

    def describe(self) -> str:
        return "\n".join(
            f"  {v.job_id} {v.outcome}: status={v.status} error={v.error} "
            f"attempts={v.attempts} {v.detail}"
            for v in self.verdicts
        )

    def assert_nothing_lost_or_duplicated(self) -> None:
        print(f"\nFAULT {json.dumps(self.row())}")
        assert self.count(Outcome.LOST) == 0, f"lost jobs:\n{self.describe()}"
        assert self.count(Outcome.DUPLICATED) == 0, f"duplicated jobs:\n{self.describe()}"
        assert self.count(Outcome.UNEXPECTED) == 0, f"unexpected outcomes:\n{self.describe()}"

    def row(self) -> dict[str, Any]:
        return {
            "fault": self.fault,
            "jobs": len(self.verdicts),
            "refused": self.refused,
            "completed": sum(v.status == "completed" for v in self.verdicts),
            "lost": self.count(Outcome.LOST),
            "duplicated": self.count(Outcome.DUPLICATED),
            "unexpected": self.count(Outcome.UNEXPECTED),
            "failed_with_code": dict(self.failed_with_code),
            "attempts": [v.attempts for v in self.verdicts],
            "notes": self.notes,
        }


# The reports of the running test's checks; the row of each is written once the test has
# ended, so that it carries the test's outcome (its own assertions follow the check).
_published: list[FaultReport] = []


def take_published() -> list[FaultReport]:
    """The reports of the checks made since the last call (by the test that just ran)."""
    taken = list(_published)
    _published.clear()
    return taken


class Checker:
    def __init__(self, stack: LocalStack, client: httpx.Client) -> None:
        self.stack = stack
        self.client = client

    def check(
        self,
        job_ids: Iterable[str],
        *,
        fault: str | None,
        allowed_failures: Iterable[str] = (),
        bound_s: float = 300.0,
        refused: int = 0,
        injected: Mapping[str, Mapping[str, int]] | None = None,
    ) -> FaultReport:
        """`fault`: the row of the results table (None: a check that only prepares the
        fault). `injected`: messages the test itself published per job and subject (a
        replay), which are not effects of the pipeline and so are not counted against it."""
        ids = list(dict.fromkeys(job_ids))
        allowed = frozenset(allowed_failures)
        jobs = self._wait_terminal(ids, bound_s)
        if all(jobs.get(job_id, {}).get("status") in TERMINAL for job_id in ids):
            # A copy still in flight (a redelivery racing the one that finished) may yet
            # publish a second effect: count only once nothing is left to deliver or ack.
            wait_consumers_idle(self.stack)
        outputs = stream_counts(self.stack, ids)
        for job_id, by_subject in (injected or {}).items():
            for subject, n in by_subject.items():
                outputs.setdefault(job_id, {})[subject] = outputs[job_id].get(subject, 0) - n
        terminal_events = asyncio.run(_terminal_event_counts(self.stack.database_url, ids))
        verdicts = [
            self._judge(job_id, jobs.get(job_id), outputs.get(job_id, {}), terminal_events, allowed)
            for job_id in ids
        ]
        report = FaultReport(fault or "", verdicts, refused)
        if fault is not None:
            _published.append(report)
        return report

    def _wait_terminal(self, ids: list[str], bound_s: float) -> dict[str, dict[str, Any]]:
        """Polls REST until every job is terminal or the bound passes (gateway may be down)."""
        deadline = time.monotonic() + bound_s
        latest: dict[str, dict[str, Any]] = {}
        pending = list(ids)
        while pending and time.monotonic() < deadline:
            for job_id in list(pending):
                try:
                    r = self.client.get(f"/v1/jobs/{job_id}")
                except httpx.TransportError:
                    break
                if r.status_code == 200:
                    latest[job_id] = r.json()
                    if latest[job_id]["status"] in TERMINAL:
                        pending.remove(job_id)
            if pending:
                time.sleep(0.5)
        return latest

    def _judge(
        self,
        job_id: str,
        job: dict[str, Any] | None,
        outputs: Mapping[str, int],
        terminal_events: Mapping[str, int],
        allowed: frozenset[str],
    ) -> JobVerdict:
        status = job["status"] if job else None
        error = job["error"] if job else None
        attempts = {s: v["attempts"] for s, v in (job or {}).get("stages", {}).items()}

        def verdict(outcome: Outcome, detail: str = "") -> JobVerdict:
            return JobVerdict(job_id, outcome, status, error, attempts, detail)

        if status not in TERMINAL:
            return verdict(Outcome.LOST, f"not terminal within the bound (last: {status})")
        # Inputs may repeat (a replay is the fault); effects and failures must not. A job
        # ends once: one terminal event in the stream, whichever it is, and one in the log.
        repeated = {s: n for s, n in outputs.items() if n > 1 and s in _EFFECT_SUBJECTS}
        announced = {s: outputs[s] for s in TERMINAL_SUBJECTS if outputs.get(s, 0) > 0}
        logged = terminal_events.get(job_id, 0)
        if repeated or sum(announced.values()) > 1 or logged > 1:
            return verdict(
                Outcome.DUPLICATED,
                f"stream outputs {repeated}, terminal events in the stream {announced}, "
                f"in the SSE log {logged}",
            )
        if logged != 1:
            return verdict(Outcome.UNEXPECTED, "no terminal event in the SSE log")
        # The one in the stream (if any: the gateway records the failures it decides itself,
        # a refused publish or a crashed stage, without announcing them) says the same.
        if any(TERMINAL_SUBJECTS[s] != status for s in announced):
            return verdict(Outcome.UNEXPECTED, f"REST says {status}, the stream {announced}")
        if status == "completed":
            result = self.client.get(f"/v1/jobs/{job_id}/result")
            if result.status_code != 200 or outputs.get(STAGE_OUTPUTS["jury"]) != 1:
                return verdict(Outcome.UNEXPECTED, f"completed but result {result.status_code}")
            return verdict(Outcome.OK)
        if status == "failed":
            if not error or not error.get("code") or not error.get("message"):
                return verdict(Outcome.UNEXPECTED, "failed without a code and a message")
            if not error.get("stage"):
                return verdict(Outcome.UNEXPECTED, "failed without the stage")
            if error["code"] not in allowed:
                return verdict(Outcome.UNEXPECTED, f"failure {error['code']} not warranted")
            return verdict(Outcome.OK)
        return verdict(Outcome.UNEXPECTED, "cancelled, but nobody cancelled it")


def wait_consumers_idle(stack: LocalStack, timeout_s: float = 120.0) -> None:
    """Waits until no consumer of the pipeline has a message left to deliver or to ack.

    Call it after publishing: each message stays pending, then ack-pending, on every
    consumer it matches until that consumer has handled it.
    """
    asyncio.run(_wait_consumers_idle(stack.nats_url, stack.namespace, timeout_s))


async def _wait_consumers_idle(nats_url: str, namespace: str, timeout_s: float) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    stream = f"{namespace.upper()}_JOBS"
    deadline = time.monotonic() + timeout_s
    try:
        for consumer in PIPELINE_CONSUMERS:
            durable = f"{namespace}-{consumer}"
            while True:
                info = await js.consumer_info(stream, durable)
                if not info.num_pending and not info.num_ack_pending:
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"{durable} did not drain: {info}")
                await asyncio.sleep(0.3)
    finally:
        await nc.close()


async def published_at(nats_url: str, namespace: str, suffix: str, job_id: str) -> list[float]:
    """When JetStream stored each message of `job_id` on `<namespace>.<suffix>` (Unix s)."""
    nc = await nats.connect(nats_url, connect_timeout=5, max_reconnect_attempts=3)
    found: list[float] = []
    try:
        js = nc.jetstream()
        stream = f"{namespace.upper()}_JOBS"
        sub = await js.subscribe(f"{namespace}.{suffix}", ordered_consumer=True, stream=stream)
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=2.0)
                except nats.errors.TimeoutError:
                    return found  # none at all on the subject
                if json.loads(msg.data).get("job_id") == job_id:
                    found.append(msg.metadata.timestamp.timestamp())
                if not msg.metadata.num_pending:
                    return found
        finally:
            await sub.unsubscribe()
    finally:
        await nc.close()


def stream_counts(stack: LocalStack, job_ids: Iterable[str]) -> dict[str, dict[str, int]]:
    """Per job, how many messages of each subject the job stream holds (progress excluded)."""
    return asyncio.run(_stream_counts(stack.nats_url, stack.namespace, set(job_ids)))


async def _stream_counts(
    nats_url: str, namespace: str, job_ids: set[str]
) -> dict[str, dict[str, int]]:
    counts: dict[str, Counter[str]] = {}
    messages = await read_stream_with_headers(nats_url, namespace)
    # A re-drive sends committed outputs again, byte for byte, marked as such: the same
    # event once more (counted only when its original is gone), not a second effect.
    originals = {(subject, data) for subject, data, headers in messages if not _redriven(headers)}
    redriven: set[tuple[str, bytes]] = set()
    for subject, data, headers in messages:
        suffix = subject.removeprefix(namespace + ".")
        if suffix == "progress":
            continue
        if _redriven(headers):
            if (subject, data) in originals or (subject, data) in redriven:
                continue
            redriven.add((subject, data))
        try:
            job_id = str(json.loads(data)["job_id"])
        except (ValueError, KeyError, TypeError):
            continue
        if job_id in job_ids:
            counts.setdefault(job_id, Counter())[suffix] += 1
    return {job_id: dict(c) for job_id, c in counts.items()}


def _redriven(headers: Mapping[str, str] | None) -> bool:
    return bool(headers and headers.get(REDRIVE_HEADER))


async def read_stream(nats_url: str, namespace: str) -> list[tuple[str, bytes]]:
    """Every message the job stream holds now, in order, as (subject, data)."""
    return [(s, d) for s, d, _ in await read_stream_with_headers(nats_url, namespace)]


async def read_stream_with_headers(
    nats_url: str, namespace: str
) -> list[tuple[str, bytes, dict[str, str] | None]]:
    """Every message the job stream holds now, in order, as (subject, data, headers)."""
    nc = await nats.connect(nats_url, connect_timeout=5, max_reconnect_attempts=3)
    try:
        js = nc.jetstream()
        stream = f"{namespace.upper()}_JOBS"
        try:
            info = await js.stream_info(stream)
        except NotFoundError:
            return []
        last = info.state.last_seq
        if info.state.messages == 0:
            return []
        sub = await js.subscribe(f"{namespace}.>", ordered_consumer=True, stream=stream)
        found: list[tuple[str, bytes, dict[str, str] | None]] = []
        try:
            while True:
                msg = await sub.next_msg(timeout=5.0)
                found.append((msg.subject, msg.data, msg.headers))
                if msg.metadata.sequence.stream >= last:
                    return found
        finally:
            await sub.unsubscribe()
    finally:
        await nc.close()


async def _terminal_event_counts(database_url: str, job_ids: list[str]) -> dict[str, int]:
    con = await asyncpg.connect(database_url, timeout=10)
    try:
        rows = await con.fetch(
            "SELECT job_id::text AS job_id, count(*) AS n FROM job_events "
            "WHERE job_id::text = ANY($1::text[]) AND type = ANY($2::text[]) GROUP BY job_id",
            job_ids,
            sorted(TERMINAL),
        )
    finally:
        await con.close()
    return {r["job_id"]: int(r["n"]) for r in rows}


__all__ = [
    "Checker",
    "FaultReport",
    "JobVerdict",
    "Outcome",
    "published_at",
    "stream_counts",
    "take_published",
    "wait_consumers_idle",
]
