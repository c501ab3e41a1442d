"""PostgreSQL: the record of every job's state, its event log (what SSE replays) and results.

Every write that changes a job happens under that job's row lock (`SELECT ... FOR UPDATE`),
which serialises the recorder replicas per job and keeps `job_events.seq` gapless and
committed in order. Event rows carry the bus message's dedup id (`source_id`, unique per
job), so a redelivered event is recorded once.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from voicejury_contracts import (
    PIPELINE_STAGES,
    REFERENCE_STEPS,
    AudioInput,
    Event,
    JobCancelled,
    JobCompleted,
    JobFailed,
    JobOptions,
    JobSubmitted,
    PitchExtracted,
    Scored,
    Stage,
    StageProgress,
    StemsSeparated,
    TranscriptReady,
    preparation_id,
)

NOTIFY_CHANNEL = "vj_job_events"

# A preparation's steps, in order: it is ready once each stage has announced its part.
_STEPS = [stage.value for stage in REFERENCE_STEPS.values()]

# A tenant's references with the state of their audio's preparation.
_REFERENCES = """
    SELECT r.*, p.preparation_id, p.attempt, p.error_stage,
           COALESCE(p.steps_done, '{}') AS steps_done,
           p.prepared_at,
           -- No preparation (a reference of revision 0003 of another kind): failed,
           -- so that uploading it again prepares it.
           COALESCE(p.status, 'failed') AS status,
           CASE WHEN p.sha256 IS NULL THEN 'not_prepared' ELSE p.error_code END
               AS error_code,
           CASE WHEN p.sha256 IS NULL THEN 'never prepared; upload it again'
                ELSE p.error_message END AS error_message
    FROM song_references r
    LEFT JOIN reference_preparations p
        ON p.sha256 = r.sha256 AND p.kind = r.audio->>'kind' AND p.transcript = r.transcript
"""
TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})
TERMINAL_EVENT_TYPES = TERMINAL_STATUSES

# Share of the whole job each stage represents in the overall progress (pitch ∥ asr).
_STAGE_WEIGHTS: dict[Stage, float] = {
    Stage.SEPARATOR: 0.35,
    Stage.PITCH: 0.2,
    Stage.ASR: 0.15,
    Stage.SCORER: 0.1,
    Stage.JURY: 0.2,
}

_COMPLETES: dict[type[Event], Stage] = {
    StemsSeparated: Stage.SEPARATOR,
    PitchExtracted: Stage.PITCH,
    TranscriptReady: Stage.ASR,
    Scored: Stage.SCORER,
    JobCompleted: Stage.JURY,
}


async def _init_connection(con: asyncpg.Connection) -> None:
    for typ in ("json", "jsonb"):
        await con.set_type_codec(typ, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def create_pool(database_url: str, size: int) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        database_url, min_size=1, max_size=size, init=_init_connection, command_timeout=30
    )
    assert pool is not None
    return pool


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Redrive:
    """A stalled job's re-drive: its `number`, and the job as submitted, to send again;
    `submitted` is None when the job has had every re-drive (`number` of them)."""

    submitted: JobSubmitted | None
    number: int


class BacklogFullError(Exception):
    """More live jobs than the configured bound: the submission must be refused."""


class TenantBacklogFullError(Exception):
    """The tenant already has its bound of live jobs: the submission must be refused."""


class ReferenceGoneError(Exception):
    """The stored reference a job was given was deleted before the job was recorded."""


@dataclass(frozen=True)
class IdempotentJob:
    job_id: UUID
    status: str
    request_sha256: str | None
    # JetStream has not yet acknowledged the job's first event (see `insert_job`).
    publish_pending: bool = False


@dataclass(frozen=True)
class Page:
    """One page of a keyset-paginated list, newest first: `rows`, the tenant's `total`, and
    whether rows older than the last one exist (`more`)."""

    rows: list[dict[str, Any]]
    total: int
    more: bool


# Where a page starts: strictly after this row (its created_at and id) in the list's order.
PageAfter = tuple[datetime, Any] | None


@dataclass(frozen=True)
class ReferenceDeletion:
    audio_objects_deleted: int
    # Jobs and preparations still running on the audio: its original goes when they end.
    audio_in_use_by: int


# Work that still downloads a stored reference original: live jobs given the reference
# (their inputs point at `references/<sha256>/`) and a preparation of that audio under way.
_ORIGINAL_USERS = """
SELECT (SELECT count(*) FROM jobs
        WHERE status IN ('queued', 'running')
          AND inputs #>> '{reference,original,sha256}' = $1
          AND inputs #>> '{reference,original,key}' LIKE 'references/%')
     + (SELECT count(*) FROM reference_preparations
        WHERE sha256 = $1 AND status = 'preparing')
"""


# Events read from the log at once (an SSE stream's page).
EVENT_PAGE = 500

_COUNT_ACTIVE = """
SELECT count(*) FROM jobs
WHERE status IN ('queued', 'running') AND ($1::text IS NULL OR tenant = $1)
"""

# Serialises the backlog check and the insert across gateway replicas (one bigint key).
_BACKLOG_LOCK = 0x564A_4241_434B


@dataclass(frozen=True)
class StoredEvent:
    seq: int
    type: str
    data: dict[str, Any]


def _submitted(row: Mapping[str, Any]) -> JobSubmitted:
    """A job's first event, from its row (`id`, `tenant`, `options`, `inputs`)."""
    return JobSubmitted(
        job_id=row["id"],
        tenant=row["tenant"],
        performance=AudioInput.model_validate(row["inputs"]["performance"]),
        reference=AudioInput.model_validate(row["inputs"]["reference"]),
        options=JobOptions.model_validate(row["options"]),
    )


class JobRepository:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    # -- API keys ----------------------------------------------------------------------

    async def create_api_key(self, tenant: str) -> str:
        """Creates a key for `tenant`; only its sha256 is stored, the key is shown once."""
        key = "vj_" + secrets.token_urlsafe(32)
        await self.pool.execute(
            "INSERT INTO api_keys (key_sha256, tenant) VALUES ($1, $2)", hash_api_key(key), tenant
        )
        return key

    async def tenant_for_key(self, key: str) -> str | None:
        tenant: str | None = await self.pool.fetchval(
            "SELECT tenant FROM api_keys WHERE key_sha256 = $1 AND revoked_at IS NULL",
            hash_api_key(key),
        )
        return tenant

    # -- jobs --------------------------------------------------------------------------

    async def find_idempotent(self, tenant: str, idempotency_key: str) -> IdempotentJob | None:
        """The job the tenant submitted with this key, with its status and the fingerprint
        of the request that made it (None for jobs recorded before fingerprints were)."""
        row = await self.pool.fetchrow(
            """
            SELECT id, status, request_sha256, publish_pending FROM jobs
            WHERE tenant = $1 AND idempotency_key = $2
            """,
            tenant,
            idempotency_key,
        )
        if row is None:
            return None
        return IdempotentJob(
            row["id"], row["status"], row["request_sha256"], row["publish_pending"]
        )

    async def release_idempotency_key(self, job_id: UUID) -> None:
        """Frees a job's Idempotency-Key: the job was refused (never queued), so the
        client's retry with that key must submit anew, not find the refused job."""
        await self.pool.execute("UPDATE jobs SET idempotency_key = NULL WHERE id = $1", job_id)

    async def release_unqueued_key(self, job_id: UUID) -> bool:
        """Frees the Idempotency-Key of a job that ended without its first event ever being
        acknowledged (its submission never got a 202); False when the job is not such a
        job (any more)."""
        status: str = await self.pool.execute(
            "UPDATE jobs SET idempotency_key = NULL WHERE id = $1 AND publish_pending "
            "AND status IN ('completed', 'failed', 'cancelled')",
            job_id,
        )
        return not status.endswith(" 0")

    async def mark_published(self, job_id: UUID) -> None:
        """JetStream acknowledged the job's first event: a retry under its key gets it."""
        await self.pool.execute(
            "UPDATE jobs SET publish_pending = false WHERE id = $1 AND publish_pending", job_id
        )

    async def insert_job(
        self,
        submitted: JobSubmitted,
        idempotency_key: str | None,
        *,
        max_active: int,
        max_active_per_tenant: int | None = None,
        request_sha256: str | None = None,
        reference_id: str | None = None,
    ) -> UUID | None:
        """Records a queued job; on an idempotency-key race returns the job that won, or
        None when that job was refused meanwhile (which releases its key).

        Raises BacklogFullError when `max_active` live jobs already exist, and
        TenantBacklogFullError when the tenant has `max_active_per_tenant` (if given): the
        counts and the insert happen under one advisory lock, so concurrent submissions
        cannot all slip under the bounds. `request_sha256`: the fingerprint of the request
        `idempotency_key` stands for (see `find_idempotent`). `reference_id`: the tenant's
        stored reference the job was given; raises ReferenceGoneError if it was deleted
        meanwhile (checked under the lock `delete_reference` takes, so a deletion either
        sees this job or refuses it).

        The job is recorded `publish_pending` (see `mark_published`). Its `created_at` is
        the clock under the backlog lock, which every insert holds until it commits, so
        jobs are dated in the order they commit: a job committed after a page of
        `list_jobs` was read is newer than everything on it and lands on top, never
        between pages already read."""
        inputs = {
            "performance": submitted.performance.model_dump(mode="json"),
            "reference": submitted.reference.model_dump(mode="json"),
        }
        async with self.pool.acquire() as con, con.transaction():
            if reference_id is not None:
                # The audio's lock before the backlog's: a deletion holds the former while
                # it deletes the original from the object store, and a job waiting for it
                # must not hold every other submission behind it meanwhile. Only this
                # method takes both, so the order cannot deadlock.
                await _lock_audio(con, submitted.reference.original.sha256)
                if not await con.fetchval(
                    "SELECT 1 FROM song_references WHERE tenant = $1 AND id = $2",
                    submitted.tenant,
                    reference_id,
                ):
                    raise ReferenceGoneError(reference_id)
            await con.execute("SELECT pg_advisory_xact_lock($1)", _BACKLOG_LOCK)
            active: int = await con.fetchval(_COUNT_ACTIVE, None)
            if active >= max_active:
                raise BacklogFullError(f"{active} jobs in progress")
            mine: int = await con.fetchval(_COUNT_ACTIVE, submitted.tenant)
            if max_active_per_tenant is not None and mine >= max_active_per_tenant:
                raise TenantBacklogFullError(f"{mine} jobs of {submitted.tenant} in progress")
            inserted: UUID | None = await con.fetchval(
                """
                INSERT INTO jobs
                    (id, tenant, status, options, inputs, idempotency_key, request_sha256,
                     publish_pending, created_at)
                VALUES ($1, $2, 'queued', $3, $4, $5, $6, true, clock_timestamp())
                ON CONFLICT (tenant, idempotency_key) DO NOTHING
                RETURNING id
                """,
                submitted.job_id,
                submitted.tenant,
                submitted.options.model_dump(mode="json"),
                inputs,
                idempotency_key,
                request_sha256,
            )
            if inserted is None:
                assert idempotency_key is not None
                existing = await self.find_idempotent(submitted.tenant, idempotency_key)
                # None: the winner was refused since our insert and released its key.
                return None if existing is None else existing.job_id
            await con.executemany(
                "INSERT INTO job_stages (job_id, stage, status) VALUES ($1, $2, 'pending')",
                [(submitted.job_id, stage.value) for stage in PIPELINE_STAGES],
            )
        return submitted.job_id

    async def delete_job(self, job_id: UUID) -> None:
        await self.pool.execute("DELETE FROM jobs WHERE id = $1", job_id)

    async def get_job(self, tenant: str, job_id: UUID) -> dict[str, Any] | None:
        row = await self.pool.fetchrow(
            "SELECT * FROM jobs WHERE id = $1 AND tenant = $2", job_id, tenant
        )
        if row is None:
            return None
        stages = await self.pool.fetch(
            "SELECT * FROM job_stages WHERE job_id = $1 ORDER BY started_at NULLS LAST", job_id
        )
        job = dict(row)
        job["stages"] = [dict(s) for s in stages]
        return job

    async def list_jobs(
        self,
        tenant: str,
        limit: int,
        after: PageAfter = None,
        statuses: Sequence[str] = (),
    ) -> Page:
        """The tenant's jobs, newest first, `limit` of them after the row `after` (keyset
        pagination: jobs submitted between two page reads neither repeat nor shift a
        page, as they would with an offset); only those in `statuses` when given, and
        `total` counts those."""
        columns = "id, status, progress, created_at, updated_at, finished_at, error_code"
        return await self._page(
            f"SELECT {columns} FROM jobs", "jobs", tenant, limit, after, statuses=statuses
        )

    async def _page(
        self,
        select: str,
        table: str,
        tenant: str,
        limit: int,
        after: PageAfter,
        alias: str = "",
        statuses: Sequence[str] = (),
    ) -> Page:
        # (created_at DESC, id) is the order of the index jobs_tenant_created; the bound is
        # written so that the index's created_at range applies.
        a = f"{alias}." if alias else ""
        counted = ["tenant = $1"]
        args: list[Any] = [tenant]
        if statuses:
            args.append(list(statuses))
            counted.append(f"status = ANY(${len(args)}::text[])")
        total: int = await self.pool.fetchval(
            f"SELECT count(*) FROM {table} WHERE {' AND '.join(counted)}", *args
        )
        where = [f"{a}{condition}" for condition in counted]
        if after is not None:
            args += after
            at, key = f"${len(args) - 1}", f"${len(args)}"
            where.append(f"{a}created_at <= {at} AND ({a}created_at < {at} OR {a}id > {key})")
        args.append(limit + 1)
        rows = await self.pool.fetch(
            f"{select} WHERE {' AND '.join(where)} "
            f"ORDER BY {a}created_at DESC, {a}id LIMIT ${len(args)}",
            *args,
        )
        return Page([dict(r) for r in rows[:limit]], total, len(rows) > limit)

    async def get_result(self, job_id: UUID) -> dict[str, Any] | None:
        result: dict[str, Any] | None = await self.pool.fetchval(
            "SELECT result FROM job_results WHERE job_id = $1", job_id
        )
        return result

    async def count_active(self, tenant: str | None = None) -> int:
        """Live (queued or running) jobs: all of them, or one tenant's."""
        count: int = await self.pool.fetchval(_COUNT_ACTIVE, tenant)
        return count

    async def redrive(
        self, job_id: UUID, max_redrives: int, stalled_after_s: float
    ) -> Redrive | None:
        """Counts one more re-drive of a job still stalled (no move for `stalled_after_s`)
        and restarts its stall clock. None when the job ended or moved since it was found
        stalled (another gateway replica's housekeeper re-drove it, say): nothing to do."""
        async with self.pool.acquire() as con, con.transaction():
            redrives: int | None = await con.fetchval(
                "SELECT redrives FROM jobs WHERE id = $1 AND status IN ('queued', 'running') "
                "AND updated_at < now() - make_interval(secs => $2) FOR UPDATE",
                job_id,
                stalled_after_s,
            )
            if redrives is None:
                return None
            if redrives >= max_redrives:
                return Redrive(None, redrives)
            row = await con.fetchrow(
                "UPDATE jobs SET redrives = redrives + 1, updated_at = now() WHERE id = $1 "
                "RETURNING id, tenant, options, inputs, redrives",
                job_id,
            )
        return Redrive(_submitted(row), int(row["redrives"]))

    async def unacknowledged_jobs(
        self, older_than_s: float, limit: int = 100
    ) -> list[JobSubmitted]:
        """Queued jobs whose first event JetStream has not acknowledged for `older_than_s`
        (`publish_pending`): their gateway stopped between recording them and the ack,
        so nobody may know whether they were published. Their first events, to publish
        again: under the same `Nats-Msg-Id`, JetStream drops the copy of one it holds."""
        rows = await self.pool.fetch(
            "SELECT id, tenant, options, inputs FROM jobs WHERE publish_pending "
            "AND status = 'queued' AND created_at < now() - make_interval(secs => $1) "
            "ORDER BY created_at LIMIT $2",
            older_than_s,
            limit,
        )
        return [_submitted(row) for row in rows]

    async def stalled_jobs(
        self,
        older_than_s: float,
        *,
        in_line: Sequence[str] = (),
        queue_wait_max_s: float = 0.0,
        limit: int = 100,
    ) -> list[tuple[UUID, str, float]]:
        """Live jobs untouched for `older_than_s`: id, the first stage not yet done, and
        seconds since the job last moved; oldest first. A job waiting at one of the
        `in_line` stages (those with a backlog) is only waiting its turn: it counts once
        untouched for `queue_wait_max_s`. Filtered here, before the limit, so that a
        lost job is found however many jobs wait in line ahead of it."""
        rows = await self.pool.fetch(
            """
            SELECT j.id, extract(epoch FROM now() - j.updated_at)::float8 AS idle_s,
                   w.stage
            FROM jobs j
            CROSS JOIN LATERAL (
                SELECT COALESCE((SELECT s.stage FROM job_stages s
                                 WHERE s.job_id = j.id AND s.status IN ('pending', 'running')
                                 ORDER BY array_position($3::text[], s.stage) LIMIT 1),
                                'gateway') AS stage
            ) w
            WHERE j.status IN ('queued', 'running')
              AND j.updated_at < now() - make_interval(secs => $1)
              AND (NOT w.stage = ANY($4::text[])
                   OR j.updated_at < now() - make_interval(secs => $5))
            ORDER BY j.updated_at
            LIMIT $2
            FOR UPDATE OF j SKIP LOCKED
            """,
            older_than_s,
            limit,
            [stage.value for stage in PIPELINE_STAGES],
            list(in_line),
            queue_wait_max_s,
        )
        return [(r["id"], r["stage"], r["idle_s"]) for r in rows]

    async def audio_expired(self, older_than_s: float, limit: int = 100) -> list[UUID]:
        """Finished jobs whose audio outlived the retention and is still stored."""
        rows = await self.pool.fetch(
            "SELECT id FROM jobs WHERE audio_deleted_at IS NULL AND finished_at IS NOT NULL "
            "AND finished_at < now() - make_interval(secs => $1) ORDER BY finished_at LIMIT $2",
            older_than_s,
            limit,
        )
        return [r["id"] for r in rows]

    async def compact_event_logs(self, older_than_s: float, limit: int = 100) -> int:
        """Deletes the progress reports of up to `limit` jobs that ended more than
        `older_than_s` ago and marks them compacted; returns how many rows went. Their
        stage and terminal events stay: a stream opened later replays what happened."""
        deleted: int = await self.pool.fetchval(
            """
            WITH due AS (
                SELECT id FROM jobs
                WHERE events_compacted_at IS NULL AND finished_at IS NOT NULL
                  AND finished_at < now() - make_interval(secs => $1)
                ORDER BY finished_at LIMIT $2
                FOR UPDATE SKIP LOCKED
            ), gone AS (
                DELETE FROM job_events e USING due
                WHERE e.job_id = due.id AND e.type = 'progress'
                RETURNING 1
            ), marked AS (
                UPDATE jobs SET events_compacted_at = now() FROM due WHERE jobs.id = due.id
                RETURNING 1
            )
            SELECT count(*) FROM gone
            """,
            older_than_s,
            limit,
        )
        return deleted

    async def mark_audio_deleted(self, job_id: UUID) -> None:
        await self.pool.execute(
            "UPDATE jobs SET audio_deleted_at = now() WHERE id = $1 AND audio_deleted_at IS NULL",
            job_id,
        )

    async def stage_details(self, job_id: UUID, stage: Stage) -> dict[str, Any] | None:
        """What a stage left for the API (object references), once it has completed."""
        details: dict[str, Any] | None = await self.pool.fetchval(
            "SELECT details FROM job_stages WHERE job_id = $1 AND stage = $2", job_id, stage.value
        )
        return details

    async def last_event_seq(self, job_id: UUID) -> int:
        """The id of the job's newest event (0: none yet)."""
        seq: int = await self.pool.fetchval(
            "SELECT COALESCE(max(seq), 0) FROM job_events WHERE job_id = $1", job_id
        )
        return seq

    async def events_after(
        self, job_id: UUID, seq: int, limit: int = EVENT_PAGE
    ) -> list[StoredEvent]:
        rows = await self.pool.fetch(
            "SELECT seq, type, data FROM job_events WHERE job_id = $1 AND seq > $2 "
            "ORDER BY seq LIMIT $3",
            job_id,
            seq,
            limit,
        )
        return [StoredEvent(r["seq"], r["type"], r["data"]) for r in rows]

    # -- references --------------------------------------------------------------------

    async def prepare_reference(
        self, tenant: str, reference_id: str, audio: AudioInput, meta: dict[str, Any]
    ) -> tuple[dict[str, Any], UUID | None]:
        """Records a tenant's reference (once: the same audio gives the same id) and the
        preparation of its audio, kind and transcript need (`song_references.transcript`):
        started when there is none, started again (a new attempt) when the last one failed,
        else shared with whoever started it. Returns the reference as `get_reference` does,
        and the preparation id to announce on the bus (None: one is under way or done)."""
        async with self.pool.acquire() as con, con.transaction():
            # Against a concurrent deletion of the last reference to this audio: see
            # `delete_reference`. The caller checks the original is still stored after this.
            await _lock_audio(con, audio.original.sha256)
            await con.execute(
                """
                INSERT INTO song_references (tenant, id, sha256, audio, title, artist, lyrics,
                    language, created_at)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, clock_timestamp())
                ON CONFLICT (tenant, id) DO NOTHING
                """,
                tenant,
                reference_id,
                audio.original.sha256,
                audio.model_dump(mode="json"),
                meta.get("title"),
                meta.get("artist"),
                meta.get("lyrics"),
                meta.get("language"),
            )
            # Held by a reference now: no longer the upload's to clean up (`mark_upload`).
            await con.execute(
                "DELETE FROM orphaned_originals WHERE sha256 = $1", audio.original.sha256
            )
            reference = await con.fetchrow(
                "SELECT audio, transcript FROM song_references WHERE tenant = $1 AND id = $2",
                tenant,
                reference_id,
            )
            stored = AudioInput.model_validate(reference["audio"])
            sha, kind, transcript = stored.original.sha256, stored.kind, reference["transcript"]
            current = await con.fetchrow(
                "SELECT attempt, status FROM reference_preparations "
                "WHERE sha256 = $1 AND kind = $2 AND transcript = $3 FOR UPDATE",
                sha,
                kind.value,
                transcript,
            )
            announce: UUID | None = None
            if current is None:
                announce = await con.fetchval(
                    "INSERT INTO reference_preparations (sha256, kind, transcript, "
                    "preparation_id, status) VALUES ($1, $2, $3, $4, 'preparing') "
                    "ON CONFLICT (sha256, kind, transcript) DO NOTHING "
                    "RETURNING preparation_id",
                    sha,
                    kind.value,
                    transcript,
                    preparation_id(sha, kind, transcript=transcript),
                )  # None: a concurrent first upload won; its announcement stands
            elif current["status"] == "failed":
                attempt = current["attempt"] + 1
                announce = preparation_id(sha, kind, attempt, transcript)
                await con.execute(
                    """
                    UPDATE reference_preparations SET preparation_id = $4, attempt = $5,
                        status = 'preparing', steps_done = '{}', error_code = NULL,
                        error_message = NULL, error_stage = NULL, prepared_at = NULL,
                        updated_at = now()
                    WHERE sha256 = $1 AND kind = $2 AND transcript = $3
                    """,
                    sha,
                    kind.value,
                    transcript,
                    announce,
                    attempt,
                )
        row = await self.get_reference(tenant, reference_id)
        assert row is not None
        return row, announce

    async def get_reference(self, tenant: str, reference_id: str) -> dict[str, Any] | None:
        """A tenant's reference with the state of its audio's preparation."""
        row = await self.pool.fetchrow(
            f"{_REFERENCES} WHERE r.tenant = $1 AND r.id = $2", tenant, reference_id
        )
        return dict(row) if row else None

    async def list_references(self, tenant: str, limit: int, after: PageAfter = None) -> Page:
        """The tenant's references, newest first, as `list_jobs`."""
        return await self._page(_REFERENCES, "song_references", tenant, limit, after, "r")

    async def delete_reference(
        self, tenant: str, reference_id: str, delete_audio: Callable[[str], Awaitable[int]]
    ) -> ReferenceDeletion | None:
        """Deletes a tenant's reference; None when it has none by that id. With the last
        tenant's reference to that audio goes its stored original (`delete_audio(sha256)`,
        which returns how many objects went), or, while jobs or the preparation still use
        it, as soon as they end (`release_orphaned_original`). Under the audio's lock, which
        uploads share, so that an upload of the same audio at that moment finds the
        original gone and stores it again. Its preparation's caches stay, for their own
        retention."""
        async with self.pool.acquire() as con, con.transaction():
            sha = await con.fetchval(
                "SELECT sha256 FROM song_references WHERE tenant = $1 AND id = $2",
                tenant,
                reference_id,
            )
            if sha is None:
                return None
            await _lock_audio(con, sha)  # before the row, in the order uploads take them
            if not await con.fetchval(
                "DELETE FROM song_references WHERE tenant = $1 AND id = $2 RETURNING 1",
                tenant,
                reference_id,
            ):
                return None  # a concurrent deletion won
            return await _release_original(con, sha, delete_audio)

    async def mark_upload(self, sha256: str, grace_s: float) -> None:
        """Lists an original about to be stored in `orphaned_originals`, due in `grace_s`:
        `prepare_reference` drops it when it records the reference, and should the upload
        fail before that, the housekeeper deletes the original unless something holds it."""
        await self.pool.execute(
            "INSERT INTO orphaned_originals (sha256, not_before) "
            "VALUES ($1, now() + make_interval(secs => $2)) ON CONFLICT (sha256) "
            "DO UPDATE SET not_before = GREATEST(orphaned_originals.not_before, "
            "EXCLUDED.not_before)",
            sha256,
            grace_s,
        )

    async def orphaned_originals(self, limit: int = 100) -> list[str]:
        """Content hashes of stored originals whose last reference went while in use, or
        whose upload failed before its reference was recorded (once due)."""
        rows = await self.pool.fetch(
            "SELECT sha256 FROM orphaned_originals WHERE not_before <= now() "
            "ORDER BY orphaned_at LIMIT $1",
            limit,
        )
        return [r["sha256"] for r in rows]

    async def release_orphaned_original(
        self, sha256: str, delete_audio: Callable[[str], Awaitable[int]]
    ) -> ReferenceDeletion:
        """Deletes an orphaned original once nothing uses it; forgets it if a tenant holds
        the audio again."""
        async with self.pool.acquire() as con, con.transaction():
            await _lock_audio(con, sha256)
            return await _release_original(con, sha256, delete_audio)

    async def record_preparation(self, event: Event) -> bool:
        """A step of a reference's preparation finished (or failed); the preparation (and
        every tenant's reference to its audio) is ready once every step of
        `REFERENCE_STEPS` is. Events of an earlier attempt match nothing."""
        if (step := REFERENCE_STEPS.get(type(event))) is not None:
            status = await self.pool.execute(
                """
                UPDATE reference_preparations SET
                    -- Expressions of the row itself, so that two steps recorded at once
                    -- (pitch and asr) both count: the second sees the first's update.
                    steps_done = ARRAY(SELECT DISTINCT s
                                       FROM unnest(array_append(steps_done, $2)) AS s
                                       ORDER BY s),
                    status = CASE WHEN array_append(steps_done, $2) @> $3::text[]
                                  THEN 'ready' ELSE status END,
                    prepared_at = CASE WHEN array_append(steps_done, $2) @> $3::text[]
                                       THEN now() ELSE prepared_at END,
                    updated_at = now()
                WHERE preparation_id = $1 AND status = 'preparing'
                  AND NOT $2 = ANY(steps_done)
                """,
                event.job_id,
                step.value,
                _STEPS,
            )
        elif isinstance(event, JobFailed):
            status = await self.pool.execute(
                "UPDATE reference_preparations SET status = 'failed', error_code = $2, "
                "error_message = $3, error_stage = $4, updated_at = now() "
                "WHERE preparation_id = $1 AND status = 'preparing'",
                event.job_id,
                event.code,
                event.message,
                event.stage.value,
            )
        elif isinstance(event, StageProgress):  # still moving: not stalled
            status = await self.pool.execute(
                "UPDATE reference_preparations SET updated_at = now() "
                "WHERE preparation_id = $1 AND status = 'preparing'",
                event.job_id,
            )
        else:
            return False
        return not status.endswith(" 0")

    async def stalled_preparations(
        self,
        older_than_s: float,
        *,
        in_line: Sequence[str] = (),
        queue_wait_max_s: float = 0.0,
        limit: int = 100,
    ) -> list[tuple[UUID, str, float]]:
        """Preparations untouched for `older_than_s`: id, the first step not yet done, and
        seconds since the preparation last moved; `in_line` and `queue_wait_max_s` as for
        `stalled_jobs`."""
        rows = await self.pool.fetch(
            """
            SELECT p.preparation_id,
                   extract(epoch FROM now() - p.updated_at)::float8 AS idle_s, w.stage
            FROM reference_preparations p
            CROSS JOIN LATERAL (
                SELECT COALESCE((SELECT s FROM unnest($2::text[]) WITH ORDINALITY AS t(s, n)
                                 WHERE NOT s = ANY(p.steps_done) ORDER BY n LIMIT 1),
                                $4) AS stage
            ) w
            WHERE p.status = 'preparing' AND p.updated_at < now() - make_interval(secs => $1)
              AND (NOT w.stage = ANY($5::text[])
                   OR p.updated_at < now() - make_interval(secs => $6))
            ORDER BY p.updated_at
            LIMIT $3
            """,
            older_than_s,
            _STEPS,
            limit,
            Stage.SEPARATOR.value,
            list(in_line),
            queue_wait_max_s,
        )
        return [(r["preparation_id"], r["stage"], r["idle_s"]) for r in rows]

    # -- state transitions -------------------------------------------------------------

    async def cancel(self, job_id: UUID, event: JobCancelled) -> str:
        """Marks a live job cancelled (terminal event included); returns its final status."""
        async with self.pool.acquire() as con, con.transaction():
            status: str = await con.fetchval(
                "SELECT status FROM jobs WHERE id = $1 FOR UPDATE", job_id
            )
            if status in TERMINAL_STATUSES:
                return status
            await con.execute(
                "UPDATE job_stages SET status = 'cancelled', finished_at = now() "
                "WHERE job_id = $1 AND status IN ('pending', 'running')",
                job_id,
            )
            await self._finish(con, job_id, "cancelled")
            await self._append(
                con, job_id, event.dedup_id(), [("cancelled", {"reason": event.reason})]
            )
            return "cancelled"

    async def record(self, event: Event) -> bool:
        """Applies one bus event to the job's state; False when it changed nothing."""
        async with self.pool.acquire() as con, con.transaction():
            status: str | None = await con.fetchval(
                "SELECT status FROM jobs WHERE id = $1 FOR UPDATE", event.job_id
            )
            if status is None:
                return False
            if status in TERMINAL_STATUSES:
                # The recorder records a fetched batch at once and replicas share its
                # consumer, so a stage's output can reach PostgreSQL after the terminal
                # event it led to (Scored after JobCompleted): its stage state and details
                # (the aligned pitch) still count, without an SSE event after the terminal.
                if status == "completed" and not isinstance(event, JobCompleted):
                    await self._complete_stage(con, event)
                return False
            source_id = event.dedup_id()
            if await con.fetchval(
                "SELECT 1 FROM job_events WHERE job_id = $1 AND source_id = $2",
                event.job_id,
                source_id,
            ):
                return False
            sse = await self._apply(con, event)
            if not sse:
                return False
            await self._append(con, event.job_id, source_id, sse)
            return True

    async def _apply(
        self, con: asyncpg.Connection, event: Event
    ) -> list[tuple[str, dict[str, Any]]]:
        job_id = event.job_id
        match event:
            case StageProgress():
                return await self._progress(con, event)
            case JobFailed():
                await con.execute(
                    "UPDATE job_stages SET status = 'failed', attempts = GREATEST(attempts, $3), "
                    "finished_at = now() WHERE job_id = $1 AND stage = $2",
                    job_id,
                    event.stage.value,
                    event.attempts,
                )
                await con.execute(
                    "UPDATE jobs SET error_code = $2, error_message = $3, error_stage = $4 "
                    "WHERE id = $1",
                    job_id,
                    event.code,
                    event.message,
                    event.stage.value,
                )
                await self._finish(con, job_id, "failed")
                data = {
                    "code": event.code,
                    "message": event.message,
                    "stage": event.stage.value,
                    "attempts": event.attempts,
                }
                return [("failed", data)]
            case JobCancelled():
                await self._finish(con, job_id, "cancelled")
                return [("cancelled", {"reason": event.reason})]
            case JobSubmitted():
                # Its own first event come back: JetStream did acknowledge it, whatever
                # became of the gateway that published it (see `insert_job`).
                await con.execute(
                    "UPDATE jobs SET publish_pending = false WHERE id = $1 AND publish_pending",
                    job_id,
                )
                return []
        completed = await self._complete_stage(con, event)
        if completed is None:
            return []
        stage, status = completed
        overall = await self._overall_progress(con, job_id)
        await con.execute(
            "UPDATE jobs SET status = 'running', progress = $2, updated_at = now() WHERE id = $1",
            job_id,
            overall,
        )
        out: list[tuple[str, dict[str, Any]]] = [
            ("stage", {"stage": stage.value, "status": status})
        ]
        if isinstance(event, JobCompleted):
            await con.execute(
                "INSERT INTO job_results (job_id, result) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                job_id,
                event.result.model_dump(mode="json"),
            )
            await self._finish(con, job_id, "completed")
            out.append(("completed", {"score": event.result.score}))
        return out

    @staticmethod
    async def _complete_stage(con: asyncpg.Connection, event: Event) -> tuple[Stage, str] | None:
        """Marks the stage whose output `event` is done (with the details later requests
        read); returns the stage and its status, or None when `event` completes no stage."""
        stage = _COMPLETES.get(type(event))
        if stage is None:
            return None
        skipped = isinstance(event, TranscriptReady) and event.performance is None
        if isinstance(event, JobCompleted) and event.result.jury is None:
            skipped = True
        status = "skipped" if skipped else "completed"
        details = None
        if isinstance(event, StemsSeparated):
            details = {
                "performance": event.performance.model_dump(mode="json"),
                "reference": event.reference.model_dump(mode="json"),
            }
        elif isinstance(event, Scored) and event.aligned_pitch is not None:
            details = {"aligned_pitch": event.aligned_pitch.model_dump(mode="json")}
        await con.execute(
            "UPDATE job_stages SET status = $3, progress = 1, finished_at = now(), "
            "started_at = COALESCE(started_at, now()), attempts = GREATEST(attempts, 1), "
            "details = COALESCE($4, details) WHERE job_id = $1 AND stage = $2",
            event.job_id,
            stage.value,
            status,
            details,
        )
        return stage, status

    async def _progress(
        self, con: asyncpg.Connection, event: StageProgress
    ) -> list[tuple[str, dict[str, Any]]]:
        row = await con.fetchrow(
            "SELECT status, attempts, progress FROM job_stages WHERE job_id = $1 AND stage = $2",
            event.job_id,
            event.stage.value,
        )
        if row is None or row["status"] not in ("pending", "running"):
            return []  # late progress of a finished stage
        if event.attempt < row["attempts"]:
            return []  # a superseded attempt still reporting
        # An attempt only reports growing fractions: an earlier report recorded after a later
        # one (the recorder records a batch at once) would move progress back. The column is
        # a float4, hence the margin (an equal fraction with a new message still counts).
        if event.attempt == row["attempts"] and event.fraction < row["progress"] - 1e-6:
            return []
        out: list[tuple[str, dict[str, Any]]] = []
        if row["status"] == "pending" or event.attempt > row["attempts"]:
            out.append(
                (
                    "stage",
                    {"stage": event.stage.value, "status": "running", "attempt": event.attempt},
                )
            )
        await con.execute(
            "UPDATE job_stages SET status = 'running', progress = $3, attempts = $4, "
            "started_at = COALESCE(started_at, now()) WHERE job_id = $1 AND stage = $2",
            event.job_id,
            event.stage.value,
            event.fraction,
            event.attempt,
        )
        overall = await self._overall_progress(con, event.job_id)
        await con.execute(
            "UPDATE jobs SET status = 'running', progress = $2, updated_at = now() WHERE id = $1",
            event.job_id,
            overall,
        )
        out.append(
            (
                "progress",
                {
                    "stage": event.stage.value,
                    "fraction": event.fraction,
                    "progress": round(overall, 3),
                    "message": event.message,
                },
            )
        )
        return out

    @staticmethod
    async def _overall_progress(con: asyncpg.Connection, job_id: UUID) -> float:
        rows = await con.fetch(
            "SELECT stage, status, progress FROM job_stages WHERE job_id = $1", job_id
        )
        total = 0.0
        for r in rows:
            done = 1.0 if r["status"] in ("completed", "skipped") else float(r["progress"])
            total += _STAGE_WEIGHTS.get(Stage(r["stage"]), 0.0) * done
        return min(total, 1.0)

    @staticmethod
    async def _finish(con: asyncpg.Connection, job_id: UUID, status: str) -> None:
        await con.execute(
            "UPDATE jobs SET status = $2, finished_at = now(), updated_at = now(), "
            "progress = CASE WHEN $2 = 'completed' THEN 1 ELSE progress END WHERE id = $1",
            job_id,
            status,
        )

    @staticmethod
    async def _append(
        con: asyncpg.Connection,
        job_id: UUID,
        source_id: str,
        events: Iterable[tuple[str, dict[str, Any]]],
    ) -> None:
        seq: int = await con.fetchval("SELECT event_seq FROM jobs WHERE id = $1", job_id)
        for i, (typ, data) in enumerate(events):
            seq += 1
            await con.execute(
                "INSERT INTO job_events (job_id, seq, type, data, source_id) "
                "VALUES ($1, $2, $3, $4, $5)",
                job_id,
                seq,
                typ,
                data,
                source_id if i == 0 else f"{source_id}#{i}",
            )
        await con.execute("UPDATE jobs SET event_seq = $2 WHERE id = $1", job_id, seq)
        # Delivered at commit, so a listener never reads before the rows are visible.
        await con.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, str(job_id))


async def _lock_audio(con: asyncpg.Connection, sha256: str) -> None:
    """The transaction's lock on one audio's stored original and the references to it."""
    await con.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", sha256)


async def _release_original(
    con: asyncpg.Connection, sha256: str, delete_audio: Callable[[str], Awaitable[int]]
) -> ReferenceDeletion:
    """Under `_lock_audio`: deletes a stored original that no reference holds and no work
    uses, or lists it in `orphaned_originals` until nothing does."""
    if await con.fetchval("SELECT 1 FROM song_references WHERE sha256 = $1", sha256):
        await con.execute("DELETE FROM orphaned_originals WHERE sha256 = $1", sha256)
        return ReferenceDeletion(0, 0)  # held by a tenant's reference: not orphaned
    users: int = await con.fetchval(_ORIGINAL_USERS, sha256)
    if users:
        await con.execute(
            "INSERT INTO orphaned_originals (sha256) VALUES ($1) ON CONFLICT DO NOTHING", sha256
        )
        return ReferenceDeletion(0, users)
    deleted = await delete_audio(sha256)
    await con.execute("DELETE FROM orphaned_originals WHERE sha256 = $1", sha256)
    return ReferenceDeletion(deleted, 0)
