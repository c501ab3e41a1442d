"""Expression of the take, beyond right notes at the right time: vibrato, how steadily long
notes are held, and scoops into notes. Reported for the jury to cite; not part of the score.

Works on the performance contour with the latency removed (MIDI cents on a `hop_s` grid,
NaN = unvoiced); the times reported are placed on the reference's timeline through the
alignment (`reference_frames`), since the jury cites them against the song's lines. Notes
come from the same onset detector as rhythm.
"""

from __future__ import annotations

import numpy as np

from voicejury_contracts.result import Expression, HeldNote

from .align import FloatArray, fill_short_gaps
from .rhythm import detect_onsets

VIBRATO_BAND_HZ = (4.0, 8.5)  # sung vibrato lies near 5-7 Hz; slower is a wobble
MIN_VIBRATO_CENTS = 15.0  # smaller periodic movement is not heard as vibrato
MIN_VIBRATO_SHARE = 0.5  # of the note's movement that must be periodic in the band
LONG_NOTE_S = 0.6  # three vibrato cycles at 5 Hz, after trimming the ends
EDGE_S = 0.1  # attack and release, trimmed before looking at a held note
SCOOP_WINDOW_S = 0.15  # the start of a note where a scoop shows
SCOOP_CENTS = 80.0  # how far below the note's pitch a scooped start begins
MIN_SCOOP_NOTE_S = 0.3  # a note must be held this long for its start to be judged
MAX_LISTED = 12  # notes and scoops listed individually (the counts cover all of them)


def _note_spans(cents: FloatArray, bridged: FloatArray, hop_s: float) -> list[tuple[int, int]]:
    """[start, end) frames of each note: from one onset to the next onset or the end of
    its voiced run (in `bridged`, short dropouts filled), whichever comes first."""
    voiced = np.isfinite(bridged)
    onsets = detect_onsets(cents, hop_s=hop_s)
    spans: list[tuple[int, int]] = []
    for k, start in enumerate(onsets):
        limit = int(onsets[k + 1]) if k + 1 < onsets.size else cents.size
        stop = np.flatnonzero(~voiced[start:limit])
        end = int(start + stop[0]) if stop.size else limit
        if end > start:
            spans.append((int(start), end))
    return spans


def held_note(
    segment: FloatArray, hop_s: float, start_s: float, end_s: float | None = None
) -> HeldNote:
    """Vibrato and steadiness of one held note (`segment`: its cents, ends trimmed, gaps
    filled). The slow trend is a quadratic fit (it keeps a slow drift out of the vibrato);
    vibrato is the strongest periodic movement in 4-8.5 Hz of what remains, present when it
    is at least `MIN_VIBRATO_CENTS` deep and most of the remaining movement. `start_s`,
    `end_s`: where the note lies on the reference's timeline (`end_s` defaults to the
    segment's own length after `start_s`)."""
    n = segment.size
    t = np.arange(n) * hop_s
    trend = np.polyval(np.polyfit(t, segment, 2), t)
    residual = segment - trend
    size = max(4096, int(2 ** np.ceil(np.log2(n))))
    spectrum = np.fft.rfft(residual * np.hanning(n), size)
    freqs = np.fft.rfftfreq(size, hop_s)
    power = np.abs(spectrum) ** 2
    band = (freqs >= VIBRATO_BAND_HZ[0]) & (freqs <= VIBRATO_BAND_HZ[1])
    # What the band holds, back in the time domain (unwindowed), to measure depth.
    full = np.fft.rfft(residual, size)
    periodic = np.fft.irfft(np.where(band, full, 0.0), size)[:n]
    extent = float(np.sqrt(2.0) * np.sqrt(np.mean(periodic**2)))
    share = float(power[band].sum() / max(power[freqs > 0.5].sum(), 1e-12))
    rate: float | None = None
    depth: float | None = None
    wobble = residual
    if extent >= MIN_VIBRATO_CENTS and share >= MIN_VIBRATO_SHARE:
        k = int(np.flatnonzero(band)[np.argmax(power[band])])
        # Parabolic interpolation between spectrum bins, only at a true local maximum: the
        # band's strongest bin can sit on the flank of a peak just outside the band (two
        # vibrato-like components), where the parabola opens upwards and the "peak" lands
        # anywhere, even at a negative frequency.
        shift = 0.0
        if 0 < k < power.size - 1 and power[k] >= power[k - 1] and power[k] >= power[k + 1]:
            a, b, c = np.log(power[k - 1 : k + 2] + 1e-12)
            curvature = a - 2 * b + c
            if curvature < 0:
                shift = float(np.clip(0.5 * (a - c) / curvature, -0.5, 0.5))
        rate_hz = float(np.clip((k + shift) * freqs[1], *VIBRATO_BAND_HZ))
        rate = round(rate_hz, 2)
        depth = round(extent, 1)
        wobble = residual - periodic
    return HeldNote(
        start_s=round(start_s, 2),
        end_s=round(start_s + n * hop_s if end_s is None else end_s, 2),
        vibrato_rate_hz=rate,
        vibrato_extent_cents=depth,
        steadiness_cents=round(float(np.sqrt(np.mean(wobble**2))), 1),
        drift_cents=round(float(trend[-1] - trend[0]), 1),
    )


def _is_scoop(approach: FloatArray, settled: FloatArray, window: int) -> bool:
    """The note starts well below where it settles and rises into it. `approach`: from the
    first frame of the note's attack (which the onset detector may have split off as a
    short note of its own) to `window` frames into the note; `settled`: what follows."""
    head = approach[: max(1, window // 3)]
    if settled.size < window // 2 or not np.isfinite(head).any() or not np.isfinite(settled).any():
        return False
    target = float(np.nanmedian(settled))
    start = float(np.nanmedian(head))
    return target - start >= SCOOP_CENTS and bool(np.nanmax(approach) > start)


def expression_features(
    cents: FloatArray, *, hop_s: float, reference_frames: FloatArray | None = None
) -> Expression:
    """Held notes (at least `LONG_NOTE_S` once the ends are trimmed) with their vibrato,
    steadiness and drift, and the notes entered with a scoop; medians over all held notes,
    the longest ones (as sung) listed for the jury to cite.

    `reference_frames[j]`: the reference frame (fractional) that performance frame `j` is
    aligned to (`performance_to_reference_frames`); the times reported are there. None:
    the take's own frames (a take sung at the reference's tempo)."""

    def at_s(frame: int) -> float:
        if reference_frames is None or reference_frames.size == 0:
            return frame * hop_s
        last = reference_frames.size - 1
        if frame <= last:
            return float(reference_frames[max(frame, 0)]) * hop_s
        # A note's end is one past its last frame.
        return (float(reference_frames[last]) + frame - last) * hop_s

    edge = round(EDGE_S / hop_s)
    long_frames = round(LONG_NOTE_S / hop_s)
    filled = fill_short_gaps(cents, max(0, round(0.03 / hop_s)))
    held: list[tuple[int, HeldNote]] = []  # (frames sung, the note)
    scoop_starts: list[float] = []
    judged = 0
    window = max(2, round(SCOOP_WINDOW_S / hop_s))
    spans = _note_spans(cents, filled, hop_s)
    for k, (start, end) in enumerate(spans):
        note = filled[start:end]
        if note.size * hop_s < MIN_SCOOP_NOTE_S:
            continue
        judged += 1
        attack = start
        if k > 0 and spans[k - 1][1] == start and start - spans[k - 1][0] <= window:
            attack = spans[k - 1][0]  # a short glide into this note, split off by the onsets
        approach = filled[attack : start + window]
        if _is_scoop(approach, filled[start + window : min(end, start + 3 * window)], window):
            scoop_starts.append(round(at_s(attack), 2))
        inner = note[edge : note.size - edge]
        if inner.size >= long_frames and np.isfinite(inner).all():
            first = start + edge
            held.append(
                (inner.size, held_note(inner, hop_s, at_s(first), at_s(first + inner.size)))
            )
    notes = [n for _, n in held]
    vibrato = [n for n in notes if n.vibrato_rate_hz is not None]
    # Longest as sung: the alignment can stretch or squeeze a note's span on the song.
    longest = [n for _, n in sorted(held, key=lambda sized: -sized[0])[:MAX_LISTED]]
    return Expression(
        notes=judged,
        held_notes=len(notes),
        vibrato_notes=len(vibrato),
        vibrato_rate_hz=_median([n.vibrato_rate_hz for n in vibrato], 2),
        vibrato_extent_cents=_median([n.vibrato_extent_cents for n in vibrato], 1),
        steadiness_cents=_median([n.steadiness_cents for n in notes], 1),
        scoops=len(scoop_starts),
        scoop_starts_s=tuple(scoop_starts[:MAX_LISTED]),
        longest_notes=tuple(sorted(longest, key=lambda n: n.start_s)),
    )


def _median(values: list[float | None], digits: int) -> float | None:
    present = [v for v in values if v is not None]
    return round(float(np.median(present)), digits) if present else None
