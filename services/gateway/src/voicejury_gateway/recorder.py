"""Records every pipeline event in PostgreSQL: the gateway's one durable consumer.

All gateway replicas share the consumer, so each event is recorded by one of them; the
repository's per-job lock and `source_id` uniqueness make a redelivery a no-op.
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid

import asyncpg.exceptions
import nats.js.errors
from faststream.middlewares import AckPolicy
from faststream.nats import JStream, NatsMessage, PullSub
from nats.js.api import ConsumerConfig
from pydantic import ValidationError

from voicejury_contracts import EVENTS_BY_SUBJECT, Event, JobFailed, Stage
from voicejury_runtime.bus import Bus, consumer_config

from .db import JobRepository

log = logging.getLogger(__name__)

_RETRY_DELAY_S = 2.0
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


def register_recorder(bus: Bus, repo: JobRepository, ack_wait_s: float) -> ConsumerConfig:
    """Registers the recorder and the advisory watch; returns the recorder's consumer
    config, which the caller creates or updates on the server before starting the broker."""
    _register_max_deliveries_watch(bus, repo)
    return _register_event_recorder(bus, repo, ack_wait_s)


def _register_event_recorder(bus: Bus, repo: JobRepository, ack_wait_s: float) -> ConsumerConfig:
    spec = bus.topology.consumer(Stage.GATEWAY)
    prefix = bus.topology.namespace + "."
    config = consumer_config(
        spec,
        ack_wait_s=ack_wait_s,
        # Unbounded: the record of a job must never be dropped for a passing DB outage.
        max_deliver=-1,
    )

    @bus.broker.subscriber(
        spec.filter_subject,
        stream=JStream(bus.topology.stream.name, declare=False),
        durable=spec.durable,
        pull_sub=PullSub(batch_size=16, timeout=5.0),
        config=config,
        ack_policy=AckPolicy.MANUAL,
    )
    async def record(msg: NatsMessage) -> None:
        raw = msg.raw_message
        event_type = EVENTS_BY_SUBJECT.get(raw.subject.removeprefix(prefix))
        if event_type is None:
            await raw.term()
            return
        try:
            event = event_type.model_validate_json(raw.data)
        except ValidationError as exc:
            log.error("unrecordable %s event: %s", raw.subject, exc)
            await raw.term()
            return
        try:
            if not await repo.record(event):
                # Not a job's event (or nothing new for the job): maybe a reference's.
                await repo.record_preparation(event)
        except Exception as exc:
            attempt = int(raw.metadata.num_delivered)
            if isinstance(exc, _UNRECORDABLE) and attempt >= _MAX_UNRECORDABLE_ATTEMPTS:
                # The same refusal on every try: retrying forever would leave the job
                # running until the reconciler gives up on it, with no word of why.
                log.error("%s refused %d times, failing its job: %r", raw.subject, attempt, exc)
                await _fail_unrecordable(repo, event, raw.subject, attempt, exc)
                await raw.term()
                return
            log.warning("recording %s failed, will retry: %s", raw.subject, exc)
            await raw.nak(delay=_RETRY_DELAY_S)
            return
        await raw.ack()

    return config


def _register_max_deliveries_watch(bus: Bus, repo: JobRepository) -> None:
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
        if await repo.record(event) or await repo.record_preparation(event):
            log.error("job %s failed: %s", job_id, event.message)
        # The stage will never acknowledge it, so interest retention would keep it until
        # the stream's max age: it is dead, and the failure is recorded.
        with contextlib.suppress(Exception):
            await bus.js.delete_msg(stream, seq)
