"""The SSE wake-up listener (PostgreSQL LISTEN) on a connection that dies in silence.

A node or a proxy gone without a FIN or RST leaves the listening socket open with nothing
coming through: the hub must notice and listen again on a new connection, or every stream
of the replica waits out its keep-alive interval for each event until the process restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from urllib.parse import urlsplit

import asyncpg
import pytest

from tests.conftest import PG_ADMIN_URL

pytestmark = pytest.mark.integration


class FreezableProxy:
    """A TCP relay to PostgreSQL whose current connections can be frozen: kept open, with
    nothing relayed either way, as through a peer that vanished."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.connections = 0
        self._never = asyncio.Event()
        self._frozen_connections: set[int] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def freeze_current(self) -> None:
        self._frozen_connections = set(range(self.connections))

    async def close(self) -> None:
        self._server.close()
        for writer in self._writers:
            writer.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = self.connections
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._writers += [writer, up_writer]

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    if index in self._frozen_connections:  # hold it: no FIN, no data
                        await self._never.wait()
                    dst.write(data)
                    await dst.drain()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))


async def test_a_listener_cut_off_in_silence_listens_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from voicejury_gateway import hub as hub_module
    from voicejury_gateway.db import NOTIFY_CHANNEL
    from voicejury_gateway.hub import EventHub

    monkeypatch.setattr(hub_module, "PROBE_EVERY_S", 1.0)
    parts = urlsplit(PG_ADMIN_URL)
    proxy = FreezableProxy((parts.hostname or "127.0.0.1", parts.port or 5432))
    port = await proxy.start()
    netloc = parts.netloc.rsplit("@", 1)
    via_proxy = parts._replace(
        netloc=(netloc[0] + "@" if len(netloc) == 2 else "") + f"127.0.0.1:{port}"
    ).geturl()
    hub = EventHub(via_proxy)
    notifier = await asyncpg.connect(PG_ADMIN_URL)
    job_id = "job-under-test"

    async def woken_within(seconds: float) -> bool:
        with hub.subscribe(job_id) as waiter:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                waiter.clear()
                await notifier.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, job_id)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waiter.wait(), timeout=0.5)
                    return True
        return False

    try:
        await hub.start()
        assert await woken_within(10), "the listener never heard a notification"
        proxy.freeze_current()
        await asyncio.sleep(0.5)
        assert not await woken_within(0.5)  # the relay is frozen: nothing comes through
        # Probed every second, answering within a second, then a second's pause.
        assert await woken_within(15), "the listener never listened again"
        assert proxy.connections >= 2
    finally:
        await proxy.close()
        with contextlib.suppress(TimeoutError):  # a close waiting on the frozen relay
            await asyncio.wait_for(hub.stop(), timeout=10)
        await notifier.close()
