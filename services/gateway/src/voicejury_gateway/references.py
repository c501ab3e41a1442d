"""Reference songs prepared ahead of jobs: upload once, analyse once, score against it often.

A preparation runs the reference through the separator, then pitch and asr, each of which
leaves its part in a content-addressed cache (stems, contour, transcript when no lyrics
came with it). A job on a ready reference then separates nothing and analyses only the
performance. One preparation per distinct audio, kind and transcript need serves every
tenant that uploads it (`reference_preparations`): the need is `none` when lyrics came with
the reference, else a transcript in its language, or in the detected one. A second
preparation of the same audio for another need finds the stems and contour cached and only
transcribes. A failed one is tried again when the audio is uploaded again.
"""

from __future__ import annotations

import asyncio
import re
import tempfile
import uuid
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse

from voicejury_contracts import (
    REFERENCE_STEPS,
    AudioInput,
    JobFailed,
    ReferenceSubmitted,
    Role,
    SourceKind,
    Stage,
)
from voicejury_runtime.audio import AudioInfo
from voicejury_runtime.store import reference_key, sha256_file

from .api import (
    REFERENCE_ID_PATTERN,
    PageCursor,
    PageLimit,
    Services,
    ServicesDep,
    TenantDep,
    best_effort,
    decode_cursor,
    iso,
    page_body,
    speech_language,
)
from .problems import ProblemError
from .uploads import EXTENSIONS, receive_audio
from .views import ReferenceDeleted, ReferencePage, ReferenceView, StageError

router = APIRouter()

# Malformed ids answer 404 like unknown ones (see problems.on_validation).
ReferenceId = Annotated[str, PathParam(pattern=REFERENCE_ID_PATTERN)]


def reference_id_for(sha256: str) -> str:
    """Content-addressed: the same audio always gets the same id."""
    return "ref_" + sha256[:32]


def _view(row: dict[str, Any]) -> ReferenceView:
    error = None
    if row["error_code"]:
        error = StageError(
            code=row["error_code"], message=row["error_message"], stage=row["error_stage"]
        )
    done = set(row["steps_done"])
    return ReferenceView(
        reference_id=row["id"],
        status=row["status"],
        steps={stage.value: stage.value in done for stage in REFERENCE_STEPS.values()},
        kind=row["audio"]["kind"],
        duration_s=row["audio"]["duration_s"],
        title=row["title"],
        artist=row["artist"],
        language=row["language"],
        has_lyrics=bool(row["lyrics"]),
        error=error,
        created_at=row["created_at"].isoformat(),
        prepared_at=iso(row["prepared_at"]),
        links={"self": f"/v1/references/{row['id']}"},
    )


def _view_response(
    row: dict[str, Any], status_code: int, location: str | None = None
) -> JSONResponse:
    headers = {"Location": location} if location else None
    return JSONResponse(_view(row).model_dump(mode="json"), status_code, headers)


@router.post(
    "/v1/references",
    status_code=202,
    response_model=ReferenceView,
    response_description="Stored; its preparation started (or started again after a failure)",
    responses={
        200: {
            "model": ReferenceView,
            "description": "This audio is stored already as this reference, with the same "
            "details: nothing new was started",
        }
    },
    summary="Store a reference song and prepare it (separation, pitch, transcript) for jobs",
)
async def submit_reference(
    services: ServicesDep,
    tenant: TenantDep,
    audio: Annotated[UploadFile, File(description="the reference song or its vocals")],
    kind: Annotated[SourceKind, Form()] = SourceKind.MIX,
    title: Annotated[str | None, Form(max_length=300, pattern=r"^[^\x00]*$")] = None,
    artist: Annotated[str | None, Form(max_length=300, pattern=r"^[^\x00]*$")] = None,
    lyrics: Annotated[str | None, Form(max_length=20_000, pattern=r"^[^\x00]*$")] = None,
    language: Annotated[
        str | None, Form(max_length=16, description="a Whisper language code; none = detect")
    ] = None,
) -> JSONResponse:
    settings = services.settings
    language = speech_language(language)
    with tempfile.TemporaryDirectory(prefix="vj-reference-") as tmp:
        path, info, content_type = await receive_audio(
            audio, "reference", Path(tmp), settings.audio_limits, settings.gateway_max_upload_bytes
        )
        sha = await asyncio.to_thread(sha256_file, path)
        reference_id = reference_id_for(sha)
        existing = await services.repo.get_reference(tenant, reference_id)
        if existing is not None:
            # A failed one too: its upload again retries its preparation with what it was
            # stored with, so other details are a conflict rather than silently dropped.
            given = {"kind": kind, "title": title, "artist": artist, "lyrics": lyrics}
            _same_as_stored(existing, {**given, "language": language})
            if existing["status"] != "failed":
                return _view_response(existing, 200)
        uploaded_meta = {
            "title": title,
            "artist": artist,
            "lyrics": lyrics or None,
            "language": language,
        }
        row, announce = await _store_reference(
            services, tenant, reference_id, sha, path, content_type, info, kind, uploaded_meta
        )
    if announce is not None:
        submitted = ReferenceSubmitted(
            job_id=announce,
            reference=AudioInput.model_validate(row["audio"]),
            language=row["language"],
            # With lyrics, jobs on it judge the words against them: no transcript needed.
            transcribe=row["transcript"] != "none",
        )
        try:
            await services.bus.publish(submitted)
        except Exception as exc:
            # Failed at once rather than left to stall, so that an upload again retries.
            not_queued = JobFailed(
                job_id=announce,
                stage=Stage.GATEWAY,
                code="broker_unavailable",
                message="the preparation could not be queued",
                attempts=1,
            )
            await best_effort(services.repo.record_preparation(not_queued))
            raise ProblemError(
                503,
                "broker_unavailable",
                "the reference could not be queued; retry shortly",
                retry_after_s=5,
            ) from exc
    return _view_response(row, 202, location=f"/v1/references/{reference_id}")


# How long an upload may take from listing its original for cleanup to recording its
# reference (`JobRepository.mark_upload`): the store's write of up to
# `gateway_max_upload_bytes` and one transaction, with a wide margin.
_UPLOAD_GRACE_S = 600.0


async def _store_reference(
    services: Services,
    tenant: str,
    reference_id: str,
    sha: str,
    path: Path,
    content_type: str,
    info: AudioInfo,
    kind: SourceKind,
    meta: dict[str, Any],
) -> tuple[dict[str, Any], uuid.UUID | None]:
    """Stores the original and records the reference (see `prepare_reference`).

    The original is written before its reference row exists and may be another tenant's
    too (content-addressed), so a failure in between cannot just delete it: the audio is
    listed for cleanup first (write-ahead), the reference's transaction takes it off the
    list, and on failure the housekeeper's rule (`release_orphaned_original`: deleted
    unless a reference holds it or work uses it) is applied at once, or, with the database
    out of reach, by the housekeeper once the entry is due."""
    key = reference_key(sha, f"original.{EXTENSIONS.get(content_type, 'bin')}")
    await services.repo.mark_upload(sha, _UPLOAD_GRACE_S)
    committed = False
    try:
        original = await services.store.put_file(key, path, content_type)
        uploaded = AudioInput(
            role=Role.REFERENCE,
            kind=kind,
            original=original,
            duration_s=info.duration_s,
            sample_rate=info.sample_rate,
            channels=info.channels,
        )
        # A failed preparation is tried again, with what the reference was stored with.
        row, announce = await services.repo.prepare_reference(tenant, reference_id, uploaded, meta)
        committed = True
        # Stored again if the last other holder of this audio deleted it meanwhile (the
        # object store is write-once: otherwise this finds it and writes nothing).
        await services.store.put_file(key, path, content_type)
    finally:
        if not committed:
            await best_effort(
                services.repo.release_orphaned_original(
                    sha, lambda sha: services.store.delete_prefix(reference_key(sha, ""))
                )
            )
    return row, announce


def _same_as_stored(row: dict[str, Any], given: dict[str, Any]) -> None:
    """The same audio uploaded again is the stored reference (200), unless the upload says
    something else about it: then 409, rather than silently dropping what it said."""
    stored = {**row, "kind": row["audio"]["kind"]}
    differ = sorted(
        name for name, value in given.items() if value not in (None, "") and value != stored[name]
    )
    if differ:
        raise ProblemError(
            409,
            "reference_conflict",
            f"this audio is stored already as {row['id']} with another {', '.join(differ)}; "
            "delete that reference first to store it anew, or give lyrics and language per "
            "job instead",
            reference_id=row["id"],
            fields=differ,
        )


@router.get(
    "/v1/references",
    response_model=ReferencePage,
    summary="The caller's references, newest first",
)
async def list_references(
    request: Request,
    services: ServicesDep,
    tenant: TenantDep,
    limit: PageLimit = 20,
    cursor: PageCursor = None,
) -> ReferencePage:
    after = decode_cursor(cursor, request, _reference_id)
    page = await services.repo.list_references(tenant, limit, after)
    return page_body(ReferencePage, page, [_view(r) for r in page.rows], limit)


def _reference_id(value: str) -> str:
    if not re.fullmatch(REFERENCE_ID_PATTERN, value):
        raise ValueError(f"not a reference id: {value!r}")
    return value


@router.delete(
    "/v1/references/{reference_id}",
    response_model=ReferenceDeleted,
    summary="Delete a reference, and its stored audio when no other tenant holds the same",
)
async def delete_reference(
    services: ServicesDep, tenant: TenantDep, reference_id: ReferenceId
) -> ReferenceDeleted:
    deleted = await services.repo.delete_reference(
        tenant, reference_id, lambda sha: services.store.delete_prefix(reference_key(sha, ""))
    )
    if deleted is None:
        raise ProblemError(404, "reference_not_found", f"no reference {reference_id}")
    # Jobs already scored against it keep their results; its analysis caches (shared by
    # content hash) expire with their own retention. Jobs still running on it finish: its
    # original goes when they have (`audio_in_use_by`).
    return ReferenceDeleted(
        reference_id=reference_id,
        deleted=True,
        audio_objects_deleted=deleted.audio_objects_deleted,
        audio_in_use_by=deleted.audio_in_use_by,
    )


@router.get(
    "/v1/references/{reference_id}",
    response_model=ReferenceView,
    summary="A reference and its preparation status",
)
async def get_reference(
    services: ServicesDep, tenant: TenantDep, reference_id: ReferenceId
) -> ReferenceView:
    row = await services.repo.get_reference(tenant, reference_id)
    if row is None:
        raise ProblemError(404, "reference_not_found", f"no reference {reference_id}")
    return _view(row)
