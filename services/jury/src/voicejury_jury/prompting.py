"""Prompts as versioned files: `prompts/<PROMPT_VERSION>/{system,user,<persona>}.md`.

Changing a prompt's wording means adding a new version directory and bumping
`PROMPT_VERSION`, so every stored result can say which prompts produced its jury.
Templates use `string.Template` (`$name`) rather than `str.format` so the JSON examples in
them need no brace escaping.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from string import Template

from .evidence import Evidence, evidence_json
from .personas import Persona
from .safety import LANGUAGE_NAMES

PROMPT_VERSION = "v3"
# The longest a persona's prompt can get, whatever the result: a unit test builds one
# that fills every cap of `evidence.py` (~41 000 characters, ~10 000 tokens). A usual
# prompt is ~5 000 characters.
MAX_PROMPT_CHARS = 42_000

Message = dict[str, str]


@cache
def _template(version: str, name: str) -> Template:
    path = files("voicejury_jury").joinpath("prompts", version, f"{name}.md")
    return Template(path.read_text(encoding="utf-8"))


def build_messages(
    persona: Persona, ev: Evidence, *, language: str, max_chars: int
) -> list[Message]:
    """The chat messages for one persona: rules and character, then the delimited data.

    The singer-provided text (title, lyrics) only ever appears inside the JSON of the user
    message's `<performance_data>` block, never in the system message.
    """
    fields = {
        "name": persona.name,
        "language_code": language,
        "language_name": LANGUAGE_NAMES[language],
        "max_chars": str(max_chars),
    }
    system = (
        _template(PROMPT_VERSION, "system").substitute(fields)
        + "\n"
        + _template(PROMPT_VERSION, persona.id).substitute(fields)
    )
    # Template substitutes in one pass and never re-reads inserted values, so a `$` in
    # lyrics stays literal.
    user = _template(PROMPT_VERSION, "user").substitute(fields, evidence=evidence_json(ev))
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def retry_message(reason: str, *, language: str) -> Message:
    """The follow-up turn after a rejected answer; `reason` is our own text, never model's."""
    text = _template(PROMPT_VERSION, "retry").substitute(
        reason=reason, language_code=language, language_name=LANGUAGE_NAMES[language]
    )
    return {"role": "user", "content": text}
