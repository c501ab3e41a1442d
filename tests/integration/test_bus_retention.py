"""The job stream on the real nats-server keeps a message only while a consumer still has to
handle it (interest retention), so steady traffic never fills it; and a message published
before a stage ever started is kept for that stage."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator

import nats
import pytest
from nats.js.api import RetentionPolicy, StreamConfig

from tests.conftest import NATS_URL, delete_namespace, reference_submitted
from voicejury_contracts import (
    Stage,
    StageProgress,
)
from voicejury_runtime.bus import CONSUMERS, Bus, make_broker
from voicejury_runtime.settings import CommonSettings

pytestmark = pytest.mark.integration


@pytest.fixture
async def bus(env: dict[str, str]) -> AsyncIterator[Bus]:
    settings = CommonSettings()
    broker = make_broker("test", settings)
    await broker.connect()
    try:
        yield Bus(broker, settings)
    finally:
        await broker.stop()
        await delete_namespace(NATS_URL, env["VJ_NAMESPACE"])


async def _messages(bus: Bus) -> int:
    return int((await bus.js.stream_info(bus.topology.stream.name)).state.messages)


async def _handle_one(bus: Bus, stage: Stage) -> None:
    """What a replica of `stage` does with its next message: take it and acknowledge it."""
    spec = bus.topology.consumer(stage)
    sub = await bus.js.pull_subscribe(
        spec.filter_subject, durable=spec.durable, stream=bus.topology.stream.name
    )
    (msg,) = await sub.fetch(1, timeout=5)
    await msg.ack_sync()


async def test_a_message_stays_until_every_consumer_that_wants_it_has_acknowledged_it(
    bus: Bus,
) -> None:
    # No stage has started: the topology alone creates every durable consumer.
    await bus.ensure_topology()
    stream = bus.topology.stream.name
    for stage in CONSUMERS:
        await bus.js.consumer_info(stream, bus.topology.consumer(stage).durable)

    await bus.publish(reference_submitted())  # wanted by the separator and the gateway's recorder
    assert await _messages(bus) == 1
    await _handle_one(bus, Stage.GATEWAY)
    assert await _messages(bus) == 1  # still the separator's to do
    await _handle_one(bus, Stage.SEPARATOR)
    assert await _messages(bus) == 0  # done by all: gone

    progress = StageProgress(job_id=uuid.uuid4(), stage=Stage.PITCH, fraction=0.5, attempt=1, seq=0)
    await bus.publish(progress)  # only the recorder wants it
    assert await _messages(bus) == 1
    await _handle_one(bus, Stage.GATEWAY)
    assert await _messages(bus) == 0


async def test_a_stream_of_another_retention_is_kept_as_it_is_and_said_so(
    bus: Bus, caplog: pytest.LogCaptureFixture
) -> None:
    """nats-server cannot change a stream's retention in place: a deployment upgraded over
    a stream of the old (limits) retention keeps working on it, and the log says how to
    move."""
    spec = bus.topology.stream
    nc = await nats.connect(NATS_URL)
    try:
        await nc.jetstream().add_stream(
            StreamConfig(name=spec.name, subjects=list(spec.subjects))  # limits retention
        )
    finally:
        await nc.close()
    with caplog.at_level(logging.ERROR, logger="voicejury_runtime.bus"):
        await bus.ensure_topology()
    info = await bus.js.stream_info(spec.name)
    assert info.config.retention == RetentionPolicy.LIMITS
    assert info.config.max_bytes == bus.settings.stream_max_bytes  # the rest did update
    assert any("retention" in r.getMessage() for r in caplog.records)
