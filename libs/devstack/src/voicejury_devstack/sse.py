"""A small Server-Sent Events client: the parser from the WHATWG spec, and a follower that
reconnects with `Last-Event-ID` until the job's terminal event.

Written here rather than taken from a package because the demo needs exactly two things a
generic client hides: the keep-alive comments (to show the job is alive while a model
loads) and control over reconnection (the gateway replays exactly what was missed).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import httpx

log = logging.getLogger("voicejury_devstack.sse")

TERMINAL_EVENTS = frozenset({"completed", "failed", "cancelled"})


@dataclass(frozen=True)
class SSEEvent:
    event: str
    data: str
    id: str | None = None
    retry_ms: int | None = None


class SSEParser:
    """Feed it lines (without their line ending); it returns an event when one completes.

    Follows the WHATWG event-stream rules: `:` starts a comment; one space after the field's
    colon is dropped; several `data:` lines join with newlines; an empty line dispatches;
    the last event id persists across events until the server sends another.
    """

    def __init__(self) -> None:
        self.last_event_id: str | None = None
        self.comments = 0
        self._event = ""
        self._data: list[str] = []
        self._retry_ms: int | None = None

    def feed(self, line: str) -> SSEEvent | None:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            self.comments += 1
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id":
            if "\0" not in value:  # the spec ignores ids with NUL
                self.last_event_id = value
        elif name == "retry" and value.isdigit():
            self._retry_ms = int(value)
        # any other field is ignored, as the spec requires
        return None

    def _dispatch(self) -> SSEEvent | None:
        data, event, retry_ms = self._data, self._event, self._retry_ms
        self._data, self._event, self._retry_ms = [], "", None
        if not data:
            return None
        return SSEEvent(
            event=event or "message",
            data="\n".join(data),
            id=self.last_event_id,
            retry_ms=retry_ms,
        )


def parse_sse(lines: Iterable[str]) -> Iterator[SSEEvent]:
    """Events in a stream of lines. An unterminated last event is dropped, as in browsers."""
    parser = SSEParser()
    for line in lines:
        if (event := parser.feed(line.rstrip("\r\n"))) is not None:
            yield event


class SSEError(RuntimeError):
    """The event stream cannot be followed (a refused request, or too many failures)."""


def follow_events(
    client: httpx.Client,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    last_event_id: str | None = None,
    max_failures: int = 5,
    reconnect_delay_s: float = 1.0,
    on_keepalive: Callable[[], None] | None = None,
    terminal: frozenset[str] = TERMINAL_EVENTS,
) -> Iterator[SSEEvent]:
    """Yields the stream's events until a terminal one, reconnecting when the connection drops.

    A reconnect sends `Last-Event-ID`, so the server resumes after the last event seen and
    nothing is shown twice. `max_failures` counts consecutive failed attempts; any event
    received resets it. 4xx answers (other than 429) are not retried: they will not change.
    """
    failures = 0
    delay_s = reconnect_delay_s
    while True:
        request_headers = {"Accept": "text/event-stream", **(headers or {})}
        if last_event_id is not None:
            request_headers["Last-Event-ID"] = last_event_id
        parser = SSEParser()
        parser.last_event_id = last_event_id
        try:
            with client.stream("GET", url, headers=request_headers) as response:
                if response.status_code != 200:
                    response.read()
                    retryable = response.status_code == 429 or response.status_code >= 500
                    if not retryable:
                        raise SSEError(
                            f"GET {url} answered {response.status_code}: {response.text[:500]}"
                        )
                    raise _Retry(f"status {response.status_code}")
                seen_comments = 0
                for line in response.iter_lines():
                    event = parser.feed(line)
                    if parser.comments != seen_comments:
                        seen_comments = parser.comments
                        if on_keepalive is not None:
                            on_keepalive()
                    if event is None:
                        continue
                    failures = 0
                    last_event_id = event.id
                    if event.retry_ms is not None:
                        delay_s = event.retry_ms / 1000
                    yield event
                    if event.event in terminal:
                        return
            reason = "the server closed the stream before the terminal event"
        except (httpx.TransportError, _Retry) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        failures += 1
        if failures > max_failures:
            raise SSEError(f"gave up on {url} after {max_failures} reconnects ({reason})")
        log.info("event stream interrupted (%s); reconnecting after id %s", reason, last_event_id)
        time.sleep(delay_s)


class _Retry(Exception):
    pass
