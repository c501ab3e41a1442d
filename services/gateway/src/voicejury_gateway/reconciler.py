"""PostgreSQL is the record of job state; this loop makes sure no accepted job hangs forever.

An event can be lost in ways the bus cannot repair on its own (a stage that crashed on its
last allowed delivery, a consumer deleted by hand, acknowledged writes lost by a broker).
A job that has not moved for `stall_timeout_s` is failed with `job_stalled`, naming the
stage it was waiting on, and its cancel flag is raised so a slow stage stops too. Every
gateway replica runs the loop; `SKIP LOCKED` gives each stalled job to one of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from uuid import UUID

from voicejury_contracts import JobFailed, Stage
from voicejury_runtime.bus import Bus

from .db import JobRepository

log = logging.getLogger(__name__)


class Reconciler:
    def __init__(
        self, repo: JobRepository, bus: Bus, stall_timeout_s: float, interval_s: float
    ) -> None:
        self.repo = repo
        self.bus = bus
        self.stall_timeout_s = stall_timeout_s
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database may be restarting; next round
                log.warning("reconciler sweep failed: %s", exc)
            await asyncio.sleep(self.interval_s)

    async def sweep(self) -> list[UUID]:
        """Fails every stalled job once; returns their ids."""
        failed: list[UUID] = []
        for job_id, stage in await self.repo.stalled_jobs(self.stall_timeout_s):
            event = JobFailed(
                job_id=job_id,
                stage=Stage(stage),
                code="job_stalled",
                message=f"no progress for {self.stall_timeout_s:.0f} s while waiting on {stage}",
                attempts=1,
            )
            if await self.repo.record(event):
                failed.append(job_id)
                log.error("job %s stalled in %s; failed", job_id, stage)
                try:
                    await self.bus.cancel(job_id)
                    await self.bus.publish(event)
                except Exception as exc:  # recorded already; the bus copy is informational
                    log.warning("could not announce stalled job %s: %s", job_id, exc)
        return failed
