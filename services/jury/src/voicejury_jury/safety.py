"""Checks on what a model wrote before it reaches a singer.

None of this replaces the system prompt's rules; it catches the cases where a model
ignores them. A rejected answer is never repaired in place: the caller asks again or
falls back to the deterministic writer, so what is published is either a model answer
that passed every check or text we wrote ourselves.
"""

from __future__ import annotations

import re
import unicodedata

SUPPORTED_LANGUAGES: tuple[str, ...] = ("en", "fr")
LANGUAGE_NAMES: dict[str, str] = {"en": "English", "fr": "French"}
DEFAULT_LANGUAGE = "en"

# Words aimed at a person rather than at their singing. Kept short on purpose: a long list
# mostly catches musical vocabulary ("a fat tone", "une grosse voix"); the prompt does the
# real work.
# Compared accent-free and lower-case, on word boundaries.
_BLOCKLIST: tuple[str, ...] = (
    # en
    "idiot",
    "moron",
    "stupid",
    "dumb",
    "ugly",
    "loser",
    "pathetic",
    "worthless",
    "disgusting",
    "retard",
    "retarded",
    "shut up",
    "kill yourself",
    "give up singing",
    # fr
    "debile",
    "cretin",
    "cretine",
    "imbecile",
    "abruti",
    "abrutie",
    "moche",
    "connard",
    "connasse",
    "ta gueule",
    "minable",
    "nullos",
    "arrete de chanter",
)
_BLOCK_RE = re.compile(r"\b(?:" + "|".join(re.escape(w) for w in _BLOCKLIST) + r")\b")

# Function words that almost every sentence of each language contains; enough to tell
# English from French in a 2–4 sentence comment, with no model and no dependency.
# fmt: off
_STOPWORDS: dict[str, frozenset[str]] = {
    "en": frozenset((
        "the", "and", "is", "you", "your", "was", "were", "an", "of", "to", "it", "this",
        "that", "with", "but", "on", "in", "at", "for", "my", "me", "i", "not", "be", "have",
        "are", "from", "what", "so", "very",
    )),
    "fr": frozenset((
        "le", "la", "les", "de", "des", "du", "est", "et", "tu", "ton", "ta", "tes", "vous",
        "votre", "un", "une", "pas", "que", "qui", "sur", "dans", "avec", "pour", "mais", "au",
        "aux", "ce", "cette", "c", "j", "je", "mon", "ma", "tres", "en",
    )),
}
# fmt: on
_WORD_RE = re.compile(r"[a-z]+")
_QUOTED_RE = re.compile(r"«[^»]*»|“[^”]*”|\"[^\"]*\"")
# C0 minus tab and newline, DEL, C1, and the surrogate range (only ever lone in a str).
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


def _fold(text: str) -> str:
    """Lower-case and strip accents, so `Débile` and `debile` match the same entry."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def normalise_language(language: str | None) -> str:
    """`"fr-FR"`, `"FR"`, `"fr_CA"` -> `"fr"`; missing or unsupported -> `"en"`."""
    if not language:
        return DEFAULT_LANGUAGE
    code = language.strip().lower().replace("_", "-").split("-", 1)[0]
    return code if code in SUPPORTED_LANGUAGES else DEFAULT_LANGUAGE


def is_offensive(text: str) -> bool:
    return _BLOCK_RE.search(_fold(text)) is not None


def looks_like(text: str, language: str) -> bool:
    """True unless the text reads clearly more like another supported language.

    Ties pass: a short comment made mostly of numbers and names proves nothing either way.
    Quoted passages are skipped: a French comment quoting English lyrics is still French.
    """
    words = _WORD_RE.findall(_fold(_QUOTED_RE.sub(" ", text)))
    counts = {lang: sum(w in stop for w in words) for lang, stop in _STOPWORDS.items()}
    own = counts.get(language, 0)
    return all(own >= n for lang, n in counts.items() if lang != language)


def strip_control_chars(text: str) -> str:
    """`text` without C0/C1 control characters (newline and tab kept) or lone surrogates.

    PostgreSQL's jsonb refuses U+0000, so one NUL in a comment would stop the gateway from
    recording the job's result; the other controls (bell, escape, backspace...) have no
    place in text shown to people, and a lone surrogate cannot even be encoded as UTF-8.
    """
    return _CONTROL_RE.sub("", text)


def truncate(text: str, max_chars: int) -> str:
    """Bound a comment's length, cutting at a word boundary and marking the cut with `…`."""
    flat = " ".join(text.split())
    if len(flat) <= max_chars:
        return flat
    cut = flat[: max_chars - 1]
    space = cut.rfind(" ")
    if space > max_chars // 2:
        cut = cut[:space]
    return cut.rstrip(" ,;:") + "…"
