"""The scored result a client reads at `GET /v1/jobs/{id}/result` (and the jury's input)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import Field

from .base import Contract, Stage

Score = float  # 0..100


class ResultWarning(Contract):
    """Something degraded the result; `code` is stable, `message` is for people."""

    code: str
    message: str


class PitchScore(Contract):
    score: float = Field(ge=0, le=100)
    accuracy: float = Field(ge=0, le=1, description="share of voiced frames within tolerance")
    mean_abs_error_cents: float = Field(ge=0)
    key_offset_cents: float = Field(description="whole-song transposition, reported apart")
    key_offset_counted: bool = Field(description="false when the request allows another key")
    register_offset_octaves: int = Field(
        default=0, description="whole octaves the singer sang away from the reference"
    )
    octave_errors_folded: int = Field(ge=0, description="frames an octave off, folded back")
    octave_switches: int = Field(ge=0, description="times the singer jumped octave mid-song")
    voiced_frames: int = Field(ge=0)
    tolerance_cents: float = Field(gt=0)


class RhythmScore(Contract):
    score: float = Field(ge=0, le=100)
    global_offset_ms: float = Field(description="recording latency; not counted as bad rhythm")
    onset_precision: float = Field(ge=0, le=1)
    onset_recall: float = Field(ge=0, le=1)
    mean_abs_timing_ms: float = Field(ge=0)
    tempo_ratio: float = Field(gt=0, description="performance duration / reference duration")


class LyricsScore(Contract):
    score: float = Field(ge=0, le=100)
    wer: float = Field(ge=0)
    against: str = Field(description="`lyrics` (given text) or `reference_transcript`")
    words_expected: int = Field(ge=0)
    words_missed: int = Field(ge=0)
    words_wrong: int = Field(ge=0)
    words_extra: int = Field(ge=0)


class HeldNote(Contract):
    """One long note of the take (times on the reference timeline, latency removed)."""

    start_s: float
    end_s: float
    vibrato_rate_hz: float | None = Field(default=None, gt=0, description="None: no vibrato")
    vibrato_extent_cents: float | None = Field(
        default=None, ge=0, description="depth either side of the note (±)"
    )
    steadiness_cents: float = Field(
        ge=0, description="RMS wobble once the slow trend and the vibrato are removed"
    )
    drift_cents: float = Field(description="slow change over the note, >0 rising")


class Expression(Contract):
    """How the take was sung beyond the notes: features the jury cites, not scored."""

    notes: int = Field(ge=0, description="notes held long enough to judge their start")
    held_notes: int = Field(ge=0, description="notes long enough to judge vibrato")
    vibrato_notes: int = Field(ge=0)
    vibrato_rate_hz: float | None = Field(default=None, description="median over vibrato notes")
    vibrato_extent_cents: float | None = Field(default=None, description="median depth (±)")
    steadiness_cents: float | None = Field(default=None, description="median over held notes")
    scoops: int = Field(ge=0, description="notes entered from well below and sliding up")
    scoop_starts_s: tuple[float, ...] = ()
    longest_notes: tuple[HeldNote, ...] = ()


class LineFeedback(Contract):
    index: int = Field(ge=0)
    start_s: float
    end_s: float
    text: str | None = None
    pitch_accuracy: float | None = Field(default=None, ge=0, le=1)
    mean_signed_cents: float | None = Field(default=None, description="<0 flat, >0 sharp")
    timing_offset_ms: float | None = Field(default=None, description="<0 early, >0 late")
    words_missed: tuple[str, ...] = ()
    words_wrong: tuple[str, ...] = ()


class Vote(StrEnum):
    YES = "yes"
    NO = "no"


class CommentSource(StrEnum):
    LLM = "llm"
    FALLBACK = "fallback"


class JuryComment(Contract):
    persona: str
    name: str
    comment: str
    vote: Vote
    source: CommentSource
    model: str | None = None
    latency_ms: float = Field(ge=0)
    prompt_tokens: int | None = Field(default=None, ge=0, description="None for the fallback")
    completion_tokens: int | None = Field(default=None, ge=0)


class Jury(Contract):
    members: tuple[JuryComment, ...]
    verdict: str = Field(description="`qualified` when at least two vote yes, else `eliminated`")
    language: str


class StageRun(Contract):
    """Provenance of one stage's work on a job."""

    stage: Stage
    model: str | None = None
    model_version: str | None = None
    device: str | None = None
    started_at: datetime
    seconds: float = Field(ge=0)
    attempt: int = Field(ge=1)
    skipped: bool = False
    cached: bool = False
    details: dict[str, str] = Field(default_factory=dict)


class Weights(Contract):
    pitch: float = Field(ge=0)
    rhythm: float = Field(ge=0)
    lyrics: float = Field(ge=0)


class ScoreResult(Contract):
    """Everything the scorer decides. The jury adds `jury`; nothing else changes after it."""

    score: float = Field(ge=0, le=100)
    weights: Weights = Field(description="the weights actually applied, after renormalising")
    pitch: PitchScore
    rhythm: RhythmScore
    lyrics: LyricsScore | None
    lines: tuple[LineFeedback, ...]
    expression: Expression | None = None
    warnings: tuple[ResultWarning, ...] = ()
    performance_separated: bool
    reference_separated: bool


class JobResult(Contract):
    job_id: str
    score: float = Field(ge=0, le=100)
    pitch: PitchScore
    rhythm: RhythmScore
    lyrics: LyricsScore | None
    lines: tuple[LineFeedback, ...]
    expression: Expression | None = None
    jury: Jury | None
    warnings: tuple[ResultWarning, ...]
    weights: Weights
    performance_separated: bool
    reference_separated: bool
    provenance: tuple[StageRun, ...]
