"""The gateway when a dependency fails halfway through a request (real PostgreSQL,
nats-server and S3; the failing call is swapped for one raising what the real client
raises, since the shared servers cannot be restarted under one test).

- An Idempotency-Key retry while the first request still waits for JetStream is told to
  come back (409), never handed a 202 for a job that may not run.
- Uploads stored before the submission's row commits do not outlive a failed submission.
- An open SSE stream outlives a database outage and resumes where it stopped.
"""

from __future__ import annotations

import asyncio
import functools
import math
import threading
import time
import uuid
from typing import Any

import asyncpg
import nats.errors
import pytest
import urllib3.exceptions
from fastapi.testclient import TestClient

from tests.audio_fixtures import sung_tone
from tests.integration.test_gateway_api import api_key, gateway, housekeeper, submit

pytestmark = pytest.mark.integration

__all__ = ["gateway"]  # the fixture, shared with test_gateway_api


def postgres_restarting(*args: Any, **kwargs: Any) -> Any:
    """What asyncpg raises while PostgreSQL restarts."""

    async def refuse(*args: Any, **kwargs: Any) -> Any:
        raise asyncpg.exceptions.CannotConnectNowError("the database system is starting up")

    return refuse


def as_a_server(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """The client sees the 503 the error handler sends, as through a real server."""
    monkeypatch.setattr(client._transport, "raise_server_exceptions", False)


def objects(client: TestClient, prefix: str) -> list[str]:
    store = client.app.state.services.store  # type: ignore[attr-defined]
    listed = store.client.list_objects(store.bucket, prefix, recursive=True)
    return sorted(o.object_name for o in listed)


# ------------------------------------------------------------------------ Idempotency-Key


@pytest.mark.parametrize("outcome", ["acknowledged", "refused"])
def test_a_retry_while_the_first_request_waits_for_jetstream_is_told_to_come_back(
    gateway: TestClient, monkeypatch: pytest.MonkeyPatch, outcome: str
) -> None:
    """The client times out and retries under its key while the gateway still waits for
    JetStream's ack: 409 `idempotency_key_in_flight` with Retry-After, not a 202. Then the
    retry gets what the first request got: the job once acknowledged; a fresh job once
    the first was refused (503), since no request under the key was ever told 202."""
    services = gateway.app.state.services  # type: ignore[attr-defined]
    as_a_server(gateway, monkeypatch)
    keyed = {**api_key(gateway, "acme"), "Idempotency-Key": "take-7"}
    perf, ref = sung_tone(), sung_tone(f0_hz=247.0)
    publishing, release = threading.Event(), threading.Event()
    real_publish = services.bus.publish

    async def held(event: Any, **kwargs: Any) -> None:
        publishing.set()
        await asyncio.to_thread(release.wait, 30)
        if outcome == "refused":
            raise nats.errors.TimeoutError()
        await real_publish(event, **kwargs)

    monkeypatch.setattr(services.bus, "publish", held)
    first: dict[str, Any] = {}
    waiting = threading.Thread(target=lambda: first.update(r=submit(gateway, keyed, perf, ref)))
    waiting.start()
    try:
        assert publishing.wait(30)
        retry = submit(gateway, keyed, perf, ref)
    finally:
        release.set()
        waiting.join(30)
    assert retry.status_code == 409, retry.text
    assert retry.json()["code"] == "idempotency_key_in_flight"
    timeout_s = services.settings.publish_timeout_s  # the longest the first may yet wait
    assert retry.headers["retry-after"] == str(max(1, math.ceil(timeout_s)))
    monkeypatch.setattr(services.bus, "publish", real_publish)

    later = submit(gateway, keyed, perf, ref)
    assert later.status_code == 202, later.text
    if outcome == "acknowledged":
        assert first["r"].status_code == 202
        assert later.json()["job_id"] == first["r"].json()["job_id"]
    else:
        assert (first["r"].status_code, first["r"].json()["code"]) == (503, "broker_unavailable")
        assert later.json()["job_id"] not in first["r"].text
        job = gateway.get(f"/v1/jobs/{later.json()['job_id']}", headers=keyed).json()
        assert job["status"] == "queued"
        again = submit(gateway, keyed, perf, ref)
        assert again.json()["job_id"] == later.json()["job_id"]
        # The refused job's task that raises its cancel flag does not stay in the set.
        deadline = time.monotonic() + 10
        while services.background:
            assert time.monotonic() < deadline, services.background
            time.sleep(0.05)


def test_a_job_whose_ack_was_not_marked_is_marked_by_the_recorder(
    gateway: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """JetStream acknowledged the first event but the gateway could not mark it (the
    database blinked, or the gateway died right after): the recorder marks it when that
    event comes by, and the key's retry then gets the job."""
    services = gateway.app.state.services  # type: ignore[attr-defined]
    keyed = {**api_key(gateway, "acme"), "Idempotency-Key": "take-8"}

    async def lost(job_id: uuid.UUID) -> None:
        raise asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed")

    with monkeypatch.context() as patched:
        patched.setattr(services.repo, "mark_published", lost)
        accepted = submit(gateway, keyed, sung_tone(), sung_tone())
    assert accepted.status_code == 202, accepted.text  # acknowledged: the job runs
    deadline = time.monotonic() + 20
    while True:
        retry = submit(gateway, keyed, sung_tone(), sung_tone())
        if retry.status_code == 202:
            break
        assert retry.json()["code"] == "idempotency_key_in_flight"
        assert time.monotonic() < deadline, "the recorder never marked the job"
        time.sleep(0.2)
    assert retry.json()["job_id"] == accepted.json()["job_id"]


def test_a_never_acknowledged_job_that_ended_frees_its_key(gateway: TestClient) -> None:
    """The gateway died between the job's row and its publish, and the job ended without
    ever being queued (the reconciler gave it up): no request was told 202, so a retry
    under the key submits anew rather than getting the dead job."""
    from voicejury_contracts import JobFailed, Stage

    services = gateway.app.state.services  # type: ignore[attr-defined]
    keyed = {**api_key(gateway, "acme"), "Idempotency-Key": "take-9"}
    dead = submit(gateway, keyed, sung_tone(), sung_tone()).json()["job_id"]

    async def as_if_never_published() -> None:
        await services.repo.pool.execute(
            "UPDATE jobs SET publish_pending = true WHERE id = $1", uuid.UUID(dead)
        )
        stalled = JobFailed(
            job_id=uuid.UUID(dead),
            stage=Stage.SEPARATOR,
            code="job_stalled",
            message="x",
            attempts=1,
        )
        await services.repo.record(stalled)

    gateway.portal.call(as_if_never_published)  # type: ignore[union-attr]
    retry = submit(gateway, keyed, sung_tone(), sung_tone())
    assert retry.status_code == 202, retry.text
    assert retry.json()["job_id"] != dead


def test_a_job_whose_gateway_stopped_before_the_ack_is_published_again_soon(
    gateway: TestClient,
) -> None:
    """The gateway recorded the job, then stopped before its first event reached JetStream:
    within a minute or so the housekeeper publishes it, so the job runs (and a retry under
    its key gets it, as once acknowledged). Before, the job waited for the stall bound (30
    min, or 6 h with any backlog ahead), its key answering 409 meanwhile."""
    from tests.conftest import reference_submitted
    from voicejury_contracts import AudioInput, JobOptions, JobSubmitted, Stage

    services = gateway.app.state.services  # type: ignore[attr-defined]
    portal = gateway.portal
    assert portal is not None
    audio = reference_submitted().reference
    submitted = JobSubmitted(
        job_id=uuid.uuid4(),
        tenant="acme",
        performance=AudioInput.model_validate(audio.model_dump() | {"role": "performance"}),
        reference=audio,
        options=JobOptions(),
    )
    job_id = submitted.job_id
    portal.call(functools.partial(services.repo.insert_job, submitted, "take-10", max_active=99))
    portal.call(
        services.repo.pool.execute,
        "UPDATE jobs SET created_at = now() - interval '30 seconds' WHERE id = $1",
        job_id,
    )
    keeper = housekeeper(services)
    keeper.unacknowledged_after_s = 60.0
    assert portal.call(keeper.publish_unacknowledged) == []  # its gateway may still publish
    keeper.unacknowledged_after_s = 10.0
    assert portal.call(keeper.publish_unacknowledged) == [job_id]
    assert portal.call(services.bus.stage_backlog, Stage.SEPARATOR) == 1  # it will run
    pending = "SELECT publish_pending FROM jobs WHERE id = $1"
    assert portal.call(services.repo.pool.fetchval, pending, job_id) is False
    assert portal.call(keeper.publish_unacknowledged) == []
    # Had the first publish landed after all, the copy is dropped: the job runs once.
    portal.call(
        services.repo.pool.execute, "UPDATE jobs SET publish_pending = true WHERE id = $1", job_id
    )
    assert portal.call(keeper.publish_unacknowledged) == [job_id]
    assert portal.call(services.bus.stage_backlog, Stage.SEPARATOR) == 1


# ------------------------------------------------------------------- uploads left behind


def test_a_job_submission_that_fails_before_its_row_commits_leaves_no_upload(
    gateway: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    services = gateway.app.state.services  # type: ignore[attr-defined]
    as_a_server(gateway, monkeypatch)
    auth = api_key(gateway, "acme")

    with monkeypatch.context() as patched:  # both files stored, then the insert fails
        patched.setattr(services.repo, "insert_job", postgres_restarting())
        r = submit(gateway, auth, sung_tone(), sung_tone(f0_hz=247.0))
    assert (r.status_code, r.json()["code"]) == (503, "database_unavailable")
    assert objects(gateway, "jobs/") == []

    real_put = services.store.put_file
    puts: list[str] = []

    async def second_put_fails(key: str, *args: Any) -> Any:
        puts.append(key)
        if len(puts) == 2:
            raise urllib3.exceptions.MaxRetryError(None, key, "connection refused")  # type: ignore[arg-type]
        return await real_put(key, *args)

    with monkeypatch.context() as patched:
        patched.setattr(services.store, "put_file", second_put_fails)
        r = submit(gateway, auth, sung_tone(), sung_tone(f0_hz=247.0))
    assert (r.status_code, r.json()["code"]) == (503, "object_store_unavailable")
    assert len(puts) == 2
    assert objects(gateway, "jobs/") == []
    assert gateway.get("/v1/jobs", headers=auth).json()["total"] == 0


def test_a_reference_upload_that_fails_before_its_row_commits_leaves_no_original(
    gateway: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deleted at once when the database answers the cleanup; listed beforehand, so that
    the housekeeper deletes it when it does not; kept while another tenant holds it."""
    services = gateway.app.state.services  # type: ignore[attr-defined]
    portal = gateway.portal
    assert portal is not None
    as_a_server(gateway, monkeypatch)
    a, b = api_key(gateway, "tenant-a"), api_key(gateway, "tenant-b")

    def upload(auth: dict[str, str], song: bytes) -> Any:
        return gateway.post(
            "/v1/references", files={"audio": ("s.wav", song, "audio/wav")}, headers=auth
        )

    with monkeypatch.context() as patched:
        patched.setattr(services.repo, "prepare_reference", postgres_restarting())
        r = upload(a, sung_tone(f0_hz=410.0))
    assert (r.status_code, r.json()["code"]) == (503, "database_unavailable")
    assert objects(gateway, "references/") == []
    assert portal.call(services.repo.orphaned_originals) == []

    # The database gone for the cleanup too: the write-ahead entry stays, due later.
    with monkeypatch.context() as patched:
        patched.setattr(services.repo, "prepare_reference", postgres_restarting())
        patched.setattr(services.repo, "release_orphaned_original", postgres_restarting())
        r = upload(a, sung_tone(f0_hz=420.0))
    assert r.status_code == 503
    left = objects(gateway, "references/")
    assert len(left) == 1
    keeper = housekeeper(services)
    assert portal.call(keeper.expire_audio) == 0  # not due: the upload may still be going
    assert portal.call(services.repo.orphaned_originals) == []
    portal.call(services.repo.pool.execute, "UPDATE orphaned_originals SET not_before = now()")
    assert portal.call(keeper.expire_audio) == 1
    assert objects(gateway, "references/") == []
    assert portal.call(services.repo.orphaned_originals) == []

    # Another tenant's failed upload of audio tenant-a holds: its original stays.
    shared = sung_tone(f0_hz=430.0)
    assert upload(a, shared).status_code == 202
    held = objects(gateway, "references/")
    with monkeypatch.context() as patched:
        patched.setattr(services.repo, "prepare_reference", postgres_restarting())
        assert upload(b, shared).status_code == 503
    assert objects(gateway, "references/") == held
    portal.call(services.repo.pool.execute, "UPDATE orphaned_originals SET not_before = now()")
    assert portal.call(keeper.expire_audio) == 0
    assert objects(gateway, "references/") == held


# ----------------------------------------------------------------------------- SSE


def test_audio_the_store_keeps_refusing_to_delete_holds_up_no_other_retention(
    gateway: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One job's audio under an object lock (the store refusing its delete every round):
    the jobs after it in the sweep still lose theirs, the cache is still swept, and the
    refused one is tried again next round."""
    import minio.error

    auth = api_key(gateway, "acme")
    services = gateway.app.state.services  # type: ignore[attr-defined]
    portal = gateway.portal
    assert portal is not None
    locked, free = (
        uuid.UUID(submit(gateway, auth, sung_tone(f0_hz=f), sung_tone()).json()["job_id"])
        for f in (300.0, 320.0)
    )
    for job_id, minutes in ((locked, 3), (free, 2)):  # the locked one is swept first
        portal.call(
            services.repo.pool.execute,
            "UPDATE jobs SET status = 'failed', finished_at = now() - $2 * interval '1 minute' "
            "WHERE id = $1",
            job_id,
            minutes,
        )
    portal.call(services.store.put_bytes, "cache/stale/x.json", b"{}", "application/json")
    delete_prefix = services.store.delete_prefix

    async def refusing(prefix: str, **kwargs: Any) -> int:
        if str(locked) in prefix:
            denied = urllib3.HTTPResponse(status=403)
            raise minio.error.S3Error(denied, "AccessDenied", "object locked", prefix, "", "")
        return int(await delete_prefix(prefix, **kwargs))

    monkeypatch.setattr(services.store, "delete_prefix", refusing)
    keeper = housekeeper(services, audio_retention_s=60, cache_retention_s=0.001)
    assert portal.call(keeper.expire_audio) == 3  # the free job's two uploads, the cache
    assert objects(gateway, f"jobs/{free}/") == []
    assert objects(gateway, "cache/") == []
    assert len(objects(gateway, f"jobs/{locked}/")) == 2
    monkeypatch.setattr(services.store, "delete_prefix", delete_prefix)
    assert portal.call(keeper.expire_audio) == 2  # the lock lifted: next round


def test_an_open_event_stream_outlives_a_database_outage_and_resumes_where_it_stopped(
    gateway: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stream's reads of the event log fail for a while (PostgreSQL restarting, or
    refusing connections): it stays open with keep-alive comments, reads again with
    backoff, and sends what came meanwhile from its last sent id, once each."""
    from voicejury_contracts import JobCancelled, Stage, StageProgress

    services = gateway.app.state.services  # type: ignore[attr-defined]
    auth = api_key(gateway, "acme")
    job_id = uuid.UUID(submit(gateway, auth, sung_tone(), sung_tone()).json()["job_id"])
    for seq, fraction in enumerate((0.25, 0.5)):
        progress = StageProgress(
            job_id=job_id, stage=Stage.SEPARATOR, fraction=fraction, attempt=1, seq=seq
        )
        gateway.portal.call(services.repo.record, progress)  # type: ignore[union-attr]
    real_read = services.repo.events_after
    reads: list[int] = []

    async def outage(job: uuid.UUID, after_seq: int, limit: int = 500) -> Any:
        reads.append(after_seq)
        if len(reads) == 2:  # the job is cancelled while the database is out of reach
            await services.repo.cancel(job_id, JobCancelled(job_id=job_id))
        if 2 <= len(reads) <= 3:
            raise asyncpg.exceptions.CannotConnectNowError("the database system is starting up")
        if len(reads) == 4:
            raise ConnectionRefusedError(111, "Connection refused")
        return await real_read(job, after_seq, limit)

    monkeypatch.setattr(services.repo, "events_after", outage)
    with gateway.stream("GET", f"/v1/jobs/{job_id}/events", headers=auth) as stream:
        assert stream.status_code == 200
        text = "".join(stream.iter_text())
    ids = [int(line[4:]) for line in text.splitlines() if line.startswith("id: ")]
    assert ids == [1, 2, 3, 4], text  # stage, progress, progress, then cancelled: once each
    assert text.count("event: cancelled") == 1
    assert text.rstrip().endswith('data: {"reason": "cancelled by client"}')
    # Kept alive through the outage (a wake-up from the cancellation may spare one).
    assert text.count(": keep-alive") >= 2, text
    assert reads == [0, 3, 3, 3, 3]  # each read after the outage from the last id sent


# ----------------------------------------------------------------------------- schema


def test_rows_of_revision_0008_stay_acknowledged_and_due_through_0009_and_back(
    database_url: str,
) -> None:
    """A job an older gateway recorded (during a rolling upgrade too: it never sets the
    column) replays as acknowledged; an orphaned original listed before is due at once."""
    from alembic import command

    from voicejury_gateway.migrate import alembic_config

    config = alembic_config(database_url)
    command.downgrade(config, "0008")

    async def legacy_rows() -> None:
        con = await asyncpg.connect(database_url)
        try:
            await con.execute(
                "INSERT INTO jobs (id, tenant, status, options, inputs, idempotency_key) "
                "VALUES ($1, 'acme', 'queued', '{}', '{}', 'take-1')",
                uuid.uuid4(),
            )
            await con.execute("INSERT INTO orphaned_originals (sha256) VALUES ('ab')")
        finally:
            await con.close()

    async def state() -> tuple[list[bool], list[str]]:
        con = await asyncpg.connect(database_url)
        try:
            pending = [r[0] for r in await con.fetch("SELECT publish_pending FROM jobs")]
            due = await con.fetch("SELECT sha256 FROM orphaned_originals WHERE not_before <= now()")
            return pending, [r[0] for r in due]
        finally:
            await con.close()

    asyncio.run(legacy_rows())
    command.upgrade(config, "head")
    assert asyncio.run(state()) == ([False], ["ab"])
    command.downgrade(config, "0008")
    command.upgrade(config, "head")
