"""Lyrics judged by word error rate (jiwer) after a language-tolerant normalisation."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from enum import StrEnum

import jiwer

_APOSTROPHES = str.maketrans(
    {
        "’": "'",
        "‘": "'",
        "‛": "'",  # U+201B
        "′": "'",  # U+2032 prime, typed for an apostrophe by some keyboards
        "ʼ": "'",
        "ʻ": "'",  # U+02BB
        "`": "'",
        "´": "'",
        "＇": "'",
    }
)
# NFKD does not decompose these ligatures ("cœur" stays "cœur"), so they are spelled out.
_LIGATURES = str.maketrans({"œ": "oe", "Œ": "OE", "æ": "ae", "Æ": "AE"})
_NOT_WORD = re.compile(r"[^\w\s']+")
_DASHES = re.compile(r"[-‐‑‒–—―_]+")


def normalise_words(text: str, language: str | None = None) -> list[str]:
    """Words for comparison: lowercase, accents stripped, apostrophes unified, no punctuation.

    "Où est-ce qu’il   chante ?" -> ["ou", "est", "ce", "qu'il", "chante"]. Accents are
    stripped because ASR and typed lyrics disagree on them far more often than singers
    mispronounce them; hyphens split words because "peut-être" and "peut être" are one
    pronunciation. In French an elision is its own word ("qu'il" -> "qu", "il"), since
    transcripts and typed lyrics split it inconsistently; in English "don't" stays whole.
    """
    text = unicodedata.normalize("NFKD", text.translate(_APOSTROPHES).translate(_LIGATURES))
    text = "".join(ch for ch in text if not unicodedata.combining(ch)).lower()
    text = _NOT_WORD.sub(" ", _DASHES.sub(" ", text))
    if language is not None and language.lower().startswith("fr"):
        text = text.replace("'", " ")
    return [w.strip("'") for w in text.split() if w.strip("'")]


class WordStatus(StrEnum):
    SUNG = "sung"
    MISSED = "missed"
    WRONG = "wrong"


@dataclass(frozen=True)
class LyricsOutcome:
    """`status[k]` says what became of expected word `expected[k]`."""

    score: float
    wer: float
    expected: tuple[str, ...]
    status: tuple[WordStatus, ...]
    words_extra: int

    @property
    def words_missed(self) -> int:
        return sum(s is WordStatus.MISSED for s in self.status)

    @property
    def words_wrong(self) -> int:
        return sum(s is WordStatus.WRONG for s in self.status)


def judge_lyrics(expected: list[str], sung: list[str]) -> LyricsOutcome | None:
    """WER of the sung words against the expected ones; None when nothing is expected.

    Score is 100 * (1 - min(WER, 1)): a take that sings every word right scores 100, one
    that sings nothing (or as many wrong words as there are words) scores 0.
    """
    if not expected:
        return None
    status = [WordStatus.MISSED] * len(expected)
    extra = 0
    if sung:
        out = jiwer.process_words(" ".join(expected), " ".join(sung))
        for chunk in out.alignments[0]:
            if chunk.type == "insert":
                extra += chunk.hyp_end_idx - chunk.hyp_start_idx
                continue
            value = {
                "equal": WordStatus.SUNG,
                "substitute": WordStatus.WRONG,
                "delete": WordStatus.MISSED,
            }[chunk.type]
            for k in range(chunk.ref_start_idx, chunk.ref_end_idx):
                status[k] = value
    errors = sum(s is not WordStatus.SUNG for s in status) + extra
    wer = errors / len(expected)
    return LyricsOutcome(
        score=100.0 * (1.0 - min(wer, 1.0)),
        wer=wer,
        expected=tuple(expected),
        status=tuple(status),
        words_extra=extra,
    )


def map_words(source: list[str], target: list[str]) -> list[int]:
    """For each source word, the index of the target word it aligns with (equal or
    substituted), or -1; used to carry timestamps from a transcript onto typed lyrics."""
    mapping = [-1] * len(source)
    if not source or not target:
        return mapping
    out = jiwer.process_words(" ".join(source), " ".join(target))
    for chunk in out.alignments[0]:
        if chunk.type in ("equal", "substitute"):
            for offset in range(chunk.ref_end_idx - chunk.ref_start_idx):
                mapping[chunk.ref_start_idx + offset] = chunk.hyp_start_idx + offset
    return mapping
