"""Quoted passages of a comment: one definition for every check that reads them.

A comment quotes the song (a lyric, the title) between quote marks. The citation check
reads what is inside (a quoted lyric cites a line); the language and insult checks read
what is outside (English lyrics quoted in a French comment do not make it English, a song
called "Loser" does not make the comment an insult). Reading both with one definition
means a quote the citation check accepts is never held against the comment elsewhere.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

# «…», “…”, „…“ or „…”, "…", 「…」, 『…』, ‘…’ and '…'. The single marks double as
# apostrophes (`l’été`, `don't`, `1'12`), so an opening one follows no letter or digit, a
# closing one is followed by none, and an apostrophe inside a quote (`‘Don’t stop’`) does
# not close it: an elision never opens or closes a quote.
QUOTED_RE = re.compile(
    r"«([^»]*)»"
    r"|“([^”]*)”"
    r"|„([^“”]*)[“”]"
    r'|"([^"]*)"'
    r"|「([^」]*)」"
    r"|『([^』]*)』"
    r"|‘((?:[^’]|’(?=\w))*)’(?!\w)"
    r"|(?<!\w)'((?:[^']|'(?=\w))*)'(?!\w)"
)


def quoted(text: str) -> Iterator[str]:
    """What `text` quotes, passage by passage, without the marks."""
    for match in QUOTED_RE.finditer(text):
        yield next(group for group in match.groups() if group is not None)


def unquoted(text: str) -> str:
    """`text` with each quoted passage, marks included, replaced by a space."""
    return QUOTED_RE.sub(" ", text)
