"""A job's audio and its aligned pitch contours: what a player and a plot need."""

from __future__ import annotations

import uuid
from enum import StrEnum
from typing import Any

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

from voicejury_contracts import ObjectRef, Role, Stage

from .api import ServicesDep, TenantDep, job_or_404
from .problems import ProblemError
from .views import AlignedPitch

router = APIRouter()


class StemName(StrEnum):
    ORIGINAL = "original"
    VOCALS = "vocals"
    ACCOMPANIMENT = "accompaniment"


def _ref(data: dict[str, Any] | None) -> ObjectRef | None:
    return ObjectRef.model_validate(data) if data else None


@router.get(
    "/v1/jobs/{job_id}/audio/{source}/{stem}",
    summary="Redirect (307) to a short-lived presigned URL of a recording or stem",
    status_code=307,
    response_class=RedirectResponse,
)
async def job_audio(
    services: ServicesDep, tenant: TenantDep, job_id: uuid.UUID, source: Role, stem: StemName
) -> RedirectResponse:
    job = await job_or_404(services, tenant, job_id)
    _audio_kept(job)
    if stem is StemName.ORIGINAL:
        ref = _ref(job["inputs"][source.value]["original"])
    else:
        stems = await services.repo.stage_details(job_id, Stage.SEPARATOR)
        if not stems:
            raise ProblemError(409, "stems_not_ready", "the separator has not finished this job")
        ref = _ref(stems[source.value].get(stem.value))
        if ref is None:
            raise ProblemError(
                404, "stem_not_found", f"no {stem.value} stem: the {source.value} was vocals only"
            )
    assert ref is not None
    # A presigned URL to a missing object would send the client an S3 error of its own.
    if await services.store.stat(ref.key) is None:  # its retention or a lifecycle rule
        raise _deleted()
    url = await services.store.presigned_get(ref.key, services.settings.gateway_presign_ttl_s)
    return RedirectResponse(url, status_code=307, headers={"Cache-Control": "no-store"})


@router.get(
    "/v1/jobs/{job_id}/pitch",
    summary="Aligned pitch contours (cents) for plotting",
    # Described, not validated: the scorer's stored JSON goes out as it is.
    responses={200: {"model": AlignedPitch, "description": "The aligned contours"}},
)
async def job_pitch(services: ServicesDep, tenant: TenantDep, job_id: uuid.UUID) -> Response:
    # The aligned contours are stored with the job's audio and deleted with it.
    _audio_kept(await job_or_404(services, tenant, job_id))
    details = await services.repo.stage_details(job_id, Stage.SCORER)
    ref = _ref((details or {}).get("aligned_pitch"))
    if ref is None:
        raise ProblemError(409, "pitch_not_ready", "the job has not been scored yet")
    if await services.store.stat(ref.key) is None:  # expired by a lifecycle rule first
        raise _deleted()
    return Response(await services.store.get_bytes(ref), media_type="application/json")


def _audio_kept(job: Any) -> None:
    if job["audio_deleted_at"] is not None:
        raise _deleted()


def _deleted() -> ProblemError:
    return ProblemError(410, "audio_deleted", "this job's audio was deleted (retention or cancel)")
