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
import time
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import httpx
import nats
import pytest
from nats.js.errors import APIError

from tests.chaos.checker import read_stream
from tests.chaos.harness import CHAOS_ENV, LONG_CLIP, Harness
from tests.conftest import keep_every_message
from voicejury_devstack.stack import S3RVER_SCRIPT, LocalStack, find_repo_root

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

STREAM_MAX_BYTES = 4 << 20  # the jobs stream's share of the store: small enough to fill
STALL_TIMEOUT_S = 30


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    if shutil.which("node") is None or not (find_repo_root() / S3RVER_SCRIPT).is_file():
        pytest.skip("s3rver is not installed: run `npm ci` in tools/s3rver (needs node)")
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
        nats_max_file_store=64 << 20,
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

    h.stack.kill_nats(signal.SIGKILL)
    try:
        during = h.post_job()  # the gateway must not answer 202 without JetStream's ack
    finally:
        h.stack.start_nats()

    report = h.checker.check(accepted, fault="3 nats-server SIGKILL + restart", refused=1)
    ghosts = _unrecorded_submissions(h, set(accepted))
    redrives = [asyncio.run(_redrives(h, job_id)) for job_id in accepted]
    report.notes.append(
        f"submission during the outage: {during.status_code} "
        f"{during.json().get('code')}; ghost JobSubmitted in the stream: {ghosts}; "
        f"re-drives per job (events the broker lost on SIGKILL): {redrives}"
    )
    report.assert_nothing_lost_or_duplicated()
    assert during.status_code == 503, during.text
    assert during.json()["code"] == "broker_unavailable"
    assert all(report.verdict(j).status == "completed" for j in accepted)


def _unrecorded_submissions(h: Harness, accepted: set[str]) -> int:
    """JobSubmitted events in the stream for jobs the gateway refused (503) after all."""
    ids = {
        json.loads(data)["job_id"]
        for subject, data in asyncio.run(read_stream(h.stack.nats_url, h.stack.namespace))
        if subject.endswith(".job.submitted")
    }
    return len(ids - accepted - set(_all_job_ids(h)))


def _all_job_ids(h: Harness) -> list[str]:
    body: dict[str, Any] = h.client.get("/v1/jobs", params={"limit": 100}).json()
    return [item["job_id"] for item in body["items"]]


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


def test_full_nats_store_refuses_with_503_and_the_backlog_drains_once_space_returns(
    h: Harness,
) -> None:
    waiting = h.submit(LONG_CLIP)
    asyncio.run(_wait_progress(h, waiting, "separator"))
    filler = asyncio.run(_fill_stream(h))
    try:
        refused = h.post_job()
        # Keep the store full while the accepted job's stages try to publish their results.
        time.sleep(4)
    finally:
        asyncio.run(_purge_filler(h))
    after = h.submit()

    report = h.checker.check(
        [waiting, after], fault="11 NATS store full, then space returns", refused=1
    )
    report.notes.append(
        f"{filler} filler bytes; refused {refused.status_code} {refused.json().get('code')}: "
        f"{refused.json().get('detail') or refused.json().get('title')}"
    )
    report.assert_nothing_lost_or_duplicated()
    assert refused.status_code == 503, refused.text
    assert refused.json()["code"] == "queue_full"
    assert all(report.verdict(j).status == "completed" for j in (waiting, after))


async def _fill_stream(h: Harness) -> int:
    """Publishes filler until the stream refuses more (discard NEW): the store is full."""
    nc = await nats.connect(h.stack.nats_url)
    js = nc.jetstream()
    written = 0
    try:
        for size in (256 << 10, 16 << 10, 1 << 10, 64):
            while True:
                try:
                    await js.publish(h.subject(f"filler.{written}"), os.urandom(size))
                except APIError:
                    break
                written += size
    finally:
        await nc.close()
    return written


async def _purge_filler(h: Harness) -> None:
    nc = await nats.connect(h.stack.nats_url)
    try:
        await nc.jetstream().purge_stream(h.stream, subject=h.subject("filler.>"))
    finally:
        await nc.close()
