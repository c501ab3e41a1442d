"""Benchmarks that share a results document each rewrite their own marked section of it."""

from __future__ import annotations

from pathlib import Path


def write_section(doc: Path, name: str, body: str) -> None:
    """Replaces the section `name` of `doc` (between `<!-- bench:<name>:start -->` and
    `<!-- bench:<name>:end -->`) with `body`, or appends it."""
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    section = f"{start}\n{body.strip()}\n{end}"
    text = doc.read_text() if doc.exists() else ""
    if start in text and end in text:
        text = text[: text.index(start)] + section + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section + "\n"
    doc.write_text(text)
