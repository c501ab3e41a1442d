"""Building blocks shared by every contract: the frozen base model and object references."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, ClassVar, Self
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1
"""Bumped on any breaking change to an event; consumers reject versions they do not know."""


def utc_now() -> datetime:
    return datetime.now(UTC)


class Contract(BaseModel):
    """Immutable, strict: an unknown field is a bug on the producer side, not data to keep."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Stage(StrEnum):
    GATEWAY = "gateway"
    SEPARATOR = "separator"
    PITCH = "pitch"
    ASR = "asr"
    SCORER = "scorer"
    JURY = "jury"


PIPELINE_STAGES: tuple[Stage, ...] = (
    Stage.SEPARATOR,
    Stage.PITCH,
    Stage.ASR,
    Stage.SCORER,
    Stage.JURY,
)


class Role(StrEnum):
    """Which of a job's two recordings an artefact belongs to."""

    PERFORMANCE = "performance"
    REFERENCE = "reference"


class SourceKind(StrEnum):
    """`mix` needs separation; `vocals` is already an isolated voice and skips it."""

    MIX = "mix"
    VOCALS = "vocals"


class Difficulty(StrEnum):
    EASY = "easy"
    NORMAL = "normal"
    HARD = "hard"


Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class ObjectRef(Contract):
    """Where a blob lives in the S3-compatible store. Audio only ever travels as one of these."""

    bucket: str = Field(min_length=3, max_length=63)
    key: str = Field(min_length=1, max_length=1024)
    sha256: Sha256
    size: int = Field(ge=0)
    content_type: str


class Event(Contract):
    """Every message on the bus: carries its job, its schema version and when it happened."""

    SUBJECT: ClassVar[str]
    """Subject suffix under the deployment's namespace, e.g. `job.submitted`."""

    schema_version: int = SCHEMA_VERSION
    job_id: UUID
    occurred_at: datetime = Field(default_factory=utc_now)

    def dedup_id(self) -> str:
        """The `Nats-Msg-Id`: one per (job, effect); JetStream drops a retried publish."""
        return f"{self.job_id}:{self.SUBJECT}"

    @classmethod
    def from_message(cls, data: bytes) -> Self:
        """The event a message's body carries. ValueError (pydantic's ValidationError is
        one) for a body that does not match the contract or is of another schema version:
        one this code does not know, or one it no longer reads."""
        event = cls.model_validate_json(data)
        if event.schema_version != SCHEMA_VERSION:
            raise ValueError(f"schema_version {event.schema_version} != {SCHEMA_VERSION}")
        return event


def job_id_of(data: bytes) -> UUID | None:
    """The `job_id` of a message body no contract reads, when it names one: the job to fail."""
    try:
        return UUID(str(json.loads(data)["job_id"]))
    except Exception:  # not JSON, not an object, no id, nested past the parser's depth
        return None


# The languages a job may name: those the transcription stage (Whisper) knows, as its
# language codes (ISO 639-1, and `haw`, `yue` where it has no two-letter code). The gateway
# refuses any other before accepting a job; tests/unit/test_contracts.py keeps the list
# equal to faster-whisper's.
_WHISPER_CODES = """
af am ar as az ba be bg bn bo br bs ca cs cy da de el en es et eu fa fi fo fr gl gu ha haw he
hi hr ht hu hy id is it ja jw ka kk km kn ko la lb ln lo lt lv mg mi mk ml mn mr ms mt my ne
nl nn no oc pa pl ps pt ro ru sa sd si sk sl sn so sq sr su sv sw ta te tg th tk tl tr tt uk
ur uz vi yi yo yue zh
"""
SPEECH_LANGUAGES = frozenset(_WHISPER_CODES.split())
