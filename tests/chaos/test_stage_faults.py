"""Faults of the pipeline's own processes, on the shared nats-server and PostgreSQL.

One stack (five stages, two gateway replicas) serves the module; each test submits its own
jobs and leaves every process running as planned. RELIABILITY.md numbering.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, NamedTuple

import asyncpg
import httpx
import nats
import pytest
from minio import Minio

from tests import hostile_corpus as corpus
from tests.chaos.checker import (
    STAGE_OUTPUTS,
    published_at,
    read_stream_with_headers,
    stream_counts,
)
from tests.chaos.harness import CHAOS_ENV, LONG_CLIP, SHORT_CLIP, Harness, restarted_with
from tests.conftest import NATS_URL, delete_namespace, keep_every_message
from voicejury_contracts import (
    SCHEMA_VERSION,
    AudioInput,
    JobFailed,
    JobOptions,
    JobSubmitted,
    ObjectRef,
    Role,
    SourceKind,
    Stage,
    StreamSpec,
)
from voicejury_devstack.sse import SSEEvent, SSEParser, follow_events
from voicejury_devstack.stack import LocalStack
from voicejury_gateway.db import JobRepository, create_pool

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

TENANT = "chaos"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    namespace = "c" + uuid.uuid4().hex[:10]
    services = ("separator", "pitch", "asr", "scorer", "jury", "gateway", "gateway_b")
    with LocalStack(
        namespace,
        tmp_path_factory.mktemp("chaos-stages"),
        env_overrides=CHAOS_ENV,
        services=services,
        tenant=TENANT,
    ) as st:
        asyncio.run(keep_every_message(st.nats_url, namespace))  # the checker's evidence
        yield st
    asyncio.run(delete_namespace(NATS_URL, namespace))


@pytest.fixture(scope="module")
def h(stack: LocalStack) -> Iterator[Harness]:
    with httpx.Client(
        base_url=stack.base_url,
        headers={"Authorization": f"Bearer {stack.api_key}"},
        timeout=httpx.Timeout(30.0, read=60.0),
    ) as client:
        yield Harness(stack, client)


def _inside_work(event: dict[str, Any]) -> bool:
    """A progress report from inside a stage's work (past its "started" report)."""
    return float(event["fraction"]) > 0


# -- 1. SIGKILL a stage mid-job ------------------------------------------------------------


def _started(event: dict[str, Any]) -> bool:
    return float(event["fraction"]) == 0


# Each stage, its input and the progress report the kill waits for: one after which the
# stage has work left (asserted: the killed delivery did not commit, so a second ran).
KILL_CASES = [
    # The separator reports progress from inside the model's chunks.
    pytest.param("separator", LONG_CLIP, "mix", _inside_work, 1, id="separator"),
    # Seconds of model work on 33 s of singing follow the "started" report.
    pytest.param("pitch", LONG_CLIP, "vocals", None, 1, id="pitch"),
    pytest.param("asr", LONG_CLIP, "vocals", None, 1, id="asr"),
    # The scorer notes the first of a job's two inputs without a report and starts with
    # the second: S3 reads, alignment and an S3 write follow its "started" report.
    pytest.param("scorer", LONG_CLIP, "vocals", _started, 1, id="scorer"),
    # Seconds of waiting on a model that never answers follow the "started" report
    # (`_silent_jury_model`).
    pytest.param("jury", SHORT_CLIP, "vocals", None, 1, id="jury"),
]


@pytest.mark.parametrize(("stage", "clip", "performance_kind", "when", "occurrence"), KILL_CASES)
def test_stage_killed_mid_job_is_redelivered_and_the_job_completes_with_one_effect(
    h: Harness,
    stage: str,
    clip: Path,
    performance_kind: str,
    when: Callable[[dict[str, Any]], bool] | None,
    occurrence: int,
) -> None:
    with _silent_jury_model(h) if stage == "jury" else nullcontext():
        try:
            job_id = h.submit_and_kill(
                stage, clip, when=when, occurrence=occurrence, performance_kind=performance_kind
            )
        finally:
            h.stack.restart(stage, env_overrides={})  # as planned

    report = h.checker.check([job_id], fault=f"1 SIGKILL {stage} mid-job")
    attempts = report.verdict(job_id).attempts.get(stage, 0)
    report.notes.append(f"{stage} attempts={attempts}")
    report.assert_nothing_lost_or_duplicated()
    assert report.verdict(job_id).status == "completed"
    assert stream_counts(h.stack, [job_id])[job_id][STAGE_OUTPUTS[stage]] == 1
    # The kill hit work in flight: a delivery that had committed its effect before dying
    # would be acked as a duplicate on redelivery, without a second "started" report.
    assert attempts >= 2, f"the kill landed after {stage} had finished: attempts={attempts}"


@contextmanager
def _silent_jury_model(h: Harness, call_timeout_s: float | None = None) -> Iterator[None]:
    """The jury restarted with a model whose endpoint accepts connections and never
    answers, so that it deliberates for its whole call timeout (3 s by default) before
    falling back. The test restarts it as planned (no models: the deterministic jury)."""
    timeouts = (
        {
            "VJ_JURY_CALL_TIMEOUT_S": str(call_timeout_s),
            "VJ_JURY_TOTAL_BUDGET_S": str(call_timeout_s),
        }
        if call_timeout_s
        else {}
    )
    with socket.create_server(("127.0.0.1", 0)) as silent:  # the kernel accepts; nobody reads
        port = silent.getsockname()[1]
        h.stack.restart(
            "jury",
            env_overrides={
                "VJ_JURY_MODELS": '["openai/gpt-4o-mini"]',
                "VJ_JURY_API_BASE": f"http://127.0.0.1:{port}/v1",
                "VJ_JURY_API_KEY": "unused",
                **timeouts,
            },
        )
        yield


# -- 2. SIGTERM a stage mid-job ------------------------------------------------------------

# The grace a stage gives its in-flight message on SIGTERM is its ack wait (6 s here); the
# silent model keeps the jury waiting far past it, so that the jury must hand the message back.
JURY_PAST_THE_GRACE_S = 60.0


# Each stage at the moment the kill test hits it (KILL_CASES), signalled from the coroutine
# that saw the progress report: work is left after it, and the test checks that the signal
# landed before the stage's output was stored.
@pytest.mark.parametrize(("stage", "clip", "performance_kind", "when", "occurrence"), KILL_CASES)
def test_sigterm_mid_job_finishes_within_grace_or_hands_the_message_back(
    h: Harness,
    stage: str,
    clip: Path,
    performance_kind: str,
    when: Callable[[dict[str, Any]], bool] | None,
    occurrence: int,
) -> None:
    output = STAGE_OUTPUTS[stage]
    slow = _silent_jury_model(h, JURY_PAST_THE_GRACE_S) if stage == "jury" else nullcontext()
    with slow:
        try:
            job_id, signalled_at = h.submit_and_signal(
                stage,
                signal.SIGTERM,
                clip,
                when=when,
                occurrence=occurrence,
                performance_kind=performance_kind,
            )
            # The broker's graceful timeout (the ack wait) bounds the in-flight handler.
            try:
                h.stack.process(stage).wait(timeout=45)
            except subprocess.TimeoutExpired:
                h.stack.kill(stage, signal.SIGKILL)
                pytest.fail(f"{stage} did not exit within 45 s of SIGTERM")
            exit_s = time.time() - signalled_at
            published = stream_counts(h.stack, [job_id]).get(job_id, {}).get(output, 0)
        finally:
            h.stack.restart(stage, env_overrides={})  # as planned

    report = h.checker.check([job_id], fault=f"2 SIGTERM {stage} mid-job")
    attempts = report.verdict(job_id).attempts.get(stage, 0)
    stored_at = asyncio.run(published_at(h.stack.nats_url, h.stack.namespace, output, job_id))
    after_s = [round(t - signalled_at, 2) for t in stored_at]
    report.notes.append(
        f"exit after {exit_s:.1f} s; "
        + ("finished within the grace" if published else "handed back")
        + f"; output stored {after_s} s after the signal; {stage} attempts={attempts}"
    )
    report.assert_nothing_lost_or_duplicated()
    assert report.verdict(job_id).status == "completed"
    assert len(stored_at) == 1, stored_at
    # Mid-work: the stage's one output was stored after the signal, by the signalled
    # delivery within its grace or by the redelivery of the message it handed back.
    assert stored_at[0] > signalled_at, f"{stage} had published before the signal: {after_s}"
    assert attempts == (1 if published else 2), (published, attempts)
    if stage == "jury":
        assert not published, "the jury cannot have finished a 60 s model call in the grace"


def test_sigterm_during_work_longer_than_the_grace_hands_the_message_back(h: Harness) -> None:
    # Full CREPE as plain 1-D convolutions takes over a minute on the 33 s clip: far past
    # the grace period (the ack wait, 6 s here), so the stage must hand the message back.
    slow = {"VJ_PITCH_MODEL_PERFORMANCE": "full", "VJ_PITCH_CONVOLUTION": "conv1d"}
    h.stack.restart("pitch", env_overrides=slow)
    job_id = h.submit_and_wait_for("pitch", LONG_CLIP, when=_inside_work, performance_kind="vocals")
    process = h.stack.process("pitch")
    t0 = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=45)
    except subprocess.TimeoutExpired:
        h.stack.kill("pitch", signal.SIGKILL)
        pytest.fail("pitch did not exit within 45 s of SIGTERM")
    exit_s = time.monotonic() - t0
    published = stream_counts(h.stack, [job_id]).get(job_id, {}).get("analysis.pitch", 0)
    h.stack.restart("pitch", env_overrides={})  # as planned: the redelivery runs quickly

    report = h.checker.check([job_id], fault="2 SIGTERM pitch, work longer than the grace")
    attempts = report.verdict(job_id).attempts.get("pitch", 0)
    report.notes.append(f"exit after {exit_s:.1f} s; handed back; pitch attempts={attempts}")
    report.assert_nothing_lost_or_duplicated()
    assert published == 0, "the handler cannot have finished a minute of work in the grace"
    assert report.verdict(job_id).status == "completed"
    assert attempts == 2, attempts
    assert stream_counts(h.stack, [job_id])[job_id]["analysis.pitch"] == 1


# -- 5. duplicate and replayed events ------------------------------------------------------

STAGES = ("separator", "pitch", "asr", "scorer", "jury")
# The stages whose consumer takes each input (their filters in the topology).
CONSUMED_BY: dict[str, tuple[str, ...]] = {
    "job.submitted": ("separator",),
    "stems.separated": ("pitch", "asr"),
    "analysis.pitch": ("scorer",),
    "analysis.transcript": ("scorer",),
    "job.scored": ("jury",),
}
# The jobs stream's Nats-Msg-Id window while the test replays events past it: short enough
# to wait out, set through `VJ_STREAM_DUPLICATE_WINDOW_S` like any deployment's.
SHORT_DUPLICATE_WINDOW_S = 2.0


def test_duplicate_and_replayed_events_produce_no_second_effect(h: Harness) -> None:
    done = h.submit()
    assert h.checker.check([done], fault=None).verdict(done).status == "completed"
    originals = _job_messages(h, done)

    # The same event again with its own Nats-Msg-Id, within the dedup window: dropped.
    submitted = originals["job.submitted"]
    assert h.publish_raw("job.submitted", submitted.data, submitted.msg_id).duplicate

    # Every process sets the stream's settings as it starts: a replica of the gateway
    # restarted with a short window shortens it for all, and its planned restart at the
    # end of the block puts the 20 minutes back. The stages' outputs, republished under
    # their fixed ids by a stage that ran twice, are then no longer dropped by JetStream:
    # only the stages' own idempotency stands between a replay and a second effect.
    short = {"VJ_STREAM_DUPLICATE_WINDOW_S": str(SHORT_DUPLICATE_WINDOW_S)}
    with restarted_with(h.stack, "gateway_b", short):
        assert _duplicate_window_s(h) == SHORT_DUPLICATE_WINDOW_S
        before = {stage: h.stage_deliveries(stage) for stage in STAGES}
        # A replayed stream: every input and the terminal event again under fresh ids...
        replayed = [*CONSUMED_BY, "job.completed"]
        for suffix in replayed:
            h.publish_raw(suffix, originals[suffix].data, f"replay-{uuid.uuid4()}")
        # ...and under their own ids once the window has passed, when JetStream takes them.
        waited_s = _publish_past_the_window(h, [originals[suffix] for suffix in replayed])
        # A superseded copy's failure arriving after the job completed: the job stays
        # completed, with one terminal event in its log.
        stale = JobFailed(
            job_id=uuid.UUID(done),
            stage=Stage.PITCH,
            code="retries_exhausted",
            message="pitch failed 5 times; last error: a superseded copy",
            attempts=5,
        )
        h.publish_raw("job.failed", stale.model_dump_json().encode(), f"stale-{uuid.uuid4()}")
        h.wait_consumers_idle()
        replays = {stage: _added(before[stage], h.stage_deliveries(stage)) for stage in STAGES}

        # A duplicate delivered while the job is still running (before any effect exists).
        before_running = h.stage_deliveries("separator")
        running = h.submit()
        running_submitted = _job_messages(h, running)["job.submitted"]
        h.publish_raw("job.submitted", running_submitted.data, f"again-{uuid.uuid4()}")

        injected = {
            done: {**dict.fromkeys(replayed, 2), "job.failed": 1},
            running: {"job.submitted": 1},
        }
        report = h.checker.check(
            [done, running], fault="5 duplicate + replayed events", injected=injected
        )
        separator_running = _added(before_running, h.stage_deliveries("separator"))
    report.notes.append(
        f"each input and job.completed replayed under a fresh id, then under its own past a "
        f"{SHORT_DUPLICATE_WINDOW_S:.0f} s dedup window ({waited_s:.1f} s of retries until "
        f"JetStream took them all); a stale job.failed; deliveries the replays added per "
        f"stage: {replays}; separator on a duplicate while running: {separator_running}"
    )
    report.assert_nothing_lost_or_duplicated()
    # Each stage handled every replay it was sent, as a duplicate: none ran a second time.
    for stage in STAGES:
        sent = 2 * sum(stage in stages for stages in CONSUMED_BY.values())
        assert replays[stage] == {"duplicate": sent}, (stage, replays)
    assert separator_running.get("ok") == 1, separator_running
    assert set(separator_running) <= {"ok", "duplicate"}, separator_running
    assert separator_running.get("duplicate", 0) >= 1, separator_running
    assert report.verdict(done).status == "completed"
    counts = stream_counts(h.stack, [done, running])
    # The replays are in the stream (as many more of each input), with no effect of their own.
    for job_id in (done, running):
        for subject in {*STAGE_OUTPUTS.values(), "job.submitted", "job.failed"}:
            expected = int(subject != "job.failed") + injected[job_id].get(subject, 0)
            assert counts[job_id].get(subject, 0) == expected, (job_id, subject, counts)
    assert _duplicate_window_s(h) == StreamSpec.duplicate_window_s  # as planned again


class _Stored(NamedTuple):
    suffix: str
    data: bytes
    msg_id: str | None


def _job_messages(h: Harness, job_id: str) -> dict[str, _Stored]:
    """The first message of each subject the stream holds for the job, with its id."""
    found: dict[str, _Stored] = {}
    messages = asyncio.run(read_stream_with_headers(h.stack.nats_url, h.stack.namespace))
    for subject, data, headers in messages:
        if json.loads(data).get("job_id") == job_id:
            suffix = subject.removeprefix(h.stack.namespace + ".")
            found.setdefault(suffix, _Stored(suffix, data, (headers or {}).get("Nats-Msg-Id")))
    return found


def _publish_past_the_window(h: Harness, messages: list[_Stored]) -> float:
    """Publishes each message under its own id again, retrying while JetStream still drops
    it as a duplicate; returns how long the window took to pass."""
    t0 = time.monotonic()
    deadline = t0 + 5 * SHORT_DUPLICATE_WINDOW_S + 10
    for message in messages:
        assert message.msg_id, message
        while h.publish_raw(message.suffix, message.data, message.msg_id).duplicate:
            assert time.monotonic() < deadline, f"{message.msg_id} still deduplicated"
            time.sleep(0.5)
    return time.monotonic() - t0


def _duplicate_window_s(h: Harness) -> float:
    async def run() -> float:
        nc = await nats.connect(h.stack.nats_url)
        try:
            info = await nc.jetstream().stream_info(h.stream)
            return float(info.config.duplicate_window or 0)
        finally:
            await nc.close()

    return asyncio.run(run())


def _added(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What a stage's deliveries counter gained, by outcome (the outcomes that moved)."""
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}


# -- 7. poison messages --------------------------------------------------------------------


def test_an_invalid_event_fails_its_job_at_once_and_other_jobs_keep_flowing(h: Harness) -> None:
    poisoned = asyncio.run(_record_job(h.stack, _submitted(h.stack, uuid.uuid4())))
    # The right subject, a real job id, a body that breaks the contract.
    h.publish_raw(
        "job.submitted",
        json.dumps(
            {"job_id": poisoned, "schema_version": SCHEMA_VERSION, "performance": 42}
        ).encode(),
    )
    healthy = h.submit()

    report = h.checker.check(
        [poisoned, healthy], fault="7 invalid event", allowed_failures={"invalid_event"}
    )
    report.assert_nothing_lost_or_duplicated()
    failed = report.verdict(poisoned)
    assert failed.status == "failed"
    assert failed.error is not None
    assert (failed.error["code"], failed.error["stage"]) == ("invalid_event", "separator")
    assert h.job(poisoned)["stages"]["separator"]["attempts"] <= 1  # no retry loop
    assert report.verdict(healthy).status == "completed"
    sse = _sse_failure(h, poisoned)
    assert (sse["code"], sse["stage"], sse["attempts"]) == ("invalid_event", "separator", 1)
    assert sse["message"] == failed.error["message"]


@pytest.mark.parametrize(
    ("announced", "code"),
    [
        # What the gateway's decoder accepted and a stage's cannot read: the checksum
        # matches, the bytes are a PDF.
        ("the PDF's own checksum", "invalid_audio"),
        # The object was replaced after the gateway stored it: the checksum the event
        # carries no longer matches.
        ("the original recording's checksum", "corrupt_object"),
    ],
)
def test_bad_audio_past_the_gateway_fails_its_job_on_the_first_delivery(
    h: Harness, announced: str, code: str
) -> None:
    pdf = corpus.pdf_named_wav()
    if code == "invalid_audio":
        submitted = _submitted(h.stack, uuid.uuid4(), hashlib.sha256(pdf).hexdigest(), len(pdf))
    else:
        submitted = _submitted(h.stack, uuid.uuid4())
    s3 = Minio(
        h.stack.s3_endpoint, access_key=h.stack.s3_access_key, secret_key="test", secure=False
    )
    for audio in (submitted.performance, submitted.reference):
        s3.put_object(h.stack.bucket, audio.original.key, io.BytesIO(pdf), len(pdf))
    bad = asyncio.run(_record_job(h.stack, submitted))
    h.publish_raw("job.submitted", submitted.model_dump_json().encode())
    healthy = h.submit()

    report = h.checker.check(
        [bad, healthy],
        fault=f"6 a PDF in the store, announced with {announced}",
        allowed_failures={code},
    )
    failed = report.verdict(bad)
    assert failed.error is not None
    report.notes.append(failed.error["message"][:160])
    report.assert_nothing_lost_or_duplicated()
    assert (failed.error["code"], failed.error["stage"]) == (code, "separator")
    assert h.job(bad)["stages"]["separator"]["attempts"] == 1  # no retry loop
    assert report.verdict(healthy).status == "completed"  # the worker stayed up


def test_a_stage_that_always_fails_retries_to_the_bound_then_fails_the_job(h: Harness) -> None:
    # A valid event whose audio is not in the store: every delivery fails the same way.
    doomed = asyncio.run(_record_job(h.stack, _submitted(h.stack, uuid.uuid4())))
    h.publish_raw(
        "job.submitted", _submitted(h.stack, uuid.UUID(doomed)).model_dump_json().encode()
    )
    healthy = h.submit()

    report = h.checker.check(
        [doomed, healthy], fault="7 stage always fails", allowed_failures={"retries_exhausted"}
    )
    failed = report.verdict(doomed)
    assert failed.error is not None
    report.notes.append(failed.error["message"][:160])
    report.assert_nothing_lost_or_duplicated()
    assert (failed.error["code"], failed.error["stage"]) == ("retries_exhausted", "separator")
    assert "failed 5 times; last error" in failed.error["message"]
    assert h.job(doomed)["stages"]["separator"]["attempts"] == 5  # VJ_MAX_DELIVER default
    assert report.verdict(healthy).status == "completed"
    sse = _sse_failure(h, doomed)
    assert (sse["code"], sse["stage"], sse["attempts"]) == ("retries_exhausted", "separator", 5)
    assert sse["message"] == failed.error["message"]


def _sse_failure(h: Harness, job_id: str) -> dict[str, Any]:
    """The data of the job's terminal SSE event (replayed from the start), which must be
    its one `failed` event: what a client following the job sees of the failure."""
    events = list(follow_events(h.client, f"/v1/jobs/{job_id}/events"))
    terminal = [e for e in events if e.event in ("completed", "failed", "cancelled")]
    assert [e.event for e in terminal] == ["failed"], [e.event for e in events]
    data: dict[str, Any] = json.loads(terminal[0].data)
    return data


def _submitted(
    stack: LocalStack, job_id: uuid.UUID, sha256: str = "0" * 64, size: int = 1000
) -> JobSubmitted:
    """A job whose two recordings are announced at their usual keys with this checksum."""

    def audio(role: Role) -> AudioInput:
        ref = ObjectRef(
            bucket=stack.bucket,
            key=f"jobs/{job_id}/input/{role.value}.wav",
            sha256=sha256,
            size=size,
            content_type="audio/wav",
        )
        return AudioInput(
            role=role,
            kind=SourceKind.VOCALS,
            original=ref,
            duration_s=9.0,
            sample_rate=44100,
            channels=1,
        )

    return JobSubmitted(
        job_id=job_id,
        tenant=TENANT,
        performance=audio(Role.PERFORMANCE),
        reference=audio(Role.REFERENCE),
        options=JobOptions(),
    )


async def _record_job(stack: LocalStack, submitted: JobSubmitted) -> str:
    """Records a queued job as the gateway does, without publishing its event."""
    pool = await create_pool(stack.database_url, 1)
    try:
        return str(await JobRepository(pool).insert_job(submitted, None, max_active=1 << 30))
    finally:
        await pool.close()


# -- 8. long work without and with heartbeats ----------------------------------------------

# A redelivery needs a puller: with one worker busy on the message, JetStream has nobody
# to redeliver to, and the late ack is still accepted. A second worker (as a second replica
# would) is free to receive the redelivery while the first one is still working.
TWO_WORKERS = {"VJ_CONCURRENCY": "2"}
# Long work: full CREPE on the 33 s take, about 15 s, well past either ack wait below (the
# reference's contour may come from the cache, so the performance must carry the time).
LONG_PITCH = {
    **TWO_WORKERS,
    "VJ_PITCH_MODEL_PERFORMANCE": "full",
    "VJ_PITCH_CONVOLUTION": "spectral",
}


def test_long_stage_without_heartbeats_is_redelivered_and_with_heartbeats_is_not(
    h: Harness,
) -> None:
    # The ack wait drops to 2 s while pitch works for about 15 s.
    with restarted_with(h.stack, "pitch", {**LONG_PITCH, "VJ_HEARTBEATS": "false"}):
        ack_wait_s = h.set_ack_wait("pitch", 2.0)
        try:
            unbeaten = h.submit(LONG_CLIP)
            report = h.checker.check(
                [unbeaten],
                fault="8 long stage, no heartbeats",
                allowed_failures={"stage_crashed"},
            )
            h.wait_consumers_idle()
            deliveries = _deliveries(h)
        finally:
            h.set_ack_wait("pitch", ack_wait_s)
    report.notes.append(
        f"pitch deliveries without heartbeats: {deliveries}, "
        f"attempts {report.verdict(unbeaten).attempts.get('pitch')}"
    )
    report.assert_nothing_lost_or_duplicated()
    # The redelivered copy runs beside the first one: seen as attempt 2 in the job's record
    # (its "started" progress), and in the deliveries metric once it has finished.
    pitch_attempts = report.verdict(unbeaten).attempts.get("pitch", 0)
    assert pitch_attempts >= 2 or sum(deliveries.values()) >= 2, (pitch_attempts, deliveries)

    with restarted_with(h.stack, "pitch", LONG_PITCH):  # heartbeats every 1.5 s, ack wait 6 s
        beaten = h.submit(LONG_CLIP)
        report = h.checker.check([beaten], fault="8 long stage, heartbeats")
        h.wait_consumers_idle()
        deliveries = _deliveries(h)
    report.notes.append(f"pitch deliveries with heartbeats: {deliveries}")
    report.assert_nothing_lost_or_duplicated()
    assert report.verdict(beaten).status == "completed"
    assert deliveries == {"ok": 1.0}, deliveries
    assert report.verdict(beaten).attempts["pitch"] == 1


def _deliveries(h: Harness) -> dict[str, float]:
    return {k: v for k, v in h.stage_deliveries("pitch").items() if v}


# -- 10. SSE reconnects across a dying gateway replica ---------------------------------------


def test_sse_resumes_after_a_gateway_replica_dies_without_missing_or_repeating(
    h: Harness,
) -> None:
    job_id = h.submit(LONG_CLIP)
    before: list[SSEEvent] = []
    url = f"{h.stack.http_url('gateway_b')}/v1/jobs/{job_id}/events"
    headers = {"Authorization": f"Bearer {h.stack.api_key}", "Accept": "text/event-stream"}
    with (
        httpx.Client(timeout=httpx.Timeout(30.0, read=60.0)) as raw,
        raw.stream("GET", url, headers=headers) as response,
    ):
        assert response.status_code == 200
        parser = SSEParser()
        for line in response.iter_lines():
            if (event := parser.feed(line)) is not None:
                before.append(event)
                if len(before) >= 3:
                    # The replica dies while this stream is open, mid-job.
                    h.stack.kill("gateway_b", signal.SIGKILL)
                    break
    assert before[-1].event not in ("completed", "failed"), "the job ended too soon"

    h.stack.restart("gateway_b")
    with httpx.Client(
        base_url=h.stack.http_url("gateway_b"),
        headers={"Authorization": f"Bearer {h.stack.api_key}"},
        timeout=httpx.Timeout(30.0, read=60.0),
    ) as b:
        after = list(follow_events(b, f"/v1/jobs/{job_id}/events", last_event_id=before[-1].id))
    replay = list(follow_events(h.client, f"/v1/jobs/{job_id}/events"))  # the other replica

    report = h.checker.check([job_id], fault="10 SSE resume across a replica death")
    report.notes.append(f"{len(before)} events before the kill, {len(after)} after")
    report.assert_nothing_lost_or_duplicated()
    assert _key(before + after) == _key(replay)
    assert [e.event for e in replay].count("completed") == 1


def _key(events: list[SSEEvent]) -> list[tuple[str | None, str, Any]]:
    return [(e.id, e.event, json.loads(e.data)) for e in events]


# -- 9. a flood of submissions (last: when it fails it leaves a backlog behind) -------


def test_a_flood_of_submissions_is_refused_beyond_the_backlog_bound(h: Harness) -> None:
    bound = 3
    with restarted_with(h.stack, "gateway", {"VJ_GATEWAY_MAX_BACKLOG": str(bound)}):
        rss_before = _rss_mib(h.stack.process("gateway").pid)
        with ThreadPoolExecutor(max_workers=4) as pool:
            answers = list(pool.map(lambda _: h.post_job(), range(8)))
        active = asyncio.run(_active_jobs(h.stack))
        rss_after = _rss_mib(h.stack.process("gateway").pid)
        accepted = [r.json()["job_id"] for r in answers if r.status_code == 202]
        refused = [r for r in answers if r.status_code != 202]
        report = h.checker.check(accepted, fault="9 flood", refused=len(refused))
    report.notes.append(
        f"8 concurrent submissions, bound {bound}: {len(accepted)} accepted, "
        f"{len(refused)} refused, {active} active right after; gateway RSS "
        f"{rss_before:.0f} -> {rss_after:.0f} MiB"
    )
    report.assert_nothing_lost_or_duplicated()
    for r in refused:
        assert r.status_code == 503, r.text
        assert r.json()["code"] == "pipeline_saturated"
        assert "retry-after" in r.headers
    assert len(accepted) <= bound, f"{len(accepted)} accepted with a backlog bound of {bound}"
    assert active <= bound
    assert rss_after - rss_before < 300


async def _active_jobs(stack: LocalStack) -> int:
    con = await asyncpg.connect(stack.database_url)
    try:
        n: int = await con.fetchval(
            "SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')"
        )
        return n
    finally:
        await con.close()


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0
