"""Periodic duties of the gateway: no job hangs forever, no audio is kept forever.

Stalled jobs. PostgreSQL is the record of job state.
An event can be lost in ways the bus cannot repair on its own (a stage that crashed on its
last allowed delivery, a consumer deleted by hand, acknowledged writes lost by a broker).
A job that has not moved for `stall_timeout_s` is re-driven: its `JobSubmitted` is sent
again, marked as a re-drive, and each stage that already did its part sends the same
outputs again (no second run) until the stage whose input was lost runs. After
`max_redrives` re-drives it is failed with `job_stalled`, naming the stage it was waiting
on, and its cancel flag is raised so a slow stage stops too. A job that is only waiting in
line (its stage's consumer still has messages to deliver or to see
acknowledged: a backlog, not a loss) is left alone up to `queue_wait_max_s`. A reference's
preparation (`POST /v1/references`) that stops moving is failed the same way
(`preparation_stalled`). Jobs waiting in line are told apart in the query, so a lost job
is found however many wait ahead of it. A job whose gateway stopped between recording it
and JetStream's ack of its first event (`publish_pending`) is not waiting in any line:
after `unacknowledged_after_s` its first event is published again under the same
`Nats-Msg-Id` (a copy JetStream holds already is dropped), so it runs, and the client's
retry under its Idempotency-Key gets it instead of a 409 for hours. Every gateway replica
runs the loop: a re-drive is counted under the job's row lock only while the job is still
stalled, and recording the failure is idempotent, so a job two replicas both find stalled
is re-driven, or failed, once.

Retention. A finished job's audio (uploads, stems, contours, transcripts under
`jobs/<id>/`) is deleted `audio_retention_s` after it finished; its result stays. Cached
reference analyses (`cache/`) have their own, longer retention, counted from their last
use (`ObjectStore.reuse` restarts an entry's age when a stage reuses it). A stored reference's
original whose last reference was deleted while jobs still used it is deleted once they
have ended. A finished job's progress reports are deleted from its event log
`event_log_retention_s` after it ended; its stage and terminal events stay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from uuid import UUID

from voicejury_contracts import PIPELINE_STAGES, JobFailed, Stage
from voicejury_runtime.bus import Bus
from voicejury_runtime.store import ObjectStore, job_key, reference_key

from .db import JobRepository

log = logging.getLogger(__name__)

# Batches of `JobRepository.compact_event_logs` (100 jobs each) per housekeeping round.
_COMPACTION_BATCHES = 10


class Housekeeper:
    def __init__(
        self,
        repo: JobRepository,
        bus: Bus,
        store: ObjectStore,
        *,
        stall_timeout_s: float,
        queue_wait_max_s: float,
        max_redrives: int,
        audio_retention_s: float,
        cache_retention_s: float,
        interval_s: float,
        unacknowledged_after_s: float = 60.0,
        event_log_retention_s: float = 7 * 24 * 3600.0,
    ) -> None:
        self.repo = repo
        self.bus = bus
        self.store = store
        self.stall_timeout_s = stall_timeout_s
        self.queue_wait_max_s = queue_wait_max_s
        self.max_redrives = max_redrives
        self.audio_retention_s = audio_retention_s
        self.cache_retention_s = cache_retention_s
        self.interval_s = interval_s
        self.unacknowledged_after_s = unacknowledged_after_s
        self.event_log_retention_s = event_log_retention_s
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
            for duty in (
                self.publish_unacknowledged,
                self.fail_stalled,
                self.fail_stalled_preparations,
                self.expire_audio,
                self.compact_event_logs,
            ):
                try:
                    await duty()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the database or store may be restarting
                    log.warning("%s failed: %s", duty.__name__, exc)
            await asyncio.sleep(self.interval_s)

    async def publish_unacknowledged(self) -> list[UUID]:
        """Publishes again the first event of each job JetStream never acknowledged, unless
        it was cancelled (its gateway's refusal raised the flag but could not record the
        failure: the stall bound ends it); returns the ids of those now acknowledged."""
        published: list[UUID] = []
        if not self.bus.connected:  # each publish would wait out its timeout
            return published
        for submitted in await self.repo.unacknowledged_jobs(self.unacknowledged_after_s):
            try:
                if await self.bus.is_cancelled(submitted.job_id):
                    continue
                await self.bus.publish(submitted)
                await self.repo.mark_published(submitted.job_id)
            except Exception as exc:  # the next round tries again
                log.warning("could not publish unacknowledged %s: %r", submitted.job_id, exc)
                continue
            log.warning(
                "%s was never acknowledged (its gateway stopped); published", submitted.job_id
            )
            published.append(submitted.job_id)
        return published

    async def fail_stalled(self) -> list[UUID]:
        """Re-drives every stalled job, or fails it once it has been re-driven
        `max_redrives` times; returns the ids of the jobs it failed."""
        if not await self.repo.stalled_jobs(self.stall_timeout_s, limit=1):
            return []  # nothing idle: no need to ask NATS which stages have a line
        stalled = await self.repo.stalled_jobs(
            self.stall_timeout_s,
            in_line=await self._in_line(),
            queue_wait_max_s=self.queue_wait_max_s,
        )
        to_fail = []
        for job_id, stage, idle_s in stalled:
            redrive = await self.repo.redrive(job_id, self.max_redrives, self.stall_timeout_s)
            if redrive is None:
                continue  # it moved meanwhile (another replica re-drove it, say)
            if redrive.submitted is None:
                to_fail.append((job_id, stage, idle_s))
                continue
            log.warning(
                "%s stalled in %s; re-drive %d of %d",
                job_id,
                stage,
                redrive.number,
                self.max_redrives,
            )
            try:
                await self.bus.publish(redrive.submitted, redrive=redrive.number)
            except Exception as exc:  # counted all the same: the next round tries again
                log.warning("could not re-drive %s: %s", job_id, exc)
        return await self._fail(to_fail, "job_stalled", self.repo.record)

    async def fail_stalled_preparations(self) -> list[UUID]:
        """Fails every stalled reference preparation once; returns their ids."""
        if not await self.repo.stalled_preparations(self.stall_timeout_s, limit=1):
            return []
        stalled = await self.repo.stalled_preparations(
            self.stall_timeout_s,
            in_line=await self._in_line(),
            queue_wait_max_s=self.queue_wait_max_s,
        )
        return await self._fail(stalled, "preparation_stalled", self.repo.record_preparation)

    async def _in_line(self) -> list[str]:
        """The stages whose consumer has a backlog: a job waiting at one may only be
        waiting its turn (up to `queue_wait_max_s`). A stage whose backlog cannot be read
        is treated as idle."""
        busy: list[str] = []
        for stage in PIPELINE_STAGES:
            try:
                backlog = await self.bus.stage_backlog(stage)
            except Exception as exc:
                log.warning("backlog of %s unknown: %s", stage.value, exc)
                continue
            if backlog:
                busy.append(stage.value)
        return busy

    async def _fail(
        self,
        stalled: list[tuple[UUID, str, float]],
        code: str,
        record: Callable[[JobFailed], Awaitable[bool]],
    ) -> list[UUID]:
        """Records the failure of each (id, stage waited on, seconds idle) once; raises its
        cancel flag, so that a slow stage stops too, and announces it on the bus."""
        failed: list[UUID] = []
        for job_id, stage, idle_s in stalled:
            event = JobFailed(
                job_id=job_id,
                stage=Stage(stage),
                code=code,
                message=f"no progress for {idle_s:.0f} s while waiting on {stage}",
                attempts=1,
            )
            if await record(event):
                failed.append(job_id)
                log.error("%s stalled in %s; failed (%s)", job_id, stage, code)
                try:
                    await self.bus.cancel(job_id)
                    await self.bus.publish(event)
                except Exception as exc:  # recorded already; the bus copy is informational
                    log.warning("could not announce stalled %s: %s", job_id, exc)
        return failed

    async def expire_audio(self) -> int:
        """Deletes audio past its retention; returns how many objects went.

        Three sweeps, each job's audio and each original apart: one that the store keeps
        refusing (an object lock, a policy) is logged and tried again next round, and
        holds up neither the jobs after it nor the other sweeps."""
        deleted = 0
        for sweep in (self._expire_job_audio, self._expire_cache, self._release_originals):
            try:
                deleted += await sweep()
            except Exception as exc:  # CancelledError is no Exception
                log.warning("%s failed: %r", sweep.__name__, exc)
        return deleted

    async def compact_event_logs(self) -> int:
        """Deletes the progress reports of jobs ended `event_log_retention_s` ago, at most
        `_COMPACTION_BATCHES` batches a round (the first rounds after an upgrade find a
        backlog; the other duties must not wait for it); returns how many went."""
        deleted = 0
        for _ in range(_COMPACTION_BATCHES):
            deleted += await self.repo.compact_event_logs(self.event_log_retention_s)
        return deleted

    async def _expire_job_audio(self) -> int:
        deleted = 0
        for job_id in await self.repo.audio_expired(self.audio_retention_s):
            try:
                deleted += await self.store.delete_prefix(job_key(job_id))
                await self.repo.mark_audio_deleted(job_id)
            except Exception as exc:
                log.warning("could not delete the audio of %s: %r", job_id, exc)
        return deleted

    async def _expire_cache(self) -> int:
        return await self.store.delete_prefix("cache/", older_than_s=self.cache_retention_s)

    async def _release_originals(self) -> int:
        deleted = 0
        for sha in await self.repo.orphaned_originals():
            try:
                released = await self.repo.release_orphaned_original(
                    sha, lambda sha: self.store.delete_prefix(reference_key(sha, ""))
                )
            except Exception as exc:
                log.warning("could not delete the orphaned original %s: %r", sha, exc)
                continue
            deleted += released.audio_objects_deleted
        return deleted
