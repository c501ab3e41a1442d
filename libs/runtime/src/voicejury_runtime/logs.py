"""Structured logs: one JSON object per line, carrying `job_id`, `stage` and `attempt`."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

_EMPTY: Mapping[str, Any] = MappingProxyType({})
_context: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "vj_log_context", default=_EMPTY
)


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Adds fields to every log record emitted inside the block (task- and thread-local)."""
    token = _context.set({**_context.get(), **fields})
    try:
        yield
    finally:
        _context.reset(token)


def bind_log_context(**fields: Any) -> None:
    """Adds fields to every log record emitted for the rest of the current task. Only where
    the task is the scope, and a `with` block cannot wrap all that logs: an HTTP request
    (servers run each in a task of its own), whose error handlers run outside the route."""
    _context.set({**_context.get(), **fields})


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **_context.get(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class _ContextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        ctx = {**_context.get(), **getattr(record, "fields", {})}
        return base + ("  " + " ".join(f"{k}={v}" for k, v in ctx.items()) if ctx else "")


def configure_logging(service: str, level: str = "INFO", *, as_json: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _JsonFormatter()
        if as_json
        else _ContextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    _context.set({"service": service})
