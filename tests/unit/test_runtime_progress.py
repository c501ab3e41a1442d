"""How often a stage's work reports progress: each report is a message on the bus, a row in
the gateway's event log and an SSE frame to every client following the job."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from voicejury_contracts import Stage, StageProgress
from voicejury_runtime.stage import StageContext


class RecordingBus:
    def __init__(self) -> None:
        self.published: list[StageProgress] = []

    async def publish(self, event: StageProgress) -> None:
        self.published.append(event)


def reported(fractions: list[float], min_interval_s: float) -> list[float]:
    bus = RecordingBus()
    service: Any = SimpleNamespace(
        stage=Stage.ASR,
        bus=bus,
        settings=SimpleNamespace(progress_min_interval_s=min_interval_s),
    )

    async def run() -> None:
        ctx = StageContext(service, uuid.uuid4(), 1, Path("."), asyncio.get_running_loop())
        for fraction in fractions:
            await ctx.progress(fraction)

    asyncio.run(run())
    assert [e.seq for e in bus.published] == list(range(len(bus.published)))
    return [e.fraction for e in bus.published]


def test_progress_moves_in_steps_of_at_least_five_percent() -> None:
    fractions = [i / 100 for i in range(101)]
    assert reported(fractions, min_interval_s=0.0) == [i / 20 for i in range(21)]


def test_fast_work_reports_its_start_and_its_end_and_nothing_between() -> None:
    """A second of transcription in ten segments: without the interval it would send ten
    events that cost the other processes more than they tell the singer."""
    fractions = [0.0, *(i / 10 for i in range(1, 11))]
    assert reported(fractions, min_interval_s=3600.0) == [0.0, 1.0]
