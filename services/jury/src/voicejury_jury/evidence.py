"""What the jury can point at: the scorer's result reduced to citable moments.

Both the LLM prompt and the deterministic fallback read the same `Evidence`, so a comment
from either source cites the same facts (a line's start time as `m:ss`, its signed cents,
its timing in ms, the scores) and the two paths cannot drift apart.
"""

from __future__ import annotations

import json
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from voicejury_contracts.result import Expression, HeldNote, LineFeedback, ScoreResult

# Below this a line's mean pitch error is within what listeners hear as "in tune", so it is
# not worth citing as a problem.
AUDIBLE_CENTS = 15.0
# Timing deviations under this are inside normal expressive phrasing.
AUDIBLE_TIMING_MS = 80.0
# Lyrics and titles come from users; a long one must not crowd the prompt or a comment.
MAX_QUOTE_CHARS = 48
# A 3-minute song has ~40 lines; past this the prompt grows with no new information.
MAX_PROMPT_LINES = 60
# Lyrics pasted as one paragraph make one line whose missed words are all the song's: a
# judge needs a few of them and how many, not 3 000 (a 200 000-character prompt).
MAX_SLIPS_SHOWN = 8
MAX_WORD_CHARS = 24
# The scorer lists at most 12 scoops and held notes, and raises a handful of warnings; an
# in-process caller is held to the same.
MAX_LISTED = 12
MAX_WARNINGS_SHOWN = 8
MAX_WARNING_CHARS = 240


# The scorer's warning for a take that is the reference recording itself
# (`voicejury_scorer.core._played_back`).
PLAYBACK_WARNING = "matches_reference_recording"


def clock(seconds: float) -> str:
    """`72.4` -> `"1:12"`: how a viewer names a moment in a song."""
    whole = max(0, int(seconds))
    return f"{whole // 60}:{whole % 60:02d}"


def quote(text: str | None, max_chars: int = MAX_QUOTE_CHARS) -> str | None:
    """A short, single-line excerpt of user-provided text (lyrics, title, a word)."""
    if not text:
        return None
    flat = " ".join(text.split())
    if len(flat) <= max_chars:
        return flat
    return flat[: max_chars - 1].rstrip() + "…"


@dataclass(frozen=True)
class Moment:
    """One line of the song, with the measurements a judge may cite."""

    index: int
    start_s: float
    clock: str
    text: str | None
    pitch_accuracy: float | None
    mean_signed_cents: float | None
    timing_offset_ms: float | None
    words_missed: tuple[str, ...]
    words_wrong: tuple[str, ...]

    @classmethod
    def of(cls, line: LineFeedback) -> Moment:
        return cls(
            index=line.index,
            start_s=line.start_s,
            clock=clock(line.start_s),
            text=quote(line.text),
            pitch_accuracy=line.pitch_accuracy,
            mean_signed_cents=line.mean_signed_cents,
            timing_offset_ms=line.timing_offset_ms,
            words_missed=line.words_missed,
            words_wrong=line.words_wrong,
        )

    @property
    def cents(self) -> int | None:
        """Absolute pitch error rounded to whole cents, as it is written in a comment."""
        if self.mean_signed_cents is None:
            return None
        return round(abs(self.mean_signed_cents))

    @property
    def flat(self) -> bool:
        return self.mean_signed_cents is not None and self.mean_signed_cents < 0

    @property
    def timing_ms(self) -> int | None:
        if self.timing_offset_ms is None:
            return None
        return round(abs(self.timing_offset_ms))

    @property
    def late(self) -> bool:
        return self.timing_offset_ms is not None and self.timing_offset_ms > 0

    @property
    def lyric_slips(self) -> tuple[str, ...]:
        return self.words_missed + self.words_wrong


@dataclass(frozen=True)
class Evidence:
    """The scorer's result plus the few moments worth talking about.

    Highlights are chosen by fixed rules (largest error, earliest on ties) so the same
    result always yields the same highlights, which keeps the fallback deterministic.
    """

    result: ScoreResult
    title: str | None
    moments: tuple[Moment, ...]
    best: Moment | None
    worst_pitch: Moment | None
    worst_timing: Moment | None
    lyric_slip: Moment | None
    held_note: HeldNote | None = None

    @property
    def scoops(self) -> int:
        return self.result.expression.scoops if self.result.expression else 0

    @property
    def first_scoop(self) -> str | None:
        e = self.result.expression
        return clock(e.scoop_starts_s[0]) if e and e.scoop_starts_s else None

    @property
    def score(self) -> int:
        return round(self.result.score)

    @property
    def warning_codes(self) -> tuple[str, ...]:
        return tuple(w.code for w in self.result.warnings)

    @property
    def played_back(self) -> bool:
        """The scorer found the take to be the reference recording itself: no judge
        sends a playback to the next round, whatever it scores."""
        return PLAYBACK_WARNING in self.warning_codes


_Model = TypeVar("_Model", bound=BaseModel)
# A required song-wide figure that is not a number reads as this, else as 0: a tempo ratio
# of 0 would be a division by zero.
_NEUTRAL: dict[str, float] = {"tempo_ratio": 1.0}


def _optional(field: FieldInfo) -> bool:
    return types.NoneType in typing.get_args(field.annotation)


def _unmeasured(value: object) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def _finite(model: _Model) -> _Model:
    """`model` with every NaN or infinite measure treated as unmeasured.

    An optional one becomes None (a line's cents, a vibrato rate); an item of a list (a
    line, a held note, a scoop's time) without a finite value where one is required (its
    time) is left out; a required song-wide figure (the key offset, the device latency)
    reads as `_NEUTRAL` or 0. pydantic accepts NaN where a field has no bounds, and
    infinity where it has only a lower one, from a caller in the same process (over NATS
    both arrive as null and fail validation before the jury), and `round()` of either
    raises.
    """
    updates: dict[str, Any] = {}
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if _unmeasured(value):
            updates[name] = None if _optional(field) else _NEUTRAL.get(name, 0.0)
        elif isinstance(value, BaseModel):
            updates[name] = _finite(value)
        elif isinstance(value, tuple):
            updates[name] = tuple(
                _finite(item) if isinstance(item, BaseModel) else item
                for item in value
                if not _unmeasured(item) and not _lacks_required(item)
            )
    return model.model_copy(update=updates) if updates else model


def _lacks_required(item: object) -> bool:
    if not isinstance(item, BaseModel):
        return False
    fields = type(item).model_fields.items()
    return any(_unmeasured(getattr(item, n)) and not _optional(f) for n, f in fields)


def gather_evidence(result: ScoreResult, title: str | None = None) -> Evidence:
    """Select the citable moments of a result; pure and deterministic.

    A NaN or infinite measure counts as unmeasured (`_finite`).
    """
    result = _finite(result)
    moments = tuple(Moment.of(line) for line in sorted(result.lines, key=lambda li: li.start_s))

    scored = [m for m in moments if m.pitch_accuracy is not None]
    # max() keeps the first of equal keys, and moments are in time order: earliest wins ties.
    best = max(scored, key=lambda m: m.pitch_accuracy or 0.0) if scored else None

    off_key = [m for m in moments if (m.cents or 0) >= AUDIBLE_CENTS]
    worst_pitch = max(off_key, key=lambda m: m.cents or 0) if off_key else None

    off_beat = [m for m in moments if (m.timing_ms or 0) >= AUDIBLE_TIMING_MS]
    worst_timing = max(off_beat, key=lambda m: m.timing_ms or 0) if off_beat else None

    slipped = [m for m in moments if m.lyric_slips]
    lyric_slip = max(slipped, key=lambda m: len(m.lyric_slips)) if slipped else None

    # The longest held note: where vibrato and steadiness are best heard.
    held = result.expression.longest_notes if result.expression else ()
    held_note = max(held, key=lambda n: n.end_s - n.start_s) if held else None

    return Evidence(
        result=result,
        title=quote(title),
        moments=moments,
        best=best,
        worst_pitch=worst_pitch,
        worst_timing=worst_timing,
        lyric_slip=lyric_slip,
        held_note=held_note,
    )


def _moment_json(m: Moment) -> dict[str, Any]:
    out: dict[str, Any] = {"line": m.index, "at": m.clock, "lyrics": m.text}
    if m.pitch_accuracy is not None:
        out["pitch_accuracy_pct"] = round(100 * m.pitch_accuracy)
    if m.mean_signed_cents is not None:
        out["mean_signed_cents"] = round(m.mean_signed_cents)
    if m.timing_offset_ms is not None:
        out["timing_offset_ms"] = round(m.timing_offset_ms)
    if m.lyric_slips:
        shown = m.lyric_slips[:MAX_SLIPS_SHOWN]
        out["words_missed_or_wrong"] = [quote(w, MAX_WORD_CHARS) for w in shown]
        if len(m.lyric_slips) > len(shown):
            out["more_words_missed_or_wrong"] = len(m.lyric_slips) - len(shown)
    return out


def _held_json(n: HeldNote) -> dict[str, Any]:
    out: dict[str, Any] = {
        "at": clock(n.start_s),
        "seconds": round(n.end_s - n.start_s, 1),
        "steadiness_cents": round(n.steadiness_cents),
        "drift_cents": round(n.drift_cents),
    }
    if n.vibrato_rate_hz is not None and n.vibrato_extent_cents is not None:
        out["vibrato_rate_hz"] = round(n.vibrato_rate_hz, 1)
        out["vibrato_extent_cents"] = round(n.vibrato_extent_cents)
    return out


def _expression_json(e: Expression | None) -> dict[str, Any] | None:
    if e is None:
        return None
    return {
        "held_notes": e.held_notes,
        "held_notes_with_vibrato": e.vibrato_notes,
        "vibrato_rate_hz": e.vibrato_rate_hz,
        "vibrato_extent_cents": e.vibrato_extent_cents,
        "steadiness_cents": e.steadiness_cents,
        "notes_scooped_from_below": e.scoops,
        "scoops_at": [clock(t) for t in e.scoop_starts_s[:MAX_LISTED]],
        "longest_notes": [_held_json(n) for n in e.longest_notes[:MAX_LISTED]],
    }


def _highlights(ev: Evidence) -> dict[str, Moment | None]:
    return {
        "best_line": ev.best,
        "worst_pitch_line": ev.worst_pitch,
        "worst_timing_line": ev.worst_timing,
        "most_lyric_slips_line": ev.lyric_slip,
    }


def _shown_moments(ev: Evidence) -> tuple[Moment, ...]:
    """The lines a model is shown: the first `MAX_PROMPT_LINES`, and every highlight."""
    first = ev.moments[:MAX_PROMPT_LINES]
    later = {m for m in _highlights(ev).values() if m is not None and m not in first}
    return first + tuple(m for m in ev.moments[MAX_PROMPT_LINES:] if m in later)


def evidence_data(ev: Evidence) -> dict[str, Any]:
    """Exactly what a model is shown, as plain data; `evidence_json` renders it.

    `citations.py` reads this same dict to decide what a comment may cite, so a key's name
    carries its unit: `at`/`scoops_at` are `m:ss` times, `*cents*`, `*_ms*` and `*_hz`
    keys are figures in that unit, `seconds` a duration, `lyrics` a line's quoted text;
    and a record with an `at` is a moment (a line, a held note), whose figures are its
    own, while the figures outside such records are song-wide.

    Bounded whatever the result: at most `MAX_PROMPT_LINES` lines plus the highlights,
    `MAX_SLIPS_SHOWN` words per line, `MAX_LISTED` held notes and scoops,
    `MAX_WARNINGS_SHOWN` warnings, every user text cut (`prompting.MAX_PROMPT_CHARS`).
    """
    r = ev.result
    return {
        "title": ev.title,
        "overall_score": ev.score,
        "weights": {
            "pitch": r.weights.pitch,
            "rhythm": r.weights.rhythm,
            "lyrics": r.weights.lyrics,
        },
        "pitch": {
            "score": round(r.pitch.score),
            "notes_in_tolerance_pct": round(100 * r.pitch.accuracy),
            "mean_abs_error_cents": round(r.pitch.mean_abs_error_cents),
            "tolerance_cents": round(r.pitch.tolerance_cents),
            "key_offset_cents": round(r.pitch.key_offset_cents),
            "key_offset_counted": r.pitch.key_offset_counted,
            "octave_switches": r.pitch.octave_switches,
        },
        "rhythm": {
            "score": round(r.rhythm.score),
            "mean_abs_timing_ms": round(r.rhythm.mean_abs_timing_ms),
            "device_latency_ms_not_counted": round(r.rhythm.global_offset_ms),
            "tempo_ratio": round(r.rhythm.tempo_ratio, 3),
        },
        "lyrics": None
        if r.lyrics is None
        else {
            "score": round(r.lyrics.score),
            "word_error_rate_pct": round(100 * r.lyrics.wer),
            "words_expected": r.lyrics.words_expected,
            "words_missed": r.lyrics.words_missed,
        },
        "expression": _expression_json(r.expression),
        "warnings": [
            {
                "code": quote(w.code),
                "message": quote(w.message, MAX_WARNING_CHARS),
            }
            for w in r.warnings[:MAX_WARNINGS_SHOWN]
        ],
        # Which line each highlight is; its record is in `lines`, shown once.
        "highlights": {
            name: None if m is None else {"line": m.index, "at": m.clock}
            for name, m in _highlights(ev).items()
        },
        "lines": [_moment_json(m) for m in _shown_moments(ev)],
    }


def evidence_json(ev: Evidence) -> str:
    """The evidence as JSON for the prompt, safe to place between delimiter tags.

    Every `<` is written as the JSON escape `\\u003c`, so no lyric or title can close the
    `<performance_data>` block and smuggle text out of it; the JSON still decodes to the
    original string.
    """
    data = evidence_data(ev)
    return json.dumps(data, ensure_ascii=False, indent=1).replace("<", "\\u003c")
