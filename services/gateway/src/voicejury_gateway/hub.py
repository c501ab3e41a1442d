"""Wakes SSE streams when their job's event log grows (PostgreSQL LISTEN/NOTIFY).

Notifications are only a wake-up: streams re-read the log, and also re-read on every
keep-alive tick, so a notification lost while the listener reconnects delays an event by
at most one keep-alive interval and never loses it. Any gateway replica serves any stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import asyncpg

from .db import NOTIFY_CHANNEL

log = logging.getLogger(__name__)

# The listening connection is asked `SELECT 1` this often and must answer within as long:
# a connection cut without a FIN or RST (a node or a proxy gone) would otherwise wait for
# notifications that never come, every stream of the replica falling back to its
# keep-alive polling until the process restarts.
PROBE_EVERY_S = 5.0


class EventHub:
    def __init__(self, database_url: str) -> None:
        self._url = database_url
        self._waiters: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @contextmanager
    def subscribe(self, job_id: str) -> Iterator[asyncio.Event]:
        waiter = asyncio.Event()
        self._waiters[job_id].add(waiter)
        try:
            yield waiter
        finally:
            self._waiters[job_id].discard(waiter)
            if not self._waiters[job_id]:
                del self._waiters[job_id]

    def _notify(self, _con: object, _pid: int, _channel: str, payload: str) -> None:
        for waiter in self._waiters.get(payload, ()):
            waiter.set()

    def _wake_all(self) -> None:
        for waiters in self._waiters.values():
            for waiter in waiters:
                waiter.set()

    async def _listen_forever(self) -> None:
        while True:
            con: asyncpg.Connection | None = None
            try:
                con = await asyncpg.connect(self._url)
                closed = asyncio.Event()
                con.add_termination_listener(lambda _con, ev=closed: ev.set())
                await con.add_listener(NOTIFY_CHANNEL, self._notify)
                self._wake_all()  # anything committed while we were away gets read now
                while not closed.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(closed.wait(), timeout=PROBE_EVERY_S)
                    if not closed.is_set():
                        await asyncio.wait_for(con.fetchval("SELECT 1"), timeout=PROBE_EVERY_S)
                log.warning("event listener disconnected")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("event listener disconnected: %r", exc)
            finally:
                if con is not None and not con.is_closed():
                    con.terminate()  # a close would wait on a connection that may be dead
            await asyncio.sleep(1.0)
