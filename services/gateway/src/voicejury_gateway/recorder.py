"""Records every pipeline event in PostgreSQL: the gateway's one durable consumer.

All gateway replicas share the consumer, so each event is recorded by one of them; the
repository's per-job lock and `source_id` uniqueness make a redelivery a no-op.
"""

from __future__ import annotations

import logging

from faststream.middlewares import AckPolicy
from faststream.nats import JStream, NatsMessage, PullSub
from nats.js.api import AckPolicy as JsAckPolicy
from nats.js.api import ConsumerConfig, DeliverPolicy
from pydantic import ValidationError

from voicejury_contracts import EVENTS_BY_SUBJECT, Stage
from voicejury_runtime.bus import Bus

from .db import JobRepository

log = logging.getLogger(__name__)

_RETRY_DELAY_S = 2.0


def register_recorder(bus: Bus, repo: JobRepository, ack_wait_s: float) -> None:
    spec = bus.topology.consumer(Stage.GATEWAY)
    prefix = bus.topology.namespace + "."

    @bus.broker.subscriber(
        spec.filter_subject,
        stream=JStream(bus.topology.stream.name, declare=False),
        durable=spec.durable,
        pull_sub=PullSub(batch_size=16, timeout=5.0),
        config=ConsumerConfig(
            durable_name=spec.durable,
            ack_policy=JsAckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=ack_wait_s,
            # Unbounded: the record of a job must never be dropped for a passing DB outage.
            max_deliver=-1,
            max_ack_pending=256,
            filter_subject=spec.filter_subject,
        ),
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
            await repo.record(event)
        except Exception as exc:
            log.warning("recording %s failed, will retry: %s", raw.subject, exc)
            await raw.nak(delay=_RETRY_DELAY_S)
            return
        await raw.ack()
