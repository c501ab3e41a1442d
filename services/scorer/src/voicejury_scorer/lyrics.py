"""Lyrics judged by word error rate (jiwer) after a language-tolerant normalisation."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum

import jiwer
from num2words import num2words  # type: ignore[import-untyped]

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

# A number as written: digits with any separators between them, and the letters glued to
# its end ("21st", "2e"). Not inside a word ("mp3").
_NUMBER = re.compile(r"(?<!\w)(\d(?:[\d.,\u00a0\u202f ]*\d)?)([^\W\d_]*)(?!\w)")
# Languages writing "3.5" and "1,000"; the others write "3,5" and "1.000" / "1 000".
_DECIMAL_POINT = frozenset({"en", "ja", "zh", "ko", "he", "hi", "th"})
_ORDINAL_SUFFIXES = {
    "en": frozenset({"st", "nd", "rd", "th"}),
    "fr": frozenset({"e", "er", "re", "ere", "eme", "ème", "ère", "è"}),
}
_MAX_DIGITS = 15  # longer runs are not numbers anyone sings; left as they are


def _num2words(value: int | Decimal, language: str, to: str = "cardinal") -> str | None:
    """`num2words` in `language` ("fr-CA" tries fr_CA, then fr); None when it has no such
    language or fails on the value (its errors vary by language: one token must not fail
    the score)."""
    code = language.replace("-", "_")
    for lang in dict.fromkeys((code, code.split("_")[0])):
        try:
            return str(num2words(value, lang=lang, to=to))
        except NotImplementedError:
            continue
        except Exception:  # its errors vary by language (see the docstring)
            return None
    return None


def _spell_number(match: re.Match[str], language: str) -> str:
    """One written number in words, or the match unchanged when it cannot be read."""
    run, suffix = match.group(1), match.group(2)
    base = language.lower().replace("_", "-").split("-")[0]
    ordinal = suffix.lower() in _ORDINAL_SUFFIXES.get(base, frozenset())
    if suffix and not ordinal:
        return match.group(0)  # "80s", "3pm": how they are sung is not the number
    point, group = (".", ",") if base in _DECIMAL_POINT else (",", ".\u00a0\u202f ")
    grouped = re.fullmatch(rf"\d{{1,3}}(?:[{re.escape(group)}]\d{{3}})+", run)
    words: list[str | None]
    if run.isdigit() or grouped:
        digits = re.sub(r"\D", "", run)
        if len(digits) > _MAX_DIGITS:
            return match.group(0)
        if len(digits) > 1 and digits.startswith("0"):
            # "007" is read digit by digit.
            words = [_num2words(int(d), language) for d in digits]
        elif ordinal and base == "fr" and digits == "1" and suffix.lower() != "er":
            words = ["première"]  # "1re", "1ère": num2words knows only "premier"
        elif ordinal:
            words = [_num2words(int(digits), language, "ordinal")]
        elif base == "en" and not grouped and len(digits) == 4 and 1100 <= int(digits) < 2000:
            words = [_num2words(int(digits), language, "year")]  # "1984": nineteen eighty-four
        else:
            words = [_num2words(int(digits), language)]
    elif not ordinal and re.fullmatch(rf"\d+{re.escape(point)}\d+", run):
        if len(run) > _MAX_DIGITS:
            return match.group(0)
        words = [_num2words(Decimal(run.replace(point, ".")), language)]
    else:
        # Anything else ("1.2.3", "12,5" in English, a list "2, 3"): each number alone.
        parts = re.findall(r"\d+", run)
        if any(len(d) > _MAX_DIGITS for d in parts):
            return match.group(0)
        words = [_num2words(int(d), language) for d in parts]
    if any(w is None for w in words):
        return match.group(0)
    return " " + " ".join(w for w in words if w) + " "


def spell_numbers(text: str, language: str | None) -> str:
    """Numbers written in digits spelled out in `language`'s words: "99" -> "ninety-nine"
    (en), "22" -> "vingt-deux", "1 000" -> "mille" (fr); thousands separators and the
    decimal mark as that language writes them, ordinals ("21st", "2e") and English years
    of 1100-1999 ("1984" -> "nineteen eighty-four") as they are read. Unchanged without a
    language or in one num2words does not know."""
    if language is None or not any(ch.isdigit() for ch in text):
        return text
    return _NUMBER.sub(lambda m: _spell_number(m, language), text)


def normalise_words(text: str, language: str | None = None) -> list[str]:
    """Words for comparison: lowercase, accents stripped, apostrophes unified, no punctuation,
    numbers in words.

    "Où est-ce qu’il   chante ?" -> ["ou", "est", "ce", "qu'il", "chante"]. Accents are
    stripped because ASR and typed lyrics disagree on them far more often than singers
    mispronounce them; hyphens split words because "peut-être" and "peut être" are one
    pronunciation. In French an elision is its own word ("qu'il" -> "qu", "il"), since
    transcripts and typed lyrics split it inconsistently; in English "don't" stays whole.
    Numbers are spelled out in the language (`spell_numbers`: ASR writes "99" where the
    lyrics say "ninety-nine", and the other way round), then split like any hyphenated
    word: "22" and "vingt-deux" both give ["vingt", "deux"].
    """
    text = spell_numbers(text.translate(_APOSTROPHES).translate(_LIGATURES), language)
    text = unicodedata.normalize("NFKD", text)
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
