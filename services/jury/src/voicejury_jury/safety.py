"""Checks on what a model wrote before it reaches a singer.

None of this replaces the system prompt's rules; it catches the cases where a model
ignores them. A rejected answer is never repaired in place: the caller asks again or
falls back to the deterministic writer, so what is published is either a model answer
that passed every check or text we wrote ourselves.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

from .quotes import unquoted

SUPPORTED_LANGUAGES: tuple[str, ...] = ("en", "fr")
LANGUAGE_NAMES: dict[str, str] = {"en": "English", "fr": "French"}
DEFAULT_LANGUAGE = "en"

# Words aimed at a person rather than at their singing. Kept short on purpose: a long list
# mostly catches musical vocabulary ("a fat tone", "une grosse voix"); the prompt does the
# real work. A word that also describes a sound ("an ugly crack", "une note moche") is
# listed only in the phrases that aim it at the singer.
# Compared accent-free, lower-case, apostrophes as spaces, on word boundaries.
_BLOCKLIST: tuple[str, ...] = (
    # en
    "idiot",
    "moron",
    "stupid",
    "dumb",
    "you are ugly",
    "you re ugly",
    "you re so ugly",
    "you look ugly",
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
    "tu es moche",
    "t es moche",
    "t es trop moche",
    "connard",
    "connasse",
    "ta gueule",
    "minable",
    "nullos",
    "arrete de chanter",
)
_BLOCK_RE = re.compile(r"\b(?:" + "|".join(re.escape(w) for w in _BLOCKLIST) + r")\b")
# Entries that are everyday words in a job's language, where they insult nobody.
_HARMLESS_IN: dict[str, frozenset[str]] = {"fr": frozenset({"retard"})}  # "late"
_APOSTROPHES_RE = re.compile(r"['’ʼ`]")

# Function words that almost every sentence of each language contains: enough to tell
# these languages apart in a 2–4 sentence comment, with no model and no dependency. Written
# lower-case with their accents, which carry much of the signal (`à` is French, `a` is not
# only French). A word common to several languages is listed under each of them, so it
# weighs the same for all of them and only counts against the others.
# fmt: off
_STOPWORDS: dict[str, frozenset[str]] = {
    "en": frozenset((
        "the", "and", "is", "you", "your", "was", "were", "a", "an", "of", "to", "it", "this",
        "that", "with", "but", "on", "in", "at", "for", "my", "me", "i", "not", "be", "have",
        "has", "are", "from", "what", "so", "very", "as", "there", "here", "too", "just",
        "more", "keep", "let", "do", "no", "yet", "every", "where", "into", "than", "yes",
        "by", "if", "up", "out", "off", "we", "our", "they", "them", "she", "his", "him",
        "who", "when", "how", "why", "only", "some", "any", "one", "again", "now", "then",
        "had", "did", "been", "would", "could", "should", "can", "these", "those", "after",
        "before", "through", "about", "really", "little", "bit",
    )),
    "fr": frozenset((
        "le", "la", "les", "de", "des", "du", "est", "et", "tu", "ton", "ta", "tes", "te",
        "vous", "votre", "un", "une", "pas", "que", "qui", "sur", "dans", "avec", "pour",
        "mais", "au", "aux", "ce", "cette", "c", "j", "je", "mon", "ma", "très", "en", "à",
        "a", "as", "ai", "il", "elle", "on", "ne", "n", "se", "si", "l", "d", "qu", "s",
        "sont", "était", "été", "ça", "où", "là", "plus", "non", "oui", "encore", "peu",
        "tout", "bien", "y", "nous", "toi", "moi", "leur", "sans", "sous", "après", "avant",
        "aussi", "comme", "trop", "moins", "vraiment", "toujours", "déjà", "même", "quand",
    )),
    "es": frozenset((
        "el", "la", "los", "las", "de", "del", "y", "que", "en", "un", "una", "es", "está",
        "por", "para", "con", "no", "tu", "tus", "te", "se", "si", "sí", "lo", "al", "su",
        "sus", "muy", "pero", "mas", "más", "como", "fue", "has", "hay", "mi", "me", "este",
        "esta", "eso", "ese", "también", "cuando", "a",
    )),
    "it": frozenset((
        "il", "lo", "la", "i", "gli", "le", "l", "di", "del", "della", "dei", "delle", "nel",
        "nella", "al", "alla", "un", "una", "uno", "è", "e", "che", "non", "per", "con", "su",
        "sei", "hai", "ha", "ho", "ma", "mi", "ti", "si", "tuo", "tua", "tuoi", "molto",
        "più", "anche", "come", "questo", "questa", "sono", "era", "a", "da", "in", "ci",
        "perché", "ancora",
    )),
    "pt": frozenset((
        "o", "os", "a", "as", "de", "do", "da", "dos", "das", "em", "no", "na", "nos", "nas",
        "um", "uma", "é", "e", "que", "não", "com", "para", "por", "mas", "muito", "você",
        "seu", "sua", "foi", "está", "isso", "este", "esta", "ao", "mais", "se", "te", "tu",
        "teu", "tua", "me",
    )),
    "de": frozenset((
        "der", "die", "das", "und", "ist", "nicht", "du", "dein", "deine", "deinen", "deiner",
        "ein", "eine", "einen", "einem", "mit", "auf", "zu", "den", "dem", "bei", "für",
        "sehr", "aber", "war", "was", "hast", "bist", "wie", "auch", "noch", "ich", "es", "im",
        "am", "von", "sich", "hat", "wird", "um", "an", "so", "in", "nur", "wenn", "dass",
        "zum", "zur", "beim", "über", "mehr", "schon", "als",
    )),
    "nl": frozenset((
        "de", "het", "een", "en", "van", "is", "je", "jij", "jouw", "niet", "dat", "die", "op",
        "met", "voor", "maar", "zijn", "was", "te", "er", "bij", "ook", "heel", "nog", "wat",
        "naar", "om", "aan", "hebt", "heb", "bent", "dit", "deze", "al", "als", "uit", "zo",
        "wel", "geen",
    )),
}
# fmt: on
STOPWORD_LANGUAGES: tuple[str, ...] = tuple(_STOPWORDS)
# From this many words on (outside quotes, units not counted), a comment in a language with
# a stopword list holds more of that language's function words than of any other's; a
# shorter one ("Rythme 74/100, 54 ms d'écart moyen. Solide.") may hold none at all, or
# only words two languages share (`on`, `a`), and a tie there proves nothing either way.
MIN_JUDGED_WORDS = 8

# The script a language is written in, for the Whisper languages not written in Latin
# script; every other code (de, tr, pl, vi, sw...) expects Latin. Script names are the first
# word of a letter's Unicode name (`CYRILLIC SMALL LETTER ZHE`).
_LATIN = frozenset({"LATIN"})
_SCRIPTS: dict[str, frozenset[str]] = {
    **dict.fromkeys(("zh", "yue"), frozenset({"CJK"})),
    "ja": frozenset({"CJK", "HIRAGANA", "KATAKANA"}),
    "ko": frozenset({"HANGUL", "CJK"}),
    **dict.fromkeys(
        ("ru", "uk", "be", "bg", "mk", "kk", "mn", "tg", "tt", "ba"), frozenset({"CYRILLIC"})
    ),
    # Written in both alphabets.
    **dict.fromkeys(("sr", "uz"), frozenset({"CYRILLIC", "LATIN"})),
    **dict.fromkeys(("ar", "fa", "ur", "ps", "sd"), frozenset({"ARABIC"})),
    **dict.fromkeys(("he", "yi"), frozenset({"HEBREW"})),
    "el": frozenset({"GREEK"}),
    **dict.fromkeys(("hi", "mr", "ne", "sa"), frozenset({"DEVANAGARI"})),
    **dict.fromkeys(("bn", "as"), frozenset({"BENGALI"})),
    "pa": frozenset({"GURMUKHI"}),
    "gu": frozenset({"GUJARATI"}),
    "ta": frozenset({"TAMIL"}),
    "te": frozenset({"TELUGU"}),
    "kn": frozenset({"KANNADA"}),
    "ml": frozenset({"MALAYALAM"}),
    "si": frozenset({"SINHALA"}),
    "th": frozenset({"THAI"}),
    "lo": frozenset({"LAO"}),
    "my": frozenset({"MYANMAR"}),
    "km": frozenset({"KHMER"}),
    "bo": frozenset({"TIBETAN"}),
    "ka": frozenset({"GEORGIAN"}),
    "hy": frozenset({"ARMENIAN"}),
    "am": frozenset({"ETHIOPIC"}),
}
# Letters of other origins (`ª`, `ー`, modifier letters) say nothing about the script.
_KNOWN_SCRIPTS: frozenset[str] = _LATIN.union(*_SCRIPTS.values())
_LETTERS_RE = re.compile(r"[^\W\d_]+")
# The units a comment cites in (`41 cents`, `140 ms`, `5.6 Hz`) are Latin letters in any
# language's comment, so they do not count towards its script.
_UNITS_RE = re.compile(r"(?<![^\W\d_])(?:cents?|ms|hz)(?![^\W\d_])")
# C0 minus tab and newline, DEL, C1, and the surrogate range (only ever lone in a str).
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


def _fold(text: str) -> str:
    """Lower-case and strip accents, so `Débile` and `debile` match the same entry."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def _base_code(language: str) -> str:
    return language.strip().lower().replace("_", "-").split("-", 1)[0]


def normalise_language(language: str | None) -> str:
    """`"fr-FR"`, `"FR"`, `"fr_CA"` -> `"fr"`; missing or unsupported -> `"en"`."""
    if not language:
        return DEFAULT_LANGUAGE
    code = _base_code(language)
    return code if code in SUPPORTED_LANGUAGES else DEFAULT_LANGUAGE


def _blocklisted(text: str) -> set[str]:
    words = " ".join(_APOSTROPHES_RE.sub(" ", _fold(text)).split())
    return {match.group(0) for match in _BLOCK_RE.finditer(words)}


def is_offensive(
    text: str, *, language: str | None = None, song: Iterable[str | None] = ()
) -> bool:
    """True when `text`, outside its quoted passages, uses a blocklist entry.

    Not held against it: an entry the song itself uses (`song`: its title and lyrics as the
    model was shown them), so a judge may name "Loser" or quote "I'm a loser baby"; nor
    one that is an everyday word of `language` (`retard` is French for "late").
    """
    found = _blocklisted(unquoted(text))
    if not found:
        return False
    allowed = set(_HARMLESS_IN.get(_base_code(language), ())) if language else set()
    for passage in song:
        allowed |= _blocklisted(passage or "")
    return not found <= allowed


# How a judge announces a vote in so many words, compared as `_blocklisted` compares
# (accent-free, lower-case, apostrophes as spaces): "it's a yes", "I vote no", "c'est un
# grand oui", "je dis non". Not "a no-brainer", nor "c'est non seulement...".
_VOTE_WORDS = {"yes": ("yes", "oui"), "no": ("no", "non")}
_VOTE_PHRASES = (
    r"\b(?:it|that) s a (?:\w+ )?{en}\b",
    r"\bi (?:vote|say|m voting|m saying|am voting|am saying) {en}\b",
    r"\bmy (?:vote|answer) is (?:a )?{en}\b",
    r"\bc est (?:un )?(?:\w+ )?{fr}\b",
    r"\bje (?:vote|dis) {fr}\b",
    r"\bmon vote (?:est|c est) (?:un )?{fr}\b",
)
_VOTE_RES = {
    vote: re.compile("|".join(p.format(en=en, fr=fr) for p in _VOTE_PHRASES) + r"(?![-\w])")
    for vote, (en, fr) in _VOTE_WORDS.items()
}
_NOT_A_VOTE_RE = re.compile(r"\bnon seulement\b")


def stated_vote(text: str) -> str | None:
    """ "yes" or "no" when `text`, outside its quotes, announces that vote in so many words
    (and not the other), else None."""
    plain = " ".join(_APOSTROPHES_RE.sub(" ", _fold(unquoted(text))).split())
    plain = _NOT_A_VOTE_RE.sub(" ", plain)
    said = {vote for vote, pattern in _VOTE_RES.items() if pattern.search(plain)}
    return said.pop() if len(said) == 1 else None


def _script_fits(text: str, scripts: frozenset[str]) -> bool:
    """At least half of the text's letters are in one of `scripts` (no letters: true)."""
    own = other = 0
    for ch in text:
        if not unicodedata.category(ch).startswith("L"):
            continue
        script = unicodedata.name(ch, "").split(" ", 1)[0]
        if script in scripts:
            own += 1
        elif script in _KNOWN_SCRIPTS:
            other += 1
    return own >= other


def looks_like(text: str, language: str) -> bool:
    """True unless the text reads as written in another language than `language`.

    Two checks, on the text outside quoted passages (a French comment quoting English
    lyrics is still French):

    1. script: at least half of the letters are in the language's script (Latin for most
       languages; CJK for `zh`, Cyrillic for `ru`, Arabic for `ar`...), not counting the
       units cited (`cents`, `ms`, `Hz`);
    2. words, for a language with a stopword list (`STOPWORD_LANGUAGES`: en, fr, es, it,
       pt, de, nl): the text holds more of that language's function words than of any
       other listed language's. A tie passes only in a text of fewer than
       `MIN_JUDGED_WORDS` words, too short to judge ("Rhythm 74/100, 54 ms timing error.
       Solid."); from that length on, the language must be positively there, so an
       English "Bravo! Great energy on 0:45, a little late (140 ms). Attack harder!",
       whose only function words (`on`, `a`) French shares, is not French.

    Any other language code (`tr`, `pl`, `ja`, `ru`...) gets the script check only: an
    answer in Cyrillic or Chinese to a Turkish job is caught, one in English is not.
    """
    code = _base_code(language)
    plain = unicodedata.normalize("NFKC", unquoted(text)).casefold()
    if not _script_fits(_UNITS_RE.sub(" ", plain), _SCRIPTS.get(code, _LATIN)):
        return False
    if code not in _STOPWORDS:
        return True
    words = _LETTERS_RE.findall(_UNITS_RE.sub(" ", plain))
    counts = {lang: sum(w in stop for w in words) for lang, stop in _STOPWORDS.items()}
    own = counts.pop(code)
    rival = max(counts.values())
    return own > rival or (own == rival and len(words) < MIN_JUDGED_WORDS)


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
