"""The message bus: JetStream topology, deduplicated publishing and the job control flags.

Publishing always waits for JetStream's ack and always sets `Nats-Msg-Id`, so a publish
retried after a lost ack (or by a redelivered handler) is dropped by the server.
"""

from __future__ import annotations

import logging
from typing import Any

import nats.js.errors
from faststream.nats import NatsBroker
from faststream.nats.opentelemetry import NatsTelemetryMiddleware
from faststream.nats.prometheus import NatsPrometheusMiddleware
from nats.js import JetStreamContext
from nats.js.api import (
    ConsumerConfig,
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.kv import KeyValue
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry

from voicejury_contracts import Event, Stage, Topology

from .settings import CommonSettings

log = logging.getLogger(__name__)

KV_TTL_S = 7 * 24 * 3600


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
    return NatsBroker(
        settings.nats_url,
        middlewares=middlewares,
        name=f"voicejury-{service}",
        # Keep reconnecting forever: a nats-server restart must not kill the stage.
        max_reconnect_attempts=-1,
        reconnect_time_wait=1,
        graceful_timeout=graceful_timeout_s,
    )


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
            retention=RetentionPolicy.LIMITS,
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
            await self.js.update_stream(config)
        for bucket in (self.topology.cancel_bucket, self.topology.join_bucket, self.effects_bucket):
            await self._bucket(bucket)

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

    async def publish(self, event: Event, *, msg_id: str | None = None) -> None:
        """Publishes and waits for JetStream's ack; raises if it is not stored."""
        await self.broker.publish(
            event.model_dump_json().encode(),
            self.topology.subject(event),
            headers={"Nats-Msg-Id": msg_id or event.dedup_id(), "content-type": "application/json"},
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
        the consumer does not exist (no replica of the stage ever started)."""
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
