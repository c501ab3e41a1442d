"""The gateway's lease (a PostgreSQL advisory lock): one holder at a time, handed over when
the holder stops, and given up when its session is lost."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import asyncpg
import pytest

from voicejury_gateway.lease import AdvisoryLease

pytestmark = pytest.mark.integration


class Worker:
    """A lease and the work it guards: counts its terms, knows whether one is running."""

    def __init__(self, database_url: str, name: str) -> None:
        self.lease = AdvisoryLease(database_url, name, poll_s=0.1, check_s=0.2)
        self.terms = 0
        self.working = False
        self.task: asyncio.Task[None] | None = None

    async def _work(self) -> None:
        self.terms += 1
        self.working = True
        try:
            await asyncio.Event().wait()
        finally:
            self.working = False

    def start(self) -> None:
        self.task = asyncio.create_task(self.lease.run(self._work))

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


async def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 15  # a liveness bound, not a speed target
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


async def test_one_holder_at_a_time_and_the_other_takes_over_when_it_stops(
    database_url: str,
) -> None:
    first, second = Worker(database_url, "test lease"), Worker(database_url, "test lease")
    other = Worker(database_url, "another lease")
    try:
        first.start()
        await until(lambda: first.working, "the lease was never taken")
        second.start()
        other.start()
        await until(lambda: other.working, "a lease of another name was held up")
        await asyncio.sleep(1.0)  # ten of the standby's polls
        assert not second.working
        assert not second.lease.held

        await first.stop()
        assert not first.working
        assert not first.lease.held
        await until(lambda: second.working, "the standby never took the lease over")
        assert second.terms == 1
    finally:
        for worker in (first, second, other):
            await worker.stop()


async def test_a_holder_whose_session_is_lost_stops_working_and_the_lease_moves_on(
    database_url: str,
) -> None:
    """The holder's database session killed (as a PostgreSQL restart or a dropped
    connection would): its work is cancelled at its next check, and a holder works again."""
    first, second = Worker(database_url, "test lease"), Worker(database_url, "test lease")
    admin = await asyncpg.connect(database_url)
    try:
        first.start()
        await until(lambda: first.working, "the lease was never taken")
        second.start()
        holder = await admin.fetchval(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", holder)
        await until(lambda: not first.working or first.terms > 1, "the holder kept working")
        await until(lambda: first.working or second.working, "nobody took the lease again")
        assert first.terms + second.terms == 2
    finally:
        await admin.close()
        for worker in (first, second):
            await worker.stop()
