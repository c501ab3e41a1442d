"""Cutting the song into lines a singer recognises, and the evidence for each one."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from voicejury_contracts.result import LineFeedback

from .align import FloatArray, IntArray
from .lyrics import LyricsOutcome, WordStatus, map_words
from .pitch import FrameJudgement


class TimedWord(Protocol):
    @property
    def text(self) -> str: ...
    @property
    def start_s(self) -> float: ...
    @property
    def end_s(self) -> float: ...


@dataclass(frozen=True)
class LineSpec:
    """A line as reference grid frames [start_frame, end_frame), with its text (if known)
    and the indices of its words in the expected-word list of the lyrics judgement."""

    start_frame: int
    end_frame: int
    text: str | None
    word_indices: tuple[int, ...] = ()


def phrase_spans(ref: FloatArray, *, hop_s: float, min_pause_s: float) -> list[tuple[int, int]]:
    """Voiced stretches of the reference separated by pauses of at least `min_pause_s`.

    Without lyrics timing, a breath long enough to hear is where a singer thinks a line
    ends. Stretches shorter than 150 ms are tracker noise, not phrases.
    """
    voiced = np.flatnonzero(np.isfinite(ref))
    if voiced.size == 0:
        return []
    pause = max(1, round(min_pause_s / hop_s))
    breaks = np.flatnonzero(np.diff(voiced) > pause)
    starts = np.r_[voiced[0], voiced[breaks + 1]]
    ends = np.r_[voiced[breaks] + 1, voiced[-1] + 1]
    min_len = max(1, round(0.15 / hop_s))
    return [(int(a), int(b)) for a, b in zip(starts, ends, strict=True) if b - a >= min_len]


def lyric_line_specs(
    line_texts: Sequence[str],
    line_words: Sequence[Sequence[int]],
    lyric_tokens: list[str],
    ref_tokens: list[str],
    ref_token_times: list[tuple[float, float]],
    *,
    hop_s: float,
) -> list[LineSpec] | None:
    """Lyric lines placed on the reference timeline through the reference transcript.

    Each typed lyric word is aligned to a transcribed reference word (jiwer alignment) and
    takes its timestamps; a line spans its timed words. A line none of whose words could be
    placed sits in the gap between its neighbours. None when no word could be placed.
    """
    mapping = map_words(lyric_tokens, ref_tokens)
    spans: list[tuple[float, float] | None] = []
    for words in line_words:
        times = [ref_token_times[mapping[w]] for w in words if mapping[w] >= 0]
        spans.append((min(t[0] for t in times), max(t[1] for t in times)) if times else None)
    if all(s is None for s in spans):
        return None
    filled: list[tuple[float, float]] = []
    for k, span in enumerate(spans):
        if span is not None:
            filled.append(span)
            continue
        before = filled[-1][1] if filled else 0.0
        after = next((s[0] for s in spans[k + 1 :] if s is not None), before)
        filled.append((before, max(before, after)))
    specs = []
    for text, words, (a, b) in zip(line_texts, line_words, filled, strict=True):
        start = round(a / hop_s)
        specs.append(LineSpec(start, max(start + 1, round(b / hop_s)), text, tuple(words)))
    return specs


def assign_words_to_spans(
    spans: list[tuple[int, int]], word_times: list[tuple[float, float]], *, hop_s: float
) -> list[list[int]]:
    """Each timed word goes to the span nearest its midpoint (words often start in the
    breath before a phrase is voiced)."""
    out: list[list[int]] = [[] for _ in spans]
    if not spans or not word_times:
        return out
    starts = np.array([a * hop_s for a, _ in spans])
    ends = np.array([b * hop_s for _, b in spans])
    centres = (starts + ends) / 2
    mids = np.array([(a + b) / 2 for a, b in word_times], dtype=np.float64)
    # Spans are sorted and disjoint: the one a midpoint falls in is the last starting at
    # or before it; otherwise the nearer of the two spans whose centres bracket it.
    inside = np.searchsorted(starts, mids, side="right") - 1
    hit = (inside >= 0) & (mids < ends[np.clip(inside, 0, None)])
    right = np.clip(np.searchsorted(centres, mids), 0, len(spans) - 1)
    left = np.clip(right - 1, 0, len(spans) - 1)
    nearest = np.where(np.abs(centres[left] - mids) <= np.abs(centres[right] - mids), left, right)
    for k, target in enumerate(np.where(hit, inside, nearest)):
        out[int(target)].append(k)
    return out


def line_feedback(
    index: int,
    spec: LineSpec,
    *,
    frames: FrameJudgement,
    ref_to_perf: IntArray,
    perf_cents: FloatArray,
    tolerance_cents: float,
    hop_s: float,
    lyrics: LyricsOutcome | None,
) -> LineFeedback:
    """Evidence for one line, on the reference timeline.

    `pitch_accuracy`: share of the line's voiced reference frames sung within tolerance;
    `mean_signed_cents`: mean folded error where both sang (<0 flat, >0 sharp, key offset
    already removed when the key change is allowed); `timing_offset_ms`: median lag of the
    alignment over the line's sung frames (<0 early, >0 late), latency already removed.
    """
    a = max(0, min(spec.start_frame, frames.ref_voiced.size))
    b = max(a, min(spec.end_frame, frames.ref_voiced.size))
    voiced = frames.ref_voiced[a:b]
    err = frames.error_cents[a:b]
    accuracy: float | None = None
    signed: float | None = None
    timing: float | None = None
    if voiced.any():
        within = np.abs(np.nan_to_num(err, nan=np.inf)) <= tolerance_cents
        accuracy = float(np.sum(within & voiced) / voiced.sum())
        judged = voiced & np.isfinite(err)
        if judged.any():
            signed = round(float(err[judged].mean()), 1)
        idx = np.arange(a, b)[voiced]
        mapped = ref_to_perf[idx]
        ok = mapped >= 0
        ok[ok] = np.isfinite(perf_cents[np.clip(mapped[ok], 0, perf_cents.size - 1)])
        if ok.any():
            timing = round(float(np.median(mapped[ok] - idx[ok])) * hop_s * 1000.0, 1)
    missed: list[str] = []
    wrong: list[str] = []
    if lyrics is not None:
        for w in spec.word_indices:
            if lyrics.status[w] is WordStatus.MISSED:
                missed.append(lyrics.expected[w])
            elif lyrics.status[w] is WordStatus.WRONG:
                wrong.append(lyrics.expected[w])
    return LineFeedback(
        index=index,
        start_s=round(spec.start_frame * hop_s, 3),
        end_s=round(spec.end_frame * hop_s, 3),
        text=spec.text,
        pitch_accuracy=None if accuracy is None else round(accuracy, 4),
        mean_signed_cents=signed,
        timing_offset_ms=timing,
        words_missed=tuple(missed),
        words_wrong=tuple(wrong),
    )
