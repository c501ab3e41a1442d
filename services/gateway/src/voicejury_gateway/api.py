"""The REST API (`/v1`) and its SSE progress stream."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import math
import re
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import asyncpg.exceptions
import nats.js.errors
from fastapi import APIRouter, Depends, File, Form, Header, Query, Request, Security, UploadFile
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)

from voicejury_contracts import (
    SPEECH_LANGUAGES,
    AudioInput,
    Difficulty,
    JobCancelled,
    JobFailed,
    JobOptions,
    JobResult,
    JobSubmitted,
    Role,
    SourceKind,
    Stage,
)
from voicejury_contracts.asyncapi import asyncapi_document
from voicejury_runtime.audio import AudioInfo
from voicejury_runtime.bus import Bus
from voicejury_runtime.logs import bind_log_context
from voicejury_runtime.store import ObjectStore, job_key

from .admission import backlog_full, check_backlog, tenant_backlog_full
from .auth import ADMITTED_TENANT, authenticate
from .db import (
    EVENT_PAGE,
    TERMINAL_EVENT_TYPES,
    TERMINAL_STATUSES,
    BacklogFullError,
    IdempotentJob,
    JobRepository,
    Page,
    PageAfter,
    ReferenceGoneError,
    StoredEvent,
    TenantBacklogFullError,
)
from .hub import EventHub
from .migrate import SchemaHead
from .problems import ProblemError, problem_response, problem_response_doc, unreachable_dependency
from .settings import GatewaySettings
from .uploads import EXTENSIONS, receive_audio
from .views import (
    JobAccepted,
    JobCancellation,
    JobLinks,
    JobPage,
    JobStatus,
    JobSummary,
    JobView,
    ListPage,
    Liveness,
    Readiness,
    StageError,
    StageView,
)

log = logging.getLogger(__name__)


@dataclass
class Services:
    """The gateway's composition root: everything a request handler may touch."""

    settings: GatewaySettings
    # The schema revision this code needs: /readyz fails while the database is behind it.
    schema: SchemaHead
    repo: JobRepository
    bus: Bus
    store: ObjectStore
    hub: EventHub
    registry: CollectorRegistry
    accepted: Counter
    rejected: Counter
    streams: Gauge
    background: set[asyncio.Task[None]] = field(default_factory=set)


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


# The two ways to present an API key, as the OpenAPI document's security schemes (either
# one will do). They only declare the headers: `authenticate` reads the key, as it does
# for the admission middleware, which runs before any dependency.
bearer_auth = HTTPBearer(
    scheme_name="bearer",
    description="an API key: `Authorization: Bearer <key>`",
    auto_error=False,
)
api_key_auth = APIKeyHeader(
    name="X-API-Key",
    scheme_name="apiKey",
    description="an API key, instead of `Authorization`",
    auto_error=False,
)


async def get_tenant(
    request: Request,
    services: ServicesDep,
    _bearer: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_auth)],
    _api_key: Annotated[str | None, Security(api_key_auth)],
) -> str:
    """The caller's tenant, from `Authorization: Bearer <key>` or `X-API-Key`."""
    admitted: str | None = request.scope.get("state", {}).get(ADMITTED_TENANT)
    if admitted is not None:  # the admission middleware has checked the key already
        return admitted
    return await authenticate(services.repo, services.settings.gateway_auth_mode, request.headers)


TenantDep = Annotated[str, Depends(get_tenant)]


async def job_in_logs(request: Request) -> None:
    """Every line logged while serving a request about a job carries the job's id, those
    of the error handlers included (they run outside the route, in the request's task)."""
    try:
        job_id = uuid.UUID(request.path_params.get("job_id", ""))
    except ValueError:
        return
    bind_log_context(job_id=str(job_id))


# A reference's id: its audio's sha256, shortened (see references.reference_id_for).
REFERENCE_ID_PATTERN = r"^ref_[0-9a-f]{32}$"

router = APIRouter()


def _links(job_id: uuid.UUID) -> JobLinks:
    base = f"/v1/jobs/{job_id}"
    return JobLinks(self=base, events=f"{base}/events", result=f"{base}/result")


def _accepted(job_id: uuid.UUID, status: str) -> JSONResponse:
    body = JobAccepted(job_id=job_id, status=status, links=_links(job_id))
    return JSONResponse(
        body.model_dump(mode="json"), status_code=202, headers={"Location": body.links.self}
    )


async def job_or_404(services: Services, tenant: str, job_id: uuid.UUID) -> dict[str, Any]:
    # Another tenant's job answers exactly like a missing one: ids leak nothing.
    job = await services.repo.get_job(tenant, job_id)
    if job is None:
        raise ProblemError(404, "job_not_found", f"no job {job_id}")
    return job


@router.post(
    "/v1/jobs",
    status_code=202,
    response_model=JobAccepted,
    summary="Submit a performance to score against a reference",
)
async def submit_job(
    services: ServicesDep,
    tenant: TenantDep,
    performance: Annotated[UploadFile, File(description="the singer's recording")],
    reference: Annotated[
        UploadFile | None, File(description="the reference song or its vocals")
    ] = None,
    reference_id: Annotated[
        str | None,
        Form(
            max_length=100,
            description="a reference stored with POST /v1/references, instead of a file",
        ),
    ] = None,
    performance_kind: Annotated[SourceKind, Form()] = SourceKind.MIX,
    reference_kind: Annotated[
        SourceKind | None,
        Form(
            description="the uploaded reference's kind (default mix); with `reference_id`, "
            "the stored reference keeps the kind it was prepared with, and a different one "
            "here is refused"
        ),
    ] = None,
    # PostgreSQL text and jsonb cannot hold U+0000.
    lyrics: Annotated[str | None, Form(max_length=20_000, pattern=r"^[^\x00]*$")] = None,
    title: Annotated[str | None, Form(max_length=300, pattern=r"^[^\x00]*$")] = None,
    language: Annotated[
        str | None, Form(max_length=16, description="a Whisper language code; none = detect")
    ] = None,
    difficulty: Annotated[Difficulty, Form()] = Difficulty.NORMAL,
    jury: Annotated[bool, Form()] = True,
    allow_key_change: Annotated[bool, Form()] = True,
    # Not empty: a blank key would be one key shared by every blank-keyed submission.
    idempotency_key: Annotated[
        str | None, Header(alias="Idempotency-Key", min_length=1, max_length=200)
    ] = None,
) -> JSONResponse:
    repo, settings = services.repo, services.settings
    if (reference is None) == (reference_id is None):
        raise ProblemError(
            422, "invalid_request", "give exactly one of `reference` (a file) or `reference_id`"
        )
    language = speech_language(language)
    fingerprint = None
    if idempotency_key:
        # Looked up first: the retry of an accepted job gets that job whatever has
        # happened since (its reference deleted, the backlog full).
        fields = {
            "reference_id": reference_id,
            "performance_kind": performance_kind,
            # As before the field could be left out: an omitted kind is the default's.
            "reference_kind": reference_kind or SourceKind.MIX,
            "lyrics": lyrics,
            "title": title,
            "language": language,
            "difficulty": difficulty,
            "jury": jury,
            "allow_key_change": allow_key_change,
        }
        fingerprint = await request_fingerprint(
            fields, performance=performance, reference=reference
        )
        existing = await repo.find_idempotent(tenant, idempotency_key)
        if existing and not await _replay_submits_anew(services, existing):
            return _replayed(services, existing, idempotency_key, fingerprint)
    stored_reference = None
    if reference_id is not None:
        if re.fullmatch(REFERENCE_ID_PATTERN, reference_id):
            stored_reference = await repo.get_reference(tenant, reference_id)
        if stored_reference is None:
            raise ProblemError(404, "reference_not_found", f"no reference {reference_id}")
        stored_kind = SourceKind(stored_reference["audio"]["kind"])
        if reference_kind not in (None, stored_kind):
            raise ProblemError(
                422,
                "reference_kind_mismatch",
                f"reference {reference_id} was prepared as {stored_kind.value}, not "
                f"{reference_kind.value}: leave `reference_kind` out, or prepare the reference "
                f"again with kind={reference_kind.value}",
            )
    try:
        await check_backlog(services, tenant)
    except ProblemError as exc:
        raise _refused(services, exc) from None

    job_id = uuid.uuid4()
    bind_log_context(job_id=str(job_id))
    received: list[tuple[Role, SourceKind, Path, AudioInfo, str]] = []
    inputs: dict[Role, AudioInput] = {}
    recorded: uuid.UUID | None = None
    stored = False
    try:
        with tempfile.TemporaryDirectory(prefix="vj-upload-") as tmp:
            # Both files are checked before either is stored: a refused upload leaves no
            # object.
            uploads = [(Role.PERFORMANCE, performance, performance_kind)]
            if reference is not None:
                uploads.append((Role.REFERENCE, reference, reference_kind or SourceKind.MIX))
            for role, upload, kind in uploads:
                try:
                    checked = await receive_audio(
                        upload,
                        role.value,
                        Path(tmp),
                        settings.audio_limits,
                        settings.gateway_max_upload_bytes,
                    )
                except ProblemError as exc:
                    services.rejected.labels(exc.code).inc()
                    raise
                received.append((role, kind, *checked))
            stored = True
            for role, kind, path, info, content_type in received:
                ext = EXTENSIONS.get(content_type, "bin")
                ref = await services.store.put_file(
                    job_key(job_id, "input", f"{role.value}.{ext}"), path, content_type
                )
                inputs[role] = AudioInput(
                    role=role,
                    kind=kind,
                    original=ref,
                    duration_s=info.duration_s,
                    sample_rate=info.sample_rate,
                    channels=info.channels,
                )

        if stored_reference is not None:
            # Its original is content-addressed, so the separator finds its cached stems.
            inputs[Role.REFERENCE] = AudioInput.model_validate(stored_reference["audio"])
            lyrics = lyrics or stored_reference["lyrics"]
            language = language or stored_reference["language"]
            title = title or stored_reference["title"]
        submitted = JobSubmitted(
            job_id=job_id,
            tenant=tenant,
            performance=inputs[Role.PERFORMANCE],
            reference=inputs[Role.REFERENCE],
            options=JobOptions(
                language=language,
                lyrics=lyrics or None,
                title=title or None,
                difficulty=difficulty,
                jury=jury,
                allow_key_change=allow_key_change,
            ),
        )
        try:
            recorded = await repo.insert_job(
                submitted,
                idempotency_key,
                max_active=settings.gateway_max_backlog,
                max_active_per_tenant=settings.gateway_max_active_jobs_per_tenant,
                request_sha256=fingerprint,
                reference_id=reference_id,
            )
        except ReferenceGoneError as exc:
            raise ProblemError(
                404, "reference_not_found", f"reference {reference_id} was deleted meanwhile"
            ) from exc
        except BacklogFullError as exc:
            raise _refused(services, backlog_full()) from exc
        except TenantBacklogFullError as exc:
            refusal = tenant_backlog_full(settings.gateway_max_active_jobs_per_tenant)
            raise _refused(services, refusal) from exc
    finally:
        if stored and recorded != job_id:
            # No committed row refers to what is stored under jobs/<id>/ (the store failed
            # on the second file, the database on the insert, the job was refused or lost a
            # key race), so no retention sweep would ever find it: it goes now. Best
            # effort: with the store out of reach too, the bucket's lifecycle rule on
            # jobs/ (deploy/k8s/base/minio.yaml) is what deletes it.
            await best_effort(services.store.delete_prefix(job_key(job_id)))
    if recorded != job_id:  # lost an Idempotency-Key race: the other request's job stands
        assert idempotency_key is not None
        winner = await repo.find_idempotent(tenant, idempotency_key)
        if winner is None:  # the winner was refused meanwhile, which released its key
            raise ProblemError(
                409,
                "idempotency_key_in_use",
                "a concurrent request with this Idempotency-Key was refused; retry",
            )
        return _replayed(services, winner, idempotency_key, fingerprint)
    try:
        if not services.bus.connected:
            raise ConnectionError("not connected to NATS")
        # 202 only once JetStream has acknowledged the first event.
        await services.bus.publish(submitted)
    except Exception as exc:
        raise await _not_queued(services, job_id, exc) from exc
    # Acknowledged: the job will run, so this request's 202 stands even if the mark is
    # lost (the recorder clears it too when the event comes by).
    await best_effort(repo.mark_published(job_id))
    services.accepted.inc()
    return _accepted(job_id, "queued")


def _same_request(existing: IdempotentJob, key: str, fingerprint: str | None) -> None:
    if existing.request_sha256 is not None and existing.request_sha256 != fingerprint:
        raise ProblemError(
            422,
            "idempotency_key_reused",
            f"Idempotency-Key {key!r} was used for another request (job {existing.job_id}); "
            "a new request needs a new key",
        )


async def _replay_submits_anew(services: Services, existing: IdempotentJob) -> bool:
    """Whether a retry under `key` is to submit its job anew: the key's job ended without
    JetStream ever acknowledging its first event (its submission got a 503, or its
    gateway died before answering and the reconciler gave the job up), so no request
    under this key was ever told 202. Its key is released here, as the 503 path does
    (and, as there, the key is free for any request)."""
    if not existing.publish_pending or existing.status not in TERMINAL_STATUSES:
        return False
    return await services.repo.release_unqueued_key(existing.job_id)


def _replayed(
    services: Services, existing: IdempotentJob, key: str, fingerprint: str | None
) -> JSONResponse:
    """The answer to a retry: the job its key made, if it is the same request and its
    first event was acknowledged (202); 409 with Retry-After while that is still open."""
    _same_request(existing, key, fingerprint)
    if existing.publish_pending and existing.status in TERMINAL_STATUSES:
        # Never acknowledged, and its key not released yet (a concurrent retry's moment).
        raise ProblemError(
            409,
            "idempotency_key_in_use",
            "the job this Idempotency-Key made was never queued; retry to submit it anew",
            retry_after_s=1,
        )
    if existing.publish_pending:
        # The first request still waits for JetStream: its job may yet be refused (503),
        # and a 202 now would be for a job that never runs.
        retry_after_s = max(1, math.ceil(services.settings.publish_timeout_s))
        raise ProblemError(
            409,
            "idempotency_key_in_flight",
            f"the request that made job {existing.job_id} with this Idempotency-Key is "
            "still being queued; retry to learn its outcome",
            retry_after_s=retry_after_s,
        )
    return _accepted(existing.job_id, existing.status)


def speech_language(value: str | None) -> str | None:
    """A job's or reference's `language` field: a language the transcription knows, or None
    (detect). Refused here rather than by a stage minutes later."""
    if value is None or not value.strip():
        return None
    code = value.strip().lower()
    if code not in SPEECH_LANGUAGES:
        raise ProblemError(
            422,
            "unsupported_language",
            f"language {value!r} is not one the transcription knows; give a code such as "
            "'en' or 'fr' (ISO 639-1), or none to detect it",
        )
    return code


async def request_fingerprint(fields: dict[str, Any], **files: UploadFile | None) -> str:
    """sha256 of a submission: its fields and the bytes of each file, read from the spooled
    upload (which is left at its start for the endpoint to read again)."""
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode())
    for name, upload in sorted(files.items()):
        digest.update(f"\0{name}\0".encode())
        if upload is None:
            continue
        await upload.seek(0)
        while chunk := await upload.read(1 << 20):
            digest.update(chunk)
        await upload.seek(0)
    return digest.hexdigest()


def _refused(services: Services, refusal: ProblemError) -> ProblemError:
    services.rejected.labels(refusal.code).inc()
    return refusal


# JetStream's refusals for lack of room, by `err_code` (nats-server's errors.json), as
# opposed to a broker out of reach. The jobs stream at its own bound (discard new) answers
# 10077 "stream store failed", whose description is the store's own error: which bound.
_JS_STREAM_STORE_FAILED = 10077
_STREAM_LIMITS = frozenset(
    {"maximum bytes exceeded", "maximum messages exceeded", "maximum messages per subject exceeded"}
)
# The broker's JetStream storage itself is spent, whoever filled it (other streams, other
# tenants): 10023 "insufficient resources" (the server's max_file_store, on a publish),
# 10002 "resource limits exceeded for account" (the account's share), 10047 "insufficient
# storage resources available" (no room left to reserve).
_JS_STORAGE_FULL = frozenset({10023, 10002, 10047})

# code -> (detail, Retry-After in seconds) of the 503 a refused submission gets.
_NOT_QUEUED: dict[str, tuple[str, int]] = {
    "queue_full": ("the job queue is full; retry later", 30),
    "broker_storage_full": ("the message broker's storage is full; retry later", 30),
    "broker_unavailable": ("the message broker is unavailable; retry shortly", 5),
}


def _not_queued_code(exc: Exception) -> str:
    """Why JetStream did not take the first event, as the refusal's stable code."""
    if isinstance(exc, nats.js.errors.APIError):
        if exc.err_code in _JS_STORAGE_FULL:
            return "broker_storage_full"
        description = (exc.description or "").lower()
        if exc.err_code == _JS_STREAM_STORE_FAILED and description in _STREAM_LIMITS:
            return "queue_full"
    return "broker_unavailable"


async def _not_queued(services: Services, job_id: uuid.UUID, exc: Exception) -> ProblemError:
    """The first event was not acknowledged: the client gets a 503 and the job must never run.

    The code says what the client and the operator wait for, from JetStream's `err_code`
    rather than from the message's wording (only 10077, which covers every store failure,
    is told apart by the store's own error):
    `queue_full` when the jobs stream is at its own bound (`VJ_STREAM_MAX_BYTES`: the
    backlog, which drains as the stages work); `broker_storage_full` when the broker's
    JetStream storage is spent, possibly by other streams or tenants on the same server (it
    does not drain by itself: an operator must free or add space, so it is a code of its
    own rather than `queue_full`); `broker_unavailable` for anything else (no answer, a
    reconnecting client, another refusal).

    The publish may still reach the stream later (the client library resends what it had
    buffered once it reconnects), so the job is recorded as failed, which the recorder
    never reopens, and its cancel flag is raised as soon as the bus answers, which makes
    every stage skip it. Its Idempotency-Key is released, so that the client's retry with
    the same key (what the key is for) submits the job anew rather than finding this one.
    Each step is best effort: nothing here may turn the 503 into a 500.
    """
    code = _not_queued_code(exc)
    log.error("could not queue job %s: %s", job_id, exc)
    services.rejected.labels(code).inc()
    failed = JobFailed(
        job_id=job_id,
        stage=Stage.GATEWAY,
        code=code,
        message="the job could not be queued and will not run",
        attempts=1,
    )
    await best_effort(services.repo.record(failed))
    await best_effort(services.repo.release_idempotency_key(job_id))
    await best_effort(services.store.delete_prefix(job_key(job_id)))
    task = asyncio.create_task(_cancel_when_reachable(services.bus, job_id))
    services.background.add(task)  # a reference, so the loop does not collect it early
    task.add_done_callback(services.background.discard)
    detail, retry_after_s = _NOT_QUEUED[code]
    return ProblemError(503, code, detail, retry_after_s=retry_after_s)


async def _cancel_when_reachable(bus: Bus, job_id: uuid.UUID, attempts: int = 300) -> None:
    for _ in range(attempts):
        try:
            await bus.cancel(job_id)
            return
        except Exception:
            await asyncio.sleep(2.0)


async def best_effort(aw: Awaitable[object]) -> None:
    try:
        await aw
    except Exception as exc:
        log.warning("cleanup step failed: %s", exc)


def iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def _job_view(job: dict[str, Any]) -> JobView:
    job_id = job["id"]
    error = None
    if job["error_code"]:
        error = StageError(
            code=job["error_code"], message=job["error_message"], stage=job["error_stage"]
        )
    stages = {
        s["stage"]: StageView(
            status=s["status"],
            progress=round(float(s["progress"]), 3),
            attempts=s["attempts"],
            started_at=iso(s["started_at"]),
            finished_at=iso(s["finished_at"]),
        )
        for s in job["stages"]
    }
    return JobView(
        job_id=job_id,
        status=job["status"],
        progress=round(float(job["progress"]), 3),
        stages=stages,
        attempts=sum(s["attempts"] for s in job["stages"]),
        error=error,
        options=job["options"],
        created_at=job["created_at"].isoformat(),
        updated_at=job["updated_at"].isoformat(),
        finished_at=iso(job["finished_at"]),
        links=_links(job_id),
    )


@router.get(
    "/v1/jobs/{job_id}",
    response_model=JobView,
    summary="A job's status, per-stage status and error",
)
async def get_job(services: ServicesDep, tenant: TenantDep, job_id: uuid.UUID) -> JobView:
    return _job_view(await job_or_404(services, tenant, job_id))


PageLimit = Annotated[int, Query(ge=1, le=100)]
PageCursor = Annotated[
    str | None,
    Query(
        max_length=200,
        description="`next_cursor` of the previous page; none for the newest items",
    ),
]


def encode_cursor(row: dict[str, Any]) -> str:
    """An opaque cursor for the page after `row`: its created_at and id (keyset)."""
    raw = json.dumps([row["created_at"].isoformat(), str(row["id"])]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(
    cursor: str | None, request: Request, parse_id: Callable[[str], Any]
) -> PageAfter:
    """The row a page starts after; 422 for a cursor no list gave out. An `offset` (the
    earlier pagination, which repeated and skipped items as jobs came in) is refused
    rather than ignored, which would hand a client page one forever."""
    if "offset" in request.query_params:
        raise ProblemError(
            422,
            "offset_not_supported",
            "lists are paginated with `cursor` (the previous page's `next_cursor`), not offset",
        )
    if cursor is None:
        return None
    try:
        created_at, key = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(created_at, str) or not isinstance(key, str):
            raise TypeError("not a cursor")
        when = datetime.fromisoformat(created_at)
        if when.tzinfo is None:
            raise ValueError("naive timestamp")
        return when.astimezone(UTC), parse_id(key)
    # binascii.Error, JSONDecodeError and UnicodeDecodeError are ValueErrors.
    except (ValueError, TypeError, OverflowError) as exc:
        raise ProblemError(
            422, "invalid_cursor", "cursor must be a next_cursor this list returned"
        ) from exc


PageT = TypeVar("PageT", bound=ListPage[Any])


def page_body(page_type: type[PageT], page: Page, items: Sequence[Any], limit: int) -> PageT:
    next_cursor = encode_cursor(page.rows[-1]) if page.more and page.rows else None
    return page_type(items=items, total=page.total, limit=limit, next_cursor=next_cursor)


@router.get("/v1/jobs", response_model=JobPage, summary="The caller's recent jobs, newest first")
async def list_jobs(
    request: Request,
    services: ServicesDep,
    tenant: TenantDep,
    limit: PageLimit = 20,
    cursor: PageCursor = None,
    status: Annotated[
        list[JobStatus] | None,
        Query(description="only jobs in these statuses (repeat it for several); all if none"),
    ] = None,
) -> JobPage:
    after = decode_cursor(cursor, request, uuid.UUID)
    page = await services.repo.list_jobs(tenant, limit, after, statuses=status or ())
    items = [
        JobSummary(
            job_id=r["id"],
            status=r["status"],
            progress=round(float(r["progress"]), 3),
            created_at=r["created_at"].isoformat(),
            finished_at=iso(r["finished_at"]),
            error_code=r["error_code"],
            links=_links(r["id"]),
        )
        for r in page.rows
    ]
    return page_body(JobPage, page, items, limit)


@router.get(
    "/v1/jobs/{job_id}/result",
    summary="The scored result of a completed job",
    # Described, not validated: the stored result goes out as it was stored, so one an
    # older version wrote (a field since renamed or dropped) cannot turn into a 500.
    responses={
        200: {
            "model": JobResult,
            "description": "The result, as stored when the job completed (one stored by an "
            "older version lacks the fields added since)",
        }
    },
)
async def get_result(services: ServicesDep, tenant: TenantDep, job_id: uuid.UUID) -> Any:
    job = await job_or_404(services, tenant, job_id)
    if job["status"] == "failed":
        raise ProblemError(
            409,
            "job_failed",
            f"the job failed in {job['error_stage']}: {job['error_message']}",
            error={
                "code": job["error_code"],
                "message": job["error_message"],
                "stage": job["error_stage"],
            },
        )
    if job["status"] == "cancelled":
        raise ProblemError(409, "job_cancelled", "the job was cancelled; it has no result")
    result = await services.repo.get_result(job_id)
    if job["status"] != "completed" or result is None:
        raise ProblemError(
            409,
            "job_not_finished",
            f"the job is {job['status']} ({job['progress']:.0%}); follow its events",
        )
    return result


@router.delete(
    "/v1/jobs/{job_id}",
    response_model=JobCancellation,
    summary="Cancel a job and delete its audio",
)
async def cancel_job(
    services: ServicesDep, tenant: TenantDep, job_id: uuid.UUID
) -> JobCancellation:
    await job_or_404(services, tenant, job_id)
    # The flag first: stages stop at their next checkpoint even before the event lands.
    await services.bus.cancel(job_id)
    event = JobCancelled(job_id=job_id)
    status = await services.repo.cancel(job_id, event)
    if status == "cancelled":
        await services.bus.publish(event)
    deleted = await services.store.delete_prefix(job_key(job_id))
    await services.repo.mark_audio_deleted(job_id)
    return JobCancellation(job_id=job_id, status=status, audio_objects_deleted=deleted)


def _sse(event: StoredEvent) -> str:
    return f"id: {event.seq}\nevent: {event.type}\ndata: {json.dumps(event.data)}\n\n"


_SSE_EVENT_SCHEMA: dict[str, Any] = {
    "title": "JobEvent",
    "type": "object",
    "required": ["id", "event", "data"],
    "properties": {
        "id": {
            "type": "string",
            "pattern": "^[0-9]+$",
            "description": "the event's sequence number in the job; Last-Event-ID resumes after it",
        },
        "event": {"type": "string", "enum": ["progress", "stage", *sorted(TERMINAL_EVENT_TYPES)]},
        "data": {
            "type": "string",
            "description": "a JSON object: `progress` {stage, fraction, progress, message}; "
            "`stage` {stage, status, attempt?}; `completed` {score}; `failed` {code, message, "
            "stage, attempts}; `cancelled` {reason}",
        },
    },
}


class _ReadBackoff:
    """The delay before an SSE stream reads its job's log again after a failed read:
    doubling from `first_s` up to `cap_s`; None while reads succeed."""

    first_s = 0.25

    def __init__(self, cap_s: float) -> None:
        self.cap_s = cap_s
        self.delay_s: float | None = None

    def failed(self) -> None:
        previous = self.delay_s
        self.delay_s = min(self.cap_s, self.first_s if previous is None else 2 * previous)

    def recovered(self) -> None:
        self.delay_s = None


async def _read_events(
    repo: JobRepository, job_id: uuid.UUID, after_seq: int, outage: _ReadBackoff
) -> list[StoredEvent] | None:
    """The job's events after `after_seq`; None when the database is out of reach. An open
    stream outlives a database restart: cutting it would leave the client reconnecting
    into 503s (a browser's EventSource gives up for good on a non-200), whereas the stream
    resumes from its last sent id once the database answers."""
    try:
        batch = await repo.events_after(job_id, after_seq)
    except Exception as exc:
        if unreachable_dependency(exc) is None and not isinstance(exc, OSError):
            raise
        if outage.delay_s is None:
            log.warning("events of %s unreadable, the stream waits: %r", job_id, exc)
        outage.failed()
        return None
    if outage.delay_s is not None:
        log.info("events of %s readable again", job_id)
        outage.recovered()
    return batch


@router.get(
    "/v1/jobs/{job_id}/events",
    summary="Server-Sent Events: progress, stage changes and one terminal event",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "The event stream: `progress`, `stage` and one terminal event "
            "(`completed`, `failed` or `cancelled`), each with an `id` to resume from "
            "(`Last-Event-ID`); `: keep-alive` comments while idle",
            # Before OpenAPI 3.2 (`itemSchema`), a stream's schema describes one event.
            "content": {"text/event-stream": {"schema": _SSE_EVENT_SCHEMA}},
        },
        204: {
            "description": "Last-Event-ID is the job's terminal event: nothing more will come "
            "(an EventSource stops reconnecting)"
        },
    },
)
async def job_events(
    request: Request,
    services: ServicesDep,
    tenant: TenantDep,
    job_id: uuid.UUID,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> Response:
    # Read before the newest event id: a terminal status means its terminal event (written
    # in the same transaction) is in, and last of all.
    job = await job_or_404(services, tenant, job_id)
    last_event_id = (last_event_id or "0").strip()
    # Event seqs are bigints: at most 19 digits, checked here, not mid-stream.
    if not re.fullmatch(r"[0-9]{1,19}", last_event_id) or int(last_event_id) >= 1 << 63:
        raise ProblemError(
            400, "invalid_last_event_id", "Last-Event-ID must be an event id this stream sent"
        )
    last_seq = int(last_event_id)
    if last_seq:
        # Ids are the job's event seqs, which only grow: an id past the newest was never
        # sent, and waiting for it would keep the stream open past the terminal event.
        newest = await services.repo.last_event_seq(job_id)
        if last_seq > newest:
            raise ProblemError(
                400,
                "invalid_last_event_id",
                f"Last-Event-ID {last_seq} is past the job's newest event ({newest})",
            )
        if last_seq == newest and job["status"] in TERMINAL_STATUSES:
            # The client saw the terminal event (a browser reconnects after any close):
            # 204 tells an EventSource to stop.
            return Response(status_code=204)
    keepalive = services.settings.gateway_sse_keepalive_s

    async def stream() -> AsyncIterator[str]:
        nonlocal last_seq
        services.streams.inc()
        outage = _ReadBackoff(cap_s=keepalive)
        try:
            with services.hub.subscribe(str(job_id)) as wake:
                yield "retry: 2000\n\n"
                while True:
                    wake.clear()
                    while True:
                        batch = await _read_events(services.repo, job_id, last_seq, outage)
                        for event in batch or ():
                            yield _sse(event)
                            last_seq = event.seq
                            if event.type in TERMINAL_EVENT_TYPES:
                                return
                        if batch is None or len(batch) < EVENT_PAGE:  # else the next page
                            break
                    if await request.is_disconnected():
                        return
                    try:
                        # While the database is out of reach, read again after a growing
                        # delay (at most the keep-alive interval): its listener is cut off
                        # too, so no wake-up comes.
                        wait_s = keepalive if outage.delay_s is None else outage.delay_s
                        await asyncio.wait_for(wake.wait(), timeout=wait_s)
                    except TimeoutError:
                        yield ": keep-alive\n\n"
        finally:
            services.streams.dec()

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.get("/healthz", response_model=Liveness, summary="Liveness: the process answers")
async def healthz() -> Liveness:
    return Liveness(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Readiness: database (migrated to this code's schema), broker and object store",
    responses={
        503: problem_response_doc(
            "Not ready (`not_ready`): `detail` says what to fix",
            ready={"const": False},
            checks=Readiness.model_json_schema()["properties"]["checks"],
        )
    },
)
async def readyz(services: ServicesDep) -> Readiness | JSONResponse:
    checks: dict[str, bool] = {}
    try:
        revisions = await schema_revisions(services.repo)
        checks["database"] = True
        checks["schema"] = not services.schema.behind(revisions)
    except Exception:
        revisions = frozenset()
        checks["database"] = checks["schema"] = False
    checks["broker"] = await services.bus.ping()
    try:
        checks["object_store"] = await services.store.ping()
    except Exception:
        checks["object_store"] = False
    if all(checks.values()):
        return Readiness(ready=True, checks=checks)
    down = [name for name, ok in checks.items() if not ok and name != "schema"]
    reasons = [f"Not reachable: {', '.join(down)}."] if down else []
    if checks["database"] and not checks["schema"]:
        at = ", ".join(sorted(revisions)) or "none (never migrated)"
        reasons.append(
            f"Database schema at revision {at}; this gateway needs {services.schema.head}: "
            "run `python -m voicejury_gateway migrate` (the gateway-migrate Job)."
        )
    return problem_response(503, "not_ready", " ".join(reasons), ready=False, checks=checks)


async def schema_revisions(repo: JobRepository) -> frozenset[str]:
    """The database's Alembic revisions (none before its first migration)."""
    try:
        rows = await repo.pool.fetch("SELECT version_num FROM alembic_version")
    except asyncpg.exceptions.UndefinedTableError:
        return frozenset()
    return frozenset(row["version_num"] for row in rows)


@router.get("/asyncapi.json", summary="The pipeline's event contracts (AsyncAPI 3.0)")
async def asyncapi(services: ServicesDep) -> dict[str, Any]:
    return asyncapi_document(services.bus.topology)


# Included on the API's port only when no `gateway_metrics_port` is set.
metrics_router = APIRouter()


@metrics_router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(services: ServicesDep) -> Response:
    return Response(generate_latest(services.registry), media_type=CONTENT_TYPE_LATEST)


__all__ = ["TERMINAL_STATUSES", "Services", "job_in_logs", "metrics_router", "router"]
