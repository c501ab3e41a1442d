"""Writes each fault test's rows of the results table once the test has ended.

A row (one per check the test made, `Checker.check`) carries the test's outcome: the checks
come before the test's own assertions, so a row is only known to pass once the whole test
has. A test that failed or was skipped before any check leaves a failed row naming it, so
that `tests/chaos/report.py` cannot render a table that hides it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from tests.chaos.checker import take_published


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" or (report.when == "setup" and not report.passed):
        rows = [r.row() for r in take_published()]
        if not rows and not report.passed:
            rows = [_unreported(report)]
        _write(rows, report)


def _unreported(report: pytest.TestReport) -> dict[str, Any]:
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:  # a failure: the first line of its exception
        message = str(crash.message).split("\n", 1)[0]
    elif isinstance(report.longrepr, tuple):  # a skip: its reason
        message = str(report.longrepr[2])
    else:
        message = report.outcome
    return {
        "fault": f"? {report.nodeid.rsplit('::', 1)[-1]}",
        "jobs": 0,
        "refused": 0,
        "completed": 0,
        "lost": 0,
        "duplicated": 0,
        "unexpected": 0,
        "failed_with_code": {},
        "attempts": [],
        "notes": [f"{report.when} {report.outcome} before any checker report: {message[:200]}"],
    }


def _write(rows: list[dict[str, Any]], report: pytest.TestReport) -> None:
    target = os.environ.get("VJ_CHAOS_REPORT")
    if not target or not rows:
        return
    with open(target, "a", encoding="utf-8") as f:
        for row in rows:
            row = {**row, "test": report.nodeid, "passed": report.passed}
            f.write(json.dumps(row) + "\n")
