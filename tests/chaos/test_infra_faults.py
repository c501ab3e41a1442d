"""Faults of the infrastructure: nats-server, PostgreSQL and the S3 server restarted, the
NATS store full. Every server here is the stack's own private process (never the shared
nats-server or PostgreSQL), and the S3 server is s3rver, which keeps objects on disk.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import asyncpg
import httpx
import nats
import pytest
from minio import Minio
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import APIError

from tests.chaos.checker import STAGE_OUTPUTS, TERMINAL, read_stream
from tests.chaos.harness import CHAOS_ENV, LONG_CLIP, Harness
from tests.conftest import keep_every_message
from voicejury_devstack.stack import S3RVER_SCRIPT, LocalStack, find_repo_root

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

# The private nats-server's whole JetStream store, and the jobs stream's bound within it.
# nats-server reserves a stream's max_bytes in the store when it creates the stream and
# refuses one that does not fit (10047), so the bound must stay below the store; each is
# small enough for a test to fill (the stream-limit and the store-full variants of fault 11).
NATS_STORE_BYTES = 64 << 20
STREAM_MAX_BYTES = 4 << 20
STALL_TIMEOUT_S = 30
# What the gateway answers when JetStream did not take a job's first event; such a job is
# recorded as failed by the gateway and must never run.
REFUSAL_CODES = ("broker_unavailable", "queue_full", "broker_storage_full")
# JetStream's err_code when the server's store (max_file_store) is spent, and when a stream
# at its own bound (discard new) refuses a message ("maximum bytes exceeded").
JS_INSUFFICIENT_RESOURCES = 10023
JS_STREAM_STORE_FAILED = 10077


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    # A failure, not a skip: skipped, `make test` and CI would pass without faults 3, 4, 11
    # and 12 ever running.
    if shutil.which("node") is None or not (find_repo_root() / S3RVER_SCRIPT).is_file():
        pytest.fail(
            "s3rver is not installed, so the infrastructure faults (3, 4, 11, 12) cannot run: "
            "run `make setup` (it needs node and npm; it runs `npm ci` in tools/s3rver)",
            pytrace=False,
        )
    namespace = "i" + uuid.uuid4().hex[:10]
    with LocalStack(
        namespace,
        tmp_path_factory.mktemp("chaos-infra"),
        env_overrides={
            **CHAOS_ENV,
            "VJ_STREAM_MAX_BYTES": str(STREAM_MAX_BYTES),
            # A job that lost an event is re-driven within the checker's bound.
            "VJ_GATEWAY_STALL_TIMEOUT_S": str(STALL_TIMEOUT_S),
            "VJ_GATEWAY_HOUSEKEEPING_INTERVAL_S": "5",
        },
        tenant="chaos",
        own_nats=True,
        nats_max_file_store=NATS_STORE_BYTES,
        own_postgres=True,
        s3="s3rver",
    ) as st:
        asyncio.run(keep_every_message(st.nats_url, namespace))  # the checker's evidence
        yield st


@pytest.fixture(scope="module")
def h(stack: LocalStack) -> Iterator[Harness]:
    with httpx.Client(
        base_url=stack.base_url,
        headers={"Authorization": f"Bearer {stack.api_key}"},
        timeout=httpx.Timeout(30.0, read=60.0),
    ) as client:
        yield Harness(stack, client)


# -- 3. nats-server killed and restarted under load --------------------------------------------


def test_nats_killed_under_load_loses_no_accepted_job_and_refuses_new_ones(h: Harness) -> None:
    accepted = [h.submit(LONG_CLIP), h.submit(), h.submit()]
    asyncio.run(_wait_progress(h, accepted[0], "pitch"))

    # Submissions keep coming across the kill and the restart, one every half second, until
    # one is accepted again after the restart: each is answered 202 (and must then run to
    # its end) or 503 (and must leave nothing behind).
    with _submitting(h) as answers:
        answers.wait_for(lambda a: len(a) >= 1)
        h.stack.kill_nats(signal.SIGKILL)
        # Read after the kill: a job still running now was running when the server died.
        in_flight = [j for j in accepted if h.job(j)["status"] not in TERMINAL]
        try:
            during = h.post_job()  # the gateway must not answer 202 without JetStream's ack
        finally:
            h.stack.start_nats()
        restarted = len(answers.seen)
        answers.wait_for(lambda a: any(r.status_code == 202 for r in a[restarted:]))
    submitted = [r.json()["job_id"] for r in answers.seen if r.status_code == 202]
    refused = [r for r in [*answers.seen, during] if r.status_code != 202]

    report = h.checker.check(
        [*accepted, *submitted],
        fault="3 nats-server SIGKILL + restart, submissions throughout",
        refused=len(refused),
    )
    ran = _refused_jobs_that_ran(h)
    left = _objects_of_refused_jobs(h)
    redrives = [asyncio.run(_redrives(h, job_id)) for job_id in accepted]
    report.notes.append(
        f"{len(in_flight)} of 3 jobs in flight at the kill; submissions across it: "
        f"{[r.status_code for r in answers.seen]}, during the outage {during.status_code} "
        f"{during.json().get('code')}; effects of refused jobs in the stream: {ran}, their "
        f"objects in the store: {left}; re-drives per job in flight (events the broker lost "
        f"on SIGKILL): {redrives}"
    )
    assert in_flight, "every job had ended before nats-server was killed"
    report.assert_nothing_lost_or_duplicated()
    assert during.status_code == 503, during.text
    assert during.json()["code"] == "broker_unavailable"
    for r in refused:
        assert r.status_code == 503, r.text
        assert r.json()["code"] in REFUSAL_CODES, r.text
    assert ran == {}, f"refused jobs ran: {ran}"
    assert left == {}, f"refused jobs left objects: {left}"
    assert all(report.verdict(j).status == "completed" for j in [*accepted, *submitted])


class _Answers:
    """The answers of a background submitter, in order, with a way to wait on them."""

    def __init__(self) -> None:
        self.seen: list[httpx.Response] = []
        self.changed = threading.Condition()

    def add(self, response: httpx.Response) -> None:
        with self.changed:
            self.seen.append(response)
            self.changed.notify_all()

    def wait_for(self, done: Callable[[list[httpx.Response]], bool], timeout_s: float = 60) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: done(self.seen), timeout_s), [
                r.status_code for r in self.seen
            ]


@contextmanager
def _submitting(h: Harness, every_s: float = 0.5) -> Iterator[_Answers]:
    answers, stop = _Answers(), threading.Event()

    def run() -> None:
        while not stop.is_set():
            answers.add(h.post_job())
            stop.wait(every_s)

    thread = threading.Thread(target=run, name="submitter", daemon=True)
    thread.start()
    try:
        yield answers
    finally:
        stop.set()
        thread.join(timeout=120)


def _objects_of_refused_jobs(h: Harness) -> dict[str, list[str]]:
    """Per refused job, the objects still stored under its prefix (none: the gateway deletes
    what it stored before refusing, and a stage that ran it anyway would have added some)."""
    refused = asyncio.run(_refused_job_ids(h))
    s3 = Minio(
        h.stack.s3_endpoint, access_key=h.stack.s3_access_key, secret_key="test", secure=False
    )
    left: dict[str, list[str]] = {}
    for obj in s3.list_objects(h.stack.bucket, prefix="jobs/", recursive=True):
        job_id = str(obj.object_name).split("/")[1]
        if job_id in refused:
            left.setdefault(job_id, []).append(str(obj.object_name))
    return left


# A stage's output, or its failure: what a job that runs leaves in the stream.
_RUN_EVIDENCE = frozenset({*STAGE_OUTPUTS.values(), "job.failed"})


def _refused_jobs_that_ran(h: Harness) -> dict[str, list[str]]:
    """Per refused job (answered 503, recorded as failed by the gateway), what the stages
    did with it: empty for every one, or it ran though its client was told it would not.

    Its JobSubmitted may still land in the stream (the client library resends a publish it
    had buffered once it reconnects); its cancel flag must then stop every stage."""
    refused = asyncio.run(_refused_job_ids(h))
    messages = asyncio.run(read_stream(h.stack.nats_url, h.stack.namespace))
    return runs_of(refused, messages, h.stack.namespace)


def runs_of(
    job_ids: set[str], messages: list[tuple[str, bytes]], namespace: str
) -> dict[str, list[str]]:
    """The stage outputs and failures among `messages` that belong to `job_ids`."""
    ran: dict[str, list[str]] = {}
    for subject, data in messages:
        suffix = subject.removeprefix(namespace + ".")
        if suffix not in _RUN_EVIDENCE:
            continue
        job_id = str(json.loads(data).get("job_id"))
        if job_id in job_ids:
            ran.setdefault(job_id, []).append(suffix)
    return ran


async def _refused_job_ids(h: Harness) -> set[str]:
    con = await asyncpg.connect(h.stack.database_url)
    try:
        rows = await con.fetch(
            "SELECT id::text AS id FROM jobs WHERE error_stage = 'gateway' "
            "AND error_code = ANY($1::text[])",
            list(REFUSAL_CODES),
        )
    finally:
        await con.close()
    return {str(r["id"]) for r in rows}


async def _wait_progress(h: Harness, job_id: str, stage: str, timeout_s: float = 120.0) -> None:
    """Returns once `stage` has recorded progress on the job (REST: stage running/done)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = await asyncio.to_thread(h.job, job_id)
        if job["stages"].get(stage, {}).get("status") in ("running", "completed"):
            return
        await asyncio.sleep(0.3)
    raise AssertionError(f"{stage} never started on {job_id}")


# -- 4. PostgreSQL and the S3 server restarted mid-job -----------------------------------------


def test_postgres_restarted_mid_job_events_wait_and_the_jobs_complete(h: Harness) -> None:
    jobs = [h.submit(LONG_CLIP), h.submit()]
    asyncio.run(_wait_progress(h, jobs[0], "pitch"))

    async def outage() -> int:
        # Down until the pipeline has published on the bus while the database was away.
        async with h.progress_watch() as progress:
            await asyncio.to_thread(h.stack.stop_postgres, "immediate")
            down_at = len(progress.seen)
            try:
                await progress.wait(jobs[0], None, None, timeout_s=60, after=down_at)
            finally:
                await asyncio.to_thread(h.stack.start_postgres)
            return len(progress.seen) - down_at

    published_meanwhile = asyncio.run(outage())
    report = h.checker.check(jobs, fault="4 PostgreSQL crash (immediate) + restart mid-job")
    report.notes.append(f"{published_meanwhile} progress events published while it was down")
    report.assert_nothing_lost_or_duplicated()
    assert all(report.verdict(j).status == "completed" for j in jobs)


def test_s3_restarted_mid_job_transient_errors_retry_and_the_job_completes(h: Harness) -> None:
    async def run() -> tuple[str, int]:
        async with h.progress_watch() as progress:
            job_id = await asyncio.to_thread(h.submit, LONG_CLIP)
            await progress.wait(job_id, "separator", None, timeout_s=120)
            await asyncio.to_thread(h.stack.kill_s3, signal.SIGKILL)
            try:
                # Down until the separator has failed on the store and come back for more.
                retried = await progress.wait(
                    job_id, "separator", lambda e: int(e["attempt"]) >= 2, timeout_s=60
                )
            finally:
                await asyncio.to_thread(h.stack.start_s3)
            return job_id, int(retried["attempt"])

    job_id, attempt = asyncio.run(run())
    report = h.checker.check([job_id], fault="4 S3 server (s3rver) SIGKILL + restart mid-job")
    report.notes.append(f"separator attempt {attempt} started while S3 was down")
    report.assert_nothing_lost_or_duplicated()
    assert report.verdict(job_id).status == "completed"
    assert report.verdict(job_id).attempts["separator"] >= 2


# -- 12. an acknowledged event lost by the broker --------------------------------------------


def test_a_job_whose_event_the_broker_lost_is_re_driven_and_completes_once(h: Harness) -> None:
    """A single nats-server killed with SIGKILL can lose writes it had acknowledged (they
    were still in its buffers): here the separator's StemsSeparated is deleted from the
    stream before pitch and asr could take it. The reconciler finds the job idle with
    nothing queued for it and re-drives it; the separator sends the same stems again
    without separating twice, and the job completes once."""
    for stage in ("pitch", "asr"):
        h.stack.kill(stage, signal.SIGKILL)
    try:
        job_id = h.submit()
        deadline = time.monotonic() + 120
        while h.job(job_id)["stages"]["separator"]["status"] != "completed":
            assert time.monotonic() < deadline, "the separator never finished"
            time.sleep(0.3)
        lost = asyncio.run(_delete_events(h, "stems.separated", job_id))
    finally:
        for stage in ("pitch", "asr"):
            h.stack.restart(stage)
    report = h.checker.check(
        [job_id], fault="12 an acknowledged event lost (deleted from the stream)"
    )
    redrives = asyncio.run(_redrives(h, job_id))
    report.notes.append(f"{lost} StemsSeparated deleted; re-drives: {redrives}")
    report.assert_nothing_lost_or_duplicated()
    assert lost == 1
    assert report.verdict(job_id).status == "completed"
    assert report.verdict(job_id).attempts["separator"] == 1  # the stems were sent again
    assert redrives >= 1


async def _delete_events(h: Harness, suffix: str, job_id: str) -> int:
    nc = await nats.connect(h.stack.nats_url)
    js = nc.jetstream()
    deleted = 0
    try:
        sub = await js.subscribe(h.subject(suffix), ordered_consumer=True, stream=h.stream)
        try:
            while True:
                msg = await sub.next_msg(timeout=2.0)
                if json.loads(msg.data)["job_id"] == job_id:
                    await js.delete_msg(h.stream, msg.metadata.sequence.stream)
                    deleted += 1
        except nats.errors.TimeoutError:
            pass
    finally:
        await nc.close()
    return deleted


async def _redrives(h: Harness, job_id: str) -> int:
    con = await asyncpg.connect(h.stack.database_url)
    try:
        return int(await con.fetchval("SELECT redrives FROM jobs WHERE id = $1::uuid", job_id))
    finally:
        await con.close()


# -- 11. the NATS store out of space ---------------------------------------------------------

Fill = Callable[[Harness], Awaitable[int]]
Free = Callable[[Harness], Awaitable[None]]


def test_jobs_stream_at_its_bound_refuses_with_queue_full_and_drains_once_purged(
    h: Harness,
) -> None:
    """The jobs stream's own bound (`VJ_STREAM_MAX_BYTES`, discard new) is reached: the
    backlog bound of this deployment, with room left in the server's store."""
    _full_store_fault(
        h,
        fault="11 jobs stream at its max_bytes, then purged",
        fill=_fill_jobs_stream,
        free=_purge_filler,
        code="queue_full",
    )


def test_full_nats_store_refuses_with_broker_storage_full_and_drains_once_space_returns(
    h: Harness,
) -> None:
    """The nats-server's JetStream store itself (`max_file_store`) is spent by another
    tenant's stream on the same server, with room left in the jobs stream: every publish,
    on any stream, is refused until that stream is deleted."""
    _full_store_fault(
        h,
        fault="11 NATS server store at its quota (max_file_store, another stream), then deleted",
        fill=_fill_server_store,
        free=_delete_filler_stream,
        code="broker_storage_full",
    )


def _full_store_fault(h: Harness, *, fault: str, fill: Fill, free: Free, code: str) -> None:
    async def run() -> tuple[str, httpx.Response, int, dict[str, Any]]:
        async with h.progress_watch() as progress:
            waiting = await asyncio.to_thread(h.submit, LONG_CLIP)
            await progress.wait(waiting, "separator", None, timeout_s=120)
            filled = await fill(h)
            try:
                refused = await asyncio.to_thread(h.post_job)
                # Full until a stage of the accepted job has failed to store its output and
                # been redelivered (its progress still reaches core subscribers: only the
                # stream refuses it).
                retried = await progress.wait(
                    waiting, None, lambda e: int(e["attempt"]) >= 2, timeout_s=120
                )
            finally:
                await free(h)
            return waiting, refused, filled, retried

    waiting, refused, filled, retried = asyncio.run(run())
    after = h.submit()  # space is back: accepted again

    report = h.checker.check([waiting, after], fault=fault, refused=1)
    ran = _refused_jobs_that_ran(h)
    problem = refused.json()
    report.notes.append(
        "a quota, not a full disk (see the notes above: ENOSPC disables JetStream); "
        f"{filled} filler bytes; refused {refused.status_code} {problem.get('code')}: "
        f"{problem.get('detail')}; {retried['stage']} attempt {retried['attempt']} started "
        f"while full; effects of refused jobs: {ran}"
    )
    report.assert_nothing_lost_or_duplicated()
    assert refused.status_code == 503, refused.text
    assert problem["code"] == code, problem
    assert "retry-after" in refused.headers
    assert ran == {}, f"refused jobs ran: {ran}"
    assert all(report.verdict(j).status == "completed" for j in (waiting, after))


async def _fill_jobs_stream(h: Harness) -> int:
    """Publishes filler into the jobs stream until it refuses more (discard new)."""
    nc = await nats.connect(h.stack.nats_url)
    try:
        written, refusal = await _publish_until_refused(
            nc.jetstream(), lambda offset: h.subject(f"filler.{offset}"), 256 << 10
        )
    finally:
        await nc.close()
    assert refusal == JS_STREAM_STORE_FAILED, refusal  # its own bound, not the server's store
    return written


async def _purge_filler(h: Harness) -> None:
    nc = await nats.connect(h.stack.nats_url)
    try:
        await nc.jetstream().purge_stream(h.stream, subject=h.subject("filler.>"))
    finally:
        await nc.close()


def _filler_stream(h: Harness) -> str:
    return f"{h.stack.namespace.upper()}_OTHER_TENANT"


async def _fill_server_store(h: Harness) -> int:
    """Another stream on the same server (unbounded, as another tenant's may be) written
    until nats-server refuses more for lack of store: no stream can take a message then."""
    nc = await nats.connect(h.stack.nats_url)
    js = nc.jetstream()
    subject = f"{h.stack.namespace}_other.data"  # outside the jobs stream's subjects
    try:
        await js.add_stream(
            StreamConfig(name=_filler_stream(h), subjects=[subject], storage=StorageType.FILE)
        )
        written, refusal = await _publish_until_refused(js, lambda _: subject, 1 << 20)
    finally:
        await nc.close()
    assert refusal == JS_INSUFFICIENT_RESOURCES, refusal
    return written


async def _publish_until_refused(
    js: JetStreamContext, subject: Callable[[int], str], first_size: int
) -> tuple[int, int | None]:
    """Publishes random payloads (smaller and smaller, down to 64 bytes, so that what is
    left is filled too) until JetStream refuses; returns the bytes written and the last
    refusal's err_code."""
    written, refusal, size = 0, None, first_size
    while size >= 64:
        try:
            await js.publish(subject(written), os.urandom(size))
        except APIError as exc:
            refusal, size = exc.err_code, size // 4
            continue
        written += size
    return written, refusal


async def _delete_filler_stream(h: Harness) -> None:
    nc = await nats.connect(h.stack.nats_url)
    try:
        await nc.jetstream().delete_stream(_filler_stream(h))
    finally:
        await nc.close()
