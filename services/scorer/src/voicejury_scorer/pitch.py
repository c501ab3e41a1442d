"""Key estimation and pitch judgement on aligned contours (MIDI cents, NaN = unvoiced)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .align import Alignment, BoolArray, DtwCosts, FloatArray, IntArray, banded_dtw, fold_cents

_PITCH_CLASS_BIN_CENTS = 10.0
_PITCH_CLASS_BINS = int(1200 / _PITCH_CLASS_BIN_CENTS)


def credit(abs_error: FloatArray, full: float, zero: float) -> FloatArray:
    """Continuous credit: 1 up to `full`, falling linearly to 0 at `zero` (same units)."""
    span = max(zero - full, 1e-9)
    return np.clip((zero - abs_error) / span, 0.0, 1.0)


def pitch_class_histogram(cents: FloatArray) -> FloatArray:
    """Occurrences of each 10-cent pitch class (cents mod 1200) among voiced values."""
    voiced = cents[np.isfinite(cents)]
    hist = np.bincount(
        (np.mod(voiced, 1200.0) / _PITCH_CLASS_BIN_CENTS).astype(np.int64) % _PITCH_CLASS_BINS,
        minlength=_PITCH_CLASS_BINS,
    ).astype(np.float64)
    # Circular Gaussian blur (sigma 20 cents) so that a slightly detuned singer still lines up.
    offsets = np.arange(-6, 7)
    kernel = np.exp(-0.5 * (offsets * _PITCH_CLASS_BIN_CENTS / 20.0) ** 2)
    return sum(
        (w * np.roll(hist, int(o)) for o, w in zip(offsets, kernel, strict=True)),
        np.zeros(_PITCH_CLASS_BINS),
    )


def key_candidates(ref: FloatArray, perf: FloatArray, count: int = 3) -> list[float]:
    """Plausible transpositions (cents in [-600, 600)) from the pitch-class histograms.

    The histograms ignore time, so they are immune to latency and tempo; the best peaks of
    their circular cross-correlation are the keys worth trying. Tonal melodies often give a
    second peak a fourth or fifth away, hence several candidates, settled by alignment cost.
    """
    hr, hp = pitch_class_histogram(ref), pitch_class_histogram(perf)
    if not hr.any() or not hp.any():
        return [0.0]
    corr = np.real(np.fft.ifft(np.conj(np.fft.fft(hr)) * np.fft.fft(hp)))
    peaks = [
        s
        for s in range(_PITCH_CLASS_BINS)
        if corr[s] >= corr[s - 1] and corr[s] >= corr[(s + 1) % _PITCH_CLASS_BINS]
    ]
    peaks.sort(key=lambda s: -corr[s])
    out: list[float] = []
    for s in peaks[:count]:
        out.append(float(fold_cents(np.array([s * _PITCH_CLASS_BIN_CENTS]))[0]))
    return out or [0.0]


def _decimate(cents: FloatArray, factor: int) -> FloatArray:
    """Every `factor`-th frame: the coarse grid only has to rank key candidates."""
    return cents[::factor].copy()


def estimate_key(
    ref: FloatArray,
    perf: FloatArray,
    *,
    band: int,
    costs: DtwCosts,
    extra_candidates: list[float],
    centre: IntArray | None = None,
) -> tuple[float, float]:
    """The transposition (cents in [-600, 600)) under which the two melodies align best,
    and the cost of that coarse alignment.

    Each candidate is scored by the cost of a coarse (40 ms) banded DTW around `centre`
    (see `banded_dtw`); the winner is then refined (by the caller) to the median of the
    aligned differences.
    """
    candidates = key_candidates(ref, perf) + extra_candidates
    factor = 4
    r_coarse, p_coarse = _decimate(ref, factor), _decimate(perf, factor)
    coarse_centre = None if centre is None else centre[::factor] // factor
    best_key, best_cost = candidates[0], np.inf
    for key in candidates:
        alignment = banded_dtw(
            r_coarse,
            p_coarse - key,
            band=max(band // factor, 1),
            costs=costs,
            centre=coarse_centre,
        )
        if alignment.cost < best_cost:
            best_key, best_cost = key, alignment.cost
    return best_key, float(best_cost) * factor


def refine_key(ref: FloatArray, perf: FloatArray, alignment: Alignment, key: float) -> float:
    """Median of aligned, octave-folded differences around `key`, ignoring gross errors."""
    r = ref[alignment.path_ref]
    p = perf[alignment.path_perf]
    both = np.isfinite(r) & np.isfinite(p)
    if not both.any():
        return key
    diff = fold_cents(p[both] - r[both] - key)
    near = np.abs(diff) <= 300.0
    if near.sum() < 10:
        return key
    return float(fold_cents(np.array([key + float(np.median(diff[near]))]))[0])


@dataclass(frozen=True)
class FrameJudgement:
    """Per reference frame (grid of the reference), after alignment.

    `error_cents`: signed octave-folded error of the aligned performance (NaN where either
    side is unvoiced or the take had already ended); `credit`: 0..1, 0 where the reference
    is voiced but nothing usable was sung; `octave`: octave index of the raw interval
    relative to the dominant one (0 = same register as most of the song).
    """

    ref_voiced: BoolArray
    error_cents: FloatArray
    credit: FloatArray
    octave: IntArray


@dataclass(frozen=True)
class PitchOutcome:
    score: float
    accuracy: float
    mean_abs_error_cents: float
    key_offset_cents: float
    register_offset_octaves: int
    octave_errors_folded: int
    octave_switches: int
    voiced_frames: int
    frames: FrameJudgement


def judge_pitch(
    ref: FloatArray,
    perf: FloatArray,
    alignment: Alignment,
    *,
    key_cents: float,
    count_key: bool,
    full_credit_cents: float,
    zero_credit_cents: float,
    min_switch_frames: int,
) -> PitchOutcome:
    """Continuous pitch credit per voiced reference frame, averaged over its aligned pairs.

    A reference frame aligned to several performance frames (the singer was slower there)
    gets the mean credit of those pairs, so dwelling on the right note does not earn
    extra weight. Errors are folded to the nearest octave (karaoke convention); frames
    whose raw interval differs from the song's dominant register by an octave are counted
    as folded octave errors. With `count_key` the transposition is not forgiven.
    """
    n = ref.size
    ref_voiced = np.isfinite(ref)
    n_voiced = int(ref_voiced.sum())
    error = np.full(n, np.nan)
    frame_credit = np.zeros(n)
    octave: IntArray = np.zeros(n, dtype=np.int64)
    if alignment.path_ref.size == 0 or n_voiced == 0:
        frames = FrameJudgement(ref_voiced, error, frame_credit, octave)
        return PitchOutcome(0.0, 0.0, 0.0, key_cents, 0, 0, 0, n_voiced, frames)

    pi, pj = alignment.path_ref, alignment.path_perf
    r, p = ref[pi], perf[pj]
    both = np.isfinite(r) & np.isfinite(p)
    raw = np.where(both, p - r - key_cents, np.nan)
    octave_idx = np.where(both, np.round(np.nan_to_num(raw) / 1200.0), 0).astype(np.int64)
    # Only a pair sung close to a whole number of octaves off says which octave the singer
    # is in: a fifth off rounds to an octave index as readily as an octave off does, but
    # it is a wrong note, not a register.
    near_octave = both & (np.abs(fold_cents(np.nan_to_num(raw))) <= zero_credit_cents)
    in_register = near_octave if near_octave.any() else both
    if in_register.any():
        values, counts = np.unique(octave_idx[in_register], return_counts=True)
        register = int(values[np.argmax(counts)])
    else:
        register = 0
    judged = raw + (key_cents if count_key else 0.0)
    pair_error = np.where(both, fold_cents(np.nan_to_num(judged)), np.nan)
    pair_credit = np.where(
        both, credit(np.abs(np.nan_to_num(pair_error)), full_credit_cents, zero_credit_cents), 0.0
    )

    pairs_per_frame = np.bincount(pi, minlength=n).astype(np.float64)
    credit_sum = np.bincount(pi, weights=pair_credit, minlength=n)
    covered = pairs_per_frame > 0
    frame_credit[covered] = credit_sum[covered] / pairs_per_frame[covered]
    frame_credit[~ref_voiced] = 0.0
    voiced_pairs = np.bincount(pi[both], minlength=n).astype(np.float64)
    err_sum = np.bincount(pi[both], weights=pair_error[both], minlength=n)
    has_err = voiced_pairs > 0
    error[has_err] = err_sum[has_err] / voiced_pairs[has_err]
    # The octave of a frame: its middle pair's octave index relative to the register.
    bounds = np.searchsorted(pi, np.arange(n), "left") + np.searchsorted(pi, np.arange(n), "right")
    mid = np.clip((bounds - 1) // 2, 0, pi.size - 1)
    octave = np.where(has_err, octave_idx[mid] - register, 0).astype(np.int64)

    judged_frames = has_err & ref_voiced
    abs_err = np.abs(error[judged_frames])
    octave_errors = int(np.sum(judged_frames & (octave != 0) & near_octave[mid]))
    switches = _count_switches(octave_idx[near_octave], min_switch_frames)

    return PitchOutcome(
        score=float(100.0 * frame_credit[ref_voiced].mean()),
        accuracy=float(np.sum(abs_err <= full_credit_cents) / n_voiced),
        mean_abs_error_cents=float(abs_err.mean()) if abs_err.size else 0.0,
        key_offset_cents=key_cents,
        register_offset_octaves=register,
        octave_errors_folded=octave_errors,
        octave_switches=switches,
        voiced_frames=n_voiced,
        frames=FrameJudgement(ref_voiced, error, frame_credit, octave),
    )


def _count_switches(octave_seq: IntArray, min_run: int) -> int:
    """Changes of register between runs lasting at least `min_run` frames.

    Shorter runs are tracker glitches or grace notes, not a singer changing octave.
    """
    if octave_seq.size == 0:
        return 0
    change = np.flatnonzero(np.diff(octave_seq)) + 1
    starts = np.r_[0, change]
    lengths = np.diff(np.r_[starts, octave_seq.size])
    stable = octave_seq[starts][lengths >= min_run]
    if stable.size < 2:
        return 0
    return int(np.count_nonzero(np.diff(stable)))
