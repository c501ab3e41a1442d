"""What a comment cites, and whether the evidence the model was shown holds it.

Issue 5 asks every judge to cite a concrete moment of the scorer's result. A model can
just as well write "at 2:47 you were 57 cents flat" about a two-minute song, so a comment
is read for its citations (times, cents, ms and Hz figures, quoted lyrics) and each one
is looked up in `evidence_data`, the very dict the prompt renders: what is accepted is
what the model was shown, no more (a line past `MAX_PROMPT_LINES` that is no highlight
was not shown). The deterministic fallback is held to the same check.

A comment passes when at least one citation is verified. Scores (`68/100`) and
percentages are not citations: every comment carries the overall score, so accepting
them would accept anything.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from .evidence import Evidence, clock, evidence_data

# A model that places the line shown at 1:12 "around 1:13", or converts it to "72.4 s",
# still points at that line. Kept to one second: lines are a few seconds apart, and a wider
# window would let most invented times in a dense song land on some line.
CLOCK_TOLERANCE_S = 1.0
# A quote of one common word ("love") proves nothing; two consecutive words of a line, or
# the whole of a one-word line, do.
MIN_QUOTE_WORDS = 2

# `1:12`, `01:12`, `1'12`; no spaces, so French typography (`ligne 3 : 12 cents`) is not a
# time. Not part of a longer run of digits, dots or colons (`1:12:30`), but a colon may end
# the sentence's clause (`1:12: goosebumps`).
_CLOCK_RE = re.compile(r"(?<![\d:.,])(\d{1,2})[:'′’](\d{2})(?!\d|:\d)")
# `1 min 12`, `1min12s`, `1 minute 12 seconds`.
_MIN_SEC_RE = re.compile(
    r"(?<![\d.,])(\d{1,2})\s?min(?:ute)?s?\s?(?:et\s)?(\d{1,2})(?:\s?(?:s|sec|secondes?|seconds?))?\b"
)
# A number with its unit: `41 cents`, `41-cent`, `140 ms`, `5.6 Hz`, `5,6 Hz`, `72 s`.
_FIGURE_RE = re.compile(
    r"(?<![\d.,])(\d+(?:[.,]\d+)?)\s?-?\s?"
    r"(cents?|ms|millisecondes?|milliseconds?|hz|s|secs?|secondes?|seconds?)\b"
)
_UNITS: Mapping[str, str] = MappingProxyType(
    {
        "cent": "cents",
        "cents": "cents",
        "ms": "ms",
        "milliseconde": "ms",
        "millisecondes": "ms",
        "millisecond": "ms",
        "milliseconds": "ms",
        "hz": "Hz",
        "s": "s",
        "sec": "s",
        "secs": "s",
        "seconde": "s",
        "secondes": "s",
        "second": "s",
        "seconds": "s",
    }
)
_QUOTE_RE = re.compile(r"«([^»]*)»|“([^”]*)”|\"([^\"]*)\"|‘([^’]*)’|„([^“”]*)[“”]")
_NON_WORD_RE = re.compile(r"[^\w]+")


@dataclass(frozen=True)
class CitableFacts:
    """What a model was shown that a comment may cite.

    `times_s`: every `m:ss` shown (lines, highlights, held notes, scoops), in whole seconds
    as rendered. `figures`: unit (`cents`, `ms`, `Hz`, `s`) to the absolute values shown
    with that unit. `lyrics`: each shown lyric line, folded (see `_fold`).
    """

    times_s: tuple[int, ...]
    figures: Mapping[str, tuple[float, ...]]
    lyrics: tuple[str, ...]


@dataclass(frozen=True)
class Citations:
    """A comment's citations, written back in our own notation (`1:12`, `41 cents`).

    Only our rendering of the parsed numbers appears here, never the model's text, so the
    invented ones can be named in the corrective retry.
    """

    verified: tuple[str, ...]
    invented: tuple[str, ...]


def _fold(text: str) -> str:
    """Case-, accent- and punctuation-free words, so `“Don't stop…”` matches `don t stop`."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    plain = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return " ".join(_NON_WORD_RE.sub(" ", plain).replace("_", " ").split())


def _leaves(node: object, key: str = "") -> Iterator[tuple[str, object]]:
    """`(key, value)` for every scalar of the evidence; list items take their list's key."""
    if isinstance(node, Mapping):
        for k, v in node.items():
            yield from _leaves(v, str(k))
    elif isinstance(node, list | tuple):
        for v in node:
            yield from _leaves(v, key)
    else:
        yield key, node


def _unit_of(key: str) -> str | None:
    if "cents" in key:
        return "cents"
    if key.endswith("_ms") or "_ms_" in key:
        return "ms"
    if key.endswith("_hz"):
        return "Hz"
    if key == "seconds":
        return "s"
    return None


def facts_from_data(data: Mapping[str, Any]) -> CitableFacts:
    """The citable facts of the evidence as rendered for the prompt (`evidence_data`)."""
    times: set[int] = set()
    figures: dict[str, set[float]] = {}
    lyrics: set[str] = set()
    for key, value in _leaves(data):
        if key in ("at", "scoops_at") and isinstance(value, str):
            shown = _CLOCK_RE.fullmatch(value)
            if shown:
                times.add(int(shown.group(1)) * 60 + int(shown.group(2)))
        elif key == "lyrics" and isinstance(value, str):
            folded = _fold(value)
            if folded:
                lyrics.add(folded)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            unit = _unit_of(key)
            if unit is not None:
                figures.setdefault(unit, set()).add(abs(float(value)))
    return CitableFacts(
        times_s=tuple(sorted(times)),
        figures=MappingProxyType({u: tuple(sorted(v)) for u, v in figures.items()}),
        lyrics=tuple(sorted(lyrics)),
    )


def citable_facts(ev: Evidence) -> CitableFacts:
    """What a comment on `ev` may cite: exactly what `evidence_json(ev)` shows a model."""
    return facts_from_data(evidence_data(ev))


def _number(text: str) -> tuple[float, int]:
    """`"5,6"` -> `(5.6, 1)`: the value and how many decimals were written."""
    normalised = text.replace(",", ".")
    decimals = len(normalised.split(".", 1)[1]) if "." in normalised else 0
    return float(normalised), decimals


def _same_figure(cited: float, decimals: int, shown: float) -> bool:
    # Equal to the precision the comment wrote: "41 cents" matches 41 and 41.3 but not 40,
    # "5.6 Hz" matches 5.61; rounding a shown value is fine, changing it is not.
    return abs(cited - shown) <= 0.5 * 10.0**-decimals + 1e-9


def _shown_time(seconds: float, facts: CitableFacts) -> bool:
    return any(abs(seconds - t) <= CLOCK_TOLERANCE_S for t in facts.times_s)


def _blank(text: str, match: re.Match[str]) -> str:
    start, end = match.span()
    return text[:start] + " " * (end - start) + text[end:]


def find_citations(text: str, facts: CitableFacts) -> Citations:
    """Every time, figure and lyric quote in `text`, split into verified and invented.

    Times are read as `m:ss` (also `01:12`, `1'12`, `1 min 12`) or as seconds (`72 s`) and
    match a shown time within `CLOCK_TOLERANCE_S` (seconds may also match a shown
    duration). A cents, ms or Hz figure matches a value shown with that unit, to the
    precision written. A quote matches when it is a whole line shown or at least
    `MIN_QUOTE_WORDS` consecutive words of one; a quote that matches nothing is not counted
    as invented (it may quote the title).
    """
    verified: list[str] = []
    invented: list[str] = []
    plain = unicodedata.normalize("NFKC", text).casefold()

    for pattern in (_CLOCK_RE, _MIN_SEC_RE):
        for match in pattern.finditer(plain):
            minutes, seconds = int(match.group(1)), int(match.group(2))
            plain = _blank(plain, match)
            if seconds >= 60:
                continue
            at = minutes * 60 + seconds
            (verified if _shown_time(at, facts) else invented).append(clock(at))

    for match in _FIGURE_RE.finditer(plain):
        value, decimals = _number(match.group(1))
        unit = _UNITS[match.group(2)]
        shown = facts.figures.get(unit, ())
        found = any(_same_figure(value, decimals, v) for v in shown)
        if unit == "s":
            found = found or _shown_time(value, facts)
            name = clock(value)
        else:
            name = f"{match.group(1).replace(',', '.')} {unit}"
        (verified if found else invented).append(name)

    for match in _QUOTE_RE.finditer(text):
        quoted = _fold(next(g for g in match.groups() if g is not None))
        if not quoted:
            continue
        padded = f" {quoted} "
        for line in facts.lyrics:
            whole = quoted == line
            if whole or (len(quoted.split()) >= MIN_QUOTE_WORDS and padded in f" {line} "):
                verified.append(f"lyrics “{line}”")
                break

    return Citations(verified=tuple(verified), invented=tuple(invented))
