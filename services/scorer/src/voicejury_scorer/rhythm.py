"""Note onsets from pitch contours, and timing judged along the alignment."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from numba import njit
from scipy import stats

from .align import FloatArray, IntArray, fill_short_gaps
from .pitch import credit

# Matched onsets the tempo line is fitted through, at most (a 3-minute song has a few
# hundred notes; beyond that the median slope does not move).
_MAX_SLOPE_POINTS = 500


def _onset_kernel(cents: FloatArray, jump: float, hold: int, min_voiced: int) -> IntArray:
    """Frames where a note starts: a voicing start, or a held pitch jump inside a voiced run.

    A jump counts when the pitch (median-smoothed over 5 frames) leaves the current note by
    more than `jump` cents and stays together (within `jump`) for `hold` frames; vibrato
    swings around the note and never holds off it, a new note does.
    """
    n = cents.shape[0]
    out = np.empty(n, dtype=np.int64)
    count = 0
    i = 0
    window = np.empty(5)
    while i < n:
        if np.isnan(cents[i]):
            i += 1
            continue
        start = i
        while i < n and not np.isnan(cents[i]):
            i += 1
        end = i
        if end - start < min_voiced:
            continue
        out[count] = start
        count += 1
        length = end - start
        smooth = np.empty(length)
        for t in range(length):
            lo = max(0, t - 2)
            hi = min(length, t + 3)
            w = 0
            for u in range(lo, hi):
                window[w] = cents[start + u]
                w += 1
            smooth[t] = np.median(window[:w])
        note = np.median(smooth[: min(hold, length)])
        cand = -1
        lo_c = 0.0
        hi_c = 0.0
        for t in range(hold, length):
            v = smooth[t]
            if abs(v - note) > jump:
                if cand >= 0:
                    lo_c = min(lo_c, v)
                    hi_c = max(hi_c, v)
                if cand < 0 or hi_c - lo_c > jump:
                    # Not (yet) a held pitch: the new note, if any, starts here.
                    cand = t
                    lo_c = v
                    hi_c = v
                if t - cand + 1 >= hold:
                    out[count] = start + cand
                    count += 1
                    note = np.median(smooth[cand : t + 1])
                    cand = -1
            else:
                cand = -1
    return out[:count].copy()


_onset_compiled = cast(Callable[..., Any], njit(cache=True)(_onset_kernel))


def detect_onsets(
    cents: FloatArray, *, hop_s: float, jump_cents: float = 80.0, hold_s: float = 0.05
) -> IntArray:
    """Onset frames of a contour on a `hop_s` grid (MIDI cents, NaN = unvoiced).

    Dropouts up to 30 ms are bridged first (a consonant is not a rest); voiced runs shorter
    than `hold_s` are ignored as tracker noise.
    """
    if cents.size == 0:
        return np.zeros(0, dtype=np.int64)
    hold = max(1, round(hold_s / hop_s))
    bridged = fill_short_gaps(cents, max(0, round(0.03 / hop_s)))
    return np.asarray(
        _onset_compiled(
            np.ascontiguousarray(bridged, dtype=np.float64), float(jump_cents), hold, hold
        ),
        dtype=np.int64,
    )


@dataclass(frozen=True)
class OnsetMatch:
    """Reference onset frame, its matched performance onset frame (both on the reference
    timeline, latency removed) and the signed timing error in ms (<0 early)."""

    ref_frame: int
    perf_frame: int
    error_ms: float


@dataclass(frozen=True)
class RhythmOutcome:
    score: float
    onset_precision: float
    onset_recall: float
    mean_abs_timing_ms: float
    tempo_ratio: float
    matches: tuple[OnsetMatch, ...]


def judge_rhythm(
    ref_onsets: IntArray,
    perf_onsets: IntArray,
    ref_to_perf: IntArray,
    *,
    hop_s: float,
    match_window_ms: float,
    full_credit_ms: float,
    zero_credit_ms: float,
    tempo_ratio: float,
    perf_end_frame: int,
    follow_tempo: bool,
    timing_ref_to_perf: IntArray | None = None,
) -> RhythmOutcome:
    """Match onsets through the alignment, then credit how close in time each one was.

    A reference onset is looked for near where the alignment says the singer was at that
    moment (±`match_window_ms`): this decides *whether* the note was sung as a note. With
    `timing_ref_to_perf` (the interval-driven pitch path) it is also looked for near where
    that path says: the note path `ref_to_perf` pairs notes by pitch and slides off the
    timing over a detuned stretch (borrowing notes at the detuned pitch), where the
    interval-driven path stays on time. Its
    timing error is then the plain time difference on the latency-corrected timeline,
    credited from 1 (within `full_credit_ms`) to 0 (at `zero_credit_ms`): this decides
    *how well* it was timed. The score is the F-measure of those soft credits, so missed
    notes (recall) and spurious ones (precision) both cost, and constant latency costs
    nothing because it was removed before.
    Performance onsets after `perf_end_frame` (beyond the aligned part) are not counted.
    """
    perf_onsets = perf_onsets[perf_onsets <= perf_end_frame]
    n_ref, n_perf = ref_onsets.size, perf_onsets.size
    if n_ref == 0 or n_perf == 0:
        return RhythmOutcome(0.0, 0.0, 0.0, 0.0, tempo_ratio, ())
    window = match_window_ms / 1000.0 / hop_s
    candidates: list[tuple[float, int, int]] = []
    maps = [ref_to_perf] if timing_ref_to_perf is None else [ref_to_perf, timing_ref_to_perf]
    for a, r in enumerate(ref_onsets):
        for mapping in maps:
            expected = mapping[r] if r < mapping.size else -1
            if expected < 0:
                continue
            lo = np.searchsorted(perf_onsets, expected - window, side="left")
            hi = np.searchsorted(perf_onsets, expected + window, side="right")
            for b in range(int(lo), int(hi)):
                candidates.append((abs(float(perf_onsets[b] - expected)), a, b))
    candidates.sort()
    used_ref: set[int] = set()
    used_perf: set[int] = set()
    matches: list[OnsetMatch] = []
    for _, a, b in candidates:
        if a in used_ref or b in used_perf:
            continue
        used_ref.add(a)
        used_perf.add(b)
        r, p = int(ref_onsets[a]), int(perf_onsets[b])
        matches.append(OnsetMatch(r, p, (p - r) * hop_s * 1000.0))
    matches.sort(key=lambda m: m.ref_frame)
    if not matches:
        return RhythmOutcome(0.0, 0.0, 0.0, 0.0, tempo_ratio, ())
    errors = np.array([abs(m.error_ms) for m in matches])
    judged: FloatArray = errors
    if follow_tempo and len(matches) >= 3:
        ref_at = np.array([m.ref_frame for m in matches], dtype=np.float64)
        perf_at = np.array([m.perf_frame for m in matches], dtype=np.float64)
        # Theil-Sen looks at every pair (O(m²) time and memory); evenly spread matches
        # give the same median slope on a long song at a bounded cost.
        sample = np.unique(np.linspace(0, len(matches) - 1, _MAX_SLOPE_POINTS).round())
        pick = sample.astype(np.int64)
        slope = float(stats.theilslopes(perf_at[pick], ref_at[pick])[0])
        # Intercept as the median residual: scipy's median(p) - slope * median(r) can miss
        # the bulk of the pairs by a whole note when a few timings are far off.
        residual = perf_at - slope * ref_at
        judged = np.abs(residual - np.median(residual)) * hop_s * 1000.0
    total_credit = float(credit(judged, full_credit_ms, zero_credit_ms).sum())
    soft_recall, soft_precision = total_credit / n_ref, total_credit / n_perf
    f_measure = (
        2 * soft_recall * soft_precision / (soft_recall + soft_precision) if total_credit else 0.0
    )
    return RhythmOutcome(
        score=100.0 * f_measure,
        onset_precision=len(matches) / n_perf,
        onset_recall=len(matches) / n_ref,
        mean_abs_timing_ms=float(errors.mean()),
        tempo_ratio=tempo_ratio,
        matches=tuple(matches),
    )
