"""Every event the pipeline exchanges. Events are past tense: they state what happened.

Flow::

    JobSubmitted ─> separator ─> StemsSeparated ─┬─> pitch ─> PitchExtracted  ─┬─> scorer ─> Scored
                                                 └─> asr   ─> TranscriptReady ─┘
    Scored ─> jury ─> JobCompleted

Any stage may instead end the job with `JobFailed`; the gateway ends it with `JobCancelled`.
`StageProgress` is informational and may arrive at any time.

A reference prepared ahead of jobs (`POST /v1/references`) takes the same stages::

    ReferenceSubmitted ─> separator ─> ReferenceSeparated ─┬─> pitch ─> ReferencePitchReady
                                                           └─> asr   ─> ReferenceTranscriptReady
"""

from __future__ import annotations

from typing import ClassVar
from uuid import NAMESPACE_URL, UUID, uuid5

from pydantic import Field

from .base import Contract, Difficulty, Event, ObjectRef, Role, SourceKind, Stage
from .result import JobResult, ScoreResult, StageRun


class JobOptions(Contract):
    """What the client asked for; forwarded unchanged by every stage."""

    language: str | None = Field(default=None, description="ISO 639-1; None = detect")
    lyrics: str | None = Field(default=None, max_length=20_000)
    title: str | None = Field(
        default=None, max_length=300, description="the song's title, for the jury to name"
    )
    difficulty: Difficulty = Difficulty.NORMAL
    jury: bool = True
    allow_key_change: bool = True


class AudioInput(Contract):
    """An uploaded recording, already checked by the gateway (decodable, not empty)."""

    role: Role
    kind: SourceKind
    original: ObjectRef
    duration_s: float = Field(gt=0)
    sample_rate: int = Field(gt=0)
    channels: int = Field(gt=0)


class Stems(Contract):
    """One recording after separation. `vocals_16k` is mono 16 kHz WAV for the analysis stages."""

    role: Role
    original: ObjectRef
    vocals: ObjectRef
    vocals_16k: ObjectRef
    accompaniment: ObjectRef | None = None
    separated: bool = Field(description="false when the input was already isolated vocals")
    cached: bool = False
    duration_s: float = Field(gt=0)


class ContourRef(Contract):
    """A pitch contour `.npz`: arrays `time_s`, `f0_hz` (0 = unvoiced), `periodicity`."""

    role: Role
    contour: ObjectRef
    hop_s: float = Field(gt=0)
    frames: int = Field(ge=0)
    voiced_ratio: float = Field(ge=0, le=1)


class TranscriptRef(Contract):
    """A transcript stored as JSON.

    `{"language", "text", "duration_s", "words": [{"word", "start_s", "end_s", "probability"}]}`
    """

    role: Role
    transcript: ObjectRef
    language: str | None = Field(
        default=None, description="the language asked for or heard; None when no words were"
    )
    word_count: int = Field(ge=0)


class JobSubmitted(Event):
    SUBJECT: ClassVar[str] = "job.submitted"

    tenant: str
    performance: AudioInput
    reference: AudioInput
    options: JobOptions


class StemsSeparated(Event):
    SUBJECT: ClassVar[str] = "stems.separated"

    options: JobOptions
    performance: Stems
    reference: Stems
    provenance: tuple[StageRun, ...]


class PitchExtracted(Event):
    SUBJECT: ClassVar[str] = "analysis.pitch"

    options: JobOptions
    performance: ContourRef
    reference: ContourRef
    provenance: tuple[StageRun, ...]


class TranscriptReady(Event):
    """`performance` is None when no ASR model is available and the job allows skipping lyrics."""

    SUBJECT: ClassVar[str] = "analysis.transcript"

    options: JobOptions
    performance: TranscriptRef | None
    reference: TranscriptRef | None
    skipped_reason: str | None = None
    provenance: tuple[StageRun, ...]


class Scored(Event):
    """`aligned_pitch`: JSON `{"time_s", "reference_cents", "performance_cents"}` for plotting
    (performance aligned to the reference's time, latency and allowed key removed; null =
    not sung)."""

    SUBJECT: ClassVar[str] = "job.scored"

    options: JobOptions
    result: ScoreResult
    aligned_pitch: ObjectRef | None = None
    detected_language: str | None = Field(
        default=None, description="what asr heard, used when the job gave no language"
    )
    provenance: tuple[StageRun, ...]


class StageProgress(Event):
    """`fraction`: the stage's own progress 0..1; `seq` orders reports within an attempt."""

    SUBJECT: ClassVar[str] = "progress"

    stage: Stage
    fraction: float = Field(ge=0, le=1)
    message: str = ""
    attempt: int = Field(ge=1)
    seq: int = Field(ge=0)

    def dedup_id(self) -> str:
        return f"{self.job_id}:{self.SUBJECT}:{self.stage}:{self.attempt}:{self.seq}"


class JobCompleted(Event):
    SUBJECT: ClassVar[str] = "job.completed"

    result: JobResult


class JobFailed(Event):
    """A permanent error, or a transient one that outlived its retries. `code` is stable."""

    SUBJECT: ClassVar[str] = "job.failed"

    stage: Stage
    code: str
    message: str
    attempts: int = Field(ge=1)


class ReferenceSubmitted(Event):
    """Prepare a reference song ahead of jobs (`POST /v1/references`): the separator
    separates it, then pitch and asr analyse its vocals, each into a content-addressed
    cache, so later jobs on it separate nothing and analyse the performance only.
    `job_id` is the preparation's id, derived from the audio (`preparation_id`)."""

    SUBJECT: ClassVar[str] = "reference.submitted"

    reference: AudioInput
    language: str | None = Field(default=None, description="ISO 639-1; None = detect")
    transcribe: bool = Field(
        default=True,
        description="false when lyrics came with the reference: jobs judge the words "
        "against them, so its transcript is never needed",
    )


class ReferenceSeparated(Event):
    """A preparation's first step: the reference's stems, for pitch and asr to analyse."""

    SUBJECT: ClassVar[str] = "reference.separated"

    stems: Stems
    language: str | None = None
    transcribe: bool = True
    provenance: tuple[StageRun, ...]


class ReferencePitchReady(Event):
    """The reference's contour is in the pitch cache (reference model and settings)."""

    SUBJECT: ClassVar[str] = "reference.pitch"

    contour: ContourRef
    provenance: tuple[StageRun, ...]


class ReferenceTranscriptReady(Event):
    """The reference's transcript is in the asr cache; `transcript` is None when none is
    needed (lyrics given) or no ASR model is available (`skipped_reason` says which)."""

    SUBJECT: ClassVar[str] = "reference.transcript"

    transcript: TranscriptRef | None
    skipped_reason: str | None = None
    provenance: tuple[StageRun, ...]


REFERENCE_STEPS: dict[type[Event], Stage] = {
    ReferenceSeparated: Stage.SEPARATOR,
    ReferencePitchReady: Stage.PITCH,
    ReferenceTranscriptReady: Stage.ASR,
}
"""A preparation is ready once each of these stages has announced its part."""


def preparation_id(
    sha256: str, kind: SourceKind = SourceKind.MIX, attempt: int = 1, transcript: str = "detect"
) -> UUID:
    """One preparation per distinct audio, kind and transcript need (`none` when lyrics came
    with the reference, `detect`, or a language code), whichever tenant uploads it; a new id
    for each attempt, so that nothing of a failed attempt (deduplication, a cancel flag)
    touches the next."""
    return uuid5(NAMESPACE_URL, f"voicejury:reference:{sha256}:{kind.value}:{transcript}:{attempt}")


class JobCancelled(Event):
    SUBJECT: ClassVar[str] = "job.cancelled"

    reason: str = "cancelled by client"


ALL_EVENTS: tuple[type[Event], ...] = (
    JobSubmitted,
    StemsSeparated,
    PitchExtracted,
    TranscriptReady,
    Scored,
    StageProgress,
    JobCompleted,
    JobFailed,
    JobCancelled,
    ReferenceSubmitted,
    ReferenceSeparated,
    ReferencePitchReady,
    ReferenceTranscriptReady,
)

EVENTS_BY_SUBJECT: dict[str, type[Event]] = {e.SUBJECT: e for e in ALL_EVENTS}
