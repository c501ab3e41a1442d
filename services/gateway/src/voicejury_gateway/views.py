"""The REST API's response bodies: what the OpenAPI document describes and a generated client
parses.

A route that builds its body itself declares one of these as its `response_model`, so the
document and the body cannot drift: a field a route sets that its model lacks fails mypy
(and the route, at once). Bodies read back as stored (a job's result, its aligned contours) are only
described (`responses=`), never validated on the way out: a document an older version
stored must not become a 500.

Timestamps are `str`, not `datetime`: `datetime.isoformat()` writes UTC as `+00:00`, which
pydantic would change to `Z` in bodies clients already parse.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from voicejury_contracts import Difficulty, SourceKind

Timestamp = Annotated[str, WithJsonSchema({"type": "string", "format": "date-time"})]
# Rounded to 3 decimals.
Fraction = Annotated[float, Field(ge=0, le=1)]

JobStatus = Literal["queued", "running", "completed", "failed", "cancelled"]
StageStatus = Literal["pending", "running", "completed", "failed", "skipped", "cancelled"]


def _open_to_new_fields(schema: dict[str, Any]) -> None:
    schema.pop("additionalProperties", None)


class View(BaseModel):
    # Forbidden extras make mypy's pydantic plugin check the fields a route sets; the
    # document, though, does not promise clients that no field will ever be added.
    model_config = ConfigDict(extra="forbid", json_schema_extra=_open_to_new_fields)


class StageError(View):
    """Why a job or a reference's preparation failed."""

    code: str = Field(description="stable, for programs")
    message: str | None = Field(description="for people; may change between versions")
    stage: str | None = Field(description="the stage that failed (`gateway`, `separator`, ...)")


class JobLinks(View):
    self: str = Field(description="this job: GET for its status, DELETE to cancel it")
    events: str = Field(description="its Server-Sent Events stream")
    result: str = Field(description="its result, once `status` is `completed` (409 before)")


class JobAccepted(View):
    job_id: uuid.UUID
    status: JobStatus = Field(
        description="`queued` for a new job; a retry with the same Idempotency-Key gets the "
        "status of the job the key made"
    )
    links: JobLinks


class StageView(View):
    """One pipeline stage's work on a job."""

    status: StageStatus = Field(
        description="`skipped`: the stage had nothing to do for this job (e.g. `jury=false`)"
    )
    progress: Fraction = Field(description="0..1; 1 once the stage is done")
    attempts: int = Field(ge=0, description="attempts so far; more than 1 after a retry")
    started_at: Timestamp | None = Field(description="ISO 8601; null until it starts")
    finished_at: Timestamp | None = Field(description="ISO 8601; null until it ends")


# The options as stored with the job: described (JobOptions' fields; a test keeps the two
# in step) rather than validated, so that a job stored before an option was added or
# changed stays readable.
_OPTIONS_SCHEMA: dict[str, Any] = {
    "properties": {
        "language": {
            "anyOf": [{"type": "string"}, {"type": "null"}],
            "description": "ISO 639-1; null: detected",
        },
        "lyrics": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "title": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "difficulty": {"type": "string", "enum": [d.value for d in Difficulty]},
        "jury": {"type": "boolean"},
        "allow_key_change": {"type": "boolean"},
    }
}


class JobView(View):
    """A job: its status, each stage's, and why it failed."""

    job_id: uuid.UUID
    status: JobStatus = Field(
        description="`completed`, `failed` and `cancelled` are final; the events stream "
        "ends with the same"
    )
    progress: Fraction = Field(description="the whole job, 0..1 (stages weighted by cost)")
    stages: dict[str, StageView] = Field(
        description="by stage name (`separator`, `pitch`, `asr`, `scorer`, `jury`), "
        "started ones first"
    )
    attempts: int = Field(ge=0, description="the stages' attempts, summed")
    error: StageError | None = Field(description="null unless `status` is `failed`")
    options: dict[str, Any] = Field(
        description="what the job was submitted with (jobs of older versions may lack "
        "newer options)",
        json_schema_extra=_OPTIONS_SCHEMA,
    )
    created_at: Timestamp = Field(description="ISO 8601")
    updated_at: Timestamp = Field(description="ISO 8601; the last change of status or progress")
    finished_at: Timestamp | None = Field(description="ISO 8601; null until the job is final")
    links: JobLinks


class JobSummary(View):
    """A job in a list; its `links.self` has the stages and the error."""

    job_id: uuid.UUID
    status: JobStatus
    progress: Fraction = Field(description="0..1")
    created_at: Timestamp = Field(description="ISO 8601")
    finished_at: Timestamp | None = Field(description="ISO 8601; null until the job is final")
    error_code: str | None = Field(description="`error.code` of a failed job, else null")
    links: JobLinks


ItemT = TypeVar("ItemT", bound=BaseModel)


class ListPage(View, Generic[ItemT]):
    """One page of a list, newest first (keyset pagination: items added between two page
    reads neither repeat nor shift a page)."""

    items: list[ItemT]
    total: int = Field(ge=0, description="how many the caller has in all")
    limit: int = Field(ge=1, description="the page size asked for")
    next_cursor: str | None = Field(
        description="opaque: pass it as `cursor` for the next, older page; null on the last"
    )


class JobPage(ListPage[JobSummary]):
    """A page of the caller's jobs, newest first."""


class JobCancellation(View):
    job_id: uuid.UUID
    status: Literal["completed", "failed", "cancelled"] = Field(
        description="the job's final status: `cancelled`, or how it had ended already "
        "(a finished job keeps its result)"
    )
    audio_objects_deleted: int = Field(
        ge=0, description="stored recordings, stems and contours deleted now (0 on a repeat)"
    )


class ReferenceView(View):
    """A reference song and the state of its preparation."""

    reference_id: str = Field(description="content-addressed: the same audio, the same id")
    status: Literal["preparing", "ready", "failed"] = Field(
        description="a `failed` one is prepared again when its audio is uploaded again"
    )
    steps: dict[str, bool] = Field(description="each preparation step, done or not")
    kind: SourceKind
    duration_s: float = Field(description="seconds")
    title: str | None
    artist: str | None
    language: str | None = Field(description="ISO 639-1; null: detected")
    has_lyrics: bool
    error: StageError | None = Field(description="null unless `status` is `failed`")
    created_at: Timestamp = Field(description="ISO 8601")
    prepared_at: Timestamp | None = Field(description="ISO 8601; null until `ready`")
    links: dict[str, str] = Field(description="`self`: this reference (GET, DELETE)")


class ReferencePage(ListPage[ReferenceView]):
    """A page of the caller's references, newest first."""


class ReferenceDeleted(View):
    reference_id: str
    deleted: Literal[True]
    audio_objects_deleted: int = Field(
        ge=0,
        description="stored objects deleted now (0 while another reference or running work "
        "holds the same audio)",
    )
    audio_in_use_by: int = Field(
        ge=0,
        description="jobs and preparations still using the audio: it is deleted when they end",
    )


class AlignedPitch(BaseModel):
    """Both pitch contours on the reference's timeline, for plotting: three arrays of the
    same length (one entry per analysis frame)."""

    time_s: list[float] = Field(description="seconds from the reference's start")
    reference_cents: list[float | None] = Field(
        description="MIDI cents (100 per semitone, A4 = 6900); null where not sung"
    )
    performance_cents: list[float | None] = Field(
        description="MIDI cents, aligned to the reference (latency and an allowed key change "
        "removed); null where not sung"
    )
    global_offset_ms: float = Field(description="the recording's latency that was removed")


class Liveness(View):
    status: Literal["ok"]


class Readiness(View):
    ready: bool
    checks: dict[str, bool] = Field(
        description="`database`, `schema` (migrated to this gateway's revision), `broker`, "
        "`object_store`: each reachable or not"
    )
