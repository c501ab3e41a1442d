"""What a comment cites, and whether the evidence the model was shown holds it.

Issue 5 asks every judge to cite a concrete moment of the scorer's result. A model can
just as well write "at 2:47 you were 57 cents flat" about a two-minute song, so a comment
is read for its citations (times, cents, ms and Hz figures, quoted lyrics) and each one
is looked up in `evidence_data`, the very dict the prompt renders: what is accepted is
what the model was shown, no more (a line past `MAX_PROMPT_LINES` that is no highlight
was not shown). The deterministic fallback is held to the same check.

Only moments are citable: a record of the evidence with an `at` time (a line, a held
note) and the figures in it, the scoops' times, the lyrics quoted. Song-wide figures
(the tolerance, the key offset, the device latency, the mean errors) are the same for
every moment, so "at 2:47 you were 50 cents flat" would pass on the tolerance alone;
they are shown, so not invented, but cite nothing (unless the evidence shows no moment
at all). Scores (`68/100`) and percentages are not citations either: every comment
carries the overall score.

A comment passes when at least one citation is verified and it cites no time the data
does not contain, nor a figure far from every figure shown with its unit: one invented
moment, or "90 cents flat" for a line 41 cents flat, is enough to mislead the singer. A
figure rounded the way people speak ("about 40 cents" for 41) is not verified, but passes.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from .evidence import Evidence, clock, evidence_data
from .quotes import quoted

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
# A number with its unit: `41 cents`, `41-cent`, `140 ms`, `5.6 Hz`, `5,6 Hz`, `72 s`. At
# most 6 digits and 3 decimals, none of a longer run: no figure shown is larger, and a
# 310-digit number would read as infinity and overflow the arithmetic below.
_FIGURE_RE = re.compile(
    r"(?<![\d.,])(\d{1,6}(?:[.,]\d{1,3})?)(?!\d)\s?-?\s?"
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
_NON_WORD_RE = re.compile(r"[^\w]+")
# How far a cents, ms or Hz figure may stray from one shown with its unit and still be the
# model rounding it ("about 40 cents" for 41, "a fifth of a second" aside): the larger of
# an absolute step per unit and a share of the value. Beyond it, the figure is misstated.
_ROUNDING_STEP: Mapping[str, float] = MappingProxyType({"cents": 5.0, "ms": 20.0, "Hz": 0.5})
_ROUNDING_SHARE = 0.2


@dataclass(frozen=True)
class CitableFacts:
    """What a model was shown that a comment may cite.

    `times_s`: every `m:ss` shown (lines, held notes, scoops), in whole seconds as
    rendered. `figures`: unit (`cents`, `ms`, `Hz`, `s`) to the absolute values shown with
    that unit in a moment's record. `song_figures`: the same for the song-wide values,
    shown but not citable (every value when no moment is shown: then they are the only
    figures to cite, and `figures` holds them). `lyrics`: each shown lyric line, folded
    (see `_fold`). `song_text`: the title and lyric lines as shown, unfolded: words a
    comment may repeat whatever they are (`safety.is_offensive`).
    """

    times_s: tuple[int, ...]
    figures: Mapping[str, tuple[float, ...]]
    lyrics: tuple[str, ...]
    song_figures: Mapping[str, tuple[float, ...]]
    song_text: tuple[str, ...]


@dataclass(frozen=True)
class Citations:
    """A comment's citations, written back in our own notation (`1:12`, `41 cents`).

    Only our rendering of the parsed numbers appears here, never the model's text, so the
    invented ones can be named in the corrective retry.
    """

    verified: tuple[str, ...]
    invented: tuple[str, ...]
    # The invented ones that are times (`2:47`, `200 s`): a moment that never happened.
    invented_times: tuple[str, ...] = ()
    # The invented cents, ms or Hz figures that no rounding of a figure shown with their
    # unit explains (`90 cents` where the data shows 41 and 50 at most).
    misstated: tuple[str, ...] = ()


def _fold(text: str) -> str:
    """Case-, accent- and punctuation-free words, so `“Don't stop…”` matches `don t stop`."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    plain = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return " ".join(_NON_WORD_RE.sub(" ", plain).replace("_", " ").split())


def _leaves(
    node: object, key: str = "", moment: bool = False
) -> Iterator[tuple[str, object, bool]]:
    """`(key, value, in_moment)` for every scalar of the evidence.

    List items take their list's key; `in_moment` is true inside a record with an `at`
    time (a line, a held note), whose figures are that moment's own.
    """
    if isinstance(node, Mapping):
        inside = moment or "at" in node
        for k, v in node.items():
            yield from _leaves(v, str(k), inside)
    elif isinstance(node, list | tuple):
        for v in node:
            yield from _leaves(v, key, moment)
    else:
        yield key, node, moment


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
    song_figures: dict[str, set[float]] = {}
    lyrics: set[str] = set()
    song_text: set[str] = {data["title"]} if isinstance(data.get("title"), str) else set()
    for key, value, in_moment in _leaves(data):
        if key in ("at", "scoops_at") and isinstance(value, str):
            shown = _CLOCK_RE.fullmatch(value)
            if shown:
                times.add(int(shown.group(1)) * 60 + int(shown.group(2)))
        elif key == "lyrics" and isinstance(value, str):
            song_text.add(value)
            folded = _fold(value)
            if folded:
                lyrics.add(folded)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            unit = _unit_of(key)
            if unit is not None:
                into = figures if in_moment else song_figures
                into.setdefault(unit, set()).add(abs(float(value)))
    if not times:
        # No moment shown (no lines, no held notes, no scoops): the song-wide figures are
        # all there is to cite.
        figures, song_figures = song_figures, {}
    return CitableFacts(
        times_s=tuple(sorted(times)),
        figures=_frozen(figures),
        lyrics=tuple(sorted(lyrics)),
        song_figures=_frozen(song_figures),
        song_text=tuple(sorted(song_text)),
    )


def _frozen(figures: Mapping[str, set[float]]) -> Mapping[str, tuple[float, ...]]:
    return MappingProxyType({unit: tuple(sorted(v)) for unit, v in figures.items()})


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


def _among(cited: float, decimals: int, shown: tuple[float, ...]) -> bool:
    return any(_same_figure(cited, decimals, value) for value in shown)


def _roughly_shown(cited: float, unit: str, facts: CitableFacts) -> bool:
    shown = (*facts.figures.get(unit, ()), *facts.song_figures.get(unit, ()))
    step = _ROUNDING_STEP.get(unit, 0.0)
    return any(abs(cited - v) <= max(step, _ROUNDING_SHARE * v) for v in shown)


def _shown_time(seconds: float, facts: CitableFacts) -> bool:
    return any(abs(seconds - t) <= CLOCK_TOLERANCE_S for t in facts.times_s)


def _blank(text: str, match: re.Match[str]) -> str:
    start, end = match.span()
    return text[:start] + " " * (end - start) + text[end:]


def find_citations(text: str, facts: CitableFacts) -> Citations:
    """Every time, figure and lyric quote in `text`, split into verified and invented.

    Times are read as `m:ss` (also `01:12`, `1'12`, `1 min 12`) or as seconds (`72 s`) and
    match a shown time within `CLOCK_TOLERANCE_S` (seconds may also match a held note's
    duration). A cents, ms or Hz figure matches a value shown with that unit in a moment's
    record, to the precision written; one that matches only a song-wide value is neither
    verified nor invented. A quote matches when it is a whole line shown or at least
    `MIN_QUOTE_WORDS` consecutive words of one; a quote that matches nothing is not counted
    as invented (it may quote the title). An invented figure no rounding of a shown one
    explains (`_roughly_shown`) is also misstated.
    """
    verified: list[str] = []
    invented: list[str] = []
    invented_times: list[str] = []
    misstated: list[str] = []
    plain = unicodedata.normalize("NFKC", text).casefold()

    for pattern in (_CLOCK_RE, _MIN_SEC_RE):
        for match in pattern.finditer(plain):
            minutes, seconds = int(match.group(1)), int(match.group(2))
            plain = _blank(plain, match)
            if seconds >= 60:
                continue
            at = minutes * 60 + seconds
            if _shown_time(at, facts):
                verified.append(clock(at))
            else:
                invented.append(clock(at))
                invented_times.append(clock(at))

    for match in _FIGURE_RE.finditer(plain):
        value, decimals = _number(match.group(1))
        unit = _UNITS[match.group(2)]
        if _among(value, decimals, facts.figures.get(unit, ())) or (
            unit == "s" and _shown_time(value, facts)
        ):
            verified.append(clock(value) if unit == "s" else _figure_name(match))
        elif _among(value, decimals, facts.song_figures.get(unit, ())):
            continue  # shown, but the same for every moment: cites nothing
        elif unit == "s":
            invented.append(clock(value))
            invented_times.append(clock(value))
        else:
            invented.append(_figure_name(match))
            if not _roughly_shown(value, unit, facts):
                misstated.append(_figure_name(match))

    for passage in quoted(text):
        words = _fold(passage)
        if not words:
            continue
        padded = f" {words} "
        for line in facts.lyrics:
            whole = words == line
            if whole or (len(words.split()) >= MIN_QUOTE_WORDS and padded in f" {line} "):
                verified.append(f"lyrics “{line}”")
                break

    return Citations(
        verified=tuple(verified),
        invented=tuple(invented),
        invented_times=tuple(invented_times),
        misstated=tuple(misstated),
    )


def _figure_name(match: re.Match[str]) -> str:
    return f"{match.group(1).replace(',', '.')} {_UNITS[match.group(2)]}"
