"""Renders the fault suite's JSON-lines report as the results table of docs/reliability.md.

    VJ_CHAOS_REPORT=/tmp/chaos.jsonl .venv/bin/python -m pytest -m chaos tests/chaos
    .venv/bin/python tests/chaos/report.py /tmp/chaos.jsonl docs/reliability.md [RELIABILITY.md]

(`make chaos-report` does both.) The table replaces what stands between the
`<!-- chaos:start -->` and `<!-- chaos:end -->` markers of the document. Each row carries
its test's outcome (written by `tests/chaos/conftest.py` once the test has ended).

The table is written whatever the run found; the exit status is non-zero, with a message,
when a row failed or when a fault of RELIABILITY.md's list (`../shared/RELIABILITY.md`
beside the repository unless given) has no row at all.
"""

from __future__ import annotations

import json
import platform
import re
import sys
from datetime import date
from pathlib import Path
from typing import Any

START, END = "<!-- chaos:start -->", "<!-- chaos:end -->"
COMMAND = "make chaos-report"
RELIABILITY = Path(__file__).resolve().parents[3] / "shared" / "RELIABILITY.md"
# A row of RELIABILITY.md's fault table: "| 3 | kill and restart nats-server ... | ... |".
_FAULT_ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*([^|]+?)\s*\|", re.MULTILINE)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _number(row: dict[str, Any]) -> int | None:
    head = str(row["fault"]).split(" ", 1)[0]
    return int(head) if head.isdigit() else None


def _passed(row: dict[str, Any]) -> bool:
    # A row without an outcome (an older report) proves nothing.
    return row.get("passed") is True


def required_faults(reliability: Path) -> dict[int, str]:
    """RELIABILITY.md's faults by number (the table under "## The faults")."""
    text = reliability.read_text()
    section = text.split("## The faults", 1)[-1]
    faults = {int(n): name for n, name in _FAULT_ROW.findall(section)}
    if not faults:
        raise SystemExit(f"no fault table found in {reliability}")
    return faults


def missing_faults(rows: list[dict[str, Any]], faults: dict[int, str]) -> list[str]:
    """RELIABILITY.md's faults that no row covers, as "number name"."""
    covered = {_number(r) for r in rows}
    return [f"{n} {name}" for n, name in faults.items() if n not in covered]


def render(rows: list[dict[str, Any]], missing: list[str]) -> str:
    failed = sum(not _passed(r) for r in rows)
    lines = [
        START,
        f"Run of `{COMMAND}` on {date.today()} ({platform.machine()}, shared 2-core machine): "
        f"{len(rows)} rows, {len(rows) - failed} passed, {failed} failed; "
        f"{sum(r['jobs'] for r in rows)} jobs accepted, "
        f"{sum(r['refused'] for r in rows)} submissions refused as the fault required, "
        f"{sum(r['lost'] for r in rows)} lost, {sum(r['duplicated'] for r in rows)} "
        f"duplicated, {sum(r['unexpected'] for r in rows)} unexpected.",
    ]
    if missing:
        lines.append(f"**Faults of RELIABILITY.md without a row: {'; '.join(missing)}.**")
    lines += [
        "",
        "| fault injected | result | jobs (+refused) | completed | lost | dup. | failed with code "
        "| what the test saw | reproduce |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    # In the order of RELIABILITY.md's table (each fault's name starts with its number).
    for r in sorted(rows, key=lambda r: _number(r) or 1 << 30):
        codes = ", ".join(f"`{c}` {n}" for c, n in r["failed_with_code"].items()) or "–"
        refused = f" (+{r['refused']})" if r["refused"] else ""
        test = r.get("test") or ""
        reproduce = f'`.venv/bin/python -m pytest -m chaos "{test}"`' if test else "–"
        lines.append(
            f"| {_cell(r['fault'])} | {'passed' if _passed(r) else '**FAILED**'} "
            f"| {r['jobs']}{refused} | {r['completed']} | {r['lost']} "
            f"| {r['duplicated']} | {codes} | {_cell('; '.join(r['notes'])) or '–'} "
            f"| {reproduce} |"
        )
    lines.append(END)
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) not in (3, 4):
        raise SystemExit(__doc__)
    report, doc = Path(sys.argv[1]), Path(sys.argv[2])
    reliability = Path(sys.argv[3]) if len(sys.argv) == 4 else RELIABILITY
    faults = required_faults(reliability)
    rows = [json.loads(line) for line in report.read_text().splitlines() if line.strip()]
    text = doc.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{doc} has no {START} ... {END} markers")
    missing = missing_faults(rows, faults)
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    doc.write_text(head + render(rows, missing) + tail)
    print(f"{len(rows)} rows written to {doc}")
    problems = [
        f"failed: {r['fault']} ({r.get('test') or 'no test'})" for r in rows if not _passed(r)
    ] + [f"no row for fault {fault}" for fault in missing]
    if problems:
        raise SystemExit(
            "the fault suite did not pass (the table shows it):\n  " + "\n  ".join(problems)
        )


if __name__ == "__main__":
    main()
