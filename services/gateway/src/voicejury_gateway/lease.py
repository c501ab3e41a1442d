"""One gateway replica at a time does a piece of work: whoever holds a PostgreSQL advisory lock.

The lock lives as long as the connection that took it: a replica that stops, crashes or
loses the database releases it, and a standby replica, asking every `poll_s`, takes it.
Process death releases it at once (the kernel closes the socket); a replica cut off
without a word releases it when PostgreSQL's TCP keep-alives give up on it (about 15 s).
The lease gives *mostly one*: a replica cut off from PostgreSQL but not from NATS keeps
working until its own liveness check fails, so the work it guards must stay correct with
two at once (it only has to be better with one).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable

import asyncpg

log = logging.getLogger(__name__)

_STOP_WAIT_S = 10.0

# PostgreSQL drops a silent peer's session (and its lock) after 5 s idle + 3 probes × 3 s.
# Set once connected, not as startup parameters, which a pooler such as PgBouncer refuses.
_KEEPALIVES = (
    "SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 3; SET tcp_keepalives_count = 3"
)


def lock_key(name: str) -> int:
    """The advisory lock's 64-bit key for a lease name (PostgreSQL's locks are integers)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), signed=True)


class AdvisoryLease:
    def __init__(
        self,
        database_url: str,
        name: str,
        *,
        poll_s: float = 1.0,
        check_s: float = 2.0,
        answer_within_s: float = 10.0,
    ) -> None:
        """`poll_s`: how often a standby asks for the lock; `check_s`: how often the holder
        checks its session; `answer_within_s`: how long either waits for an answer."""
        self.name = name
        self.key = lock_key(name)
        self.held = False
        self._url = database_url
        self._poll_s = poll_s
        self._check_s = check_s
        self._answer_within_s = answer_within_s

    async def run(self, work: Callable[[], Awaitable[None]]) -> None:
        """Runs `work` whenever this process holds the lease, until it stops holding it;
        forever (cancel it to stop: `work` is cancelled and the lease released)."""
        while True:
            con: asyncpg.Connection | None = None
            try:
                con = await asyncpg.connect(
                    self._url,
                    server_settings={"application_name": "voicejury-lease"},
                    timeout=self._answer_within_s,
                )
                await con.execute(_KEEPALIVES)
                # Asking again rather than waiting in pg_advisory_lock: a wait on a session
                # that died without a word would never end, and never take over.
                while not await self._try_lock(con):  # noqa: ASYNC110 (a poll, on purpose)
                    await asyncio.sleep(self._poll_s)
                log.info("this replica holds the %s lease", self.name)
                self.held = True
                await self._while_held(con, work)
            # CancelledError is no Exception: cancelling `run` ends it.
            except Exception as exc:  # the database restarting, the work failing
                log.warning("the %s lease is lost or out of reach: %r", self.name, exc)
            finally:
                if self.held:
                    log.info("this replica gives up the %s lease", self.name)
                self.held = False
                if con is not None:
                    # Ending the session releases the lock (also when it is already gone).
                    try:
                        await asyncio.wait_for(con.close(), timeout=5)
                    except Exception:  # no answer: drop the socket, the server lets go
                        con.terminate()
            await asyncio.sleep(self._poll_s)

    async def _try_lock(self, con: asyncpg.Connection) -> bool:
        # Bounded: a half-open connection would otherwise keep a standby from taking over.
        query = con.fetchval("SELECT pg_try_advisory_lock($1)", self.key)
        return bool(await asyncio.wait_for(query, timeout=self._answer_within_s))

    async def _while_held(
        self, con: asyncpg.Connection, work: Callable[[], Awaitable[None]]
    ) -> None:
        """Runs `work` while the lock's session answers; returns (or raises) when it does
        not, or when `work` ends."""
        task = asyncio.ensure_future(work())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self._check_s)
                if done:
                    task.result()  # work never ends by itself: an error ends the term
                    return
                # A session that does not answer may have lost its lock: step down.
                await asyncio.wait_for(con.fetchval("SELECT 1"), timeout=self._answer_within_s)
        finally:
            task.cancel()
            # Bounded: the lease is given up even if the work does not stop as it should.
            done, _ = await asyncio.wait({task}, timeout=_STOP_WAIT_S)
            if not done:
                log.error("the %s lease's work did not stop; giving the lease up", self.name)
            elif not task.cancelled() and task.exception() is not None:
                log.debug("the %s lease's work ended with %r", self.name, task.exception())
