"""A scorer result the jury tests share: a plausible 5-line verse and chorus."""

from __future__ import annotations

from voicejury_contracts.result import (
    Expression,
    HeldNote,
    LineFeedback,
    LyricsScore,
    PitchScore,
    ResultWarning,
    RhythmScore,
    ScoreResult,
    Weights,
)


def make_result(
    *,
    score: float = 68.4,
    pitch_score: float = 71.0,
    rhythm_score: float = 74.0,
    mean_abs_error_cents: float = 31.0,
    tempo_ratio: float = 1.01,
    key_offset_cents: float = 0.0,
    warnings: tuple[ResultWarning, ...] = (),
    lines: tuple[LineFeedback, ...] | None = None,
    expression: Expression | None = None,
) -> ScoreResult:
    """A plausible 5-line verse-and-chorus, as the scorer would publish it."""
    if lines is None:
        lines = (
            LineFeedback(
                index=0,
                start_s=12.3,
                end_s=16.0,
                text="Is this the real life",
                pitch_accuracy=0.91,
                mean_signed_cents=-6.0,
                timing_offset_ms=22.0,
            ),
            LineFeedback(
                index=1,
                start_s=16.4,
                end_s=20.1,
                text="Is this just fantasy",
                pitch_accuracy=0.78,
                mean_signed_cents=12.0,
                timing_offset_ms=-35.0,
            ),
            LineFeedback(
                index=2,
                start_s=45.2,
                end_s=49.8,
                text="Caught in a landslide",
                pitch_accuracy=0.55,
                mean_signed_cents=-18.0,
                timing_offset_ms=140.0,
                words_missed=("landslide",),
            ),
            LineFeedback(
                index=3,
                start_s=72.0,
                end_s=77.5,
                text="No escape from reality",
                pitch_accuracy=0.42,
                mean_signed_cents=-41.0,
                timing_offset_ms=60.0,
            ),
            LineFeedback(
                index=4,
                start_s=95.7,
                end_s=101.0,
                text="Open your eyes",
                pitch_accuracy=0.83,
                mean_signed_cents=9.0,
                timing_offset_ms=-12.0,
            ),
        )
    return ScoreResult(
        score=score,
        weights=Weights(pitch=0.4, rhythm=0.3, lyrics=0.3),
        pitch=PitchScore(
            score=pitch_score,
            accuracy=0.69,
            mean_abs_error_cents=mean_abs_error_cents,
            key_offset_cents=key_offset_cents,
            key_offset_counted=False,
            octave_errors_folded=14,
            octave_switches=1,
            voiced_frames=6120,
            tolerance_cents=50.0,
        ),
        rhythm=RhythmScore(
            score=rhythm_score,
            global_offset_ms=182.0,
            onset_precision=0.81,
            onset_recall=0.77,
            mean_abs_timing_ms=54.0,
            tempo_ratio=tempo_ratio,
        ),
        lyrics=LyricsScore(
            score=58.0,
            wer=0.21,
            against="lyrics",
            words_expected=24,
            words_missed=3,
            words_wrong=2,
            words_extra=0,
        ),
        lines=lines,
        expression=expression,
        warnings=warnings,
        performance_separated=True,
        reference_separated=True,
    )


def make_expression(*, vibrato: bool = True, steadiness_cents: float = 6.0) -> Expression:
    """Expression with one long held note at 1:13 (with or without vibrato) and 3 scoops."""
    held = HeldNote(
        start_s=73.4,
        end_s=76.2,
        vibrato_rate_hz=5.6 if vibrato else None,
        vibrato_extent_cents=42.0 if vibrato else None,
        steadiness_cents=steadiness_cents,
        drift_cents=-8.0,
    )
    return Expression(
        notes=41,
        held_notes=6,
        vibrato_notes=4 if vibrato else 0,
        vibrato_rate_hz=5.6 if vibrato else None,
        vibrato_extent_cents=42.0 if vibrato else None,
        steadiness_cents=steadiness_cents,
        scoops=3,
        scoop_starts_s=(16.4, 45.1, 96.0),
        longest_notes=(held,),
    )
