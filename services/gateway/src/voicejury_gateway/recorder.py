"""Records every pipeline event in PostgreSQL: the gateway's one durable consumer.

One gateway replica at a time records (the one holding the recorder's lease, a PostgreSQL
advisory lock); the others stand by and one of them takes over within about a second of
its stop or death. So a job's events are recorded in the stream's order whichever replica
a client's SSE stream is served by. Should two replicas ever record at once (one cut off
from PostgreSQL but not yet aware of it) nothing is lost or doubled: the repository's
per-job lock and `source_id` uniqueness make a redelivery a no-op, and it copes with a
job's events recorded out of order (`JobRepository.record`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid

import asyncpg.exceptions
import nats.js.errors
from faststream.nats import NatsMessage
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry, Counter, Gauge

from voicejury_contracts import (
    EVENTS_BY_SUBJECT,
    Event,
    JobFailed,
    Stage,
    StageProgress,
    job_id_of,
)
from voicejury_runtime.bus import Bus, consumer_config
from voicejury_runtime.logs import log_context

from .db import JobRepository
from .lease import AdvisoryLease

log = logging.getLogger(__name__)

_RETRY_DELAY_S = 2.0
# A recording replica that has not heard from JetStream for this long (cut off from NATS
# but not from PostgreSQL) gives the lease up, so that one that can reach it records. Its
# checks take up to two fetch waits (an empty fetch, then a question): it steps down 15 to
# 25 s after the last answer.
_STEP_DOWN_AFTER_S = 15.0
BATCH_SIZE = 16
# How long one fetch waits on a quiet stream before asking again; an event that arrives
# meanwhile is handed over at once.
_FETCH_WAIT_S = 5.0
# What PostgreSQL (or the repository) refuses the same way every time, whatever the retry:
# a value the column cannot hold, a constraint the event breaks, an event the code cannot
# map. Anything else (an unreachable database above all) is retried without bound.
_UNRECORDABLE: tuple[type[Exception], ...] = (
    asyncpg.exceptions.DataError,
    asyncpg.exceptions.IntegrityConstraintViolationError,
    ValueError,
    TypeError,
    KeyError,
)
_MAX_UNRECORDABLE_ATTEMPTS = 5
# What FastStream's telemetry middleware injects on every publish, whatever the global
# propagator (OTEL_PROPAGATORS) is set to: read with the same one, or a record span could
# start a trace of its own.
_TRACE_CONTEXT = TraceContextTextMapPropagator()


async def _fail_unrecordable(
    repo: JobRepository, event: Event, subject: str, attempts: int, exc: Exception
) -> None:
    failed = JobFailed(
        job_id=event.job_id,
        stage=Stage.GATEWAY,
        code="unrecordable_event",
        message=f"the gateway could not record its {type(event).__name__} event "
        f"({subject}): {type(exc).__name__}",
        attempts=attempts,
    )
    try:
        if not await repo.record(failed):
            await repo.record_preparation(failed)
    except Exception as record_exc:  # the job's own row refuses it: the reconciler ends it
        log.error("could not fail job %s either: %r", event.job_id, record_exc)


def _cancel_requested() -> bool:
    """Whether this task was asked to stop: on Python 3.11 a cancellation landing in
    nats-py's `wait_for` as a message arrives is swallowed (CPython gh-86296), and a fetch
    loop that missed it would never hand the lease on, nor let `stop` end."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def _hand_back(batch: list[Msg]) -> None:
    """Naks the events of `batch` not settled yet."""
    for raw in batch:
        if not raw.is_acked:  # acked, naked or terminated
            with contextlib.suppress(Exception):  # the connection gone: the ack wait it is
                await raw.nak()


class EventRecorder:
    """Records every pipeline event in PostgreSQL, from the gateway's durable pull consumer.

    Its own fetch loop rather than a FastStream subscriber: a fetch hands over what is
    waiting (up to `BATCH_SIZE` events) at once, and each job's events of it are recorded
    one after another in the stream's order, jobs side by side, so one replica's SSE
    streams show a job's stages in the order they happened. FastStream's pull subscriber
    runs a fetched batch all at once, in no fixed order (a stage could be seen starting
    before the one it waits for had finished); its batch mode waits out its timeout to fill
    a batch and, with a short one, loses its task to the `asyncio.TimeoutError` nats-py
    raises when that timeout runs out.

    It records only while this replica holds the recorder's lease (see the module's
    docstring); `voicejury_recorder_leader` tells which replica that is.
    """

    def __init__(
        self,
        bus: Bus,
        repo: JobRepository,
        *,
        database_url: str,
        ack_wait_s: float,
        tracer_provider: TracerProvider | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.bus = bus
        self.repo = repo
        self.spec = bus.topology.consumer(Stage.GATEWAY)
        # Unbounded deliveries (the spec's): a job's record must never be dropped for a
        # passing database outage.
        self.config = consumer_config(self.spec, ack_wait_s=ack_wait_s)
        self._prefix = bus.topology.namespace + "."
        self._tracer = trace.get_tracer(__name__, tracer_provider=tracer_provider)
        self._settled = Counter(
            "voicejury_events_recorded_total",
            "Pipeline events the recorder settled: recorded, retried (handed back), "
            "terminated (unreadable or refused for good)",
            ["outcome"],
            registry=registry,
        )
        self._recording = Gauge(
            "voicejury_recorder_leader",
            "1 while this replica records the pipeline's events (holds the recorder lease), "
            "0 while it stands by",
            registry=registry,
        )
        self.lease = AdvisoryLease(database_url, f"voicejury recorder {bus.topology.namespace}")
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Records from the consumer (created beforehand with `config`) whenever this
        replica holds the recorder's lease."""
        self._task = asyncio.create_task(self.lease.run(self._record_while_leader))

    async def stop(self) -> None:
        """Stops fetching, hands the events it holds unsettled back (another replica
        records them) and gives the lease up."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _record_while_leader(self) -> None:
        subscription = await self.bus.js.pull_subscribe_bind(
            durable=self.spec.durable, stream=self.bus.topology.stream.name
        )
        self._recording.set(1)
        try:
            await self._loop(subscription)
        finally:
            self._recording.set(0)
            # Before the connection drains: the cancelled fetch's pull request lives on in
            # the server, and what it still delivers here would sit unread and hold the
            # drain up for its whole timeout (and away from the replica taking over).
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()

    async def _loop(self, subscription: JetStreamContext.PullSubscription) -> None:
        """Fetches and records until cancelled; raises ConnectionError once JetStream has
        not answered for `_STEP_DOWN_AFTER_S` (the lease then passes to another replica)."""
        last_answer = time.monotonic()
        while True:
            batch: list[Msg] = []
            try:
                batch = await subscription.fetch(BATCH_SIZE, timeout=_FETCH_WAIT_S)
            except TimeoutError:  # nothing to record (nats-py's TimeoutError is one too)
                pass
            # CancelledError is no Exception: stop() still ends the loop.
            except Exception as exc:  # the broker restarting: nats-py reconnects meanwhile
                log.warning("fetching events failed, trying again: %r", exc)
                await asyncio.sleep(_RETRY_DELAY_S)
            if _cancel_requested():  # and swallowed: what was fetched goes back first
                await _hand_back(batch)
                raise asyncio.CancelledError
            if batch or await self._jetstream_answers():
                last_answer = time.monotonic()
            elif time.monotonic() - last_answer >= _STEP_DOWN_AFTER_S:
                raise ConnectionError(
                    f"JetStream has not answered for {_STEP_DOWN_AFTER_S:.0f} s: giving the "
                    "recorder to a replica that can reach it"
                )
            if not batch:
                continue
            try:
                await self.record_batch(batch)
            except asyncio.CancelledError:
                # Stopping, or the lease lost, mid-batch: the events not yet settled go
                # back now, to the replica taking over, rather than after the ack wait.
                await _hand_back(batch)
                raise
            except Exception as exc:  # a `term` that never reached the broker, say
                log.warning("recording events failed: %r; the unsettled ones come back", exc)

    async def _jetstream_answers(self) -> bool:
        """Whether JetStream answers a question about the recorder's consumer (a quiet
        stream's empty fetch looks the same as an unreachable one). A consumer that is
        gone (deleted by hand, or with its stream) is created again, with this
        recorder's configuration: the subscription fetches from it by name."""
        stream = self.bus.topology.stream.name
        try:
            await asyncio.wait_for(
                self.bus.js.consumer_info(stream, self.spec.durable), timeout=_FETCH_WAIT_S
            )
        except nats.js.errors.NotFoundError:
            log.warning("the recorder's consumer %s is gone; creating it again", self.spec.durable)
            try:
                await asyncio.wait_for(self.bus.ensure_consumer(self.config), _FETCH_WAIT_S)
            except Exception as exc:  # its stream gone too: a stage's start creates both
                log.warning("could not create the recorder's consumer: %r", exc)
                return False
        except Exception as exc:  # CancelledError is no Exception
            log.debug("JetStream does not answer the recorder: %r", exc)
            return False
        return True

    async def record_batch(self, batch: list[Msg]) -> None:
        """Records and settles one fetch's events: each job's in order, jobs side by side."""
        by_job: dict[uuid.UUID, list[tuple[Msg, Event]]] = {}
        for raw in batch:
            if (event := await self._parse(raw)) is not None:
                by_job.setdefault(event.job_id, []).append((raw, event))
        outcomes = await asyncio.gather(
            *(self._record_in_order(events) for events in by_job.values()),
            return_exceptions=True,
        )
        for outcome in outcomes:
            if isinstance(outcome, Exception):  # an ack that never reached the broker
                log.warning("recording events failed: %r; the unsettled ones come back", outcome)

    async def _parse(self, raw: Msg) -> Event | None:
        """The event `raw` carries, or None once it is terminated as one no retry can read.

        An unreadable event (a newer or older schema version, a field the contract does
        not know) that names its job and that no stage reads (a job's end, a reference's
        analysis) stands for the job's failure, recorded in its place: the job ends now
        with the reason rather than at the stall bound with none. One a stage reads is
        that stage's to fail the job over (with its own name); an unreadable progress
        report is only dropped."""
        event_type = EVENTS_BY_SUBJECT.get(raw.subject.removeprefix(self._prefix))
        if event_type is None:
            log.error("no event is published on %s; dropping it", raw.subject)
        else:
            try:
                return event_type.from_message(raw.data)
            except ValueError as exc:
                log.error("unrecordable %s event: %s", raw.subject, exc)
                if (
                    event_type is not StageProgress
                    and not self.bus.topology.stages_reading(event_type)
                    and (job_id := job_id_of(raw.data)) is not None
                ):
                    return JobFailed(
                        job_id=job_id,
                        stage=Stage.GATEWAY,
                        code="invalid_event",
                        message=f"the gateway could not read its {raw.subject} event: {exc}"[:2000],
                        attempts=max(1, int(raw.metadata.num_delivered)),
                    )
        await raw.term()
        self._settled.labels("terminated").inc()
        return None

    async def _record_in_order(self, events: list[tuple[Msg, Event]]) -> None:
        """One job's events of a batch, one after another in the stream's order. After one
        that must be retried, the job's later events are handed back with it, so that they
        come back behind it rather than overtake it."""
        for index, (raw, event) in enumerate(events):
            if not await self._record(raw, event):
                for later, _ in events[index + 1 :]:
                    await later.nak(delay=_RETRY_DELAY_S)
                    self._settled.labels("retried").inc()
                return

    async def _record(self, raw: Msg, event: Event) -> bool:
        """Records `event` and settles `raw`: True once acked or terminated, False when it
        was handed back to be tried again."""
        # The publisher's trace context rides in the headers: the record joins the job's trace.
        with (
            log_context(**event_log_fields(event)),
            self._tracer.start_as_current_span(
                f"{raw.subject} record",
                context=_TRACE_CONTEXT.extract(raw.headers or {}),
                kind=SpanKind.CONSUMER,
                attributes={
                    "messaging.system": "nats",
                    "messaging.destination.name": raw.subject,
                    "voicejury.job_id": str(event.job_id),
                },
            ),
        ):
            try:
                if not await self.repo.record(event):
                    # Not a job's event (or nothing new for the job): maybe a reference's.
                    await self.repo.record_preparation(event)
            except Exception as exc:
                attempt = int(raw.metadata.num_delivered)
                if isinstance(exc, _UNRECORDABLE) and attempt >= _MAX_UNRECORDABLE_ATTEMPTS:
                    # The same refusal on every try: retrying forever would leave the job
                    # running until the reconciler gives up on it, with no word of why.
                    log.error("%s refused %d times, failing its job: %r", raw.subject, attempt, exc)
                    await _fail_unrecordable(self.repo, event, raw.subject, attempt, exc)
                    await raw.term()
                    self._settled.labels("terminated").inc()
                    return True
                log.warning("recording %s failed, will retry: %s", raw.subject, exc)
                await raw.nak(delay=_RETRY_DELAY_S)
                self._settled.labels("retried").inc()
                return False
        await raw.ack()
        self._settled.labels("recorded").inc()
        return True


def event_log_fields(event: Event) -> dict[str, str]:
    """The log context of recording `event`: its job, and the stage it comes from when it
    names one (the lines' `service` says the gateway logs them)."""
    fields = {"job_id": str(event.job_id)}
    if isinstance(stage := getattr(event, "stage", None), Stage):
        fields["stage"] = stage.value
    return fields


def register_max_deliveries_watch(bus: Bus, repo: JobRepository) -> None:
    """Fails a job at once when a stage never acknowledged its event within `max_deliver`.

    That happens when the stage process dies on every attempt (killed, out of memory)
    and so never gets to report the failure itself. JetStream announces it with an
    advisory; without this the job would wait for the reconciler's stall bound.
    """
    stream = bus.topology.stream.name
    prefix = f"{bus.topology.namespace}-"

    @bus.broker.subscriber(
        f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.*",
        # One gateway replica handles each advisory.
        queue=f"{bus.topology.namespace}-gateway-advisories",
    )
    async def on_max_deliveries(msg: NatsMessage) -> None:
        try:
            advisory = json.loads(msg.raw_message.data)
            stage = Stage(str(advisory["consumer"]).removeprefix(prefix))
            if stage is Stage.GATEWAY:  # its own deliveries are unbounded; none gave up
                raise ValueError("the recorder's consumer is not a stage")
            seq = int(advisory["stream_seq"])
            stored = await bus.js.get_msg(stream, seq)
            job_id = uuid.UUID(str(json.loads(stored.data or b"{}")["job_id"]))
        except (ValueError, KeyError, TypeError, nats.js.errors.NotFoundError) as exc:
            # Gone already: the reconciler fails the job after the stall bound instead.
            log.warning("ignoring max-deliveries advisory: %s", exc)
            return
        deliveries = max(int(advisory.get("deliveries", 1)), 1)
        event = JobFailed(
            job_id=job_id,
            stage=stage,
            code="stage_crashed",
            message=f"{stage.value} stopped without finishing {deliveries} times in a row",
            attempts=deliveries,
        )
        with log_context(**event_log_fields(event)):
            if await repo.record(event) or await repo.record_preparation(event):
                log.error("job %s failed: %s", job_id, event.message)
        # The stage will never acknowledge it, so interest retention would keep it until
        # the stream's max age: it is dead, and the failure is recorded.
        with contextlib.suppress(Exception):
            await bus.js.delete_msg(stream, seq)
