"""The scorer's pure core: two pitch contours (and transcripts) in, a `ScoreResult` out.

Order of work, each step on a 10 ms grid of MIDI cents (NaN = unvoiced):

1. global offset (recording latency) by cross-correlating voicing and note-change curves,
   removed before anything is judged (and checked against step 3's alignment, which
   under a tempo change knows better where the singer started: `_settle_latency`);
2. key: candidate transpositions from pitch-class histograms, settled by a coarse DTW,
   refined from the aligned frames; octaves are folded everywhere;
3. exact DTW in a Sakoe-Chiba band (±`dtw_band_s`, widened where it cannot reach an
   end), open at the end;
4. pitch: continuous credit per voiced reference frame by |cents error|;
5. rhythm: note onsets of both contours matched through the alignment, credited by timing;
6. lyrics: WER of the performance transcript against the lyrics (or reference transcript);
7. lines: per lyric line or sung phrase, the evidence a singer can act on;
8. guard rails: silence, noise, another song, a short take score low with a warning
   (another song: `mismatch_evidence`, the take's fit to the reference against its fit to
   the same notes in another order).

Nothing here raises on bad or empty input: a degraded input gives a low score and a
`ResultWarning` saying why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import stats

from voicejury_contracts.result import (
    LyricsScore,
    PitchScore,
    ResultWarning,
    RhythmScore,
    ScoreResult,
    Weights,
)

from .align import (
    COURSE_COSTS,
    PITCH_TIMING_COSTS,
    Alignment,
    DtwCosts,
    FloatArray,
    IntArray,
    banded_dtw,
    dropped_voiced_frames,
    estimate_global_offset,
    fill_short_gaps,
    first_voiced_lag,
    fold_cents,
    performance_to_reference_frames,
    reference_to_performance_map,
    shift_to_reference_timeline,
    tempo_centre,
    to_grid,
)
from .expression import expression_features
from .lines import (
    LineSpec,
    assign_words_to_spans,
    line_feedback,
    lyric_line_specs,
    phrase_spans,
)
from .lyrics import LyricsOutcome, judge_lyrics, normalise_words
from .pitch import estimate_key, judge_pitch, pitch_class_histogram, refine_key
from .rhythm import detect_onsets, judge_rhythm

__all__ = [
    "TOLERANCES",
    "Contour",
    "ScoringAnalysis",
    "ScoringConfig",
    "Tolerances",
    "Word",
    "analyse_performance",
    "estimate_latency_and_key",
    "mismatch_evidence",
    "score_performance",
]


@dataclass(frozen=True)
class Contour:
    """One recording's pitch.

    `time_s`: (n,) seconds, increasing; `f0_hz`: (n,) Hz, 0 (or NaN) = unvoiced;
    `periodicity`: (n,) 0..1 voicing confidence, None when the tracker gives none.
    """

    time_s: npt.NDArray[Any]
    f0_hz: npt.NDArray[Any]
    periodicity: npt.NDArray[Any] | None = None


@dataclass(frozen=True)
class Word:
    """A transcribed word and its time span in seconds from the start of its recording."""

    text: str
    start_s: float
    end_s: float


@dataclass(frozen=True)
class Tolerances:
    """How forgiving a difficulty is.

    Pitch: full credit for |error| <= `pitch_full_cents`, falling linearly to none at
    `pitch_zero_cents` (the full-credit bound is also the "within tolerance" of accuracy).
    Rhythm: a reference onset counts as sung when a performance onset lies within
    ±`onset_window_ms` of where the alignment places it; its timing (after latency removal)
    earns full credit within `timing_full_ms`, none beyond `timing_zero_ms`. All in cents
    (1/100 semitone) and milliseconds.
    """

    pitch_full_cents: float
    pitch_zero_cents: float
    onset_window_ms: float
    timing_full_ms: float
    timing_zero_ms: float


# Performous gives full credit within half a semitone and none beyond 1.5/1.0/0.5
# semitones; these are a little stricter at full credit and keep a continuous slope.
TOLERANCES: dict[str, Tolerances] = {
    "easy": Tolerances(75.0, 200.0, 150.0, 120.0, 400.0),
    "normal": Tolerances(50.0, 150.0, 100.0, 80.0, 300.0),
    "hard": Tolerances(25.0, 100.0, 70.0, 50.0, 200.0),
}


@dataclass(frozen=True)
class ScoringConfig:
    """Settings of one scoring run.

    `weights`: pitch, rhythm, lyrics (renormalised over what can be scored);
    `difficulty`: key of `TOLERANCES` (unknown values fall back to normal, with a warning);
    `allow_key_change`: forgive a whole-song transposition (always reported);
    `dtw_band_s`: how far (s) the alignments may stray from the take's course (see
    `tempo_centre`); kept within `MIN_DTW_BAND_S`..`MAX_DTW_BAND_S` (a non-finite value
    means the default), and widened where even that cannot follow the take to its end
    (warned `alignment_band_widened`);
    `max_global_offset_s`: largest recording latency searched, either sign;
    `hop_s`: the common grid (clamped to 1..100 ms); `min_periodicity`: frames below it
    are unvoiced (0.21 is torchcrepe's usual threshold); `min_pause_s`: a rest this long
    ends a phrase; `dtw_costs`: local costs of the alignment that pairs notes (rhythm,
    guard rails); `pitch_dtw_costs`: those of the alignment pitch is judged on (see
    `DtwCosts`);
    `max_duration_s`: frames of either contour later than this are dropped (with a
    warning): a single stray timestamp hours out would otherwise size every grid;
    `follow_tempo`: judge onset timing against the singer's own steady tempo (a straight
    line fitted through the matched onsets) rather than the reference's clock. On the
    MASTmelody dev set this lifts rhythm's pass/fail ROC AUC from 0.739 to 0.885 (the
    total's from 0.892 to 0.950; chosen on that same data), since an unaccompanied
    singer is not wrong to sing a little slower; `tempo_ratio` and the
    per-line `timing_offset_ms` still show any drift. Turn it off for karaoke played along
    a backing track, where drifting off the band's tempo is a rhythm fault.
    `max_mismatch_evidence`: a take whose `mismatch_evidence` reaches this is warned
    `melody_mismatch` and capped (infinity turns the check off; docs/scoring.md says how
    the default was chosen).
    """

    weights: tuple[float, float, float] = (0.4, 0.3, 0.3)
    difficulty: str = "normal"
    allow_key_change: bool = True
    dtw_band_s: float = 1.5
    max_global_offset_s: float = 2.0
    hop_s: float = 0.01
    min_periodicity: float = 0.21
    min_pause_s: float = 0.3
    dtw_costs: DtwCosts = field(default_factory=DtwCosts)
    pitch_dtw_costs: DtwCosts = PITCH_TIMING_COSTS
    follow_tempo: bool = True
    max_duration_s: float = 1800.0
    max_mismatch_evidence: float = 0.75


@dataclass(frozen=True)
class ScoringAnalysis:
    """The result plus the aligned contours behind it (for plotting).

    `time_s`: reference grid times; `reference_cents`: the reference; `performance_cents`:
    the performance frame aligned to each reference frame, latency and (when allowed) key
    removed, folded into the reference's octave where it was sung an octave off;
    NaN = unvoiced or not sung.
    """

    result: ScoreResult
    time_s: FloatArray
    reference_cents: FloatArray
    performance_cents: FloatArray
    global_offset_ms: float
    mismatch_evidence: float = float("nan")


# How far (s) the take's course may drift from the reference's clock, at most (20 % of
# the length up to this): keeps the coarse alignment linear in the length.
_MAX_COURSE_DRIFT_S = 60.0
# The band of the fine alignments (`dtw_band_s`): under 0.2 s (±0.1 s for the pitch path)
# a take 5 % slower than its course already leaves the band within seconds; over a
# minute the band costs more time and memory than the course's drift can justify.
MIN_DTW_BAND_S = 0.2
MAX_DTW_BAND_S = 60.0
# The latency is re-measured along the alignment when the start it implies is this far
# (ms) from the cross-correlation's: beyond a tempo change's compromise, not jitter.
_LATENCY_AGREEMENT_MS = 100.0
# A latency reported this far (ms) beyond the searched range is out of range; less is the
# alignment's own jitter around a latency at the range's edge.
_OFFSET_SLACK_MS = 100.0
_START_WINDOW_S = 60.0  # of the song, from its first sung frame, that dates its start

# Guard rails: below these the take is not a real attempt at the song.
_MIN_REFERENCE_S = 1.0  # of melody; less is not a song to judge against
_MIN_COVERAGE = 0.5  # share of the reference's sung frames paired with singing
# A breath or a staccato rest this short (s) inside the take's singing still covers the
# reference frames it is paired with; a skipped phrase does not.
_COVERAGE_GAP_S = 0.5
_MIN_VOICING_RATIO = 0.35  # sung frames of the take per sung frame of the reference
# Another song still shares pitches with the reference (the alignment finds them), but
# not when they come: both little in tune and notes off the reference's (own-tempo) timing.
_MISMATCH_ACCURACY = 0.5
_MISMATCH_RHYTHM = 25.0
_MISMATCH_RHYTHM_ALONE = 10.0  # rhythm this low is a mismatch whatever the accuracy
# Sung frames after the alignment's end, beyond this share of the reference's sung frames
# (and this many seconds), are a take that goes on singing something else.
_MAX_EXCESS = 0.5
_MIN_EXCESS_S = 2.0
# Share of 10 ms steps between voiced frames moving less than a semitone: real singing
# (even with vibrato) stays above 0.95, a tracker following noise falls near 0.1.
_MIN_CONTINUITY = 0.7
_EVIDENCE_DECIMATION = 4  # 40 ms frames: the question is which order fits, not where
_EVIDENCE_MIN_FRAMES = 25  # voiced coarse frames (1 s) on each side
# Decoys other than the retrograde: the reference's sung span rotated by these shares of
# its length (by more than the band, so that the alignment cannot undo the shift).
_DECOY_SHIFTS = (1 / 2, 1 / 3, 2 / 3, 1 / 4, 3 / 4)
# Misfit of a decoy with the reference itself (alignment cost per sung coarse frame,
# semitone units; `_decoy`). The retrograde of a real melody lies near 1-2 (vocadito_1:
# 1.3; mastmelody-dev's references 0.18-1.8, the low end all 61_mel2, a melody nearly
# symmetric), of a scale up and down or an arpeggio 1-3-5-8-5-3-1 near 0.04. From this
# misfit on the retrograde is the decoy: good takes of near-palindromes measured 0.45 of
# evidence at a misfit of 0.21, 0.62 at 0.14 (the bound is 0.75). Not higher: against
# 61_mel2 a rotation is the stricter decoy, under which other songs' evidence fell from
# 0.85 to 0.70, below the bound. Below it for every reordering (one note or one figure
# repeated), there is no decoy.
_MIN_DECOY_MISFIT = 0.2
_CAP_LOW_VOICING = 40.0
_CAP_MISMATCH = 30.0
# The take is the reference recording itself (played back, or uploaded as the take): on
# the aligned frames, half within this many cents of the reference, at least this share
# within 10 cents and nine in ten within `_PLAYBACK_P90_CENTS`, over at least half the
# reference's sung frames. Measured: vocadito_1 and _10 through the pitch stage's two
# models (tiny for the reference, full for the take), median 3.6-5.4 cents, 78-90 %
# within 10, p90 10-15 (6.0 / 72 % / 18 with noise and a room added); a live singer
# against a steady piano (mastmelody-dev, all 428 takes), median 11 cents at best and at
# most 46 % within 10. Only a warning: the score still says how the recording matches.
_PLAYBACK_MEDIAN_CENTS = 8.0
_PLAYBACK_MIN_WITHIN_10 = 0.6
_PLAYBACK_P90_CENTS = 25.0


def score_performance(
    reference: Contour,
    performance: Contour,
    *,
    reference_words: Sequence[Word] | None,
    performance_words: Sequence[Word] | None,
    lyrics: str | None,
    language: str | None,
    config: ScoringConfig,
    performance_separated: bool,
    reference_separated: bool,
    transcription_skipped: bool = False,
) -> ScoreResult:
    """Score a performance against a reference. Never raises on degenerate input.

    `reference_words` / `performance_words`: ASR words with timestamps (s), None when no
    transcript exists (then lyrics cannot be scored against it); `lyrics`: typed lyrics,
    one line per line of the song, preferred over the reference transcript; `language`:
    ISO code of the lyrics (affects only word normalisation); `transcription_skipped`: no
    transcript because the deployment runs without speech recognition (the warning says
    so, rather than that the take had none).
    """
    return analyse_performance(
        reference,
        performance,
        reference_words=reference_words,
        performance_words=performance_words,
        lyrics=lyrics,
        language=language,
        config=config,
        performance_separated=performance_separated,
        reference_separated=reference_separated,
        transcription_skipped=transcription_skipped,
    ).result


def _sanitise(
    contour: Contour, max_duration_s: float
) -> tuple[FloatArray, FloatArray, FloatArray | None, int]:
    """Equal lengths, finite increasing times; anything else is dropped, not raised on.

    A periodicity array of another length than the times cannot say which frame it
    belongs to, so it is ignored (the pitch is kept, every voiced frame trusted). Frames
    later than `max_duration_s` are dropped too; the last value returned is how many.
    """
    t: FloatArray = np.asarray(contour.time_s, dtype=np.float64).ravel()
    f: FloatArray = np.asarray(contour.f0_hz, dtype=np.float64).ravel()
    p: FloatArray | None = (
        None
        if contour.periodicity is None
        else np.asarray(contour.periodicity, dtype=np.float64).ravel()
    )
    n = min(t.size, f.size)
    t, f = t[:n], f[:n]
    if p is not None and p.size != n:
        p = None
    keep = np.isfinite(t) & (t >= 0)
    too_late = int(np.sum(keep & (t > max_duration_s)))
    keep &= t <= max_duration_s
    t, f = t[keep], f[keep]
    p = p[keep] if p is not None else None
    if t.size > 1 and np.any(np.diff(t) <= 0):
        order = np.argsort(t, kind="stable")
        t, f = t[order], f[order]
        p = p[order] if p is not None else None
        unique = np.r_[True, np.diff(t) > 0]
        t, f = t[unique], f[unique]
        p = p[unique] if p is not None else None
    return t, f, p, too_late


def _sanitise_words(words: Sequence[Word] | None, end_s: float) -> list[Word] | None:
    """Transcript words with usable times: a word without a finite start and end is
    dropped (an ASR glitch cannot place it) and times are clamped into [0, `end_s`] (the
    contour's end) with end >= start. The order is kept: it is the order of the words
    sung, which the word error rate compares, even where the timestamps disagree."""
    if words is None:
        return None
    out: list[Word] = []
    for w in words:
        try:
            start, end = float(w.start_s), float(w.end_s)
        except (TypeError, ValueError):
            continue
        if not (np.isfinite(start) and np.isfinite(end)):
            continue
        start = min(max(start, 0.0), end_s)
        end = min(max(end, start), end_s)
        out.append(Word(str(w.text), start, end))
    return out


def _paired_key(ref: FloatArray, perf: FloatArray) -> list[float]:
    """Key from frames voiced at the same (latency-corrected) time: right whenever the
    take follows the reference's tempo, which karaoke takes do."""
    n = min(ref.size, perf.size)
    both = np.isfinite(ref[:n]) & np.isfinite(perf[:n])
    if both.sum() < 50:
        return []
    hist = pitch_class_histogram(perf[:n][both] - ref[:n][both])
    mode = float(np.argmax(hist)) * 10.0
    return [float(fold_cents(np.array([mode]))[0])]


def estimate_latency_and_key(
    ref: FloatArray, perf_raw: FloatArray, *, band: int, config: ScoringConfig, hop_s: float
) -> tuple[int, float, FloatArray, IntArray]:
    """(lag in frames, key in cents, performance on the reference timeline, the take's
    course on that timeline (`tempo_centre`)), both grids MIDI cents on `hop_s` frames;
    `band` in frames."""
    max_lag = round(config.max_global_offset_s / hop_s)
    lags = [estimate_global_offset(ref, perf_raw, max_lag)]
    start = first_voiced_lag(ref, perf_raw, min_run=max(1, round(0.1 / hop_s)))
    if start is not None and abs(start) <= max_lag and start not in lags:
        lags.append(start)
    best: tuple[float, int, float, FloatArray, IntArray] | None = None
    for lag in lags:
        perf = shift_to_reference_timeline(perf_raw, lag)
        # Key-blind, so it can guide the search for the key.
        centre = tempo_centre(
            ref,
            perf,
            band=band,
            costs=COURSE_COSTS,
            max_reach=round(_MAX_COURSE_DRIFT_S / hop_s),
        )
        key, cost = estimate_key(
            ref,
            perf,
            band=band,
            costs=config.dtw_costs,
            extra_candidates=_paired_key(ref, perf),
            centre=centre,
        )
        # Sung frames cut off by the shift are charged as sung over silence, so that a lag
        # cannot win by throwing away the part of the take that fits badly.
        cost += config.dtw_costs.voicing_mismatch * dropped_voiced_frames(perf_raw, lag)
        if best is None or cost < best[0]:
            best = (cost, lag, key, perf, centre)
    assert best is not None
    return best[1:]


def _tempo_ratio(
    ref: FloatArray, perf: FloatArray, path_ref: IntArray, path_perf: IntArray, hop_s: float
) -> float:
    """Performance duration / reference duration over the stretch both sang (from the
    alignment path); 1.0 when less than a second was sung together."""
    both = np.isfinite(ref[path_ref]) & np.isfinite(perf[path_perf])
    if both.sum() < 2:
        return 1.0
    i, j = path_ref[both], path_perf[both]
    span_ref = int(i[-1] - i[0])
    if span_ref * hop_s < 1.0:
        return 1.0
    return float(np.clip((j[-1] - j[0]) / span_ref, 0.05, 20.0))


def _fine_alignments(
    ref: FloatArray, perf: FloatArray, *, band: int, centre: IntArray, config: ScoringConfig
) -> tuple[Alignment, Alignment]:
    """The note path (pitch-matched, `dtw_costs`) and the timing path (interval-driven,
    `pitch_dtw_costs`, half the band: timing needs less room than note matching), both
    around the take's course; `perf` on the reference timeline with the key removed."""
    notes = banded_dtw(ref, perf, band=band, costs=config.dtw_costs, centre=centre)
    timing = banded_dtw(
        ref, perf, band=max(1, band // 2), costs=config.pitch_dtw_costs, centre=centre
    )
    return notes, timing


@dataclass(frozen=True)
class _Aligned:
    """The take under one latency: `lag` (frames, >0 late), `perf` on the reference
    timeline (key not removed), its course `centre`, and the two fine paths."""

    lag: int
    perf: FloatArray
    centre: IntArray
    notes: Alignment
    timing: Alignment


def _settle_latency(
    ref: FloatArray,
    perf_raw: FloatArray,
    first: _Aligned,
    *,
    first_note_lag: int | None,
    key: float,
    band: int,
    config: ScoringConfig,
    hop_s: float,
) -> _Aligned:
    """The latency the timings are measured from, checked against the alignment.

    The cross-correlation's lag is a compromise over the whole take: a take sung 20 %
    faster that starts 134 ms early correlates best 490 ms early (and fits about as well
    as the first-note lag, so it can win the search), and then its first line would read
    120 ms *late*. When where the timing path puts the singer at the reference's first
    sung frame (`_start_offset_frames`) disagrees with the lag by more than
    `_LATENCY_AGREEMENT_MS` and agrees instead with `first_note_lag` (the take's first
    sung note on the reference's first, searched here whatever its size), that lag is
    taken, with its own course, unless its timing path fits worse (sung frames a lag
    throws away charged as in `estimate_latency_and_key`). Two measurements must agree:
    on another song or notes in the wrong order the path's start says little, and the
    latency found is kept.
    """
    late = round(
        _start_offset_frames(
            ref,
            first.perf,
            reference_to_performance_map(first.timing, ref.size),
            hop_s=hop_s,
        )
    )
    agreement = _LATENCY_AGREEMENT_MS / 1000.0 / hop_s
    if (
        abs(late) <= agreement
        or first_note_lag is None
        or abs(first.lag + late - first_note_lag) > agreement
    ):
        return first
    lag = first_note_lag
    perf = shift_to_reference_timeline(perf_raw, lag)
    # The course anew: the first one's start was spent catching up with the wrong lag.
    centre = tempo_centre(
        ref, perf, band=band, costs=COURSE_COSTS, max_reach=round(_MAX_COURSE_DRIFT_S / hop_s)
    )
    notes, timing = _fine_alignments(ref, perf - key, band=band, centre=centre, config=config)
    charge = config.pitch_dtw_costs.voicing_mismatch
    before = first.timing.cost + charge * dropped_voiced_frames(perf_raw, first.lag)
    after = timing.cost + charge * dropped_voiced_frames(perf_raw, lag)
    if not after <= before:
        return first
    return _Aligned(lag, perf, centre, notes, timing)


def _start_offset_frames(
    ref: FloatArray, perf: FloatArray, ref_to_perf: IntArray, *, hop_s: float
) -> float:
    """How late (frames, on the latency-corrected timeline) the singer was at the first
    sung reference frame, by the alignment: a robust line (Theil-Sen on an even sample)
    through the frames both sang in the first `_START_WINDOW_S` of the song, read at its
    first sung frame. The path itself starts at the origin and needs a while to catch up
    with a latency the search did not cover, so its first frames say too little; 0 when
    under a second of frames was sung together there."""
    voiced = np.flatnonzero(np.isfinite(ref))
    if voiced.size == 0 or perf.size == 0:
        return 0.0
    first = int(voiced[0])
    window = (ref_to_perf >= 0) & (np.arange(ref.size) <= first + _START_WINDOW_S / hop_s)
    idx = np.flatnonzero(np.isfinite(ref) & window)
    idx = idx[np.isfinite(perf[np.clip(ref_to_perf[idx], 0, perf.size - 1)])]
    if idx.size * hop_s < 1.0:
        return 0.0
    pick = np.unique(np.linspace(0, idx.size - 1, 300).round().astype(np.int64))
    i = idx[pick].astype(np.float64)
    j = ref_to_perf[idx[pick]].astype(np.float64)
    slope = float(stats.theilslopes(j, i)[0])
    intercept = float(np.median(j - slope * i))
    return slope * first + intercept - first


@dataclass(frozen=True)
class _ExpectedWords:
    """The words the singer should have sung, in order, and where they belong."""

    tokens: list[str]
    against: str
    line_texts: list[str] = field(default_factory=list)
    line_words: list[list[int]] = field(default_factory=list)
    token_times: list[tuple[float, float]] = field(default_factory=list)
    token_text: list[str] = field(default_factory=list)


def _lyric_lines(lyrics: str, language: str | None) -> tuple[list[str], list[list[str]]]:
    texts, words = [], []
    for line in lyrics.splitlines():
        tokens = normalise_words(line, language)
        if tokens:
            texts.append(line.strip())
            words.append(tokens)
    return texts, words


def _timed_tokens(
    words: Sequence[Word], language: str | None
) -> tuple[list[str], list[tuple[float, float]], list[str]]:
    tokens: list[str] = []
    times: list[tuple[float, float]] = []
    texts: list[str] = []
    for w in words:
        for token in normalise_words(w.text, language):
            tokens.append(token)
            times.append((float(w.start_s), float(w.end_s)))
            texts.append(w.text.strip())
    return tokens, times, texts


def _expected_words(
    lyrics: str | None, reference_words: Sequence[Word] | None, language: str | None
) -> _ExpectedWords | None:
    if lyrics is not None and lyrics.strip():
        texts, per_line = _lyric_lines(lyrics, language)
        tokens: list[str] = []
        line_words: list[list[int]] = []
        for line_tokens in per_line:
            line_words.append(list(range(len(tokens), len(tokens) + len(line_tokens))))
            tokens.extend(line_tokens)
        if tokens:
            return _ExpectedWords(tokens, "lyrics", texts, line_words)
    if reference_words:
        tokens, times, texts = _timed_tokens(reference_words, language)
        if tokens:
            return _ExpectedWords(
                tokens, "reference_transcript", token_times=times, token_text=texts
            )
    return None


def _line_specs(
    ref: FloatArray,
    expected: _ExpectedWords | None,
    reference_words: Sequence[Word] | None,
    language: str | None,
    config: ScoringConfig,
) -> list[LineSpec]:
    """Lyric lines placed by the reference transcript when both exist, else sung phrases
    (carrying the lyric lines when they are as many, or the transcript words they hold)."""
    hop = min(max(config.hop_s, 0.001), 0.1)
    if expected is not None and expected.against == "lyrics" and reference_words:
        ref_tokens, ref_times, _ = _timed_tokens(reference_words, language)
        specs = lyric_line_specs(
            expected.line_texts,
            expected.line_words,
            expected.tokens,
            ref_tokens,
            ref_times,
            hop_s=hop,
        )
        if specs is not None:
            # Timestamps out of order would otherwise give lines going back in time.
            return sorted(specs, key=lambda spec: (spec.start_frame, spec.end_frame))
    spans = phrase_spans(ref, hop_s=hop, min_pause_s=config.min_pause_s)
    if expected is None:
        return [LineSpec(a, b, None) for a, b in spans]
    if expected.against == "lyrics":
        if len(spans) == len(expected.line_texts):
            return [
                LineSpec(a, b, text, tuple(words))
                for (a, b), text, words in zip(
                    spans, expected.line_texts, expected.line_words, strict=True
                )
            ]
        return [LineSpec(a, b, None) for a, b in spans]
    groups = assign_words_to_spans(spans, expected.token_times, hop_s=hop)
    specs = []
    for (a, b), members in zip(spans, groups, strict=True):
        texts: list[str] = []
        for k in members:
            # Several tokens can come from one transcript word; show that word once.
            if not texts or k == 0 or expected.token_times[k] != expected.token_times[k - 1]:
                texts.append(expected.token_text[k])
        specs.append(LineSpec(a, b, " ".join(texts) or None, tuple(members)))
    return specs


def _weights(config: ScoringConfig, lyrics_scored: bool) -> Weights:
    """Configured weights normalised to sum 1, lyrics dropped when they cannot be scored."""
    pitch, rhythm, lyric = (max(float(w), 0.0) for w in config.weights)
    if not lyrics_scored:
        lyric = 0.0
    total = pitch + rhythm + lyric
    if total <= 0:
        pitch, rhythm, lyric = (0.4, 0.3, 0.3) if lyrics_scored else (0.4, 0.3, 0.0)
        total = pitch + rhythm + lyric
    return Weights(pitch=pitch / total, rhythm=rhythm / total, lyrics=lyric / total)


def analyse_performance(
    reference: Contour,
    performance: Contour,
    *,
    reference_words: Sequence[Word] | None,
    performance_words: Sequence[Word] | None,
    lyrics: str | None,
    language: str | None,
    config: ScoringConfig,
    performance_separated: bool,
    reference_separated: bool,
    transcription_skipped: bool = False,
) -> ScoringAnalysis:
    """`score_performance`, also returning the aligned contours (see `ScoringAnalysis`)."""
    warnings: list[ResultWarning] = []
    tol = TOLERANCES.get(config.difficulty)
    if tol is None:
        warnings.append(
            ResultWarning(
                code="unknown_difficulty",
                message=f"Unknown difficulty {config.difficulty!r}; scored as normal.",
            )
        )
        tol = TOLERANCES["normal"]
    hop = min(max(config.hop_s, 0.001), 0.1)

    max_duration_s = config.max_duration_s if np.isfinite(config.max_duration_s) else 1800.0
    ref_t, ref_f, ref_p, ref_late = _sanitise(reference, max_duration_s)
    perf_t, perf_f, perf_p, perf_late = _sanitise(performance, max_duration_s)
    for name, late in (("reference", ref_late), ("performance", perf_late)):
        if late:
            warnings.append(
                ResultWarning(
                    code="contour_too_long",
                    message=f"{late} pitch frames of the {name} later than "
                    f"{max_duration_s:.0f} s were ignored.",
                )
            )
    ref = to_grid(ref_t, ref_f, ref_p, min_periodicity=config.min_periodicity, hop_s=hop)
    perf_raw = to_grid(perf_t, perf_f, perf_p, min_periodicity=config.min_periodicity, hop_s=hop)

    reference_words = _sanitise_words(reference_words, ref.size * hop)

    # 1-2. Latency and key, removed before anything is judged: each plausible latency
    # (cross-correlation peak; first sung note on the reference's first) is tried with each
    # plausible key, and the pair under which the melodies align best wins.
    band_s = config.dtw_band_s if np.isfinite(config.dtw_band_s) else ScoringConfig.dtw_band_s
    band = max(1, round(min(max(band_s, MIN_DTW_BAND_S), MAX_DTW_BAND_S) / hop))
    lag, key, perf, centre = estimate_latency_and_key(
        ref, perf_raw, band=band, config=config, hop_s=hop
    )

    # 3. Alignments: notes paired by pitch (for rhythm and the guard rails), and the
    # timing the melody's intervals give (for pitch, which a detuned stretch cannot bend).
    # Both keep within the band around the take's overall course (`tempo_centre`).
    alignment, pitch_alignment = _fine_alignments(
        ref, perf - key, band=band, centre=centre, config=config
    )
    # The latency is a compromise over the whole take; where the singer's first note
    # lies by the alignment is what the timings are meant to be relative to.
    settled = _settle_latency(
        ref,
        perf_raw,
        _Aligned(lag, perf, centre, alignment, pitch_alignment),
        first_note_lag=first_voiced_lag(ref, perf_raw, min_run=max(1, round(0.1 / hop))),
        key=key,
        band=band,
        config=config,
        hop_s=hop,
    )
    lag, perf, centre = settled.lag, settled.perf, settled.centre
    alignment, pitch_alignment = settled.notes, settled.timing
    if alignment.band > band or pitch_alignment.band > max(1, band // 2):
        widest_s = max(alignment.band, 2 * pitch_alignment.band) * hop
        warnings.append(
            ResultWarning(
                code="alignment_band_widened",
                message=f"The take strays further from its overall course than the "
                f"alignment band (±{band * hop:.2f} s) allows; the band was widened to "
                f"±{widest_s:.2f} s to follow it to the end.",
            )
        )
    evidence = mismatch_evidence(
        ref, perf - key, centre=centre, band=band, costs=config.pitch_dtw_costs
    )
    key = refine_key(ref, perf, pitch_alignment, key)

    # 4. Pitch.
    pitch = judge_pitch(
        ref,
        perf,
        pitch_alignment,
        key_cents=key,
        count_key=not config.allow_key_change,
        full_credit_cents=tol.pitch_full_cents,
        zero_credit_cents=tol.pitch_zero_cents,
        min_switch_frames=max(1, round(0.2 / hop)),
    )

    # 5. Rhythm.
    ref_to_perf = reference_to_performance_map(alignment, ref.size)
    # Where the singer was, by the melody's intervals: a detuned stretch leaves it on time,
    # where the note path can slide to borrow notes at the detuned pitch.
    ref_to_perf_timing = reference_to_performance_map(pitch_alignment, ref.size)
    rhythm = judge_rhythm(
        detect_onsets(ref, hop_s=hop),
        detect_onsets(perf, hop_s=hop),
        ref_to_perf,
        hop_s=hop,
        match_window_ms=tol.onset_window_ms,
        full_credit_ms=tol.timing_full_ms,
        zero_credit_ms=tol.timing_zero_ms,
        tempo_ratio=_tempo_ratio(ref, perf, alignment.path_ref, alignment.path_perf, hop),
        perf_end_frame=int(alignment.path_perf[-1]) if alignment.path_perf.size else -1,
        follow_tempo=config.follow_tempo,
        timing_ref_to_perf=ref_to_perf_timing,
    )

    # The latency searched is bounded (`max_global_offset_s`), but the course and the band
    # follow a take that starts later: then the latency found is wrong, and where the
    # alignment puts the first sung note is reported instead, with a warning.
    offset_ms = lag * hop * 1000.0
    implied_ms = (
        (lag + _start_offset_frames(ref, perf, ref_to_perf_timing, hop_s=hop)) * hop * 1000.0
    )
    if abs(implied_ms) > config.max_global_offset_s * 1000.0 + _OFFSET_SLACK_MS:
        offset_ms = implied_ms
        warnings.append(
            ResultWarning(
                code="latency_out_of_range",
                message=f"The take starts {offset_ms / 1000.0:+.1f} s from the reference, "
                f"beyond the {config.max_global_offset_s:.1f} s latency searched; its first "
                "notes may be judged against the wrong part of the song.",
            )
        )

    # 6. Lyrics.
    expected = _expected_words(lyrics, reference_words, language)
    lyrics_outcome: LyricsOutcome | None = None
    if performance_words is not None and expected is not None:
        sung = [t for w in performance_words for t in normalise_words(w.text, language)]
        lyrics_outcome = judge_lyrics(expected.tokens, sung)
        if not sung and lyrics_outcome is not None:
            warnings.append(
                ResultWarning(
                    code="no_words_recognised",
                    message="No words were recognised in the performance, so every word of "
                    "the lyrics counts as missed.",
                )
            )
    if lyrics_outcome is None:
        if performance_words is None:
            reason = (
                "speech recognition is not available on this deployment"
                if transcription_skipped
                else "no transcript of the performance"
            )
        else:
            reason = "neither lyrics nor a reference transcript to compare with"
        warnings.append(
            ResultWarning(
                code="lyrics_not_scored",
                message=f"Lyrics were not scored ({reason}); pitch and rhythm weights "
                "were renormalised.",
            )
        )

    # 7. Lines.
    specs = _line_specs(ref, expected, reference_words, language, config)
    lines = tuple(
        line_feedback(
            k,
            spec,
            frames=pitch.frames,
            ref_to_perf=ref_to_perf_timing,
            perf_cents=perf,
            tolerance_cents=tol.pitch_full_cents,
            hop_s=hop,
            lyrics=lyrics_outcome,
        )
        for k, spec in enumerate(specs)
    )

    # 8. Guard rails and the total.
    weights = _weights(config, lyrics_outcome is not None)
    total = (
        weights.pitch * pitch.score
        + weights.rhythm * rhythm.score
        + weights.lyrics * (lyrics_outcome.score if lyrics_outcome else 0.0)
    )
    cap, guard_warnings = _guard_rails(
        ref,
        perf,
        alignment.path_ref,
        alignment.path_perf,
        ref_voiced_frames=pitch.voiced_frames,
        pitch_accuracy=pitch.accuracy,
        rhythm_score=rhythm.score,
        mismatch_evidence=evidence,
        max_mismatch_evidence=config.max_mismatch_evidence,
        hop_s=hop,
    )
    warnings.extend(guard_warnings)
    total = min(total, cap)
    aligned = _aligned_performance(
        ref, perf, reference_to_performance_map(pitch_alignment, ref.size), key, config
    )
    if (
        played_back := _played_back(ref, aligned, ref_voiced_frames=pitch.voiced_frames)
    ) is not None:
        warnings.append(played_back)

    result = ScoreResult(
        score=round(float(np.clip(total, 0.0, 100.0)), 1),
        weights=weights,
        pitch=PitchScore(
            score=_score(pitch.score),
            accuracy=round(float(np.clip(pitch.accuracy, 0.0, 1.0)), 4),
            mean_abs_error_cents=round(pitch.mean_abs_error_cents, 1),
            key_offset_cents=round(key, 1),
            key_offset_counted=not config.allow_key_change,
            register_offset_octaves=pitch.register_offset_octaves,
            octave_errors_folded=pitch.octave_errors_folded,
            octave_switches=pitch.octave_switches,
            voiced_frames=pitch.voiced_frames,
            tolerance_cents=tol.pitch_full_cents,
        ),
        rhythm=RhythmScore(
            score=_score(rhythm.score),
            global_offset_ms=round(offset_ms, 1),
            onset_precision=round(rhythm.onset_precision, 4),
            onset_recall=round(rhythm.onset_recall, 4),
            mean_abs_timing_ms=round(rhythm.mean_abs_timing_ms, 1),
            tempo_ratio=round(max(rhythm.tempo_ratio, 1e-3), 4),
        ),
        lyrics=None
        if lyrics_outcome is None or expected is None
        else LyricsScore(
            score=_score(lyrics_outcome.score),
            wer=round(lyrics_outcome.wer, 4),
            against=expected.against,
            words_expected=len(lyrics_outcome.expected),
            words_missed=lyrics_outcome.words_missed,
            words_wrong=lyrics_outcome.words_wrong,
            words_extra=lyrics_outcome.words_extra,
        ),
        lines=lines,
        expression=expression_features(
            perf,
            hop_s=hop,
            reference_frames=performance_to_reference_frames(pitch_alignment, perf.size),
        ),
        warnings=tuple(warnings),
        performance_separated=performance_separated,
        reference_separated=reference_separated,
    )
    return ScoringAnalysis(
        result=result,
        time_s=np.arange(ref.size, dtype=np.float64) * hop,
        reference_cents=ref,
        performance_cents=aligned,
        global_offset_ms=offset_ms,
        mismatch_evidence=evidence,
    )


def _score(value: float) -> float:
    return round(float(np.clip(value, 0.0, 100.0)), 1)


def _aligned_performance(
    ref: FloatArray,
    perf: FloatArray,
    ref_to_perf: IntArray,
    key: float,
    config: ScoringConfig,
) -> FloatArray:
    out = np.full(ref.size, np.nan)
    ok = ref_to_perf >= 0
    if not ok.any() or perf.size == 0:
        return out
    sung = perf[ref_to_perf[ok]] - (key if config.allow_key_change else 0.0)
    # Drawn in the reference's octave, so that an octave slip shows as the folded error.
    anchor = np.where(np.isfinite(ref[ok]), ref[ok], sung)
    out[ok] = anchor + fold_cents(sung - anchor)
    return out


def _played_back(
    ref: FloatArray, aligned: FloatArray, *, ref_voiced_frames: int
) -> ResultWarning | None:
    """A warning when the take is the reference recording itself, not sung (see
    `_PLAYBACK_MEDIAN_CENTS`): no live singer follows a recording that closely."""
    both = np.isfinite(ref) & np.isfinite(aligned)
    if ref_voiced_frames == 0 or both.sum() < max(0.5 * ref_voiced_frames, 100):
        return None
    apart = np.abs(aligned[both] - ref[both])
    within_10 = float(np.mean(apart < 10.0))
    if (
        float(np.median(apart)) > _PLAYBACK_MEDIAN_CENTS
        or within_10 < _PLAYBACK_MIN_WITHIN_10
        or float(np.percentile(apart, 90)) > _PLAYBACK_P90_CENTS
    ):
        return None
    return ResultWarning(
        code="matches_reference_recording",
        message=f"The take follows the reference recording almost exactly ({within_10:.0%} "
        "of its notes within 10 cents of it, closer than a live singer gets): it may be the "
        "reference played back rather than sung.",
    )


def mismatch_evidence(
    ref: FloatArray,
    perf: FloatArray,
    *,
    centre: IntArray,
    band: int,
    costs: DtwCosts,
    factor: int = _EVIDENCE_DECIMATION,
) -> float:
    """How much better the take fits the reference than the same notes in another order.

    `perf` is on the reference's timeline with the key removed. Both alignments run on a
    coarse grid (every `factor`-th frame) along the same course and band with the same
    costs; the value is the cost of the reference in its own order over the cost of a
    decoy (`_decoy`): its retrograde (same notes, same pitch range, same rhythm values,
    wrong order), or for a melody that reads the same backwards its sung span rotated. An
    attempt at the song, even a poor one, fits its own order clearly better (about
    0.25-0.6 for good takes, more for weak ones); another melody fits both orders alike
    (near 1). NaN when either side has too little singing to tell, or when no reordering
    of the reference differs from it (one note or one figure repeated): then the rule
    cannot tell the song from another, and is not applied.
    """
    r = np.ascontiguousarray(ref[::factor])
    p = np.ascontiguousarray(perf[::factor])
    if np.isfinite(r).sum() < _EVIDENCE_MIN_FRAMES or np.isfinite(p).sum() < _EVIDENCE_MIN_FRAMES:
        return float("nan")
    c = np.asarray(centre[::factor], dtype=np.int64) // factor
    b = max(band // factor, 1)
    decoy = _decoy(r, band=b, costs=costs)
    if decoy is None:
        return float("nan")
    forward = banded_dtw(r, p, band=b, costs=costs, centre=c).cost
    backward = banded_dtw(decoy, p, band=b, costs=costs, centre=c).cost
    if not (np.isfinite(forward) and np.isfinite(backward)) or backward <= 0:
        return float("nan")
    return float(forward / backward)


def _decoy(ref: FloatArray, *, band: int, costs: DtwCosts) -> FloatArray | None:
    """The reordering of `ref` the take is also aligned to, or None when none differs.

    The retrograde, unless it fits the reference itself nearly as well as the reference
    does (a scale up and down, an arpeggio 1-3-5-8-5-3-1: then a good take fits both
    alike and would be taken for another song); then whichever fits the reference worst
    of it and the sung span rotated by a half, a third, ... (`_DECOY_SHIFTS`). Misfit is
    the alignment cost with the reference per sung frame, diagonal band, same costs; a
    decoy needs `_MIN_DECOY_MISFIT`. The retrograde is kept wherever it will do, since
    the bound on the evidence was set with it (docs/scoring.md); the rotations cost
    nothing then."""
    voiced = np.flatnonzero(np.isfinite(ref))
    a, b = int(voiced[0]), int(voiced[-1]) + 1

    def misfit(decoy: FloatArray) -> float:
        return banded_dtw(ref, decoy, band=band, costs=costs).cost / voiced.size

    best = np.ascontiguousarray(ref[::-1])
    best_misfit = misfit(best)
    if best_misfit >= _MIN_DECOY_MISFIT:
        return best
    for share in _DECOY_SHIFTS:
        rotated = ref.copy()
        rotated[a:b] = np.roll(ref[a:b], round(share * (b - a)))
        rotated_misfit = misfit(rotated)
        if rotated_misfit > best_misfit:
            best, best_misfit = rotated, rotated_misfit
    return best if best_misfit >= _MIN_DECOY_MISFIT else None


def _coverage(
    ref_voiced: npt.NDArray[np.bool_],
    perf: FloatArray,
    path_ref: IntArray,
    path_perf: IntArray,
    *,
    hop_s: float,
) -> float:
    """Share of the reference's sung frames that the alignment pairs with singing in the
    take, breaths and rests of the take up to `_COVERAGE_GAP_S` counted as singing.

    Not "how far the take got": a take that skips the first half, or a verse in the
    middle, reaches the end of the song but covers only what it sang."""
    if not ref_voiced.any() or path_ref.size == 0:
        return 0.0
    singing = np.isfinite(fill_short_gaps(perf, max(0, round(_COVERAGE_GAP_S / hop_s))))
    covered = np.zeros(ref_voiced.size, dtype=bool)
    covered[path_ref[singing[path_perf]]] = True
    return float(np.sum(covered & ref_voiced) / ref_voiced.sum())


def _guard_rails(
    ref: FloatArray,
    perf: FloatArray,
    path_ref: IntArray,
    path_perf: IntArray,
    *,
    ref_voiced_frames: int,
    pitch_accuracy: float,
    rhythm_score: float,
    mismatch_evidence: float,
    max_mismatch_evidence: float,
    hop_s: float,
) -> tuple[float, list[ResultWarning]]:
    """Cap on the total score and warnings for takes that are not a real attempt."""
    warnings: list[ResultWarning] = []
    if ref_voiced_frames < _MIN_REFERENCE_S / hop_s:
        warnings.append(
            ResultWarning(
                code="reference_unusable",
                message="Less than a second of melody was found in the reference, so the "
                "performance could not be judged.",
            )
        )
        return 0.0, warnings
    perf_voiced = int(np.isfinite(perf).sum())
    if perf_voiced == 0:
        warnings.append(
            ResultWarning(
                code="no_vocals_detected",
                message="No singing was detected in the performance.",
            )
        )
        return 0.0, warnings

    cap = 100.0
    ref_voiced = np.isfinite(ref)
    sung_pairs = np.isfinite(perf[path_perf]) if path_perf.size else np.zeros(0, dtype=bool)
    reached = int(path_ref[sung_pairs].max()) + 1 if sung_pairs.any() else 0
    coverage = _coverage(ref_voiced, perf, path_ref, path_perf, hop_s=hop_s)
    if coverage < _MIN_COVERAGE:
        warnings.append(
            ResultWarning(
                code="performance_too_short",
                message=f"The take covers only {coverage:.0%} of the song's sung part.",
            )
        )
        cap = min(cap, 100.0 * coverage)
    ref_in_reach = max(int(ref_voiced[:reached].sum()), 1)
    perf_in_reach = (
        int(np.isfinite(perf[: int(path_perf[sung_pairs].max()) + 1]).sum())
        if sung_pairs.any()
        else 0
    )
    ratio = perf_in_reach / ref_in_reach
    if ratio < _MIN_VOICING_RATIO:
        warnings.append(
            ResultWarning(
                code="low_voicing",
                message=f"Singing was detected in only {ratio:.0%} of the expected time; "
                "the recording may be mostly silence, noise or accompaniment.",
            )
        )
        cap = min(cap, _CAP_LOW_VOICING)
    voiced_perf = np.isfinite(perf)
    steady = voiced_perf[1:] & voiced_perf[:-1]
    if steady.sum() >= 50:
        continuity = float(np.mean(np.abs(np.diff(perf))[steady] <= 100.0))
        if continuity < _MIN_CONTINUITY:
            warnings.append(
                ResultWarning(
                    code="erratic_pitch",
                    message="The performance's pitch jumps erratically from frame to frame; "
                    "the recording may be noise rather than singing.",
                )
            )
            cap = min(cap, _CAP_MISMATCH)
    # Singing past the end of the alignment is not the song: a take that goes on with
    # another song (or sings it five times) would otherwise be judged on its best part.
    excess = int(np.isfinite(perf[int(path_perf[-1]) + 1 :]).sum()) if path_perf.size else 0
    song = int(ref_voiced.sum())
    if excess > _MAX_EXCESS * song and excess * hop_s > _MIN_EXCESS_S:
        share = song / (song + excess)
        warnings.append(
            ResultWarning(
                code="performance_too_long",
                message=f"Only {share:.0%} of the singing in the take lines up with the song; "
                "the rest was sung after the song's melody had ended.",
            )
        )
        cap = min(cap, 100.0 * share)
    # A short take is already capped by its coverage; its low accuracy is not a mismatch.
    # Notes that almost never start where the song's do are another song, however many
    # pitches the alignment found in common (a short reference has few to find).
    too_short = coverage < _MIN_COVERAGE
    off_beat = rhythm_score < _MISMATCH_RHYTHM_ALONE
    if not too_short and (
        off_beat or (pitch_accuracy < _MISMATCH_ACCURACY and rhythm_score < _MISMATCH_RHYTHM)
    ):
        warnings.append(
            ResultWarning(
                code="melody_mismatch",
                message=f"Only {pitch_accuracy:.0%} of the melody was in tune and the notes "
                "did not follow the reference's timing; this may be a different song.",
            )
        )
        cap = min(cap, _CAP_MISMATCH)
    elif not too_short and mismatch_evidence >= max_mismatch_evidence:
        warnings.append(
            ResultWarning(
                code="melody_mismatch",
                message="The take fits the reference's melody hardly better than the same "
                f"notes in another order (cost ratio {mismatch_evidence:.2f}, bound "
                f"{max_mismatch_evidence:.2f}): this may be a different song, or the melody "
                "was largely missed.",
            )
        )
        cap = min(cap, _CAP_MISMATCH)
    return cap, warnings
