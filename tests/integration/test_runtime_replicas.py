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
