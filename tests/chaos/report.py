"""Renders the fault suite's JSON-lines report as the results table of docs/reliability.md.

    VJ_CHAOS_REPORT=/tmp/chaos.jsonl .venv/bin/python -m pytest -m chaos tests/chaos
    .venv/bin/python tests/chaos/report.py /tmp/chaos.jsonl docs/reliability.md

(`make chaos-report` does both.) The table replaces what stands between the
`<!-- chaos:start -->` and `<!-- chaos:end -->` markers of the document.
"""

from __future__ import annotations

import json
import platform
import sys
from datetime import date
from pathlib import Path
from typing import Any

START, END = "<!-- chaos:start -->", "<!-- chaos:end -->"
COMMAND = "make chaos-report"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _number(row: dict[str, Any]) -> int:
    head = str(row["fault"]).split(" ", 1)[0]
    return int(head) if head.isdigit() else 1 << 30


def render(rows: list[dict[str, Any]]) -> str:
    lines = [
        START,
        f"Run of `{COMMAND}` on {date.today()} ({platform.machine()}, shared 2-core machine): "
        f"{len(rows)} faults, {sum(r['jobs'] for r in rows)} jobs accepted, "
        f"{sum(r['refused'] for r in rows)} submissions refused as the fault required, "
        f"{sum(r['lost'] for r in rows)} lost, {sum(r['duplicated'] for r in rows)} "
        f"duplicated, {sum(r['unexpected'] for r in rows)} unexpected.",
        "",
        "| fault injected | jobs (+refused) | completed | lost | dup. | failed with code "
        "| what the test saw | reproduce |",
        "|---|---|---|---|---|---|---|---|",
    ]
    # In the order of RELIABILITY.md's table (each fault's name starts with its number).
    for r in sorted(rows, key=_number):
        codes = ", ".join(f"`{c}` {n}" for c, n in r["failed_with_code"].items()) or "–"
        refused = f" (+{r['refused']})" if r["refused"] else ""
        test = r.get("test") or ""
        reproduce = f'`.venv/bin/python -m pytest -m chaos "{test}"`' if test else "–"
        lines.append(
            f"| {_cell(r['fault'])} | {r['jobs']}{refused} | {r['completed']} | {r['lost']} "
            f"| {r['duplicated']} | {codes} | {_cell('; '.join(r['notes'])) or '–'} "
            f"| {reproduce} |"
        )
    lines.append(END)
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    report, doc = Path(sys.argv[1]), Path(sys.argv[2])
    rows = [json.loads(line) for line in report.read_text().splitlines() if line.strip()]
    text = doc.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{doc} has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    doc.write_text(head + render(rows) + tail)
    print(f"{len(rows)} faults written to {doc}")


if __name__ == "__main__":
    main()
