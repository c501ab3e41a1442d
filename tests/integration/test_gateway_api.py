"""The gateway over real HTTP semantics, PostgreSQL, nats-server and an S3 server."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import io
import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import nats
import pytest
from fastapi.testclient import TestClient

from tests.audio_fixtures import PDF, silence, sung_tone, wav_bytes
from tests.conftest import NATS_URL, delete_namespace, free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def gateway(
    env: dict[str, str], database_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[TestClient]:
    from voicejury_gateway.app import create_app
    from voicejury_gateway.settings import GatewaySettings

    monkeypatch.setenv("VJ_DATABASE_URL", database_url)
    monkeypatch.setenv("VJ_GATEWAY_MAX_DURATION_S", "5")
    monkeypatch.setenv("VJ_GATEWAY_SSE_KEEPALIVE_S", "0.5")
    with TestClient(create_app(GatewaySettings())) as client:
        yield client
    asyncio.run(delete_namespace(NATS_URL, env["VJ_NAMESPACE"]))


def api_key(client: TestClient, tenant: str) -> dict[str, str]:
    repo = client.app.state.services.repo  # type: ignore[attr-defined]
    key = client.portal.call(repo.create_api_key, tenant)  # type: ignore[union-attr]
    return {"Authorization": f"Bearer {key}"}


def submit(
    client: TestClient, headers: dict[str, str], perf: bytes, ref: bytes, **form: str
) -> Any:
    files = {
        "performance": ("perf.wav", perf, "audio/wav"),
        "reference": ("ref.wav", ref, "audio/wav"),
    }
    return client.post("/v1/jobs", files=files, data=form, headers=headers)


def test_accepted_job_is_recorded_and_its_first_event_is_on_the_stream(
    gateway: TestClient, env: dict[str, str]
) -> None:
    auth = api_key(gateway, "acme")
    r = submit(gateway, auth, sung_tone(), sung_tone(f0_hz=247.0), performance_kind="vocals")
    assert r.status_code == 202, r.text
    body = r.json()
    assert r.headers["location"] == f"/v1/jobs/{body['job_id']}"
    job = gateway.get(f"/v1/jobs/{body['job_id']}", headers=auth).json()
    assert job["status"] == "queued"
    assert set(job["stages"]) == {"separator", "pitch", "asr", "scorer", "jury"}

    async def first_event() -> bytes:
        nc = await nats.connect(NATS_URL)
        msg = await nc.jetstream().get_msg(f"{env['VJ_NAMESPACE'].upper()}_JOBS", 1)
        await nc.close()
        return msg.data or b""

    data = asyncio.run(first_event())
    assert body["job_id"].encode() in data


def test_the_songs_title_travels_with_the_job_for_the_jury(gateway: TestClient) -> None:
    auth = api_key(gateway, "acme")
    job = submit(gateway, auth, sung_tone(), sung_tone(), title="Ako ay may lobo").json()
    options = gateway.get(f"/v1/jobs/{job['job_id']}", headers=auth).json()["options"]
    assert options["title"] == "Ako ay may lobo"
    too_long = submit(gateway, auth, sung_tone(), sung_tone(), title="x" * 301)
    assert (too_long.status_code, too_long.json()["code"]) == (422, "invalid_request")


def test_idempotency_key_returns_the_same_job(gateway: TestClient) -> None:
    auth = {**api_key(gateway, "acme"), "Idempotency-Key": "take-1"}
    first = submit(gateway, auth, sung_tone(), sung_tone())
    second = submit(gateway, auth, sung_tone(), sung_tone())
    assert first.status_code == second.status_code == 202
    assert first.json()["job_id"] == second.json()["job_id"]
    listing = gateway.get("/v1/jobs", headers=auth).json()
    assert listing["total"] == 1


def test_a_blank_idempotency_key_is_refused_not_shared(gateway: TestClient) -> None:
    """A blank key would be one key for every blank-keyed submission of the tenant: the
    second would be handed the first's job and its own audio dropped."""
    blank = {**api_key(gateway, "acme"), "Idempotency-Key": ""}
    for _ in range(2):
        refused = submit(gateway, blank, sung_tone(), sung_tone())
        assert refused.status_code == 422, refused.text
        assert refused.json()["code"] == "invalid_request"
        assert "Idempotency-Key" in refused.text
    assert gateway.get("/v1/jobs", headers=blank).json()["total"] == 0


def test_a_key_released_during_an_idempotency_race_gets_409_not_500(
    gateway: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two requests under one key: the loser's insert meets the winner's row, and the
    winner is refused (its publish failed) before the loser looks it up, which releases
    the key. The loser is told to retry; its upload is not left behind."""
    services = gateway.app.state.services  # type: ignore[attr-defined]
    auth = {**api_key(gateway, "acme"), "Idempotency-Key": "raced"}
    assert submit(gateway, auth, sung_tone(), sung_tone()).status_code == 202

    async def released(tenant: str, key: str) -> None:
        return None  # the winner's row as the loser sees it once the key is released

    monkeypatch.setattr(services.repo, "find_idempotent", released)
    loser = submit(gateway, auth, sung_tone(), sung_tone())
    assert loser.status_code == 409, loser.text
    assert loser.json()["code"] == "idempotency_key_in_use"
    jobs = gateway.get("/v1/jobs", headers=auth).json()
    assert jobs["total"] == 1


def test_an_idempotency_key_stands_for_one_request(gateway: TestClient) -> None:
    """Its retry gets its job whatever happened since (here: its reference was deleted);
    another request under the same key is refused, not handed the first request's job."""
    auth = api_key(gateway, "acme")
    files = {"audio": ("song.wav", sung_tone(seconds=2.0, f0_hz=262.0), "audio/wav")}
    reference_id = gateway.post("/v1/references", files=files, headers=auth).json()["reference_id"]
    keyed = {**auth, "Idempotency-Key": "take-ref"}
    first = submit_with_reference_id(gateway, keyed, reference_id)
    assert first.status_code == 202, first.text
    assert gateway.delete(f"/v1/references/{reference_id}", headers=auth).status_code == 200
    retry = submit_with_reference_id(gateway, keyed, reference_id)
    assert (retry.status_code, retry.json()["job_id"]) == (202, first.json()["job_id"])

    keyed = {**auth, "Idempotency-Key": "take-2"}
    accepted = submit(gateway, keyed, sung_tone(), sung_tone())
    assert accepted.status_code == 202
    for other in (
        submit(gateway, keyed, sung_tone(f0_hz=247.0), sung_tone()),  # another take
        submit(gateway, keyed, sung_tone(), sung_tone(), difficulty="hard"),
    ):
        assert other.status_code == 422, other.text
        assert other.json()["code"] == "idempotency_key_reused"
        assert accepted.json()["job_id"] in other.json()["detail"]
    same = submit(gateway, keyed, sung_tone(), sung_tone())
    assert (same.status_code, same.json()["job_id"]) == (202, accepted.json()["job_id"])
    assert gateway.get("/v1/jobs", headers=auth).json()["total"] == 2


def test_a_tenant_at_its_bound_of_live_jobs_gets_429_others_do_not(
    gateway: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    services = gateway.app.state.services  # type: ignore[attr-defined]
    bounded = services.settings.model_copy(update={"gateway_max_active_jobs_per_tenant": 1})
    monkeypatch.setattr(services, "settings", bounded)
    a, b = api_key(gateway, "tenant-a"), api_key(gateway, "tenant-b")
    assert submit(gateway, a, sung_tone(), sung_tone()).status_code == 202
    refused = submit(gateway, a, sung_tone(), sung_tone())
    assert (refused.status_code, refused.json()["code"]) == (429, "too_many_active_jobs")
    assert refused.headers["retry-after"] == "30"
    assert submit(gateway, b, sung_tone(), sung_tone()).status_code == 202
    # Checked again where the job is recorded, under the lock (the early check can race).
    from voicejury_gateway.db import TenantBacklogFullError

    page = gateway.portal.call(services.repo.list_jobs, "tenant-a", 1)  # type: ignore[union-attr]
    rows = page.rows
    with pytest.raises(TenantBacklogFullError):
        gateway.portal.call(  # type: ignore[union-attr]
            functools.partial(
                services.repo.insert_job,
                _resubmitted(gateway, "tenant-a", rows[0]["id"]),
                None,
                max_active=100,
                max_active_per_tenant=1,
            )
        )


def _resubmitted(client: TestClient, tenant: str, job_id: uuid.UUID) -> Any:
    """A copy of a recorded job's `JobSubmitted` under a new id."""
    from voicejury_contracts import AudioInput, JobOptions, JobSubmitted

    services = client.app.state.services  # type: ignore[attr-defined]
    row = client.portal.call(services.repo.get_job, tenant, job_id)  # type: ignore[union-attr]
    return JobSubmitted(
        job_id=uuid.uuid4(),
        tenant=tenant,
        performance=AudioInput.model_validate(row["inputs"]["performance"]),
        reference=AudioInput.model_validate(row["inputs"]["reference"]),
        options=JobOptions.model_validate(row["options"]),
    )


def test_languages_are_checked_before_a_job_is_accepted(gateway: TestClient) -> None:
    """A language the transcription does not know would fail the job minutes later."""
    auth = api_key(gateway, "acme")
    reference = {"audio": ("s.wav", sung_tone(seconds=2.0, f0_hz=330.0), "audio/wav")}
    for refused in (
        submit(gateway, auth, sung_tone(), sung_tone(), language="zz"),
        gateway.post("/v1/references", files=reference, data={"language": "zz"}, headers=auth),
    ):
        assert (refused.status_code, refused.json()["code"]) == (422, "unsupported_language")
    job = submit(gateway, auth, sung_tone(), sung_tone(), language="FR").json()
    assert (
        gateway.get(f"/v1/jobs/{job['job_id']}", headers=auth).json()["options"]["language"] == "fr"
    )
    assert submit(gateway, auth, sung_tone(), sung_tone(), language="haw").status_code == 202


def test_malformed_ids_are_404_like_unknown_ones(gateway: TestClient) -> None:
    auth = api_key(gateway, "acme")
    for method, path, code in (
        ("GET", "/v1/references/ref_%00abc", "reference_not_found"),
        ("DELETE", "/v1/references/ref_%00abc", "reference_not_found"),
        ("GET", "/v1/references/nope", "reference_not_found"),
        ("GET", "/v1/jobs/not-a-uuid", "job_not_found"),
        ("GET", "/v1/jobs/not-a-uuid/events", "job_not_found"),
        ("DELETE", "/v1/jobs/123", "job_not_found"),
        ("GET", f"/v1/jobs/{uuid.uuid4()}/audio/singer/original", "source_not_found"),
    ):
        r = gateway.request(method, path, headers=auth)
        assert (r.status_code, r.json()["code"]) == (404, code), (method, path, r.text)
    for reference_id in ("ref_\x00x", "ref_" + "0" * 32):
        r = submit_with_reference_id(gateway, auth, reference_id)
        assert (r.status_code, r.json()["code"]) == (404, "reference_not_found"), r.text


def test_a_stored_reference_keeps_its_kind_and_a_different_one_is_refused(
    gateway: TestClient,
) -> None:
    """A stored reference was separated (or not) as the kind it was prepared with: a job
    asking for another kind would silently get the stored one."""
    auth = api_key(gateway, "acme")
    files = {"audio": ("song.wav", sung_tone(seconds=2.0, f0_hz=311.0), "audio/wav")}
    stored = gateway.post("/v1/references", files=files, headers=auth)  # kind mix
    reference_id = stored.json()["reference_id"]

    def submit(**form: str) -> Any:
        return gateway.post(
            "/v1/jobs",
            files={"performance": ("p.wav", sung_tone(), "audio/wav")},
            data={"reference_id": reference_id, **form},
            headers=auth,
        )

    refused = submit(reference_kind="vocals")
    assert refused.status_code == 422, refused.text
    assert refused.json()["code"] == "reference_kind_mismatch"
    assert "prepared as mix" in refused.json()["detail"]
    services = gateway.app.state.services  # type: ignore[attr-defined]
    for accepted in (submit(reference_kind="mix"), submit()):
        assert accepted.status_code == 202, accepted.text
        job_id = uuid.UUID(accepted.json()["job_id"])
        job = gateway.portal.call(services.repo.get_job, "acme", job_id)  # type: ignore[union-attr]
        assert job["inputs"]["reference"]["kind"] == "mix"
    # Left out, the kind is the default's: a retry under the key that names it is the same
    # request (as it was before the field could be left out).
    performance = sung_tone()
    keyed = {**auth, "Idempotency-Key": "kind-1"}
    first, retry = (
        gateway.post(
            "/v1/jobs",
            files={"performance": ("p.wav", performance, "audio/wav")},
            data={"reference_id": reference_id, **form},
            headers=keyed,
        )
        for form in ({}, {"reference_kind": "mix"})
    )
    assert (first.status_code, retry.status_code) == (202, 202), retry.text
    assert retry.json()["job_id"] == first.json()["job_id"]


def test_the_same_audio_uploaded_with_other_details_is_a_conflict(gateway: TestClient) -> None:
    auth = api_key(gateway, "acme")
    files = {"audio": ("song.wav", sung_tone(seconds=2.0, f0_hz=349.0), "audio/wav")}
    stored = gateway.post("/v1/references", files=files, data={"title": "Lobo"}, headers=auth)
    assert stored.status_code == 202
    for same in ({}, {"title": "Lobo"}, {"kind": "mix"}):
        assert (
            gateway.post("/v1/references", files=files, data=same, headers=auth).status_code == 200
        )
    other = gateway.post(
        "/v1/references", files=files, data={"lyrics": "la la", "kind": "vocals"}, headers=auth
    )
    assert other.status_code == 409, other.text
    assert other.json()["code"] == "reference_conflict"
    assert other.json()["fields"] == ["kind", "lyrics"]
    assert other.json()["reference_id"] == stored.json()["reference_id"]


def test_a_failed_reference_uploaded_again_with_other_details_is_a_conflict(
    gateway: TestClient,
) -> None:
    """Its upload again retries the preparation with what it was stored with: other
    details get the same 409 as for a reference that did not fail, not silently dropped."""
    from voicejury_contracts import JobFailed, Stage

    services = gateway.app.state.services  # type: ignore[attr-defined]
    auth = api_key(gateway, "acme")
    files = {"audio": ("song.wav", sung_tone(seconds=2.0, f0_hz=331.0), "audio/wav")}
    stored = gateway.post("/v1/references", files=files, data={"title": "Lobo"}, headers=auth)
    assert stored.status_code == 202
    reference_id = stored.json()["reference_id"]
    row = gateway.portal.call(services.repo.get_reference, "acme", reference_id)  # type: ignore[union-attr]
    crashed = JobFailed(
        job_id=row["preparation_id"],
        stage=Stage.SEPARATOR,
        code="stage_crashed",
        message="x",
        attempts=3,
    )
    assert gateway.portal.call(services.repo.record_preparation, crashed)  # type: ignore[union-attr]
    other = {"kind": "vocals", "lyrics": "la la la", "language": "fr", "title": "Lobo 2"}
    refused = gateway.post("/v1/references", files=files, data=other, headers=auth)
    assert refused.status_code == 409, refused.text
    assert refused.json()["code"] == "reference_conflict"
    assert refused.json()["fields"] == ["kind", "language", "lyrics", "title"]
    unchanged = gateway.get(f"/v1/references/{reference_id}", headers=auth).json()
    assert (unchanged["status"], unchanged["kind"], unchanged["has_lyrics"]) == (
        "failed",
        "mix",
        False,
    )
    retried = gateway.post("/v1/references", files=files, data={"title": "Lobo"}, headers=auth)
    assert retried.status_code == 202, retried.text
    assert retried.json()["status"] == "preparing"


def test_pages_neither_repeat_nor_skip_items_added_between_reads(gateway: TestClient) -> None:
    """Keyset pagination (`cursor`, `next_cursor`): a job or reference added while a
    client pages goes on top, and shifts none of the pages the client has yet to read."""
    auth = api_key(gateway, "acme")

    def add_job() -> str:
        job_id: str = submit(gateway, auth, sung_tone(), sung_tone()).json()["job_id"]
        return job_id

    def add_reference(f0_hz: float) -> str:
        files = {"audio": ("s.wav", sung_tone(seconds=1.0, f0_hz=f0_hz), "audio/wav")}
        r = gateway.post("/v1/references", files=files, headers=auth)
        assert r.status_code == 202, r.text
        reference_id: str = r.json()["reference_id"]
        return reference_id

    def pages(path: str, key: str, added: Any) -> list[list[str]]:
        out, cursor = [], None
        while True:
            query = f"{path}?limit=2" + (f"&cursor={cursor}" if cursor else "")
            page = gateway.get(query, headers=auth)
            assert page.status_code == 200, page.text
            out.append([item[key] for item in page.json()["items"]])
            added()  # the user adds another one between two page reads
            cursor = page.json()["next_cursor"]
            if cursor is None:
                return out

    jobs = [add_job() for _ in range(5)]
    assert pages("/v1/jobs", "job_id", add_job) == [jobs[4:2:-1], jobs[2:0:-1], jobs[:1]]
    assert gateway.get("/v1/jobs?limit=100", headers=auth).json()["total"] == 8
    tones = iter(range(200, 400, 7))
    references = [add_reference(next(tones)) for _ in range(3)]
    assert pages("/v1/references", "reference_id", lambda: add_reference(next(tones))) == [
        references[:0:-1],
        references[:1],
    ]
    for query, code in (
        ("cursor=nope", "invalid_cursor"),
        ("cursor=WyJ4IiwgInkiXQ", "invalid_cursor"),  # base64 of ["x", "y"]
        ("offset=2", "offset_not_supported"),  # refused, not ignored (page one forever)
    ):
        for path in ("/v1/jobs", "/v1/references"):
            r = gateway.get(f"{path}?{query}", headers=auth)
            assert (r.status_code, r.json()["code"]) == (422, code), (path, query, r.text)


def test_jobs_are_listed_by_status_and_pages_keep_to_it(gateway: TestClient) -> None:
    """`status` (repeatable) filters the list, its `total` and its next pages; a status
    no job can have is a 422, not an empty list."""
    auth = api_key(gateway, "acme")
    jobs = [submit(gateway, auth, sung_tone(), sung_tone()).json()["job_id"] for _ in range(4)]
    for job_id in jobs[1:]:
        assert gateway.delete(f"/v1/jobs/{job_id}", headers=auth).status_code == 200
    cancelled, cursor = [], None
    while True:
        query = "/v1/jobs?status=cancelled&limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = gateway.get(query, headers=auth).json()
        assert page["total"] == 3
        assert {item["status"] for item in page["items"]} == {"cancelled"}
        cancelled += [item["job_id"] for item in page["items"]]
        if (cursor := page["next_cursor"]) is None:
            break
    assert cancelled == jobs[:0:-1]
    live = gateway.get("/v1/jobs?status=queued&status=running", headers=auth).json()
    assert ([item["job_id"] for item in live["items"]], live["total"]) == ([jobs[0]], 1)
    assert gateway.get("/v1/jobs", headers=auth).json()["total"] == 4
    r = gateway.get("/v1/jobs?status=lost", headers=auth)
    assert (r.status_code, r.json()["code"]) == (422, "invalid_request"), r.text


def test_the_openapi_document_declares_the_auth_the_sse_stream_and_re_uploads(
    gateway: TestClient,
) -> None:
    """What a generated client needs: the API key as security schemes (either header),
    the event stream's media type, and the 200 of a reference uploaded again."""
    document = gateway.app.openapi()  # type: ignore[attr-defined]
    schemes = document["components"]["securitySchemes"]
    assert (schemes["bearer"]["type"], schemes["bearer"]["scheme"]) == ("http", "bearer")
    assert (schemes["apiKey"]["in"], schemes["apiKey"]["name"]) == ("header", "X-API-Key")
    public = {"/healthz", "/readyz", "/metrics", "/asyncapi.json"}
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            headers = {p["name"].lower() for p in operation.get("parameters", [])}
            assert not headers & {"authorization", "x-api-key"}, (method, path)
            expected: Any = None if path in public else [{"bearer": []}, {"apiKey": []}]
            assert operation.get("security") == expected, (method, path)
    events = document["paths"]["/v1/jobs/{job_id}/events"]["get"]["responses"]["200"]
    assert list(events["content"]) == ["text/event-stream"]
    upload = document["paths"]["/v1/references"]["post"]["responses"]
    view = {"$ref": "#/components/schemas/ReferenceView"}
    for status in ("200", "202"):
        assert upload[status]["content"]["application/json"]["schema"] == view
    # Either header authenticates, as declared.
    key = api_key(gateway, "acme")["Authorization"].removeprefix("Bearer ")
    assert gateway.get("/v1/jobs", headers={"X-API-Key": key}).status_code == 200
    assert gateway.get("/v1/jobs", headers={"Authorization": f"bearer {key}"}).status_code == 200


def _documented_body(document: dict[str, Any], path: str, method: str = "get") -> Any:
    """The JSON Schema of an operation's 200 (or 202) body, its `$ref` followed."""
    responses = document["paths"][path][method]["responses"]
    status = "200" if "200" in responses else "202"
    schema = responses[status]["content"]["application/json"]["schema"]
    return document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]


def test_the_openapi_document_types_the_json_bodies_and_path_only_operations_have_no_422(
    gateway: TestClient,
) -> None:
    """A client generated from the document gets typed bodies: the result is the
    contracts' JobResult; jobs, pages, cancellations and deleted references have their
    fields. An operation whose only inputs are path segments answers a malformed one 404,
    so it declares no 422."""
    from voicejury_contracts import JobOptions, JobResult

    document = gateway.app.openapi()  # type: ignore[attr-defined]
    schemas = document["components"]["schemas"]

    def fields(path: str, method: str = "get") -> set[str]:
        return set(_documented_body(document, path, method)["properties"])

    result = _documented_body(document, "/v1/jobs/{job_id}/result")
    assert result["title"] == "JobResult"
    assert set(result["properties"]) == set(JobResult.model_fields)
    assert {"score", "pitch", "rhythm", "lyrics", "lines", "jury"} <= set(result["required"])
    assert schemas["Jury"]["properties"]["members"]["items"] == {
        "$ref": "#/components/schemas/JuryComment"
    }

    job = _documented_body(document, "/v1/jobs/{job_id}")
    assert set(job["required"]) == {
        "job_id", "status", "progress", "stages", "attempts", "error", "options",
        "created_at", "updated_at", "finished_at", "links",
    }  # fmt: skip
    progress = job["properties"]["progress"]
    assert (progress["minimum"], progress["maximum"]) == (0, 1)
    assert job["properties"]["created_at"]["format"] == "date-time"
    assert set(job["properties"]["status"]["enum"]) == {
        "queued", "running", "completed", "failed", "cancelled",
    }  # fmt: skip
    stage = job["properties"]["stages"]["additionalProperties"]["$ref"].rsplit("/", 1)[-1]
    assert set(schemas[stage]["properties"]) == {
        "status", "progress", "attempts", "started_at", "finished_at",
    }  # fmt: skip
    error = job["properties"]["error"]["anyOf"][0]["$ref"].rsplit("/", 1)[-1]
    assert set(schemas[error]["properties"]) == {"code", "message", "stage"}
    # Described, not validated (an older job's options stay readable), and in step with
    # the contract.
    assert set(job["properties"]["options"]["properties"]) == set(JobOptions.model_fields)
    assert job["properties"]["options"]["additionalProperties"] is True

    for path in ("/v1/jobs", "/v1/references"):
        assert fields(path) == {"items", "total", "limit", "next_cursor"}
    items = _documented_body(document, "/v1/jobs")["properties"]["items"]["items"]["$ref"]
    assert set(schemas[items.rsplit("/", 1)[-1]]["properties"]) == {
        "job_id", "status", "progress", "created_at", "finished_at", "error_code", "links",
    }  # fmt: skip
    references = _documented_body(document, "/v1/references")["properties"]["items"]["items"]
    assert references == {"$ref": "#/components/schemas/ReferenceView"}
    assert fields("/v1/jobs/{job_id}", "delete") == {"job_id", "status", "audio_objects_deleted"}
    assert fields("/v1/references/{reference_id}", "delete") == {
        "reference_id", "deleted", "audio_objects_deleted", "audio_in_use_by",
    }  # fmt: skip
    assert fields("/v1/jobs/{job_id}/pitch") == {
        "time_s", "reference_cents", "performance_cents", "global_offset_ms",
    }  # fmt: skip
    assert fields("/healthz") == {"status"}
    assert fields("/readyz") == {"ready", "checks"}

    path_only = [
        ("/v1/jobs/{job_id}", "get"),
        ("/v1/jobs/{job_id}", "delete"),
        ("/v1/jobs/{job_id}/result", "get"),
        ("/v1/jobs/{job_id}/pitch", "get"),
        ("/v1/jobs/{job_id}/audio/{source}/{stem}", "get"),
        ("/v1/references/{reference_id}", "get"),
        ("/v1/references/{reference_id}", "delete"),
    ]
    for path, method in path_only:
        assert "422" not in document["paths"][path][method]["responses"], (method, path)
    # A body, a query or a header can still be refused as invalid.
    for path, method in (("/v1/jobs", "post"), ("/v1/jobs", "get"), ("/v1/references", "get")):
        assert "422" in document["paths"][path][method]["responses"], (method, path)
    auth = api_key(gateway, "acme")
    for path in ("/v1/jobs/not-a-job", "/v1/jobs/not-a-job/result", "/v1/references/nope"):
        assert gateway.get(path, headers=auth).status_code == 404, path


def test_bodies_match_their_documented_schemas_and_a_stored_result_goes_out_as_stored(
    gateway: TestClient,
) -> None:
    """A failed job's view, a page, a cancellation, a reference's deletion and readiness
    validate against the document; a result stored by an older version (a field since
    dropped, one since added missing) is served as it was stored, not refused with a 500."""
    import jsonschema  # type: ignore[import-untyped]  # schemathesis brings it

    from voicejury_contracts import JobFailed, Stage

    document = gateway.app.openapi()  # type: ignore[attr-defined]
    services = gateway.app.state.services  # type: ignore[attr-defined]
    portal = gateway.portal
    assert portal is not None
    auth = api_key(gateway, "acme")

    def conforms(path: str, method: str, body: Any) -> None:
        # The document is the root, so that the schemas' `#/components/...` refs resolve.
        schema = {**document, **_documented_body(document, path, method)}
        jsonschema.Draft202012Validator(
            schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
        ).validate(body)

    job_id = submit(gateway, auth, sung_tone(), sung_tone()).json()["job_id"]
    failed = JobFailed(
        job_id=uuid.UUID(job_id), stage=Stage.PITCH, code="pitch_failed", message="m", attempts=2
    )
    assert portal.call(services.repo.record, failed)
    view = gateway.get(f"/v1/jobs/{job_id}", headers=auth).json()
    assert view["error"] == {"code": "pitch_failed", "message": "m", "stage": "pitch"}
    conforms("/v1/jobs/{job_id}", "get", view)
    conforms("/v1/jobs", "get", gateway.get("/v1/jobs", headers=auth).json())
    cancelled = gateway.delete(f"/v1/jobs/{job_id}", headers=auth).json()
    assert cancelled["status"] == "failed"  # it had ended already
    conforms("/v1/jobs/{job_id}", "delete", cancelled)
    files = {"audio": ("s.wav", sung_tone(seconds=1.0), "audio/wav")}
    reference_id = gateway.post("/v1/references", files=files, headers=auth).json()["reference_id"]
    conforms("/v1/references", "get", gateway.get("/v1/references", headers=auth).json())
    deleted = gateway.delete(f"/v1/references/{reference_id}", headers=auth).json()
    conforms("/v1/references/{reference_id}", "delete", deleted)
    conforms("/readyz", "get", gateway.get("/readyz").json())
    conforms("/healthz", "get", gateway.get("/healthz").json())

    older = {"job_id": job_id, "score": 71.5, "dropped_since": [1, 2]}
    done_id = submit(gateway, auth, sung_tone(), sung_tone()).json()["job_id"]

    async def completed_long_ago() -> None:
        async with services.repo.pool.acquire() as con:
            await con.execute(
                "UPDATE jobs SET status = 'completed', finished_at = now() WHERE id = $1",
                uuid.UUID(done_id),
            )
            await con.execute(
                "INSERT INTO job_results (job_id, result) VALUES ($1, $2)",
                uuid.UUID(done_id),
                older,
            )

    portal.call(completed_long_ago)
    r = gateway.get(f"/v1/jobs/{done_id}/result", headers=auth)
    assert (r.status_code, r.json()) == (200, older)


def test_method_not_allowed_names_every_method_of_the_path(gateway: TestClient) -> None:
    auth = api_key(gateway, "acme")
    for path, allowed in (
        ("/v1/jobs", {"GET", "POST"}),
        (f"/v1/jobs/{uuid.uuid4()}", {"GET", "DELETE"}),
        ("/v1/references/ref_" + "0" * 32, {"GET", "DELETE"}),
    ):
        r = gateway.put(path, headers=auth)
        assert r.status_code == 405
        assert allowed <= set(r.headers["allow"].replace(" ", "").split(",")), r.headers
        assert r.headers["content-type"].startswith("application/problem+json")


def test_cors_only_for_the_configured_origins(
    env: dict[str, str], database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from voicejury_gateway.app import create_app
    from voicejury_gateway.settings import GatewaySettings

    monkeypatch.setenv("VJ_DATABASE_URL", database_url)
    monkeypatch.setenv("VJ_GATEWAY_CORS_ORIGINS", '["https://app.example"]')
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,idempotency-key",
    }
    with TestClient(create_app(GatewaySettings())) as client:
        ok = client.options("/v1/jobs", headers={"Origin": "https://app.example", **preflight})
        assert ok.status_code == 200
        assert ok.headers["access-control-allow-origin"] == "https://app.example"
        other = client.options("/v1/jobs", headers={"Origin": "https://evil.example", **preflight})
        assert "access-control-allow-origin" not in other.headers
        refused = client.get("/v1/jobs", headers={"Origin": "https://app.example"})
        assert refused.status_code == 401  # a refusal a browser can read
        assert refused.headers["access-control-allow-origin"] == "https://app.example"
    asyncio.run(delete_namespace(NATS_URL, env["VJ_NAMESPACE"]))


def test_sse_catch_up_longer_than_a_page_arrives_without_a_pause(gateway: TestClient) -> None:
    """A client far behind gets every missed event at once, not one page per keep-alive."""
    from voicejury_contracts import JobFailed, Stage

    auth = api_key(gateway, "acme")
    job_id = submit(gateway, auth, sung_tone(), sung_tone()).json()["job_id"]
    services = gateway.app.state.services  # type: ignore[attr-defined]

    async def many_events() -> None:
        async with services.repo.pool.acquire() as con:
            seq = await con.fetchval("SELECT event_seq FROM jobs WHERE id = $1", uuid.UUID(job_id))
            await con.executemany(
                "INSERT INTO job_events (job_id, seq, type, data, source_id) "
                "VALUES ($1, $2, 'progress', $3, $4)",
                [
                    (uuid.UUID(job_id), seq + i, {"stage": "pitch", "fraction": i / 1200}, f"t{i}")
                    for i in range(1, 1201)
                ],
            )
            await con.execute(
                "UPDATE jobs SET event_seq = $2 WHERE id = $1", uuid.UUID(job_id), seq + 1200
            )
        failed = JobFailed(
            job_id=uuid.UUID(job_id), stage=Stage.PITCH, code="x", message="x", attempts=1
        )
        await services.repo.record(failed)

    gateway.portal.call(many_events)  # type: ignore[union-attr]
    with gateway.stream("GET", f"/v1/jobs/{job_id}/events", headers=auth) as stream:
        text = "".join(stream.iter_text())
    assert text.count("event: progress") >= 1200
    assert text.count("event: failed") == 1
    assert ": keep-alive" not in text  # the page boundaries (500, 1000) did not wait


def test_a_full_backlog_refuses_submissions_before_reading_their_bodies(
    gateway: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The body here is no valid multipart at all: parsing it would answer 400, so a 503
    shows the refusal came first. A retry carrying an Idempotency-Key still gets its job."""
    services = gateway.app.state.services  # type: ignore[attr-defined]
    auth = {**api_key(gateway, "acme"), "Idempotency-Key": "full-1"}
    accepted = submit(gateway, auth, sung_tone(), sung_tone())
    assert accepted.status_code == 202
    full = services.settings.model_copy(update={"gateway_max_backlog": 1})
    monkeypatch.setattr(services, "settings", full)
    garbage = {"Content-Type": "multipart/form-data; boundary=b", **api_key(gateway, "acme")}
    keyed_reference = ("/v1/references", {**garbage, "Idempotency-Key": "ref-1"})
    for path, headers in (("/v1/jobs", garbage), ("/v1/references", garbage), keyed_reference):
        # A reference has no idempotent retry: its key does not pass it by the bound.
        r = gateway.post(path, content=b"--b\r\nnot a part", headers=headers)
        assert r.status_code == 503, (path, r.text)
        assert r.json()["code"] == "pipeline_saturated"
        assert r.headers["retry-after"] == "30"
    retry = submit(gateway, auth, sung_tone(), sung_tone())
    assert (retry.status_code, retry.json()["job_id"]) == (202, accepted.json()["job_id"])


def test_a_retry_with_the_idempotency_key_of_a_refused_job_submits_it_anew(
    gateway: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 503 means "not queued, retry": the retry with the same key must not be handed the
    refused job (failed, never to run) with a 202."""
    services = gateway.app.state.services  # type: ignore[attr-defined]
    auth = {**api_key(gateway, "acme"), "Idempotency-Key": "take-503"}

    async def refused(event: Any) -> None:
        raise ConnectionError("nats is down")

    with monkeypatch.context() as patched:
        patched.setattr(services.bus, "publish", refused)
        down = submit(gateway, auth, sung_tone(), sung_tone())
    assert (down.status_code, down.json()["code"]) == (503, "broker_unavailable")
    retry = submit(gateway, auth, sung_tone(), sung_tone())
    assert retry.status_code == 202, retry.text
    job = gateway.get(f"/v1/jobs/{retry.json()['job_id']}", headers=auth).json()
    assert job["status"] == "queued"
    again = submit(gateway, auth, sung_tone(), sung_tone())
    assert again.json()["job_id"] == retry.json()["job_id"]  # the key holds the queued job
    statuses = sorted(j["status"] for j in gateway.get("/v1/jobs", headers=auth).json()["items"])
    assert statuses == ["failed", "queued"]  # the refused one stays visible as failed


@pytest.mark.parametrize(
    ("performance", "status", "code"),
    [
        (b"", 422, "empty_audio"),
        (PDF, 415, "unsupported_media_type"),
        (silence(), 422, "silent_audio"),
        (sung_tone(seconds=6.0), 413, "audio_too_long"),
        (sung_tone(seconds=0.1), 422, "audio_too_short"),
        (sung_tone()[:2000], 422, "corrupt_audio"),
        (
            wav_bytes(
                __import__("numpy").full(16000, float("nan"), dtype="float32"), 16000, "FLOAT"
            ),
            422,
            "invalid_samples",
        ),
    ],
    ids=["empty", "pdf", "silence", "too-long", "too-short", "truncated", "nan"],
)
def test_bad_uploads_get_a_problem_not_a_job(
    gateway: TestClient, performance: bytes, status: int, code: str
) -> None:
    auth = api_key(gateway, "acme")
    r = submit(gateway, auth, performance, sung_tone())
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["code"] == code
    assert gateway.get("/v1/jobs", headers=auth).json()["total"] == 0


def test_missing_fields_and_bad_options_are_422(gateway: TestClient) -> None:
    auth = api_key(gateway, "acme")
    r = gateway.post(
        "/v1/jobs", files={"performance": ("p.wav", sung_tone(), "audio/wav")}, headers=auth
    )
    assert r.status_code == 422
    assert r.json()["code"] == "invalid_request"
    r = submit(gateway, auth, sung_tone(), sung_tone(), difficulty="impossible")
    assert r.status_code == 422


def test_unauthenticated_and_foreign_tenants_see_nothing(gateway: TestClient) -> None:
    a, b = api_key(gateway, "tenant-a"), api_key(gateway, "tenant-b")
    assert gateway.get("/v1/jobs").status_code == 401
    assert gateway.get("/v1/jobs", headers={"Authorization": "Bearer nope"}).status_code == 401
    job_id = submit(gateway, a, sung_tone(), sung_tone()).json()["job_id"]
    for path in ("", "/result", "/events"):
        r = gateway.get(f"/v1/jobs/{job_id}{path}", headers=b)
        assert r.status_code == 404, path
        assert r.json()["code"] == "job_not_found"
    assert gateway.delete(f"/v1/jobs/{job_id}", headers=b).status_code == 404
    assert gateway.get(f"/v1/jobs/{uuid.uuid4()}", headers=a).status_code == 404


def test_a_jobs_audio_and_pitch_are_tenant_scoped_behind_short_lived_unguessable_urls(
    gateway: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another tenant asking for a job's audio or contours gets the answer an unknown job
    gets (ids leak nothing), even once they are there; the owner gets a presigned URL that
    lives `VJ_GATEWAY_PRESIGN_TTL_S` to a key holding the job's random id."""
    from voicejury_contracts import Role, Stems, StemsSeparated

    services = gateway.app.state.services  # type: ignore[attr-defined]
    portal = gateway.portal
    assert portal is not None
    ttl = 123  # not the default (300): the setting, not a constant, decides
    monkeypatch.setattr(
        services, "settings", services.settings.model_copy(update={"gateway_presign_ttl_s": ttl})
    )
    a, b = api_key(gateway, "tenant-a"), api_key(gateway, "tenant-b")
    performance = sung_tone()
    job_id = submit(gateway, a, performance, sung_tone(f0_hz=247.0)).json()["job_id"]
    paths = [
        f"/v1/jobs/{job_id}/audio/performance/original",
        f"/v1/jobs/{job_id}/audio/reference/original",
        f"/v1/jobs/{job_id}/audio/performance/vocals",
        f"/v1/jobs/{job_id}/pitch",
    ]

    def foreign_is_like_unknown() -> None:
        unknown_id = str(uuid.uuid4())
        for path in paths:
            foreign = gateway.get(path, headers=b, follow_redirects=False)
            unknown = gateway.get(path.replace(job_id, unknown_id), headers=a)
            assert foreign.status_code == unknown.status_code == 404, (path, foreign.text)
            assert foreign.headers["content-type"].startswith("application/problem+json")
            assert foreign.json()["code"] == "job_not_found"
            assert foreign.json() == json.loads(unknown.text.replace(unknown_id, job_id))
            assert "location" not in foreign.headers

    # Queued, nothing separated or scored yet: the owner is told so, the other tenant not.
    owner = {path: gateway.get(path, headers=a, follow_redirects=False) for path in paths}
    assert [r.status_code for r in owner.values()] == [307, 307, 409, 409]
    assert owner[paths[2]].json()["code"] == "stems_not_ready"
    assert owner[paths[3]].json()["code"] == "pitch_not_ready"
    foreign_is_like_unknown()

    # The separator and the scorer have answered (bookkeeping only: no stages run here).
    row = portal.call(services.repo.get_job, "tenant-a", uuid.UUID(job_id))
    stems = {
        role: Stems(
            role=role,
            original=row["inputs"][role.value]["original"],
            vocals=row["inputs"][role.value]["original"],
            vocals_16k=row["inputs"][role.value]["original"],
            separated=True,
            duration_s=1.0,
        )
        for role in Role
    }
    separated = StemsSeparated(
        job_id=uuid.UUID(job_id),
        options=row["options"],
        performance=stems[Role.PERFORMANCE],
        reference=stems[Role.REFERENCE],
        provenance=(),
    )
    assert portal.call(services.repo.record, separated)
    contours = b'{"time_s": [0.0], "reference_cents": [0.0], "performance_cents": [1.0]}'
    aligned = portal.call(
        services.store.put_bytes, f"jobs/{job_id}/aligned_pitch.json", contours, "application/json"
    )
    portal.call(
        services.repo.pool.execute,
        "UPDATE job_stages SET details = $2 WHERE job_id = $1 AND stage = 'scorer'",
        uuid.UUID(job_id),
        {"aligned_pitch": aligned.model_dump(mode="json")},
    )
    assert gateway.get(paths[2], headers=a, follow_redirects=False).status_code == 307
    pitch = gateway.get(paths[3], headers=a)
    assert (pitch.status_code, pitch.content) == (200, contours)
    foreign_is_like_unknown()

    # The owner's redirect: a signed URL living the configured TTL, to an unguessable key.
    r = gateway.get(paths[0], headers=a, follow_redirects=False)
    assert r.headers["cache-control"] == "no-store"
    url = httpx.URL(r.headers["location"])
    assert url.params["X-Amz-Expires"] == str(ttl)
    assert url.params["X-Amz-Signature"]
    bucket, _, key = url.path.lstrip("/").partition("/")
    assert bucket == services.settings.s3_bucket
    assert "tenant-a" not in key
    # Named by the job's random (version 4) id, 122 random bits; nothing else in it is
    # a secret (`input/performance.wav` is the same for every job).
    random_parts = [part for part in key.split("/") if _uuid4(part)]
    assert random_parts == [job_id], key
    assert httpx.get(str(url), timeout=10).content == performance


def _uuid4(text: str) -> bool:
    try:
        return uuid.UUID(text).version == 4 and str(uuid.UUID(text)) == text
    except ValueError:
        return False


def test_result_is_409_until_the_job_finishes(gateway: TestClient) -> None:
    auth = api_key(gateway, "acme")
    job_id = submit(gateway, auth, sung_tone(), sung_tone()).json()["job_id"]
    r = gateway.get(f"/v1/jobs/{job_id}/result", headers=auth)
    assert r.status_code == 409
    assert r.json()["code"] == "job_not_finished"


def test_cancel_ends_the_stream_and_deletes_the_audio(gateway: TestClient) -> None:
    auth = api_key(gateway, "acme")
    job_id = submit(gateway, auth, sung_tone(), sung_tone()).json()["job_id"]
    r = gateway.delete(f"/v1/jobs/{job_id}", headers=auth)
    assert r.status_code == 200
    assert r.json()["status"] == "cancelled"
    assert r.json()["audio_objects_deleted"] == 2
    assert gateway.get(f"/v1/jobs/{job_id}", headers=auth).json()["status"] == "cancelled"
    with gateway.stream("GET", f"/v1/jobs/{job_id}/events", headers=auth) as stream:
        text = "".join(stream.iter_text())
    assert "event: cancelled" in text
    assert gateway.get(f"/v1/jobs/{job_id}/result", headers=auth).json()["code"] == "job_cancelled"
    # A client that saw the terminal event and reconnects (a browser's EventSource does,
    # after any close) is told there is nothing more (204 stops it), not kept waiting.
    terminal = int(re.findall(r"^id: (\d+)$", text, re.MULTILINE)[-1])

    def events_after(last_event_id: int) -> Any:
        headers = {**auth, "Last-Event-ID": str(last_event_id)}
        return gateway.get(f"/v1/jobs/{job_id}/events", headers=headers)

    done = events_after(terminal)
    assert (done.status_code, done.text) == (204, "")
    assert "event: cancelled" in events_after(terminal - 1).text
    past = events_after(terminal + 1)  # never sent: refused, not waited for
    assert (past.status_code, past.json()["code"]) == (400, "invalid_last_event_id")


def test_a_dependency_out_of_reach_is_a_503_to_retry_not_a_500(
    env: dict[str, str], database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the database, broker and object store clients raise when their server is down
    or restarting (raised here by hand at the call that meets it; the chaos suite restarts
    the real servers): a 503 problem naming the dependency, with Retry-After."""
    import asyncpg.exceptions
    import nats.errors
    import urllib3.exceptions

    from voicejury_gateway.app import create_app
    from voicejury_gateway.settings import GatewaySettings

    monkeypatch.setenv("VJ_DATABASE_URL", database_url)
    with TestClient(create_app(GatewaySettings()), raise_server_exceptions=False) as client:
        services = client.app.state.services  # type: ignore[attr-defined]
        auth = api_key(client, "acme")
        job_id = submit(client, auth, sung_tone(), sung_tone()).json()["job_id"]

        def fails_with(exc: BaseException) -> Any:
            async def fail(*args: Any, **kwargs: Any) -> Any:
                raise exc

            return fail

        outages = [
            (
                services.repo,
                "tenant_for_key",
                asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"),
                "database_unavailable",
            ),
            (services.bus, "cancel", nats.errors.ConnectionClosedError(), "broker_unavailable"),
            (
                services.store,
                "delete_prefix",
                urllib3.exceptions.MaxRetryError(None, "/", "refused"),  # type: ignore[arg-type]
                "object_store_unavailable",
            ),
        ]
        for target, method, exc, code in outages:
            with monkeypatch.context() as patched:
                patched.setattr(target, method, fails_with(exc))
                r = client.delete(f"/v1/jobs/{job_id}", headers=auth)
            assert r.status_code == 503, (code, r.text)
            assert r.json()["code"] == code
            assert r.headers["retry-after"] == "5"
        # Anything else stays a 500 that says nothing of its cause.
        with monkeypatch.context() as patched:
            patched.setattr(services.bus, "cancel", fails_with(KeyError("secret")))
            r = client.delete(f"/v1/jobs/{job_id}", headers=auth)
        assert (r.status_code, r.json()["code"]) == (500, "internal_error")
        assert "secret" not in r.text
        assert client.delete(f"/v1/jobs/{job_id}", headers=auth).status_code == 200
    asyncio.run(delete_namespace(NATS_URL, env["VJ_NAMESPACE"]))


def test_readiness_checks_every_dependency(gateway: TestClient) -> None:
    r = gateway.get("/readyz")
    assert r.status_code == 200
    assert r.json()["checks"] == {
        "database": True,
        "schema": True,
        "broker": True,
        "object_store": True,
    }
    assert gateway.get("/healthz").status_code == 200
    assert "voicejury_jobs_accepted_total" in gateway.get("/metrics").text


def test_unready_gateway_names_the_dependency_in_a_problem(gateway: TestClient) -> None:
    from voicejury_runtime.store import ObjectStore

    services = gateway.app.state.services  # type: ignore[attr-defined]
    reachable = services.store
    closed = services.settings.model_copy(update={"s3_endpoint": f"127.0.0.1:{free_port()}"})
    services.store = ObjectStore(closed)
    try:
        r = gateway.get("/readyz")
    finally:
        services.store = reachable
    assert r.status_code == 503
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["code"] == "not_ready"
    assert body["detail"] == "Not reachable: object_store."
    assert body["checks"] == {
        "database": True,
        "schema": True,
        "broker": True,
        "object_store": False,
    }
    assert gateway.get("/readyz").status_code == 200


def test_the_gateway_is_unready_while_the_database_is_behind_its_schema(
    env: dict[str, str], empty_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reachable is not usable: on a database the migration job has not brought to this
    code's revision every query would fail, so the replica takes no traffic. A revision
    it does not know is a newer release's (its migration ran first, mid-rollout): the old
    replica stays ready rather than leave the Service without endpoints."""
    from alembic import command

    from voicejury_gateway.app import create_app
    from voicejury_gateway.migrate import alembic_config, schema_head, upgrade
    from voicejury_gateway.settings import GatewaySettings

    url = empty_database_url
    head = schema_head().head
    monkeypatch.setenv("VJ_DATABASE_URL", url)

    def version(sql: str) -> None:
        async def run() -> None:
            con = await asyncpg.connect(url)
            try:
                await con.execute(sql)
            finally:
                await con.close()

        asyncio.run(run())

    with TestClient(create_app(GatewaySettings())) as client:
        r = client.get("/readyz")
        assert r.status_code == 503, r.text
        body = r.json()
        assert body["code"] == "not_ready"
        assert body["checks"] == {
            "database": True,
            "schema": False,
            "broker": True,
            "object_store": True,
        }
        assert "revision none" in body["detail"], body["detail"]
        assert f"needs {head}" in body["detail"]
        assert "gateway-migrate" in body["detail"]

        upgrade(url)
        assert client.get("/readyz").status_code == 200
        command.downgrade(alembic_config(url), "-1")
        behind = client.get("/readyz")
        assert behind.status_code == 503
        assert behind.json()["checks"]["schema"] is False
        upgrade(url)
        version("UPDATE alembic_version SET version_num = 'from_a_newer_release'")
        assert client.get("/readyz").status_code == 200
    asyncio.run(delete_namespace(NATS_URL, env["VJ_NAMESPACE"]))


def test_metrics_can_be_served_apart_from_the_public_api(
    env: dict[str, str], database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With `VJ_GATEWAY_METRICS_PORT` an Ingress routing the API's port cannot expose the
    metrics (tenants' job counts, refusal codes): they answer on their own port only."""
    from voicejury_gateway.app import create_app
    from voicejury_gateway.settings import GatewaySettings

    port = free_port()
    monkeypatch.setenv("VJ_DATABASE_URL", database_url)
    monkeypatch.setenv("VJ_HTTP_HOST", "127.0.0.1")
    monkeypatch.setenv("VJ_GATEWAY_METRICS_PORT", str(port))
    with TestClient(create_app(GatewaySettings())) as client:
        assert client.get("/metrics").status_code == 404
        scraped = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
        assert scraped.status_code == 200
        assert scraped.headers["content-type"].startswith("text/plain; version=")
        assert "voicejury_jobs_accepted_total" in scraped.text
        assert "voicejury_recorder_leader" in scraped.text
    with pytest.raises(httpx.ConnectError):  # closed with the app
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)
    asyncio.run(delete_namespace(NATS_URL, env["VJ_NAMESPACE"]))


def test_the_gateways_lines_about_a_job_are_json_naming_the_job(
    env: dict[str, str],
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Under VJ_LOG_JSON every line is JSON (FastStream's included), and those about a job
    carry its id: the recorder's, per event, and a route's, error handlers included."""
    from voicejury_contracts import Stage, StageProgress
    from voicejury_gateway.app import create_app
    from voicejury_gateway.settings import GatewaySettings

    monkeypatch.setenv("VJ_DATABASE_URL", database_url)
    monkeypatch.setenv("VJ_LOG_JSON", "true")
    with TestClient(create_app(GatewaySettings()), raise_server_exceptions=False) as client:
        services = client.app.state.services  # type: ignore[attr-defined]
        portal = client.portal
        assert portal is not None
        auth = api_key(client, "acme")
        job_id = submit(client, auth, sung_tone(), sung_tone()).json()["job_id"]
        record = services.repo.record
        refused = threading.Event()

        async def refusing_once(event: Any) -> bool:
            if isinstance(event, StageProgress) and not refused.is_set():
                refused.set()
                raise ConnectionError("database restarting")
            return bool(await record(event))

        monkeypatch.setattr(services.repo, "record", refusing_once)
        progress = StageProgress(
            job_id=uuid.UUID(job_id), stage=Stage.PITCH, fraction=0.5, attempt=1, seq=0
        )
        portal.call(services.bus.publish, progress)
        assert refused.wait(30)

        async def broken(*args: Any, **kwargs: Any) -> Any:
            raise KeyError("a bug")

        with monkeypatch.context() as patched:
            patched.setattr(services.bus, "cancel", broken)
            assert client.delete(f"/v1/jobs/{job_id}", headers=auth).status_code == 500
    asyncio.run(delete_namespace(NATS_URL, env["VJ_NAMESPACE"]))

    out, err = capfd.readouterr()
    records = []
    for line in (out + err).splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError:
                pytest.fail(f"not a JSON line: {line!r}")
    assert all(r["service"] == "gateway" for r in records)
    (retried,) = [r for r in records if r["msg"].startswith("recording ")]
    assert (retried["job_id"], retried["stage"]) == (job_id, "pitch"), retried
    (unhandled,) = [r for r in records if r["msg"].startswith("unhandled error on DELETE")]
    assert unhandled["job_id"] == job_id, unhandled


def test_presigned_urls_are_signed_for_the_public_endpoint(
    gateway: TestClient, s3_endpoint: str
) -> None:
    from voicejury_runtime.store import ObjectStore

    services = gateway.app.state.services  # type: ignore[attr-defined]
    port = s3_endpoint.rsplit(":", 1)[1]
    public = services.settings.model_copy(update={"s3_public_endpoint": f"localhost:{port}"})
    store = ObjectStore(public)
    key = f"jobs/{uuid.uuid4()}/probe.bin"
    gateway.portal.call(store.put_bytes, key, b"public", "application/octet-stream")  # type: ignore[union-attr]
    url = gateway.portal.call(store.presigned_get, key, 60)  # type: ignore[union-attr]
    assert url.startswith(f"http://localhost:{port}/")
    assert "X-Amz-Signature=" in url
    assert httpx.get(url, timeout=10).content == b"public"
    internal = gateway.portal.call(services.store.presigned_get, key, 60)  # type: ignore[union-attr]
    assert internal.startswith(f"http://{s3_endpoint}/")


def test_objects_are_written_once_and_checked_on_every_read(
    gateway: TestClient, tmp_path: Path
) -> None:
    """A redelivered stage writing its key again gets the first write back (the object
    must stay what the first, deduplicated, event announced); a changed object fails
    permanently, never in a retry loop."""
    from voicejury_runtime.errors import PermanentStageError
    from voicejury_runtime.store import ObjectIntegrityError

    store = gateway.app.state.services.store  # type: ignore[attr-defined]
    call = gateway.portal.call  # type: ignore[union-attr]
    key = f"jobs/{uuid.uuid4()}/performance/contour.json"
    first = call(store.put_bytes, key, b"first attempt", "application/json")
    again = call(store.put_bytes, key, b"second attempt, other bytes", "application/json")
    assert again == first
    assert call(store.get_bytes, first) == b"first attempt"
    (tmp_path / "other.wav").write_bytes(b"yet another")
    assert call(store.put_file, key, tmp_path / "other.wav", "audio/wav") == first

    store.client.put_object(store.bucket, key, io.BytesIO(b"tampered"), 8)  # behind its back
    with pytest.raises(ObjectIntegrityError, match="does not match its sha256") as caught:
        call(store.get_bytes, first)
    assert isinstance(caught.value, PermanentStageError)
    assert caught.value.code == "corrupt_object"
    with pytest.raises(ObjectIntegrityError):
        call(store.download, first, tmp_path / "copy")


def test_writers_racing_for_one_key_all_get_the_winners_object(
    gateway: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two jobs separating one new reference on two GPU replicas write the same cache keys
    with bytes that may differ. Every writer must get back the object that stayed, or the
    losers announce a checksum the object no longer has and their jobs fail as corrupt."""
    store = gateway.app.state.services.store  # type: ignore[attr-defined]
    call = gateway.portal.call  # type: ignore[union-attr]
    writers = 4
    # Every writer looks before writing and finds the key free, then all write at once:
    # the interleaving a look-then-write store gets wrong.
    all_looked = threading.Barrier(writers, timeout=30)
    looked: set[int] = set()
    look = store._stat

    def look_then_wait(key: str) -> Any:
        found = look(key)
        if threading.get_ident() not in looked:
            looked.add(threading.get_ident())
            all_looked.wait()
        return found

    monkeypatch.setattr(store, "_stat", look_then_wait)
    key = f"cache/separations/{uuid.uuid4().hex}/htdemucs-sig/vocals.wav"
    payloads = [f"take {i}".encode() * (i + 1) for i in range(writers)]
    (tmp_path / "take.wav").write_bytes(payloads[-1])

    async def race() -> list[Any]:
        puts = [store.put_bytes(key, data, "audio/wav") for data in payloads[:-1]]
        puts.append(store.put_file(key, tmp_path / "take.wav", "audio/wav"))
        return list(await asyncio.gather(*puts))

    refs = call(race)
    assert len(looked) == writers  # they really all found the key free
    assert len(set(refs)) == 1, "every writer gets the one object that stayed"
    assert call(store.get_bytes, refs[0]) in payloads  # and it is whole and checks out
    monkeypatch.undo()

    # An object this store did not write (no checksum) is replaced, as before.
    foreign = f"jobs/{uuid.uuid4()}/performance/contour.json"
    store.client.put_object(store.bucket, foreign, io.BytesIO(b"foreign"), 7)
    ours = call(store.put_bytes, foreign, b"ours", "application/json")
    assert call(store.get_bytes, ours) == b"ours"


def housekeeper(services: Any, max_redrives: int = 0, **overrides: float) -> Any:
    """The gateway's housekeeper with long bounds (and no re-drive) unless told otherwise."""
    from voicejury_gateway.housekeeping import Housekeeper

    durations = {
        "stall_timeout_s": 3600.0,
        "queue_wait_max_s": 3600.0,
        "audio_retention_s": 3600.0,
        "cache_retention_s": 3600.0,
    }
    durations.update(overrides)
    return Housekeeper(
        services.repo,
        services.bus,
        services.store,
        interval_s=60,
        max_redrives=max_redrives,
        **durations,
    )


def lose_queued_events(gateway: TestClient) -> None:
    """What a broker that lost acknowledged writes leaves: none of the events waiting in
    the job stream (no stage runs in these tests, so they would wait in line forever)."""
    services = gateway.app.state.services  # type: ignore[attr-defined]
    assert gateway.portal is not None
    gateway.portal.call(services.bus.js.purge_stream, services.bus.topology.stream.name)


def fail_stalled(portal: Any, keeper: Any, job_id: str) -> None:
    """Sweeps until the job is failed: the recorder may hold its row lock for a moment,
    and the sweep skips locked rows (it will meet them on its next round)."""
    deadline = time.monotonic() + 10
    while uuid.UUID(job_id) not in portal.call(keeper.fail_stalled):
        assert time.monotonic() < deadline, "the stalled job was never failed"
        time.sleep(0.1)


def test_a_job_waiting_in_line_at_a_busy_stage_is_not_taken_for_stalled(
    gateway: TestClient,
) -> None:
    """A backlog is not a loss: while the stage's consumer still holds messages, a job that
    has not moved is waiting its turn, up to `queue_wait_max_s`."""
    from voicejury_contracts import Stage

    auth = api_key(gateway, "acme")
    job_id = submit(gateway, auth, sung_tone(), sung_tone()).json()["job_id"]
    services = gateway.app.state.services  # type: ignore[attr-defined]
    portal = gateway.portal
    assert portal is not None
    # The separator's consumer exists from the start (every process creates them all);
    # none runs here, so the job's JobSubmitted stays undelivered: a backlog of one.
    assert portal.call(services.bus.stage_backlog, Stage.SEPARATOR) == 1
    assert portal.call(services.bus.stage_backlog, Stage.JURY) == 0

    def idle_for(minutes: int) -> None:
        portal.call(
            services.repo.pool.execute,
            f"UPDATE jobs SET updated_at = now() - interval '{minutes} minutes' WHERE id = $1",
            uuid.UUID(job_id),
        )

    keeper = housekeeper(services, stall_timeout_s=60, queue_wait_max_s=600)
    idle_for(2)  # past the stall timeout, in line
    assert portal.call(keeper.fail_stalled) == []
    assert gateway.get(f"/v1/jobs/{job_id}", headers=auth).json()["status"] == "queued"
    idle_for(11)  # past the longest wait in line
    fail_stalled(portal, keeper, job_id)
    job = gateway.get(f"/v1/jobs/{job_id}", headers=auth).json()
    assert (job["status"], job["error"]["code"]) == ("failed", "job_stalled")
    assert job["error"]["message"].startswith("no progress for 66")  # its own idle time


def test_an_event_the_database_keeps_refusing_fails_its_job_instead_of_looping(
    gateway: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refusal that no retry can change (here: a value PostgreSQL cannot store) fails the
    job with a code after a few deliveries, rather than a redelivery every 2 s forever."""
    import asyncpg.exceptions

    from voicejury_contracts import Stage, StageProgress

    auth = api_key(gateway, "acme")
    job_id = submit(gateway, auth, sung_tone(), sung_tone()).json()["job_id"]
    services = gateway.app.state.services  # type: ignore[attr-defined]
    portal = gateway.portal
    assert portal is not None
    record = services.repo.record
    refused: list[int] = []

    async def refusing(event: Any) -> bool:
        if isinstance(event, StageProgress) and event.message == "refused":
            refused.append(1)
            raise asyncpg.exceptions.UntranslatableCharacterError("\\u0000 cannot be stored")
        return bool(await record(event))

    monkeypatch.setattr(services.repo, "record", refusing)
    progress = StageProgress(
        job_id=uuid.UUID(job_id),
        stage=Stage.PITCH,
        fraction=0.5,
        message="refused",
        attempt=1,
        seq=0,
    )
    portal.call(services.bus.publish, progress)
    deadline = time.monotonic() + 60
    while (job := gateway.get(f"/v1/jobs/{job_id}", headers=auth).json())["status"] != "failed":
        assert time.monotonic() < deadline, (len(refused), job)
        time.sleep(0.5)
    assert job["error"]["code"] == "unrecordable_event"
    assert "StageProgress" in job["error"]["message"]
    assert len(refused) == 5  # then terminated, not redelivered again
    time.sleep(3)
    assert len(refused) == 5


def publish_raw(gateway: TestClient, event: Any, change: dict[str, Any]) -> None:
    """`event` published with `change` merged into its JSON: a body off its contract."""
    bus = gateway.app.state.services.bus  # type: ignore[attr-defined]
    body = json.dumps({**event.model_dump(mode="json"), **change}).encode()
    assert gateway.portal is not None
    gateway.portal.call(
        functools.partial(
            bus.broker.publish, body, bus.topology.subject(event), stream=bus.topology.stream.name
        )
    )


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"schema_version": 2}, "schema_version 2 != 1"),  # a newer stage, mid-upgrade
        ({"mood": "sunny"}, "mood"),  # a field this contract does not know
    ],
)
def test_an_end_of_job_the_gateway_cannot_read_fails_its_job_with_the_reason(
    gateway: TestClient, change: dict[str, Any], named: str
) -> None:
    """No stage reads a job's end but the gateway: dropped, it would leave the job running
    until the stall bound, then failed as stalled, with no word of why."""
    from voicejury_contracts import JobFailed, Stage

    auth = api_key(gateway, "acme")
    job_id = submit(gateway, auth, sung_tone(), sung_tone()).json()["job_id"]
    failed = JobFailed(
        job_id=uuid.UUID(job_id), stage=Stage.PITCH, code="x", message="x", attempts=1
    )
    publish_raw(gateway, failed, change)
    deadline = time.monotonic() + 30
    while (job := gateway.get(f"/v1/jobs/{job_id}", headers=auth).json())["status"] != "failed":
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    assert (job["error"]["code"], job["error"]["stage"]) == ("invalid_event", "gateway")
    assert "failed event" in job["error"]["message"]
    assert named in job["error"]["message"]


def test_an_unreadable_progress_report_or_stage_input_leaves_the_job_to_its_stage(
    gateway: TestClient,
) -> None:
    """A progress report is only dropped (failing a healthy job over it would fail every
    job in flight when a deploy adds a field); an input a stage reads is that stage's to
    fail the job over, naming itself (chaos fault 7), not the gateway's."""
    from voicejury_contracts import Stage, StageProgress

    auth = api_key(gateway, "acme")
    services = gateway.app.state.services  # type: ignore[attr-defined]
    job_id = uuid.UUID(submit(gateway, auth, sung_tone(), sung_tone()).json()["job_id"])
    report = StageProgress(job_id=job_id, stage=Stage.PITCH, fraction=0.5, attempt=1, seq=0)
    submitted = gateway.portal.call(  # type: ignore[union-attr]
        services.repo.pool.fetchrow,
        "SELECT tenant, options, inputs, id FROM jobs WHERE id = $1",
        job_id,
    )
    from voicejury_gateway.db import _submitted

    def terminated() -> float:
        value = services.registry.get_sample_value(
            "voicejury_events_recorded_total", {"outcome": "terminated"}
        )
        return float(value or 0.0)

    before = terminated()
    publish_raw(gateway, report, {"schema_version": 2})
    publish_raw(gateway, _submitted(submitted), {"schema_version": 2})
    deadline = time.monotonic() + 30
    while terminated() < before + 2:
        assert time.monotonic() < deadline, "the recorder never dropped them"
        time.sleep(0.2)
    job = gateway.get(f"/v1/jobs/{job_id}", headers=auth).json()
    assert job["status"] == "queued", job


def test_a_lost_job_is_found_behind_more_jobs_waiting_in_line_than_a_sweep_takes(
    gateway: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Jobs waiting their turn at a busy stage, more of them than one sweep reads (one,
    here, for 100 in the gateway), stalled longer than a lost job behind them: the lost
    one is still found and re-driven."""
    auth = api_key(gateway, "acme")
    services = gateway.app.state.services  # type: ignore[attr-defined]
    portal = gateway.portal
    assert portal is not None
    waiting, lost = (
        uuid.UUID(submit(gateway, auth, sung_tone(), sung_tone()).json()["job_id"])
        for _ in range(2)
    )
    # No stage runs here: both JobSubmitted wait at the separator (a backlog). The lost
    # job got past it: its next stage, pitch, has nothing queued for it.
    for job_id, minutes in ((waiting, 3), (lost, 2)):
        portal.call(
            services.repo.pool.execute,
            f"UPDATE jobs SET updated_at = now() - interval '{minutes} minutes' WHERE id = $1",
            job_id,
        )
    portal.call(
        services.repo.pool.execute,
        "UPDATE job_stages SET status = 'completed' WHERE job_id = $1 AND stage = 'separator'",
        lost,
    )
    one_at_a_time = functools.partial(services.repo.stalled_jobs, limit=1)
    monkeypatch.setattr(services.repo, "stalled_jobs", one_at_a_time)
    keeper = housekeeper(services, stall_timeout_s=60, queue_wait_max_s=600, max_redrives=1)
    assert portal.call(keeper.fail_stalled) == []

    def redrives(job_id: uuid.UUID) -> int:
        sql = "SELECT redrives FROM jobs WHERE id = $1"
        return int(portal.call(services.repo.pool.fetchval, sql, job_id))

    assert (redrives(waiting), redrives(lost)) == (0, 1)


def test_two_replicas_finding_one_stalled_job_re_drive_it_once(
    gateway: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both gateway replicas' housekeepers find the job stalled; one re-drives it first.
    The other must see that it moved: not count a second re-drive, nor (its last one
    used) fail the job the moment it was sent again."""
    auth = api_key(gateway, "acme")
    job_id = submit(gateway, auth, sung_tone(), sung_tone()).json()["job_id"]
    services = gateway.app.state.services  # type: ignore[attr-defined]
    portal = gateway.portal
    assert portal is not None
    lose_queued_events(gateway)
    portal.call(
        services.repo.pool.execute,
        "UPDATE jobs SET updated_at = now() - interval '2 minutes' WHERE id = $1",
        uuid.UUID(job_id),
    )
    # (The re-driven JobSubmitted waits at the separator: no longer wait in line for it.)
    first, second = (
        housekeeper(services, stall_timeout_s=60, queue_wait_max_s=60, max_redrives=1) for _ in "ab"
    )
    found = portal.call(services.repo.stalled_jobs, 60.0)
    assert [job for job, _, _ in found] == [uuid.UUID(job_id)]

    async def as_found_before(older_than_s: float, **_: Any) -> Any:
        return found  # what the second replica read before the first re-drove the job

    assert portal.call(first.fail_stalled) == []  # re-drive 1 of 1
    monkeypatch.setattr(second.repo, "stalled_jobs", as_found_before)
    assert portal.call(second.fail_stalled) == []
    job = gateway.get(f"/v1/jobs/{job_id}", headers=auth).json()
    assert job["status"] == "queued", job
    redrives = portal.call(
        services.repo.pool.fetchval, "SELECT redrives FROM jobs WHERE id = $1", uuid.UUID(job_id)
    )
    assert redrives == 1


def test_a_job_that_stops_moving_is_re_driven_then_failed_by_the_reconciler(
    gateway: TestClient,
) -> None:
    auth = api_key(gateway, "acme")
    job_id = submit(gateway, auth, sung_tone(), sung_tone()).json()["job_id"]
    services = gateway.app.state.services  # type: ignore[attr-defined]
    portal = gateway.portal
    assert portal is not None
    keeper = housekeeper(services, stall_timeout_s=60, max_redrives=1)
    assert portal.call(keeper.fail_stalled) == []

    def lost_and_idle() -> None:
        lose_queued_events(gateway)
        portal.call(
            services.repo.pool.execute,
            "UPDATE jobs SET updated_at = now() - interval '2 minutes' WHERE id = $1",
            uuid.UUID(job_id),
        )

    # Its JobSubmitted was lost: sent again, marked as the first re-drive.
    lost_and_idle()
    assert portal.call(keeper.fail_stalled) == []
    assert gateway.get(f"/v1/jobs/{job_id}", headers=auth).json()["status"] == "queued"
    from voicejury_contracts import JobSubmitted

    topology = services.bus.topology
    stream, subject = topology.stream.name, topology.subject(JobSubmitted)
    again = portal.call(services.bus.js.get_last_msg, stream, subject)
    assert json.loads(again.data)["job_id"] == job_id
    assert again.headers["VJ-Redrive"] == "1"
    assert portal.call(keeper.fail_stalled) == []  # its stall clock started again
    # Lost again, and the re-drives are used up: failed.
    lost_and_idle()
    fail_stalled(portal, keeper, job_id)
    assert gateway.portal.call(keeper.fail_stalled) == []  # type: ignore[union-attr]

    job = gateway.get(f"/v1/jobs/{job_id}", headers=auth).json()
    assert job["status"] == "failed"
    assert job["error"]["code"] == "job_stalled"
    assert job["error"]["stage"] == "separator"
    with gateway.stream("GET", f"/v1/jobs/{job_id}/events", headers=auth) as stream:
        text = "".join(stream.iter_text())
    assert text.count("event: failed") == 1


async def announce_max_deliveries(namespace: str, deliveries: int) -> None:
    """What nats-server publishes when the separator's consumer exhausts its deliveries on
    message 1 (the job's JobSubmitted)."""
    stream, consumer = f"{namespace.upper()}_JOBS", f"{namespace}-separator"
    advisory = {
        "stream": stream,
        "consumer": consumer,
        "stream_seq": 1,
        "deliveries": deliveries,
    }
    nc = await nats.connect(NATS_URL)
    try:
        await nc.publish(
            f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.{consumer}",
            json.dumps(advisory).encode(),
        )
        await nc.flush()
    finally:
        await nc.close()


def test_a_max_deliveries_advisory_fails_the_job_with_stage_crashed(
    gateway: TestClient, env: dict[str, str]
) -> None:
    auth = api_key(gateway, "acme")
    job_id = submit(gateway, auth, sung_tone(), sung_tone()).json()["job_id"]
    asyncio.run(announce_max_deliveries(env["VJ_NAMESPACE"], deliveries=5))
    with gateway.stream("GET", f"/v1/jobs/{job_id}/events", headers=auth) as stream_:
        text = "".join(stream_.iter_text())
    assert "event: failed" in text
    error = gateway.get(f"/v1/jobs/{job_id}", headers=auth).json()["error"]
    assert error["code"] == "stage_crashed"
    assert error["stage"] == "separator"


def test_a_failed_jobs_terminal_event_carries_its_code_message_stage_and_attempts(
    gateway: TestClient, env: dict[str, str]
) -> None:
    """The SSE client learns why its job failed from the `failed` event itself, the same
    error the REST view gives: here the separator's consumer ran out of deliveries (the
    max-deliveries advisory nats-server publishes, through the gateway's own watch)."""
    from voicejury_devstack.sse import parse_sse

    auth = api_key(gateway, "acme")
    job_id = submit(gateway, auth, sung_tone(), sung_tone()).json()["job_id"]
    # 3: not the stages' max_deliver (5), so the count seen is the advisory's.
    asyncio.run(announce_max_deliveries(env["VJ_NAMESPACE"], deliveries=3))
    with gateway.stream("GET", f"/v1/jobs/{job_id}/events", headers=auth) as stream_:
        seen = list(parse_sse(stream_.iter_lines()))
    terminal = [e for e in seen if e.event in ("completed", "failed", "cancelled")]
    assert [e.event for e in terminal] == ["failed"], seen
    assert seen[-1] is terminal[0]
    assert json.loads(terminal[0].data) == {
        "code": "stage_crashed",
        "message": "separator stopped without finishing 3 times in a row",
        "stage": "separator",
        "attempts": 3,
    }
    job = gateway.get(f"/v1/jobs/{job_id}", headers=auth).json()
    assert job["status"] == "failed"
    assert {**job["error"], "attempts": job["stages"]["separator"]["attempts"]} == json.loads(
        terminal[0].data
    )


def test_a_finished_jobs_progress_reports_go_after_the_retention_and_its_story_stays(
    gateway: TestClient,
) -> None:
    """Twenty-odd progress rows per job, kept forever, would grow the event log without
    bound: after the retention they go, once; the stage and terminal events stay, and
    the job's stream still replays what happened and ends."""
    from voicejury_contracts import Stage, StageProgress

    auth = api_key(gateway, "acme")
    services = gateway.app.state.services  # type: ignore[attr-defined]
    portal = gateway.portal
    assert portal is not None
    job_id = uuid.UUID(submit(gateway, auth, sung_tone(), sung_tone()).json()["job_id"])
    for seq in range(3):
        report = StageProgress(
            job_id=job_id, stage=Stage.SEPARATOR, fraction=(seq + 1) / 4, attempt=1, seq=seq
        )
        assert portal.call(services.repo.record, report)
    assert gateway.delete(f"/v1/jobs/{job_id}", headers=auth).status_code == 200

    def types() -> list[str]:
        return [e.type for e in portal.call(services.repo.events_after, job_id, 0)]

    before = types()
    assert (before.count("progress"), before[-1]) == (3, "cancelled")
    keeper = housekeeper(services)
    keeper.event_log_retention_s = 60.0
    assert portal.call(keeper.compact_event_logs) == 0  # ended just now
    portal.call(
        services.repo.pool.execute,
        "UPDATE jobs SET finished_at = now() - interval '2 minutes' WHERE id = $1",
        job_id,
    )
    assert portal.call(keeper.compact_event_logs) == 3
    assert types() == [t for t in before if t != "progress"]
    assert portal.call(keeper.compact_event_logs) == 0
    with gateway.stream("GET", f"/v1/jobs/{job_id}/events", headers=auth) as stream:
        replayed = [line for line in stream.iter_lines() if line.startswith("event: ")]
    assert replayed[-1] == "event: cancelled"
    assert "event: progress" not in replayed


def test_finished_jobs_lose_their_audio_after_the_retention_but_keep_their_state(
    gateway: TestClient,
) -> None:
    auth = api_key(gateway, "acme")
    job_id = submit(gateway, auth, sung_tone(), sung_tone()).json()["job_id"]
    services = gateway.app.state.services  # type: ignore[attr-defined]
    keeper = housekeeper(services, stall_timeout_s=1, audio_retention_s=60)
    portal = gateway.portal
    assert portal is not None
    portal.call(
        services.repo.pool.execute,
        "UPDATE jobs SET updated_at = now() - interval '1 hour' WHERE id = $1",
        uuid.UUID(job_id),
    )
    lose_queued_events(gateway)
    fail_stalled(portal, keeper, job_id)  # no stage runs here
    assert portal.call(keeper.expire_audio) == 0  # finished just now: within retention
    portal.call(
        services.repo.pool.execute,
        "UPDATE jobs SET finished_at = now() - interval '2 minutes' WHERE id = $1",
        uuid.UUID(job_id),
    )
    assert portal.call(keeper.expire_audio) == 2  # the two uploads
    assert portal.call(keeper.expire_audio) == 0
    assert gateway.get(f"/v1/jobs/{job_id}", headers=auth).json()["status"] == "failed"


def test_audio_gone_from_the_store_is_410_not_a_redirect_to_an_s3_error(
    gateway: TestClient,
) -> None:
    """An object can go on its own (a lifecycle rule, a cache's retention): the client
    gets a problem, not a presigned URL to S3's NoSuchKey."""
    auth = api_key(gateway, "acme")
    job_id = submit(gateway, auth, sung_tone(), sung_tone()).json()["job_id"]
    path = f"/v1/jobs/{job_id}/audio/performance/original"
    there = gateway.get(path, headers=auth, follow_redirects=False)
    assert there.status_code == 307
    services = gateway.app.state.services  # type: ignore[attr-defined]
    gateway.portal.call(services.store.delete_prefix, f"jobs/{job_id}/input/performance")  # type: ignore[union-attr]
    gone = gateway.get(path, headers=auth, follow_redirects=False)
    assert (gone.status_code, gone.json()["code"]) == (410, "audio_deleted")


def test_references_are_content_addressed_tenant_scoped_and_usable_by_jobs(
    gateway: TestClient, env: dict[str, str]
) -> None:
    a, b = api_key(gateway, "tenant-a"), api_key(gateway, "tenant-b")
    song = sung_tone(seconds=3.0)
    files = {"audio": ("song.wav", song, "audio/wav")}
    first = gateway.post("/v1/references", files=files, data={"title": "Lobo"}, headers=a)
    assert first.status_code == 202, first.text
    ref = first.json()
    assert ref["status"] == "preparing"
    again = gateway.post("/v1/references", files=files, headers=a)
    assert again.status_code == 200
    assert again.json()["reference_id"] == ref["reference_id"]
    assert gateway.get(f"/v1/references/{ref['reference_id']}", headers=b).status_code == 404

    job = submit_with_reference_id(gateway, a, ref["reference_id"])
    assert job.status_code == 202, job.text
    for bad in (
        {"reference_id": "ref_nope"},
        {},
    ):
        r = gateway.post(
            "/v1/jobs",
            files={"performance": ("p.wav", sung_tone(), "audio/wav")},
            data=bad,
            headers=a,
        )
        assert r.status_code in (404, 422), r.text
    both = gateway.post(
        "/v1/jobs",
        files={
            "performance": ("p.wav", sung_tone(), "audio/wav"),
            "reference": ("r.wav", song, "audio/wav"),
        },
        data={"reference_id": ref["reference_id"]},
        headers=a,
    )
    assert both.status_code == 422

    # Its three steps mark it ready (simulated: no stages run here).
    services = gateway.app.state.services  # type: ignore[attr-defined]
    portal = gateway.portal
    assert portal is not None
    inputs = gateway.get(f"/v1/jobs/{job.json()['job_id']}", headers=a).json()
    assert inputs["status"] == "queued"
    assert inputs["options"]["title"] == "Lobo"  # the jury names the song
    row = portal.call(services.repo.get_reference, "tenant-a", ref["reference_id"])
    assert row["audio"]["original"]["sha256"] == hashlib.sha256(song).hexdigest()
    separated, pitch, transcript = preparation_steps(row)
    record = services.repo.record_preparation
    assert portal.call(record, separated)
    assert not portal.call(record, separated)  # a redelivery changes nothing
    view = gateway.get(f"/v1/references/{ref['reference_id']}", headers=a).json()
    assert view["status"] == "preparing"
    assert view["steps"] == {"separator": True, "pitch": False, "asr": False}

    async def both_at_once() -> list[bool]:  # two recorder replicas, pitch and asr together
        return list(await asyncio.gather(record(pitch), record(transcript)))

    assert portal.call(both_at_once) == [True, True]
    ready = gateway.get(f"/v1/references/{ref['reference_id']}", headers=a).json()
    assert ready["status"] == "ready", ready
    assert ready["steps"] == {"separator": True, "pitch": True, "asr": True}
    assert ready["prepared_at"] is not None
    assert ready["title"] == "Lobo"
    # Another tenant uploading the same audio finds it ready at once.
    other = gateway.post("/v1/references", files=files, headers=b)
    assert other.status_code == 202
    assert other.json()["status"] == "ready"
    assert other.json()["steps"] == ready["steps"]

    # Each tenant lists and deletes its own; the audio goes with the last holder, once no
    # job given the reference still runs on it.
    listed = gateway.get("/v1/references", headers=a).json()
    assert [r["reference_id"] for r in listed["items"]] == [ref["reference_id"]]
    assert listed["total"] == 1
    original = row["audio"]["original"]["key"]
    sha = row["audio"]["original"]["sha256"]
    stored = services.store.stat
    keeper = housekeeper(services)
    assert gateway.delete(f"/v1/references/{ref['reference_id']}", headers=a).json() == {
        "reference_id": ref["reference_id"],
        "deleted": True,
        "audio_objects_deleted": 0,  # tenant-b holds the same audio
        "audio_in_use_by": 0,
    }
    assert gateway.get(f"/v1/references/{ref['reference_id']}", headers=a).status_code == 404
    assert gateway.get("/v1/references", headers=a).json()["total"] == 0
    assert gateway.get(f"/v1/references/{ref['reference_id']}", headers=b).status_code == 200
    assert portal.call(stored, original) is not None
    gone = gateway.delete(f"/v1/references/{ref['reference_id']}", headers=b).json()
    # Tenant-a's job still runs on it: the original stays until that job ends.
    assert (gone["audio_objects_deleted"], gone["audio_in_use_by"]) == (0, 1)
    assert portal.call(stored, original) is not None
    assert portal.call(services.repo.orphaned_originals) == [sha]
    assert portal.call(keeper.expire_audio) == 0
    assert portal.call(stored, original) is not None
    late = submit_with_reference_id(gateway, b, ref["reference_id"])
    assert (late.status_code, late.json()["code"]) == (404, "reference_not_found")
    assert gateway.delete(f"/v1/jobs/{job.json()['job_id']}", headers=a).status_code == 200
    assert portal.call(keeper.expire_audio) == 1  # the job ended: the original goes
    assert portal.call(stored, original) is None
    assert portal.call(services.repo.orphaned_originals) == []
    again = gateway.delete(f"/v1/references/{ref['reference_id']}", headers=b)
    assert again.status_code == 404
    assert again.json()["code"] == "reference_not_found"
    # Uploaded again: stored again, and its finished preparation still stands.
    back = gateway.post("/v1/references", files=files, headers=a)
    assert back.status_code == 202
    assert back.json()["status"] == "ready"
    assert portal.call(stored, original) is not None
    # Deleted while a job runs on it, then uploaded again before that job ends: the
    # original is held again and stays.
    assert submit_with_reference_id(gateway, a, ref["reference_id"]).status_code == 202
    held = gateway.delete(f"/v1/references/{ref['reference_id']}", headers=a).json()
    assert held["audio_in_use_by"] == 1
    assert gateway.post("/v1/references", files=files, headers=a).status_code == 202
    assert portal.call(keeper.expire_audio) == 0
    assert portal.call(services.repo.orphaned_originals) == []
    assert portal.call(stored, original) is not None


def test_a_job_given_a_reference_deleted_meanwhile_is_refused_not_recorded(
    gateway: TestClient,
) -> None:
    """The race the audio's lock closes: the job's request found the reference, then it
    was deleted (and its original with it) before the job was recorded."""
    from voicejury_contracts import AudioInput, JobOptions, JobSubmitted, Role
    from voicejury_gateway.db import ReferenceGoneError

    auth = api_key(gateway, "acme")
    services = gateway.app.state.services  # type: ignore[attr-defined]
    portal = gateway.portal
    assert portal is not None
    files = {"audio": ("song.wav", sung_tone(seconds=2.0, f0_hz=294.0), "audio/wav")}
    reference_id = gateway.post("/v1/references", files=files, headers=auth).json()["reference_id"]
    row = portal.call(services.repo.get_reference, "acme", reference_id)
    reference = AudioInput.model_validate(row["audio"])
    submitted = JobSubmitted(
        job_id=uuid.uuid4(),
        tenant="acme",
        performance=reference.model_copy(update={"role": Role.PERFORMANCE}),
        reference=reference,
        options=JobOptions(),
    )
    # Its preparation is under way (no stages run here), so the original stays for it.
    deleted = gateway.delete(f"/v1/references/{reference_id}", headers=auth).json()
    assert deleted["audio_in_use_by"] == 1
    with pytest.raises(ReferenceGoneError):
        portal.call(
            functools.partial(
                services.repo.insert_job,
                submitted,
                None,
                max_active=100,
                reference_id=reference_id,
            )
        )
    assert gateway.get(f"/v1/jobs/{submitted.job_id}", headers=auth).status_code == 404


def test_a_job_waiting_on_a_reference_being_deleted_does_not_hold_up_other_submissions(
    gateway: TestClient,
) -> None:
    """A deletion holds its audio's lock while it deletes the original from the object
    store; a job given that reference waits for it, and must not make every other
    submission wait too."""
    from voicejury_contracts import AudioInput, JobOptions, JobSubmitted, Role
    from voicejury_gateway.db import _lock_audio

    auth = api_key(gateway, "acme")
    services = gateway.app.state.services  # type: ignore[attr-defined]
    repo = services.repo
    files = {"audio": ("song.wav", sung_tone(seconds=2.0, f0_hz=330.0), "audio/wav")}
    reference_id = gateway.post("/v1/references", files=files, headers=auth).json()["reference_id"]
    portal = gateway.portal
    assert portal is not None
    reference = AudioInput.model_validate(
        portal.call(repo.get_reference, "acme", reference_id)["audio"]
    )

    def job() -> JobSubmitted:
        return JobSubmitted(
            job_id=uuid.uuid4(),
            tenant="acme",
            performance=reference.model_copy(update={"role": Role.PERFORMANCE}),
            reference=reference,
            options=JobOptions(),
        )

    async def scenario() -> tuple[Any, Any]:
        async with repo.pool.acquire() as deleting, deleting.transaction():
            await _lock_audio(deleting, reference.original.sha256)  # a deletion under way
            on_reference = asyncio.create_task(
                repo.insert_job(job(), None, max_active=100, reference_id=reference_id)
            )
            for _ in range(600):  # until that job waits on the audio's lock
                if await repo.pool.fetchval(
                    "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
                    "WHERE d.datname = current_database() AND l.locktype = 'advisory' "
                    "AND NOT l.granted"
                ):
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the job never waited on the audio's lock")
            # Fails with a timeout if the waiting job holds the backlog's lock.
            other = await asyncio.wait_for(repo.insert_job(job(), None, max_active=100), 30)
            assert not on_reference.done()
        return other, await on_reference  # the deletion let go (rolled back): it proceeds

    other, on_reference = portal.call(scenario)
    for job_id in (other, on_reference):
        assert gateway.get(f"/v1/jobs/{job_id}", headers=auth).json()["status"] == "queued"


def test_a_reference_is_prepared_for_the_transcript_its_jobs_need(
    gateway: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same audio uploaded by tenants with other needs of its words: a reference reads
    ready only once what its own jobs need is made (bookkeeping only: no stages run here)."""
    from voicejury_contracts import ReferenceSubmitted

    services = gateway.app.state.services  # type: ignore[attr-defined]
    portal = gateway.portal
    assert portal is not None
    announced: list[ReferenceSubmitted] = []
    publish = services.bus.publish

    async def spied(event: Any) -> None:
        if isinstance(event, ReferenceSubmitted):
            announced.append(event)
        await publish(event)

    monkeypatch.setattr(services.bus, "publish", spied)
    audio = sung_tone(seconds=2.0, f0_hz=392.0)
    keys: dict[str, dict[str, str]] = {}

    def auth(tenant: str) -> dict[str, str]:
        return keys.setdefault(tenant, api_key(gateway, tenant))

    def upload(tenant: str, **form: str) -> tuple[dict[str, Any], ReferenceSubmitted | None]:
        before = len(announced)
        files = {"audio": ("song.wav", audio, "audio/wav")}
        r = gateway.post("/v1/references", files=files, data=form, headers=auth(tenant))
        assert r.status_code == 202, r.text
        assert len(announced) - before in (0, 1)
        return dict(r.json()), (announced[-1] if len(announced) > before else None)

    def prepare(tenant: str, reference_id: str) -> None:
        row = portal.call(services.repo.get_reference, tenant, reference_id)
        for step in preparation_steps(row):
            assert portal.call(services.repo.record_preparation, step)

    def status(tenant: str, reference_id: str) -> str:
        r = gateway.get(f"/v1/references/{reference_id}", headers=auth(tenant))
        return str(r.json()["status"])

    detected, announcement = upload("t-detect")
    assert announcement is not None
    assert (announcement.transcribe, announcement.language) == (True, None)
    reference_id = detected["reference_id"]
    prepare("t-detect", reference_id)
    # The same need: shared, ready at once, nothing announced.
    same, announcement = upload("t-detect-too")
    assert (same["status"], announcement) == ("ready", None)
    # A transcript in another language is another preparation (its stems and contour come
    # from the caches the first one filled); the first stays ready.
    french, announcement = upload("t-french", language="fr")
    assert french["status"] == "preparing"
    assert announcement is not None
    assert (announcement.transcribe, announcement.language) == (True, "fr")
    prepared_ids = {announced[0].job_id, announcement.job_id}
    assert len(prepared_ids) == 2
    assert status("t-detect", reference_id) == "ready"
    # Lyrics given: no transcript needed, whatever the language.
    lyrics, announcement = upload("t-lyrics", lyrics="la la la")
    assert lyrics["status"] == "preparing"
    assert announcement is not None
    assert announcement.transcribe is False
    assert announcement.job_id not in prepared_ids
    shared, announcement = upload("t-lyrics-fr", lyrics="la la la", language="fr")
    assert (shared["status"], announcement) == ("preparing", None)  # the lyrics' one, running
    prepare("t-lyrics", reference_id)
    assert status("t-lyrics-fr", reference_id) == "ready"
    assert status("t-french", reference_id) == "preparing"
    prepare("t-french", reference_id)
    assert status("t-french", reference_id) == "ready"


def test_a_reference_preparation_that_fails_or_stalls_says_where_and_is_retried(
    gateway: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bookkeeping only (no stages run here): the events are what the stages announce."""
    from voicejury_contracts import JobFailed, Stage

    auth = api_key(gateway, "acme")
    services = gateway.app.state.services  # type: ignore[attr-defined]
    portal = gateway.portal
    assert portal is not None
    audio = sung_tone(seconds=2.0, f0_hz=330.0)

    def post() -> dict[str, Any]:
        files = {"audio": ("song.wav", audio, "audio/wav")}
        r = gateway.post("/v1/references", files=files, headers=auth)
        assert r.status_code == 202, r.text
        return dict(r.json())

    def row_of(reference_id: str) -> dict[str, Any]:
        row: dict[str, Any] = portal.call(services.repo.get_reference, "acme", reference_id)
        return row

    reference_id = post()["reference_id"]
    first = row_of(reference_id)
    separated, _, _ = preparation_steps(first)
    assert portal.call(services.repo.record_preparation, separated)
    failed = JobFailed(
        job_id=first["preparation_id"],
        stage=Stage.PITCH,
        code="invalid_audio",
        message="no",
        attempts=1,
    )
    assert portal.call(services.repo.record_preparation, failed)
    view = gateway.get(f"/v1/references/{reference_id}", headers=auth).json()
    assert view["status"] == "failed"
    assert view["error"] == {"code": "invalid_audio", "message": "no", "stage": "pitch"}
    assert view["steps"] == {"separator": True, "pitch": False, "asr": False}

    # Uploaded again: a new attempt, under a new preparation id, from scratch.
    again = post()
    assert again["status"] == "preparing"
    assert again["error"] is None
    assert again["steps"] == {"separator": False, "pitch": False, "asr": False}
    second = row_of(reference_id)
    assert second["attempt"] == 2
    assert second["preparation_id"] != first["preparation_id"]
    assert not portal.call(services.repo.record_preparation, separated)  # the old attempt's

    # It stops moving: failed after the stall bound, naming the step it waited on.
    keeper = housekeeper(services, stall_timeout_s=60, audio_retention_s=60)
    assert portal.call(keeper.fail_stalled_preparations) == []  # just started: moving
    portal.call(
        services.repo.pool.execute,
        "UPDATE reference_preparations SET updated_at = now() - interval '2 minutes' "
        "WHERE preparation_id = $1",
        second["preparation_id"],
    )
    lose_queued_events(gateway)  # its ReferenceSubmitted waited for a separator
    assert portal.call(keeper.fail_stalled_preparations) == [second["preparation_id"]]
    assert portal.call(keeper.fail_stalled_preparations) == []  # once
    error = gateway.get(f"/v1/references/{reference_id}", headers=auth).json()["error"]
    assert error["code"] == "preparation_stalled"
    assert error["stage"] == "separator"  # nothing had answered yet

    # The bus refuses the announcement: a 503, and the attempt is failed, not left to stall.
    async def refused(event: Any) -> None:
        raise ConnectionError("nats is down")

    with monkeypatch.context() as patched:
        patched.setattr(services.bus, "publish", refused)
        files = {"audio": ("song.wav", audio, "audio/wav")}
        r = gateway.post("/v1/references", files=files, headers=auth)
    assert r.status_code == 503
    assert r.json()["code"] == "broker_unavailable"
    error = gateway.get(f"/v1/references/{reference_id}", headers=auth).json()["error"]
    assert (error["code"], error["stage"]) == ("broker_unavailable", "gateway")
    assert post()["status"] == "preparing"
    assert row_of(reference_id)["attempt"] == 4


def preparation_steps(row: dict[str, Any]) -> tuple[Any, Any, Any]:
    """What the separator, pitch and asr announce for the preparation of a reference."""
    from voicejury_contracts import (
        ContourRef,
        ObjectRef,
        ReferencePitchReady,
        ReferenceSeparated,
        ReferenceTranscriptReady,
        Role,
        Stems,
        TranscriptRef,
    )

    audio = ObjectRef.model_validate(row["audio"]["original"])
    job_id = row["preparation_id"]
    stems = Stems(
        role=Role.REFERENCE,
        original=audio,
        vocals=audio,
        vocals_16k=audio,
        separated=True,
        duration_s=3.0,
    )
    contour = ContourRef(role=Role.REFERENCE, contour=audio, hop_s=0.01, frames=1, voiced_ratio=1)
    words = TranscriptRef(role=Role.REFERENCE, transcript=audio, language="en", word_count=0)
    return (
        ReferenceSeparated(job_id=job_id, stems=stems, provenance=()),
        ReferencePitchReady(job_id=job_id, contour=contour, provenance=()),
        ReferenceTranscriptReady(job_id=job_id, transcript=words, provenance=()),
    )


def submit_with_reference_id(client: TestClient, headers: dict[str, str], reference_id: str) -> Any:
    return client.post(
        "/v1/jobs",
        files={"performance": ("p.wav", sung_tone(), "audio/wav")},
        data={"reference_id": reference_id, "performance_kind": "vocals"},
        headers=headers,
    )
