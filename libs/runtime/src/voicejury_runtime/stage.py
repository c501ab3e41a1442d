"""The stage runtime: one durable JetStream consumer per stage, with explicit acknowledgement.

A handler is a small async function `(event, ctx) -> events to publish`. Around it the
runtime guarantees, for every delivery:

- the event is parsed against its contract; an unparseable one fails its job at once;
- a cancelled job, or a (job, stage) whose effect is already committed, is acked untouched;
- while the handler runs, `in_progress()` heartbeats keep JetStream from redelivering it
  and a watcher turns a cancellation into `ctx.should_stop()` raising at the next checkpoint;
- outputs are published (deduplicated by `Nats-Msg-Id`) *before* the ack, so a crash at any
  point means a redelivery, never a loss;
- `PermanentStageError` fails the job on this delivery; anything else is retried with a
  growing delay (`nak(delay)`) until `max_deliver`, then fails the job with the last error.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import uvicorn
from faststream import FastStream
from faststream.asgi import AsgiFastStream, AsgiResponse, get
from faststream.middlewares import AckPolicy
from faststream.nats import JStream, NatsMessage, PullSub
from nats.js.api import ConsumerConfig
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

from voicejury_contracts import (
    EVENTS_BY_SUBJECT,
    REDRIVE_HEADER,
    Event,
    JobFailed,
    Stage,
    StageProgress,
    StageRun,
    job_id_of,
    utc_now,
)

from .bus import Bus, FastStreamLogger, consumer_config, make_broker
from .errors import JobCancelledError, PermanentStageError
from .logs import configure_logging, log_context
from .memory import keep_freed_memory
from .models import release_accelerator_memory
from .settings import StageSettings
from .store import ObjectStore, job_key
from .telemetry import new_registry, setup_tracing

log = logging.getLogger(__name__)

E = TypeVar("E", bound=Event)
Handler = Callable[[Any, "StageContext"], Awaitable[Sequence[Event]]]

_PROGRESS_MIN_STEP = 0.05
# Pauses (s) between tries of a job failure's publish: a broker busy for a moment.
_FAIL_PUBLISH_RETRIES_S = (0.5, 1.0, 2.0)


class StageContext:
    """What a handler may use during one delivery. `report` and `should_stop` are thread-safe."""

    def __init__(
        self,
        service: StageService,
        job_id: uuid.UUID,
        attempt: int,
        workdir: Path,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.service = service
        self.stage = service.stage
        self.job_id = job_id
        self.attempt = attempt
        self.workdir = workdir
        self.started_at: datetime = utc_now()
        self._t0 = time.perf_counter()
        self._loop = loop
        self._cancelled = threading.Event()
        self._seq = 0
        self._last_fraction = -1.0
        self._last_progress_at = 0.0  # time.monotonic() of the last published progress
        self._pending: set[concurrent.futures.Future[None]] = set()

    @property
    def store(self) -> ObjectStore:
        return self.service.store

    @property
    def bus(self) -> Bus:
        return self.service.bus

    async def progress(self, fraction: float, message: str = "") -> None:
        """Publishes progress, the first and the last always, the rest at least 5 % and
        `progress_min_interval_s` apart; a failed publish is logged, not raised."""
        fraction = min(max(fraction, 0.0), 1.0)
        now = time.monotonic()
        if (
            self._seq
            and fraction < 1.0
            and (
                round(fraction - self._last_fraction, 9) < _PROGRESS_MIN_STEP  # 0.15-0.1 < 0.05
                or now - self._last_progress_at < self.service.settings.progress_min_interval_s
            )
        ):
            return
        self._last_fraction = fraction
        self._last_progress_at = now
        event = StageProgress(
            job_id=self.job_id,
            stage=self.stage,
            fraction=round(fraction, 3),
            message=message,
            attempt=self.attempt,
            seq=self._seq,
        )
        self._seq += 1
        try:
            await self.bus.publish(event)
        except Exception as exc:  # progress is informational; the job must not fail for it
            log.warning("progress publish failed: %s", exc)

    def report(self, fraction: float, message: str = "") -> None:
        """`progress` callable from a worker thread."""
        fut = asyncio.run_coroutine_threadsafe(self.progress(fraction, message), self._loop)
        self._pending.add(fut)
        fut.add_done_callback(self._pending.discard)

    def should_stop(self) -> None:
        """Checkpoint for long work: raises JobCancelledError once the job is cancelled."""
        if self._cancelled.is_set():
            raise JobCancelledError(str(self.job_id))

    def mark_cancelled(self) -> None:
        self._cancelled.set()

    async def run_blocking(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Runs CPU/GPU-heavy work off the event loop, so heartbeats keep flowing."""
        return await asyncio.to_thread(fn, *args, **kwargs)

    def stage_run(
        self,
        *,
        model: str | None = None,
        model_version: str | None = None,
        device: str | None = None,
        skipped: bool = False,
        cached: bool = False,
        details: dict[str, str] | None = None,
    ) -> StageRun:
        return StageRun(
            stage=self.stage,
            model=model,
            model_version=model_version,
            device=device,
            started_at=self.started_at,
            seconds=round(time.perf_counter() - self._t0, 4),
            attempt=self.attempt,
            skipped=skipped,
            cached=cached,
            details=details or {},
        )


class StageService:
    """Composition root of a stage process: broker, bus, store, telemetry, health, handlers."""

    def __init__(self, stage: Stage, settings: StageSettings) -> None:
        configure_logging(stage.value, settings.log_level, as_json=settings.log_json)
        if settings.keep_freed_memory:  # before any thread of the service exists
            keep_freed_memory()
        self.stage = stage
        self.settings = settings
        self.registry = new_registry()
        self.tracer_provider = setup_tracing(stage.value, settings)
        # SIGTERM: the in-flight message gets one ack wait to finish (heartbeats keep it
        # ours meanwhile), then it is handed back to another replica.
        self.broker = make_broker(
            stage.value,
            settings,
            tracer_provider=self.tracer_provider,
            registry=self.registry,
            graceful_timeout_s=settings.ack_wait_s,
        )
        self.bus = Bus(self.broker, settings)
        self.store = ObjectStore(settings)
        self._startup: list[Callable[[], Awaitable[None]]] = []
        self._readiness: list[Callable[[], str | None]] = []
        self._consumers: list[ConsumerConfig] = []
        self._started = False
        self.deliveries = Counter(
            "voicejury_stage_deliveries_total",
            "Deliveries handled, by outcome",
            ["stage", "outcome"],
            registry=self.registry,
        )
        self.seconds = Histogram(
            "voicejury_stage_seconds",
            "Handler wall time per delivery",
            ["stage"],
            registry=self.registry,
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
        )

    # -- composition -------------------------------------------------------------------

    def on_startup(self, fn: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
        """Runs once after the bus is up, before consuming (load the model here)."""
        self._startup.append(fn)
        return fn

    def readiness(self, fn: Callable[[], str | None]) -> Callable[[], str | None]:
        """Registers a check returning None when ready, else the reason it is not."""
        self._readiness.append(fn)
        return fn

    def handles(
        self, *event_types: type[Event], announce_start: bool = True
    ) -> Callable[[Handler], Handler]:
        """Registers the stage's handler of `event_types`. The runtime reports the stage
        started (progress 0, `started`) on each delivery, before the handler runs; a
        handler that may only take note of an event (a fan-in's first half) passes
        `announce_start=False` and reports its start itself once it really starts, so
        that no client sees the stage running while it waits for its other input."""
        spec = self.bus.topology.consumer(self.stage)
        accepted = {t.SUBJECT: t for t in event_types}
        settings = self.settings

        config = consumer_config(
            spec,
            ack_wait_s=settings.ack_wait_s,
            max_deliver=settings.max_deliver,
            # The consumer's bound, shared by every replica; each replica takes at most
            # `concurrency` at a time.
            max_ack_pending=settings.max_ack_pending,
        )
        self._consumers.append(config)

        def register(handler: Handler) -> Handler:
            async def _on_message(msg: NatsMessage) -> None:
                await self._deliver(msg, accepted, handler, announce_start)

            # One pull subscriber per worker, each fetching one message only once it is
            # done with the last: a message leaves the server only when a worker is free to
            # heartbeat it. FastStream's `max_workers` fetches the next message while every
            # worker is busy, and that one, unheartbeated, is redelivered after the ack wait.
            for _ in range(settings.concurrency):
                self.broker.subscriber(
                    spec.filter_subject,
                    stream=JStream(self.bus.topology.stream.name, declare=False),
                    durable=spec.durable,
                    pull_sub=PullSub(batch_size=1, timeout=5.0),
                    config=config,
                    # The runtime acks, naks and terminates itself; FastStream's NATS
                    # default would terminate on any exception, i.e. never retry.
                    ack_policy=AckPolicy.MANUAL,
                )(_on_message)

            return handler

        return register

    # -- delivery ----------------------------------------------------------------------

    async def _deliver(
        self,
        msg: NatsMessage,
        accepted: dict[str, type[Event]],
        handler: Handler,
        announce_start: bool,
    ) -> None:
        raw = msg.raw_message
        attempt = int(raw.metadata.num_delivered)
        suffix = raw.subject.removeprefix(self.bus.topology.namespace + ".")
        event_type = accepted.get(suffix)
        if event_type is None:
            # Another stage's event on a shared wildcard filter (e.g. scorer's analysis.>).
            await _settle(raw.ack())
            return
        try:
            event = event_type.from_message(raw.data)
        except ValueError as exc:
            if await self._reject_poison(raw.data, suffix, attempt, exc):
                await _settle(raw.term())
                self.deliveries.labels(self.stage, "invalid").inc()
            else:
                with contextlib.suppress(Exception):
                    await raw.nak(delay=self.settings.backoff_for(attempt))
                self.deliveries.labels(self.stage, "retry").inc()
            return

        with log_context(job_id=str(event.job_id), stage=self.stage.value, attempt=attempt):
            try:
                outcome = await self._handle(msg, event, attempt, handler, announce_start)
            except Exception as exc:
                # A broker or flag-store call around the handler failed (the checks before
                # it, a failure's own publish): never left unsettled, which would wait out
                # the ack wait and, at the last attempt, end the job without its error.
                outcome = await self._retry_or_fail(raw, event, attempt, exc)
            self.deliveries.labels(self.stage, outcome).inc()

    async def _handle(
        self, msg: NatsMessage, event: Event, attempt: int, handler: Handler, announce_start: bool
    ) -> str:
        raw = msg.raw_message
        effect_key = f"{event.job_id}.{self.stage.value}"
        redrive = _redrive_of(raw)
        if await self.bus.is_cancelled(event.job_id):
            # An earlier delivery may have stored objects after the cancel's sweep and then
            # died or failed (its input swept from under it): nothing of the job stays.
            return await self._end_cancelled(raw, event)
        committed = await self.bus.flag_get(self.bus.effects_bucket, effect_key)
        if committed is not None and not redrive:
            log.info("effect already committed; acking duplicate delivery")
            await _settle(raw.ack())
            return "duplicate"
        if committed is not None and (recorded := _committed_outputs(committed)):
            # The job stopped moving after this stage: what it published may be what was
            # lost. The same events again (under the re-drive's ids), never a second run;
            # downstream, the same happens until the stage that lost its input runs.
            for out in recorded:
                await self.bus.publish(out, redrive=redrive)
            log.info("effect already committed; re-driving its outputs")
            await _settle(raw.ack())
            return "duplicate"
        # A re-drive meeting a bare marker (no outputs recorded) runs the stage again: its
        # objects are write-once, so it announces the same objects as before.

        loop = asyncio.get_running_loop()
        with tempfile.TemporaryDirectory(prefix=f"vj-{self.stage.value}-") as tmp:
            ctx = StageContext(self, event.job_id, attempt, Path(tmp), loop)
            stop_watching = asyncio.Event()
            watcher = asyncio.create_task(self._watch(msg, ctx, stop_watching))
            t0 = time.perf_counter()
            try:
                if announce_start:
                    await ctx.progress(0.0, "started")
                outputs = await handler(event, ctx)
                if await self.bus.is_cancelled(event.job_id):
                    raise JobCancelledError(str(event.job_id))
                for out in outputs:
                    await self.bus.publish(out, redrive=redrive)
                if outputs:
                    # The outputs themselves, so that a re-drive can send them again.
                    await self.bus.flag_set(
                        self.bus.effects_bucket, effect_key, _commit_record(outputs)
                    )
            except JobCancelledError:
                log.info("job cancelled; stopping at checkpoint")
                return await self._end_cancelled(raw, event)
            except asyncio.CancelledError:
                # Shutting down (SIGTERM past the grace period): hand the message back now
                # rather than letting another replica wait out the ack window, and stop the
                # worker thread at its next checkpoint (the process waits for it to end).
                log.warning("interrupted by shutdown; handing the message back")
                ctx.mark_cancelled()
                with contextlib.suppress(Exception):
                    await asyncio.shield(raw.nak())
                raise
            except PermanentStageError as exc:
                log.warning("permanent failure %s: %s", exc.code, exc.message)
                await self._fail(event.job_id, exc.code, exc.message, attempt)
                await _settle(raw.ack())
                return "failed"
            except Exception as exc:
                # The cancel sweeps the job's inputs at once, while the stage sees its flag
                # only at its next poll: an input gone from under the work is the cancel,
                # not a transient error to retry.
                if await _safe(self.bus.is_cancelled(event.job_id)):
                    log.info("job cancelled while failing (%s); not retried", exc)
                    return await self._end_cancelled(raw, event)
                return await self._retry_or_fail(raw, event, attempt, exc)
            finally:
                await _stop(watcher, stop_watching)
                # Whatever the outcome (done, failed, cancelled mid-work): the next job may
                # be a 10-minute song, and the GPU may be shared with other pods.
                release_accelerator_memory()
                self.seconds.labels(self.stage).observe(time.perf_counter() - t0)
            await _settle(raw.ack())
            return "ok"

    async def _end_cancelled(self, raw: Any, event: Event) -> str:
        """Acks a delivery of a cancelled job, publishing nothing. What this delivery (or an
        earlier one) stored may postdate the cancel's own sweep of the job's objects: swept
        again, so that a cancelled job leaves no audio behind."""
        with contextlib.suppress(Exception):
            await self.store.delete_prefix(job_key(event.job_id))
        await _settle(raw.ack())
        return "cancelled"

    async def _retry_or_fail(self, raw: Any, event: Event, attempt: int, exc: Exception) -> str:
        detail = f"{type(exc).__name__}: {exc}"
        if attempt >= self.settings.max_deliver:
            log.error("giving up after %d attempts: %s", attempt, detail, exc_info=exc)
            try:
                await self._fail(
                    event.job_id,
                    "retries_exhausted",
                    f"{self.stage.value} failed {attempt} times; last error: {detail}",
                    attempt,
                )
            except Exception:
                # Cannot record the failure (bus down): handed back at once, so that the
                # broker's max-deliveries advisory fails the job now (the gateway records it
                # as `stage_crashed`), not after the ack wait.
                log.exception("could not publish the job failure")
                with contextlib.suppress(Exception):
                    await raw.nak()
                return "retry"
            await _settle(raw.term())
            return "failed"
        delay = self.settings.backoff_for(attempt)
        log.warning("transient failure, retry in %.1fs: %s", delay, detail, exc_info=exc)
        with contextlib.suppress(Exception):
            await raw.nak(delay=delay)
        return "retry"

    async def _watch(self, msg: NatsMessage, ctx: StageContext, stop: asyncio.Event) -> None:
        """Heartbeats (`in_progress`) and cancellation polling while a handler runs.

        Ends when `stop` is set, checked after every await: on Python 3.11 a cancellation
        that lands inside nats-py's `wait_for` can be swallowed (CPython gh-86296), and a
        watcher that outlived its handler would heartbeat an unacked message forever.
        """
        next_beat = time.monotonic() + self.settings.heartbeat_s
        step = min(self.settings.cancel_poll_s, self.settings.heartbeat_s)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=step)
            if stop.is_set():
                return
            # Apart: the cancel flags' bucket out of reach must not stop the heartbeats
            # (the work would be redelivered while it runs). A reconnecting broker: both
            # are tried again next tick.
            try:
                if await self.bus.is_cancelled(ctx.job_id):
                    ctx.mark_cancelled()
            except Exception as exc:
                log.debug("cancel poll failed: %s", exc)
            if self.settings.heartbeats and time.monotonic() >= next_beat:
                try:
                    await msg.in_progress()
                    next_beat = time.monotonic() + self.settings.heartbeat_s
                except Exception as exc:
                    log.debug("heartbeat failed: %s", exc)

    async def _fail(self, job_id: uuid.UUID, code: str, message: str, attempt: int) -> None:
        """Publishes the job's failure, trying again over a few seconds (a broker busy for
        a moment must not cost the job its error); raises when it never goes out."""
        failed = JobFailed(
            job_id=job_id, stage=self.stage, code=code, message=message, attempts=attempt
        )
        for delay in (*_FAIL_PUBLISH_RETRIES_S, None):
            try:
                await self.bus.publish(failed)
                return
            except Exception:
                if delay is None:
                    raise
                log.warning("publishing the job failure failed; trying again in %.1fs", delay)
                await asyncio.sleep(delay)

    async def _reject_poison(self, data: bytes, suffix: str, attempt: int, exc: Exception) -> bool:
        """An event that does not match its contract: fails its job if we can tell which.
        False when that failure could not be published (the delivery is to be tried again,
        and at the last attempt the broker's max-deliveries advisory fails the job)."""
        log.error("invalid %s event: %s", suffix, exc)
        job_id = job_id_of(data)
        if job_id is None:
            return True
        try:
            await self._fail(
                job_id,
                "invalid_event",
                f"{self.stage.value} could not read its input event: {exc}"[:2000],
                attempt,
            )
        except Exception:
            log.exception("could not publish the failure of job %s", job_id)
            return False
        return True

    # -- process -----------------------------------------------------------------------

    async def _on_start(self) -> None:
        await self.broker.connect()
        await self.bus.ensure_topology()
        for config in self._consumers:
            await self.bus.ensure_consumer(config)
        await self.store.ensure_bucket()
        for fn in self._startup:
            await fn()
        self._started = True

    def not_ready_reason(self) -> str | None:
        if not self._started:
            return "starting"
        for check in self._readiness:
            if (reason := check()) is not None:
                return reason
        return None

    def app(self) -> FastStream:
        return FastStream(self.broker, logger=FastStreamLogger(), on_startup=[self._on_start])

    def asgi(self) -> AsgiFastStream:
        """The process: consumer plus `/healthz`, `/readyz` and `/metrics` for Kubernetes."""

        @get
        async def healthz() -> AsgiResponse:
            return AsgiResponse(b"ok", status_code=200)

        @get
        async def readyz() -> AsgiResponse:
            reason = self.not_ready_reason()
            if reason is None and not await self.bus.ping():
                reason = "broker unreachable"
            if reason is None and not await _safe(self.store.ping()):
                reason = "object store unreachable"
            body = json.dumps({"ready": reason is None, "reason": reason}).encode()
            return AsgiResponse(
                body,
                status_code=200 if reason is None else 503,
                headers={"Content-Type": "application/json"},
            )

        @get
        async def metrics() -> AsgiResponse:
            # Prometheus 3 refuses a scrape whose Content-Type is missing or unknown.
            return AsgiResponse(
                generate_latest(self.registry),
                status_code=200,
                headers={"Content-Type": CONTENT_TYPE_LATEST},
            )

        return AsgiFastStream(
            self.broker,
            asgi_routes=[("/healthz", healthz), ("/readyz", readyz), ("/metrics", metrics)],
            logger=FastStreamLogger(),
            on_startup=[self._on_start],
        )

    def run(self) -> None:
        uvicorn.run(
            self.asgi(),
            host=self.settings.http_host,
            port=self.settings.http_port,
            log_level="warning",
            # No logging config of uvicorn's own (plain text): its lines go through the
            # root handler, JSON under VJ_LOG_JSON.
            log_config=None,
            # SIGTERM: stop fetching, let the in-flight message finish within the grace period.
            timeout_graceful_shutdown=int(self.settings.ack_wait_s),
        )


def _redrive_of(raw: Any) -> int:
    """Which re-drive of its job a delivered message belongs to (0: none)."""
    try:
        return max(int((raw.headers or {}).get(REDRIVE_HEADER, 0)), 0)
    except (TypeError, ValueError):
        return 0


# Above this, an effect's record is the bare marker: NATS refuses messages over its
# max_payload (1 MiB by default), and a re-drive then runs the stage again instead.
_MAX_COMMIT_RECORD_BYTES = 512 * 1024


def _commit_record(outputs: Sequence[Event]) -> bytes:
    record = json.dumps([[o.SUBJECT, o.model_dump(mode="json")] for o in outputs]).encode()
    if len(record) > _MAX_COMMIT_RECORD_BYTES:
        log.warning("outputs of %d bytes kept as a bare effect marker", len(record))
        return b"1"
    return record


def _committed_outputs(record: bytes) -> list[Event]:
    """The events a committed effect published (none for a record of an older runtime)."""
    try:
        entries = json.loads(record)
        return [EVENTS_BY_SUBJECT[subject].model_validate(data) for subject, data in entries]
    except (ValueError, TypeError, KeyError):
        return []


async def _stop(watcher: asyncio.Task[None], stop: asyncio.Event) -> None:
    """Stops the watcher without ever blocking the ack behind it."""
    stop.set()
    watcher.cancel()
    await asyncio.wait({watcher}, timeout=5.0)


async def _settle(aw: Awaitable[None]) -> None:
    """An ack or a term that may not reach the broker (it is reconnecting): the message then
    comes back after the ack wait, to a delivery that finds its effect committed. Never an
    error, which would make a done delivery look failed."""
    try:
        await aw
    except Exception as exc:
        log.warning("could not settle the message (it will come back): %r", exc)


async def _safe(aw: Awaitable[bool]) -> bool:
    try:
        return await aw
    except Exception:
        return False
