"""The watcher that runs beside a stage's work: heartbeats and cancellation polls."""

from __future__ import annotations

import asyncio
import uuid
from types import SimpleNamespace
from typing import Any

from voicejury_runtime.stage import StageService


class Message:
    def __init__(self) -> None:
        self.heartbeats = 0

    async def in_progress(self) -> None:
        self.heartbeats += 1


def test_heartbeats_go_on_while_the_cancel_flags_cannot_be_read() -> None:
    """The cancel flags' bucket out of reach (its stream without quorum, say) while the
    job's consumer still works: the heartbeats must go on, or JetStream would hand the
    message to another replica while this one still works on it."""

    async def unreadable(job_id: object) -> bool:
        raise ConnectionError("cancel flags unavailable")

    service: Any = SimpleNamespace(
        bus=SimpleNamespace(is_cancelled=unreadable),
        settings=SimpleNamespace(heartbeat_s=0.02, cancel_poll_s=0.01, heartbeats=True),
    )
    msg = Message()
    nats_message: Any = msg
    ctx: Any = SimpleNamespace(job_id=uuid.uuid4(), mark_cancelled=lambda: None)

    async def run() -> None:
        stop = asyncio.Event()
        watcher = asyncio.create_task(StageService._watch(service, nats_message, ctx, stop))
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.wait_for(watcher, timeout=5)

    asyncio.run(run())
    assert msg.heartbeats >= 3
