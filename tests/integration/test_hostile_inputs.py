"""Hostile and corrupt uploads against the real gateway (PostgreSQL, nats-server, S3).

Each file of `tests/hostile_corpus.py` is either refused at the gateway with a problem+json
and a stable `code`, leaving no job row and no stored object, or (where the gateway cannot
tell it from a real recording) accepted. Never a 500, never a hang; the duration and
decoded-size limits are enforced from the header, before any decoding, and bounded while
decoding when the header does not say.
"""

from __future__ import annotations

import asyncio
import functools
import io
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from fastapi.testclient import TestClient

from tests import hostile_corpus as corpus
from tests.conftest import NATS_URL, delete_namespace, scratch_database
from tests.integration.test_gateway_api import api_key, submit

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

MAX_UPLOAD_BYTES = 6 << 20
VALID = corpus.valid_wav()


@functools.cache
def gigabytes_when_decoded_flac(seconds: int = 90, *, length_known: bool = True) -> bytes:
    """8 channels x 192 kHz of a constant: within the channel, rate, duration and upload
    limits, yet 90 s is 138 M samples, 553 MB as float32 (the full 10 min a reviewer found
    is 3.7 GB), and FLAC codes each constant block in a few bytes (about 150 kB here).
    `length_known=False` zeroes the STREAMINFO total, so only decoding tells the length."""
    sr, channels = 192_000, 8
    buf = io.BytesIO()
    second = np.full((sr, channels), 0.25, dtype=np.float32)
    with sf.SoundFile(buf, "w", sr, channels, format="FLAC", subtype="PCM_16") as f:
        for _ in range(seconds):
            f.write(second)
    data = bytearray(buf.getvalue())
    if not length_known:
        packed = int.from_bytes(data[8 + 13 : 8 + 18], "big") & ~((1 << 36) - 1)
        data[8 + 13 : 8 + 18] = packed.to_bytes(5, "big")
    return bytes(data)


@pytest.fixture(scope="module")
def hostile_gateway(s3_endpoint: str) -> Iterator[TestClient]:
    """One gateway for the whole corpus (default duration limit, a 6 MB upload limit).

    Module-scoped so the ~40 uploads share one database and one stream; every case uses
    its own tenant, and counts rows and objects before and after.
    """
    from voicejury_gateway.migrate import upgrade

    namespace = "t" + uuid.uuid4().hex[:10]
    with scratch_database(f"vj_{namespace}") as database_url:
        upgrade(database_url)
        yield from _gateway(namespace, database_url, s3_endpoint)


def _gateway(namespace: str, database_url: str, s3_endpoint: str) -> Iterator[TestClient]:
    from voicejury_gateway.app import create_app
    from voicejury_gateway.settings import GatewaySettings

    env = {
        "VJ_NATS_URL": NATS_URL,
        "VJ_NAMESPACE": namespace,
        "VJ_S3_ENDPOINT": s3_endpoint,
        "VJ_S3_ACCESS_KEY": "test",
        "VJ_S3_SECRET_KEY": "test",
        "VJ_S3_BUCKET": f"vj-{namespace}",
        "VJ_LOG_JSON": "false",
        "VJ_DATABASE_URL": database_url,
        "VJ_GATEWAY_MAX_UPLOAD_BYTES": str(MAX_UPLOAD_BYTES),
    }
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            with TestClient(create_app(GatewaySettings())) as client:
                yield client
    finally:
        asyncio.run(delete_namespace(NATS_URL, namespace))


def job_rows(client: TestClient) -> int:
    pool = client.app.state.services.repo.pool  # type: ignore[attr-defined]
    count: int = client.portal.call(pool.fetchval, "SELECT count(*) FROM jobs")  # type: ignore[union-attr]
    return count


def stored_objects(client: TestClient) -> list[str]:
    store = client.app.state.services.store  # type: ignore[attr-defined]
    return [o.object_name for o in store.client.list_objects(store.bucket, "jobs/", recursive=True)]


def assert_problem(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["code"] == code, body
    assert body["detail"]
    return body


@dataclass(frozen=True)
class Hostile:
    name: str
    make: Callable[[], bytes]
    status: int
    code: str


REFUSED = [
    Hostile("zero-bytes", corpus.empty, 422, "empty_audio"),
    Hostile("truncated-wav", corpus.truncated_wav, 422, "corrupt_audio"),
    Hostile("pdf-named-wav", corpus.pdf_named_wav, 415, "unsupported_media_type"),
    Hostile("png", corpus.png, 415, "unsupported_media_type"),
    Hostile("random-bytes", corpus.random_bytes, 415, "unsupported_media_type"),
    Hostile("nan-samples", corpus.nan_samples, 422, "invalid_samples"),
    Hostile("inf-samples", corpus.inf_samples, 422, "invalid_samples"),
    Hostile("far-over-full-scale", corpus.far_over_full_scale, 422, "invalid_samples"),
    Hostile("clip-0.1s", corpus.clip_0_1_s, 422, "audio_too_short"),
    Hostile("silence", corpus.silence, 422, "silent_audio"),
    Hostile("near-silence", corpus.near_silence, 422, "silent_audio"),
    Hostile("100-channels", corpus.channels_100, 422, "too_many_channels"),
    Hostile("4000-hz", lambda: corpus.sample_rate(4_000), 422, "unsupported_sample_rate"),
    Hostile("7999-hz", lambda: corpus.sample_rate(7_999), 422, "unsupported_sample_rate"),
    Hostile("192001-hz", lambda: corpus.sample_rate(192_001), 422, "unsupported_sample_rate"),
    Hostile("zero-hz-header", corpus.zero_sample_rate_wav, 415, "unsupported_media_type"),
    Hostile("zero-channels-header", corpus.zero_channels_wav, 415, "unsupported_media_type"),
    # A 4 GB data chunk over 1 s of samples: a lying header counts as truncated.
    Hostile("hours-wav-lying-header", corpus.hours_wav_lying_header, 422, "corrupt_audio"),
    Hostile("hours-flac-lying-header", corpus.hours_flac_lying_header, 413, "audio_too_long"),
    Hostile("11-min-honest-wav", corpus.honestly_long_wav, 413, "audio_too_long"),
    Hostile("thousands-of-chunks", corpus.many_chunks_wav, 422, "corrupt_audio"),
    Hostile("sun-au-format", corpus.odd_format_au, 415, "unsupported_media_type"),
    Hostile("over-upload-limit", corpus.over_upload_limit, 413, "upload_too_large"),
    Hostile("8ch-192khz-flac", gigabytes_when_decoded_flac, 413, "audio_too_large"),
]


@pytest.mark.parametrize("role", ["performance", "reference"])
@pytest.mark.parametrize("hostile", REFUSED, ids=lambda h: h.name)
def test_hostile_upload_gets_a_problem_and_leaves_no_job_and_no_object(
    hostile_gateway: TestClient, hostile: Hostile, role: str
) -> None:
    auth = api_key(hostile_gateway, f"tenant-{uuid.uuid4().hex[:8]}")
    rows, objects = job_rows(hostile_gateway), stored_objects(hostile_gateway)
    bad = hostile.make()
    perf, ref = (bad, VALID) if role == "performance" else (VALID, bad)

    r = submit(hostile_gateway, auth, perf, ref)

    body = assert_problem(r, hostile.status, hostile.code)
    assert body["detail"].startswith(f"{role}") or hostile.code == "upload_too_large"
    assert "/tmp" not in body["detail"]  # no server paths in what a client reads
    assert hostile_gateway.get("/v1/jobs", headers=auth).json()["total"] == 0
    assert job_rows(hostile_gateway) == rows
    assert stored_objects(hostile_gateway) == objects


def job_inputs(client: TestClient, job_id: str) -> dict[str, Any]:
    pool = client.app.state.services.repo.pool  # type: ignore[attr-defined]
    raw = client.portal.call(  # type: ignore[union-attr]
        pool.fetchval, "SELECT inputs FROM jobs WHERE id = $1", uuid.UUID(job_id)
    )
    inputs: dict[str, Any] = raw if isinstance(raw, dict) else __import__("json").loads(raw)
    return inputs


@pytest.mark.parametrize(
    ("name", "make", "filename", "content_type", "stored_as", "duration_s"),
    [
        ("11025-hz", lambda: corpus.sample_rate(11_025, 2.0), "a.wav", "audio/wav", "wav", 2.0),
        ("flac-named-mp3", corpus.valid_flac, "take.mp3", "audio/mpeg", "flac", 2.0),
        ("ogg-as-octet-stream", corpus.valid_ogg, "x.bin", "application/octet-stream", "ogg", 2.0),
        ("wav-named-pdf", corpus.valid_wav, "cv.pdf", "application/pdf", "wav", 2.0),
        ("multi-mb-list-chunk", corpus.huge_list_chunk_wav, "a.wav", "audio/wav", "wav", 2.0),
        # The header estimates 10 s; what decodes is ~2.8 s, and that is what the job records.
        ("cut-mp3", corpus.truncated_mp3, "a.mp3", "audio/mpeg", "mp3", 2.85),
    ],
    ids=lambda v: v if isinstance(v, str) and "/" not in v and "." not in v else "",
)
def test_what_the_gateway_cannot_tell_from_a_recording_is_accepted_as_what_it_is(
    hostile_gateway: TestClient,
    name: str,
    make: Callable[[], bytes],
    filename: str,
    content_type: str,
    stored_as: str,
    duration_s: float,
) -> None:
    auth = api_key(hostile_gateway, f"tenant-{uuid.uuid4().hex[:8]}")
    files = {
        "performance": (filename, make(), content_type),
        "reference": ("ref.wav", VALID, "audio/wav"),
    }
    r = hostile_gateway.post("/v1/jobs", files=files, headers=auth)
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    # Named and typed by its bytes, never by the client's file name or content type.
    assert f"jobs/{job_id}/input/performance.{stored_as}" in stored_objects(hostile_gateway)
    performance = job_inputs(hostile_gateway, job_id)["performance"]
    assert performance["duration_s"] == pytest.approx(duration_s, abs=0.1)


@pytest.mark.parametrize(
    ("make", "status", "code"),
    [
        (corpus.honestly_long_wav, 413, "audio_too_long"),
        (corpus.hours_flac_lying_header, 413, "audio_too_long"),
        (corpus.hours_wav_lying_header, 422, "corrupt_audio"),
        (gigabytes_when_decoded_flac, 413, "audio_too_large"),
    ],
    ids=["11-min-honest-wav", "hours-flac-header", "hours-wav-header", "8ch-192khz-flac"],
)
def test_long_or_large_audio_is_refused_from_its_header_without_decoding(
    hostile_gateway: TestClient,
    monkeypatch: pytest.MonkeyPatch,
    make: Callable[[], bytes],
    status: int,
    code: str,
) -> None:
    from voicejury_runtime.audio import check_audio_content as real_check

    decoded: list[Path] = []

    def spy(path: Path, *args: Any, **kwargs: Any) -> Any:
        decoded.append(path)
        return real_check(path, *args, **kwargs)

    monkeypatch.setattr("voicejury_gateway.uploads.check_audio_content", spy)
    auth = api_key(hostile_gateway, "acme")

    r = submit(hostile_gateway, auth, make(), VALID)

    assert_problem(r, status, code)
    assert decoded == []  # refused by probe_audio, from the header alone
    # The spy is live: a good pair is decoded, both files.
    assert submit(hostile_gateway, auth, VALID, VALID).status_code == 202
    assert len(decoded) == 2


def test_a_stream_without_a_declared_length_stops_decoding_at_the_limit(
    hostile_gateway: TestClient,
) -> None:
    """A FLAC whose STREAMINFO says 'length unknown' (legal): decoding is the only way to
    know, so it is bounded by the duration limit instead of running to the end."""
    auth = api_key(hostile_gateway, "acme")
    r = submit(hostile_gateway, auth, corpus.flac_of_unknown_length(11 * 60), VALID)
    # libsndfile decodes such a stream, or gives up on it as corrupt: either is a clean 4xx.
    assert r.status_code in (413, 422), r.text
    assert r.json()["code"] in ("audio_too_long", "corrupt_audio")


def test_a_stream_without_a_declared_length_stops_decoding_at_the_sample_limit(
    hostile_gateway: TestClient,
) -> None:
    """The 8 x 192 kHz FLAC with 'length unknown': refused once decoding passes the
    decoded-size limit (75 s of it), not after all 90 s."""
    auth = api_key(hostile_gateway, "acme")
    r = submit(hostile_gateway, auth, gigabytes_when_decoded_flac(length_known=False), VALID)
    body = assert_problem(r, 413, "audio_too_large")
    assert "over 75 s" in body["detail"]


def test_the_decoded_size_limit_cannot_be_raised_past_what_the_stages_decode() -> None:
    from pydantic import ValidationError

    from voicejury_gateway.settings import GatewaySettings
    from voicejury_runtime.audio import MAX_SAMPLES

    assert GatewaySettings().audio_limits.max_samples == MAX_SAMPLES == 600 * 96_000 * 2
    assert GatewaySettings(gateway_max_samples=1000).audio_limits.max_samples == 1000
    with pytest.raises(ValidationError, match="gateway_max_samples"):
        GatewaySettings(gateway_max_samples=MAX_SAMPLES + 1)


# --------------------------------------------------- past the gateway: the stages' own guard


def test_a_stage_refuses_audio_too_large_to_decode_permanently_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An object that reached a stage by another path (an older gateway, a hand-made
    reference): `read_audio` fails it with `invalid_audio`, a permanent error, so the job
    fails on its first delivery instead of the worker being OOM-killed on every one."""
    from voicejury_runtime.audio import read_audio
    from voicejury_runtime.errors import InvalidAudioError, PermanentStageError

    reads: list[int] = []
    real_read = sf.SoundFile.read

    def counting_read(self: sf.SoundFile, *args: Any, **kwargs: Any) -> Any:
        reads.append(1)
        return real_read(self, *args, **kwargs)

    monkeypatch.setattr(sf.SoundFile, "read", counting_read)
    path = tmp_path / "large.flac"
    path.write_bytes(gigabytes_when_decoded_flac())

    with pytest.raises(InvalidAudioError, match="too large to decode") as refused:
        read_audio(path)
    assert isinstance(refused.value, PermanentStageError)
    assert refused.value.code == "invalid_audio"
    assert reads == []  # refused from the header

    # No length in the header: decoding stops at the bound (here 1 s of it), not the end.
    path.write_bytes(gigabytes_when_decoded_flac(length_known=False))
    with pytest.raises(InvalidAudioError, match="over 1 s"):
        read_audio(path, max_samples=8 * 192_000)


# ------------------------------------------------------------------ every error is a problem


def test_unknown_routes_and_methods_are_problems(hostile_gateway: TestClient) -> None:
    assert_problem(hostile_gateway.get("/v2/nothing-here"), 404, "not_found")
    r = hostile_gateway.put("/v1/jobs", content=b"x")
    assert_problem(r, 405, "method_not_allowed")
    assert "POST" in r.headers["allow"]


def test_missing_and_wrong_credentials_are_problems(hostile_gateway: TestClient) -> None:
    r = hostile_gateway.get("/v1/jobs")
    assert_problem(r, 401, "unauthenticated")
    assert r.headers["www-authenticate"] == "Bearer"
    assert_problem(
        hostile_gateway.get("/v1/jobs", headers={"X-API-Key": "vj_guess"}), 401, "invalid_api_key"
    )


def test_invalid_fields_are_422_problems(hostile_gateway: TestClient) -> None:
    auth = api_key(hostile_gateway, "acme")
    body = assert_problem(
        hostile_gateway.get("/v1/jobs?limit=0", headers=auth), 422, "invalid_request"
    )
    assert body["errors"][0]["loc"] == ["query", "limit"]
    assert_problem(hostile_gateway.get("/v1/jobs/not-a-uuid", headers=auth), 404, "job_not_found")
    r = submit(hostile_gateway, auth, VALID, VALID, language="english")
    assert_problem(r, 422, "unsupported_language")
    r = submit(hostile_gateway, auth, VALID, VALID, lyrics="la " * 10_000)
    assert_problem(r, 422, "invalid_request")
    # Over the multipart parser's 1 MB per field: the same answer, not its 400.
    r = submit(hostile_gateway, auth, VALID, VALID, lyrics="la " * 700_000)
    assert_problem(r, 422, "invalid_request")


def test_out_of_range_numbers_are_refused_not_passed_to_the_database(
    hostile_gateway: TestClient,
) -> None:
    auth = api_key(hostile_gateway, "acme")
    r = hostile_gateway.get(f"/v1/jobs?limit={2**63}", headers=auth)
    assert_problem(r, 422, "invalid_request")
    job_id = submit(hostile_gateway, auth, VALID, VALID).json()["job_id"]
    hostile_gateway.delete(f"/v1/jobs/{job_id}", headers=auth)  # a stream that ends
    for last_event_id in (str(2**63), "9" * 5_000, "-1", "x"):
        r = hostile_gateway.get(
            f"/v1/jobs/{job_id}/events", headers={**auth, "Last-Event-ID": last_event_id}
        )
        assert r.status_code in (200, 400), (last_event_id, r.text)


def test_text_the_database_cannot_store_is_refused(hostile_gateway: TestClient) -> None:
    """PostgreSQL text and jsonb refuse U+0000: it must be a 422, not a failed INSERT."""
    auth = api_key(hostile_gateway, "acme")
    rows = job_rows(hostile_gateway)
    r = submit(hostile_gateway, auth, VALID, VALID, lyrics="la\x00la")
    assert_problem(r, 422, "invalid_request")
    assert job_rows(hostile_gateway) == rows


def test_a_malformed_multipart_body_is_a_400_problem(hostile_gateway: TestClient) -> None:
    auth = api_key(hostile_gateway, "acme")
    r = hostile_gateway.post(
        "/v1/jobs",
        content=b"--b\r\nContent-Disposition: form-data; name=\r\n\r\nx",
        headers={**auth, "Content-Type": "multipart/form-data; boundary=b"},
    )
    assert 400 <= r.status_code < 500, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["code"]


def test_a_body_declared_over_the_bound_is_refused_before_it_is_read(
    hostile_gateway: TestClient,
) -> None:
    auth = api_key(hostile_gateway, "acme")
    r = hostile_gateway.post(
        "/v1/jobs",
        content=b"\0" * (2 * MAX_UPLOAD_BYTES + (2 << 20)),
        headers={**auth, "Content-Type": "multipart/form-data; boundary=b"},
    )
    assert_problem(r, 413, "upload_too_large")


def test_a_reference_body_is_bounded_by_one_upload_not_two(
    hostile_gateway: TestClient,
) -> None:
    """POST /v1/references takes one recording: a body past one upload and the form's
    allowance is refused before it is read (invalid multipart here: parsing it would
    answer 400), as a job's is past two."""
    auth = api_key(hostile_gateway, "acme")
    r = hostile_gateway.post(
        "/v1/references",
        content=b"\0" * (MAX_UPLOAD_BYTES + (2 << 20)),
        headers={**auth, "Content-Type": "multipart/form-data; boundary=b"},
    )
    assert_problem(r, 413, "upload_too_large")


def test_a_chunked_body_is_cut_off_at_the_bound(hostile_gateway: TestClient) -> None:
    """No Content-Length to refuse by: the middleware counts what arrives."""
    auth = api_key(hostile_gateway, "acme")
    head = (
        b'--b\r\nContent-Disposition: form-data; name="performance"; filename="p.wav"\r\n'
        b"Content-Type: audio/wav\r\n\r\n"
    )

    def body() -> Iterator[bytes]:
        yield head
        for _ in range(2 * MAX_UPLOAD_BYTES // (1 << 20) + 4):
            yield b"\0" * (1 << 20)

    r = hostile_gateway.post(
        "/v1/jobs",
        content=body(),
        headers={**auth, "Content-Type": "multipart/form-data; boundary=b"},
    )
    assert "content-length" not in {k.lower() for k in r.request.headers}
    assert_problem(r, 413, "upload_too_large")


async def test_the_limit_middleware_stops_reading_at_the_bound() -> None:
    """At the ASGI level: a slow, endless body is not read past the bound."""
    from starlette.types import Message

    from voicejury_gateway.uploads import UploadLimitMiddleware

    reads = 0
    sent: list[Message] = []

    async def endless() -> Message:
        nonlocal reads
        reads += 1
        return {"type": "http.request", "body": b"\0" * 1000, "more_body": True}

    async def send(message: Message) -> None:
        sent.append(message)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while (await receive())["more_body"]:
            pass

    scope = {"type": "http", "method": "POST", "path": "/v1/jobs", "headers": []}
    await asyncio.wait_for(UploadLimitMiddleware(app, 10_000)(scope, endless, send), 5)
    assert reads == 11
    assert sent[0]["status"] == 413
