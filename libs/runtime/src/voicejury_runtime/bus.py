"""The message bus: JetStream topology, deduplicated publishing and the job control flags.

Publishing always waits for JetStream's ack and always sets `Nats-Msg-Id`, so a publish
retried after a lost ack (or by a redelivered handler) is dropped by the server.

The job stream keeps a message only while a consumer still has to handle it (interest
retention): what it holds is the work in flight, not a week of history, so steady traffic
never fills it (PostgreSQL is the record; SSE replays from there). A message is kept only
for consumers that exist when it is published, so every process creates all the durable
consumers of the topology before it publishes or consumes anything.
"""

from __future__ import annotations

import json
import logging
from collections.abc import MutableMapping
from typing import Any

import nats.js.errors
from faststream.context import ContextRepo
from faststream.nats import NatsBroker
from faststream.nats.opentelemetry import NatsTelemetryMiddleware
from faststream.nats.prometheus import NatsPrometheusMiddleware
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.kv import KeyValue
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry

from voicejury_contracts import (
    PIPELINE_STAGES,
    REDRIVE_HEADER,
    ConsumerSpec,
    Event,
    Stage,
    Topology,
)

from .settings import CommonSettings

log = logging.getLogger(__name__)

KV_TTL_S = 7 * 24 * 3600

# Every durable consumer of the job stream: the five stages and the gateway's recorder.
CONSUMERS: tuple[Stage, ...] = (*PIPELINE_STAGES, Stage.GATEWAY)


def consumer_config(
    spec: ConsumerSpec,
    *,
    ack_wait_s: float | None = None,
    max_deliver: int | None = None,
    max_ack_pending: int | None = None,
) -> ConsumerConfig:
    """A durable pull consumer with explicit acks, from its spec and the service's settings
    (the spec's defaults where a setting is not given)."""
    return ConsumerConfig(
        durable_name=spec.durable,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=spec.ack_wait_s if ack_wait_s is None else ack_wait_s,
        max_deliver=spec.max_deliver if max_deliver is None else max_deliver,
        max_ack_pending=spec.max_ack_pending if max_ack_pending is None else max_ack_pending,
        filter_subject=spec.filter_subject,
    )


class FastStreamLogger(logging.LoggerAdapter[logging.Logger]):
    """FastStream's own lines (the app starting and stopping, the broker's `Received` and
    `Processed` per message, its connection trouble) through the root handler, so that
    they come out like every other line: JSON under VJ_LOG_JSON. FastStream's default
    loggers print coloured text through handlers of their own and do not propagate.

    FastStream's fields (subject, stream, message_id) come along, and, once `broker` is
    set, the `job_id` of the message it is handling: FastStream logs `Received` before
    any handler, and so before the stage's `log_context`, has run."""

    def __init__(self) -> None:
        # Not under `faststream.`: that logger does not propagate to the root.
        super().__init__(logging.getLogger("voicejury_runtime.faststream"))
        self.broker: NatsBroker | None = None

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        fields = {k: v for k, v in (kwargs.get("extra") or {}).items() if v}
        if self.broker is not None and (job_id := _job_id_of(self.broker.context)):
            fields["job_id"] = job_id
        kwargs["extra"] = {"fields": fields}
        return msg, kwargs


def _job_id_of(context: ContextRepo) -> str | None:
    """The `job_id` of the message FastStream is handling in this task, if it has one."""
    message = context.get_local("message")
    if message is None:
        return None
    try:
        job_id = json.loads(message.body).get("job_id")
    except (ValueError, TypeError, AttributeError):  # not JSON, or not an object
        return None
    return str(job_id) if job_id is not None else None


def make_broker(
    service: str,
    settings: CommonSettings,
    *,
    tracer_provider: TracerProvider | None = None,
    registry: CollectorRegistry | None = None,
    graceful_timeout_s: float = 30.0,
) -> NatsBroker:
    """`graceful_timeout_s`: on SIGTERM, how long in-flight handlers may run before they
    are cancelled (a stage hands its message back then); the pod's grace must exceed it."""
    middlewares: list[Any] = []
    if tracer_provider is not None:
        middlewares.append(NatsTelemetryMiddleware(tracer_provider=tracer_provider))
    if registry is not None:
        middlewares.append(NatsPrometheusMiddleware(registry=registry, app_name=service))
    logger = FastStreamLogger()
    broker = NatsBroker(
        settings.nats_url,
        middlewares=middlewares,
        logger=logger,
        name=f"voicejury-{service}",
        # Keep reconnecting forever: a nats-server restart must not kill the stage.
        max_reconnect_attempts=-1,
        reconnect_time_wait=1,
        graceful_timeout=graceful_timeout_s,
    )
    # Asked at each line: the context holding the message is the broker's at that time (an
    # app adopting the broker gives it its own).
    logger.broker = broker
    return broker


class Bus:
    """What every service needs from NATS beyond subscribing: topology, publish, flags."""

    def __init__(self, broker: NatsBroker, settings: CommonSettings) -> None:
        self.broker = broker
        self.settings = settings
        self.topology: Topology = settings.topology
        self._kv: dict[str, KeyValue] = {}

    @property
    def js(self) -> JetStreamContext:
        js: JetStreamContext = self.broker.config.connection_state.stream
        return js

    async def ensure_topology(self) -> None:
        """Creates or updates the stream and KV buckets; safe to run from every replica."""
        spec = self.topology.stream
        config = StreamConfig(
            name=spec.name,
            subjects=list(spec.subjects),
            retention=RetentionPolicy.INTEREST,
            storage=StorageType.FILE,
            # Refuse new messages when full instead of silently dropping the oldest jobs.
            discard=DiscardPolicy.NEW,
            max_age=spec.max_age_s,
            max_bytes=self.settings.stream_max_bytes,
            duplicate_window=spec.duplicate_window_s,
            num_replicas=self.settings.stream_replicas,
        )
        try:
            await self.js.add_stream(config)
        except nats.js.errors.BadRequestError:
            existing = (await self.js.stream_info(spec.name)).config
            if existing.retention != config.retention:
                # nats-server cannot change a stream's retention in place.
                log.error(
                    "stream %s keeps its %s retention: delete it while idle (or migrate) "
                    "to get %s retention",
                    spec.name,
                    existing.retention,
                    config.retention,
                )
                config.retention = existing.retention
            await self.js.update_stream(config)
        await self._ensure_consumers_exist()
        for bucket in (self.topology.cancel_bucket, self.topology.join_bucket, self.effects_bucket):
            await self._bucket(bucket)

    async def _ensure_consumers_exist(self) -> None:
        """Creates, with the topology's defaults, each durable consumer that does not exist
        yet, so that a message published before a stage first starts is kept for it. The
        owning service sets its own configuration on start (`ensure_consumer`)."""
        stream = self.topology.stream.name
        for stage in CONSUMERS:
            spec = self.topology.consumer(stage)
            try:
                await self.js.consumer_info(stream, spec.durable)
            except nats.js.errors.NotFoundError:
                await self.js.add_consumer(stream, config=consumer_config(spec))

    async def ensure_consumer(self, config: ConsumerConfig) -> None:
        """Creates the durable consumer, or updates it to `config`: without this a changed
        ack wait, max deliver or concurrency would never reach an existing consumer."""
        await self.js.add_consumer(self.topology.stream.name, config=config)

    @property
    def effects_bucket(self) -> str:
        return f"{self.topology.namespace}_effects"

    async def _bucket(self, name: str) -> KeyValue:
        if name not in self._kv:
            try:
                self._kv[name] = await self.js.key_value(name)
            except nats.js.errors.BucketNotFoundError:
                self._kv[name] = await self.js.create_key_value(
                    KeyValueConfig(
                        bucket=name,
                        ttl=KV_TTL_S,
                        storage=StorageType.FILE,
                        replicas=self.settings.stream_replicas,
                    )
                )
        return self._kv[name]

    async def publish(self, event: Event, *, msg_id: str | None = None, redrive: int = 0) -> None:
        """Publishes and waits for JetStream's ack; raises if it is not stored.

        `redrive` > 0: a copy sent again by the reconciler's n-th re-drive of a job that
        stopped moving (`REDRIVE_HEADER`); its own message id, so that JetStream does not
        drop it as a duplicate of the original."""
        headers = {"content-type": "application/json"}
        dedup = msg_id or event.dedup_id()
        if redrive:
            headers[REDRIVE_HEADER] = str(redrive)
            dedup = f"{dedup}:redrive:{redrive}"
        headers["Nats-Msg-Id"] = dedup
        await self.broker.publish(
            event.model_dump_json().encode(),
            self.topology.subject(event),
            headers=headers,
            stream=self.topology.stream.name,
            timeout=self.settings.publish_timeout_s,
        )

    async def kv(self, bucket: str) -> KeyValue:
        return await self._bucket(bucket)

    async def flag_get(self, bucket: str, key: str) -> bytes | None:
        kv = await self._bucket(bucket)
        try:
            entry = await kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        return entry.value

    async def flag_set(self, bucket: str, key: str, value: bytes = b"1") -> None:
        kv = await self._bucket(bucket)
        await kv.put(key, value)

    async def is_cancelled(self, job_id: object) -> bool:
        return await self.flag_get(self.topology.cancel_bucket, str(job_id)) is not None

    async def cancel(self, job_id: object) -> None:
        await self.flag_set(self.topology.cancel_bucket, str(job_id))

    async def stage_backlog(self, stage: Stage) -> int | None:
        """Messages a stage's consumer has yet to deliver or to see acknowledged; None when
        the consumer does not exist (deleted by hand since the topology was set up)."""
        try:
            info = await self.js.consumer_info(
                self.topology.stream.name, self.topology.consumer(stage).durable
            )
        except nats.js.errors.NotFoundError:
            return None
        return int(info.num_pending or 0) + int(info.num_ack_pending or 0)

    @property
    def connected(self) -> bool:
        try:
            return bool(self.broker.connection.is_connected)
        except Exception:  # no connection was ever made
            return False

    async def ping(self) -> bool:
        try:
            await self.js.account_info()
        except Exception:
            return False
        return True
