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


class SSEParser:
    """Feed it lines (without their line ending); it returns an event when one completes.

    Follows the WHATWG event-stream rules: `:` starts a comment; one space after the field's
    colon is dropped; several `data:` lines join with newlines; an empty line dispatches;
    the last event id persists across events until the server sends another; a `retry:`
    field sets the reconnection time at once, whether or not its event carries data (the
    gateway sends `retry: 2000` alone), and it too persists (`retry_ms`).
    """

    def __init__(self, retry_ms: int | None = None) -> None:
        self.last_event_id: str | None = None
        self.retry_ms: int | None = retry_ms
        self.comments = 0
        self._event = ""
        self._data: list[str] = []

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
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry_ms = int(value)
        # any other field is ignored, as the spec requires
        return None

    def _dispatch(self) -> SSEEvent | None:
        data, event = self._data, self._event
        self._data, self._event = [], ""
        if not data:
            return None
        return SSEEvent(event=event or "message", data="\n".join(data), id=self.last_event_id)


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
    on_reconnect: Callable[[], None] | None = None,
    terminal: frozenset[str] = TERMINAL_EVENTS,
) -> Iterator[SSEEvent]:
    """Yields the stream's events until a terminal one, reconnecting when the connection drops.

    A reconnect sends `Last-Event-ID`, so the server resumes after the last event seen and
    nothing is shown twice; it waits `reconnect_delay_s`, or what the server last set with
    `retry:`. `max_failures` counts consecutive failed attempts; any event received resets
    it. 4xx answers (other than 429) are not retried: they will not change.
    `on_reconnect` is called before each reconnection (it may raise to give up).
    """
    failures = 0
    retry_ms: int | None = None
    while True:
        request_headers = {"Accept": "text/event-stream", **(headers or {})}
        if last_event_id is not None:
            request_headers["Last-Event-ID"] = last_event_id
        parser = SSEParser(retry_ms)
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
                    retry_ms = parser.retry_ms
                    if parser.comments != seen_comments:
                        seen_comments = parser.comments
                        if on_keepalive is not None:
                            on_keepalive()
                    if event is None:
                        continue
                    failures = 0
                    last_event_id = event.id
                    yield event
                    if event.event in terminal:
                        return
            reason = "the server closed the stream before the terminal event"
        except (httpx.TransportError, _Retry) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        failures += 1
        if failures > max_failures:
            raise SSEError(f"gave up on {url} after {max_failures} reconnects ({reason})")
        if on_reconnect is not None:
            on_reconnect()
        log.info("event stream interrupted (%s); reconnecting after id %s", reason, last_event_id)
        time.sleep(reconnect_delay_s if retry_ms is None else retry_ms / 1000)


class _Retry(Exception):
    pass
