"""Replicas of a stage share one durable consumer on the real nats-server: each one added
must add throughput, so the consumer must let every replica hold a message at once."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from tests.conftest import NATS_URL, delete_namespace, reference_submitted
from voicejury_contracts import ReferenceSubmitted, Stage

pytestmark = pytest.mark.integration

REPLICAS = 3


async def test_each_replica_of_a_stage_works_on_its_own_message_at_the_same_time(
    env: dict[str, str],
) -> None:
    """Three replicas (one message each at a time, as deployed), three messages: all three
    are in the handlers together. With the consumer's max_ack_pending at one replica's
    concurrency, the second and third would wait for the first's ack."""
    from voicejury_runtime.settings import StageSettings
    from voicejury_runtime.stage import StageService

    settings = StageSettings(concurrency=1)
    inside: set[uuid.UUID] = set()
    all_inside = asyncio.Event()
    release = asyncio.Event()

    async def handler(event: Any, ctx: Any) -> list[Any]:
        inside.add(event.job_id)
        if len(inside) == REPLICAS:
            all_inside.set()
        await release.wait()
        return []

    replicas = [StageService(Stage.SEPARATOR, settings) for _ in range(REPLICAS)]
    for replica in replicas:
        replica.handles(ReferenceSubmitted)(handler)
    try:
        for replica in replicas:
            await replica._on_start()
            await replica.broker.start()
        for _ in range(REPLICAS):
            await replicas[0].bus.publish(reference_submitted())
        try:
            await asyncio.wait_for(all_inside.wait(), timeout=30)
        except TimeoutError:
            pytest.fail(f"{len(inside)} of {REPLICAS} replicas got a message at once")
    finally:
        release.set()
        for replica in replicas:
            await replica.broker.stop()
        await delete_namespace(NATS_URL, env["VJ_NAMESPACE"])


async def test_a_replica_working_on_all_it_may_fetches_nothing_more(
    env: dict[str, str],
) -> None:
    """A replica with two workers, both busy past the ack wait (heartbeats keep theirs):
    the third message stays on the server until a worker is free, so it is delivered once.
    Fetched early, it would wait in the process without heartbeats and be delivered again
    (attempt 2) while its first copy still waited for a worker."""
    from voicejury_runtime.settings import StageSettings
    from voicejury_runtime.stage import StageService

    settings = StageSettings(concurrency=2, ack_wait_s=3, heartbeat_s=1, cancel_poll_s=1)
    deliveries: list[tuple[uuid.UUID, int]] = []

    async def handler(event: Any, ctx: Any) -> list[Any]:
        deliveries.append((event.job_id, ctx.attempt))
        await asyncio.sleep(7)  # past two ack waits
        return []

    replica = StageService(Stage.SEPARATOR, settings)
    replica.handles(ReferenceSubmitted)(handler)
    try:
        await replica._on_start()
        await replica.broker.start()
        for _ in range(3):
            await replica.bus.publish(reference_submitted())
        for _ in range(200):
            if len({job for job, _ in deliveries}) == 3:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(4)  # a redelivery, were there one, would have come by now
    finally:
        await replica.broker.stop()
        await delete_namespace(NATS_URL, env["VJ_NAMESPACE"])
    assert len({job for job, _ in deliveries}) == 3
    assert [attempt for _, attempt in deliveries] == [1, 1, 1]
