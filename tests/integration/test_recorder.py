"""The gateway's event recorder: the order it records a job's events in, what it does with
events that still reach PostgreSQL out of order (gateway replicas share its consumer, so
across replicas a job's events are not recorded in the order the stages published them),
and its shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import nats
import nats.js.errors
import pytest
from fastapi.testclient import TestClient

from tests.audio_fixtures import sung_tone
from tests.conftest import NATS_URL, delete_namespace
from tests.integration.test_gateway_api import api_key, gateway, submit
from voicejury_contracts import (
    JobCompleted,
    JobOptions,
    JobResult,
    PitchScore,
    RhythmScore,
    Scored,
    ScoreResult,
    Stage,
    StageProgress,
    StageRun,
    Weights,
)
from voicejury_runtime.store import job_key

pytestmark = pytest.mark.integration

__all__ = ["gateway"]  # the fixture, imported for the tests below


def _scores() -> dict[str, Any]:
    return {
        "score": 80.0,
        "weights": Weights(pitch=4 / 7, rhythm=3 / 7, lyrics=0.0),
        "pitch": PitchScore(
            score=80.0,
            accuracy=0.8,
            mean_abs_error_cents=20.0,
            key_offset_cents=0.0,
            key_offset_counted=False,
            register_offset_octaves=0,
            octave_errors_folded=0,
            octave_switches=0,
            voiced_frames=100,
            tolerance_cents=50.0,
        ),
        "rhythm": RhythmScore(
            score=80.0,
            global_offset_ms=0.0,
            onset_precision=0.8,
            onset_recall=0.8,
            mean_abs_timing_ms=30.0,
            tempo_ratio=1.0,
        ),
        "lyrics": None,
        "lines": (),
        "performance_separated": False,
        "reference_separated": False,
    }


def pitch_report(job_id: uuid.UUID, seq: int, *, of: int) -> StageProgress:
    """The pitch stage's `seq`-th progress report of `of` (attempt 1), `report <seq>`."""
    return StageProgress(
        job_id=job_id,
        stage=Stage.PITCH,
        fraction=(seq + 1) / of,
        message=f"report {seq}",
        attempt=1,
        seq=seq,
    )


def test_a_stage_output_recorded_after_the_jobs_completion_still_counts(
    gateway: TestClient,
) -> None:
    """Scored recorded after JobCompleted: the scorer's stage is completed and its aligned
    pitch served, and the event log still ends with one terminal event."""
    auth = api_key(gateway, "acme")
    job_id = uuid.UUID(submit(gateway, auth, sung_tone(), sung_tone()).json()["job_id"])
    services = gateway.app.state.services  # type: ignore[attr-defined]
    portal = gateway.portal
    assert portal is not None
    contours = {"time_s": [0.0, 0.01], "reference_cents": [0.0, 1.0], "performance_cents": [2.0]}
    aligned = portal.call(
        services.store.put_bytes,
        job_key(job_id, "analysis", "aligned_pitch.json"),
        json.dumps(contours).encode(),
        "application/json",
    )
    run = StageRun(stage=Stage.SCORER, started_at=datetime.now(UTC), seconds=0.1, attempt=1)
    scored = Scored(
        job_id=job_id,
        options=JobOptions(),
        result=ScoreResult(**_scores()),
        aligned_pitch=aligned,
        provenance=(run,),
    )
    completed = JobCompleted(
        job_id=job_id,
        result=JobResult(
            job_id=str(job_id), jury=None, warnings=(), provenance=(run,), **_scores()
        ),
    )

    assert portal.call(services.repo.record, completed)
    assert not portal.call(services.repo.record, scored)  # no new event for the stream

    job = gateway.get(f"/v1/jobs/{job_id}", headers=auth).json()
    assert job["status"] == "completed"
    assert job["stages"][Stage.SCORER.value]["status"] == "completed", job["stages"]
    pitch = gateway.get(f"/v1/jobs/{job_id}/pitch", headers=auth)
    assert pitch.status_code == 200, pitch.text
    assert pitch.json() == contours
    with gateway.stream("GET", f"/v1/jobs/{job_id}/events", headers=auth) as stream:
        kinds = [
            line.removeprefix("event: ")
            for line in stream.iter_lines()
            if line.startswith("event: ")
        ]
    terminal = [k for k in kinds if k in ("completed", "failed", "cancelled")]
    assert terminal == ["completed"], kinds
    assert kinds[-1] == "completed", kinds


def test_an_earlier_progress_report_recorded_late_does_not_move_progress_back(
    gateway: TestClient,
) -> None:
    """Within one attempt a stage reports growing fractions; recorded out of order, the
    earlier report is dropped, so a client's progress bar never goes back. An equal
    fraction with a new message, or a new attempt starting over, still counts."""
    auth = api_key(gateway, "acme")
    job_id = uuid.UUID(submit(gateway, auth, sung_tone(), sung_tone()).json()["job_id"])
    services = gateway.app.state.services  # type: ignore[attr-defined]
    portal = gateway.portal
    assert portal is not None

    def report(fraction: float, seq: int, attempt: int = 1, message: str = "") -> bool:
        event = StageProgress(
            job_id=job_id,
            stage=Stage.PITCH,
            fraction=fraction,
            message=message or f"at {fraction}",
            attempt=attempt,
            seq=seq,
        )
        return bool(portal.call(services.repo.record, event))

    assert report(0.7, seq=2)
    assert not report(0.62, seq=1)  # published before 0.7, recorded after it
    assert report(0.7, seq=3, message="same fraction, new news")
    assert report(0.1, seq=0, attempt=2)  # redelivered: the new attempt starts over
    job = gateway.get(f"/v1/jobs/{job_id}", headers=auth).json()
    assert job["stages"][Stage.PITCH.value]["attempts"] == 2
    assert job["stages"][Stage.PITCH.value]["progress"] == pytest.approx(0.1)


def test_events_fetched_together_are_recorded_in_stream_order_job_by_job(
    env: dict[str, str], database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two jobs' progress, published interleaved while no gateway runs, reaches the next
    gateway's recorder in one fetch. Each job's reports are recorded in the order the stream
    holds them: none dropped as an earlier report recorded late, and each job's event log
    reads as the stage published it."""
    from voicejury_contracts import Topology
    from voicejury_gateway.app import create_app
    from voicejury_gateway.settings import GatewaySettings

    monkeypatch.setenv("VJ_DATABASE_URL", database_url)
    with TestClient(create_app(GatewaySettings())) as client:
        auth = api_key(client, "acme")
        jobs = [
            uuid.UUID(submit(client, auth, sung_tone(), sung_tone()).json()["job_id"])
            for _ in range(2)
        ]
    reports = [pitch_report(job, seq, of=8) for seq in range(8) for job in jobs]
    topology = Topology(env["VJ_NAMESPACE"])

    async def publish() -> None:
        nc = await nats.connect(NATS_URL)
        js = nc.jetstream()
        for report in reports:
            await js.publish(
                topology.subject(report),
                report.model_dump_json().encode(),
                stream=topology.stream.name,
                headers={"Nats-Msg-Id": report.dedup_id()},
            )
        await nc.close()

    asyncio.run(publish())
    try:
        with TestClient(create_app(GatewaySettings())) as client:
            services = client.app.state.services  # type: ignore[attr-defined]
            portal = client.portal
            assert portal is not None
            deadline = time.monotonic() + 30
            for job in jobs:
                while True:
                    logged = portal.call(services.repo.events_after, job, 0)
                    messages = [e.data.get("message") for e in logged if e.type == "progress"]
                    if len(messages) == 8 or time.monotonic() > deadline:
                        break
                    time.sleep(0.1)
                assert messages == [f"report {seq}" for seq in range(8)], messages
    finally:
        asyncio.run(delete_namespace(NATS_URL, env["VJ_NAMESPACE"]))


async def test_a_stopped_recorder_leaves_nothing_to_hold_the_connections_drain_up(
    env: dict[str, str], database_url: str
) -> None:
    """Stopped while its fetch waits on the server, the recorder leaves no subscription
    behind: an event published next is not delivered to it, where nobody would read it and
    the connection's drain (the broker's stop) would wait on it for its whole timeout."""
    from voicejury_gateway.db import JobRepository, create_pool
    from voicejury_gateway.recorder import EventRecorder
    from voicejury_gateway.settings import GatewaySettings
    from voicejury_runtime.bus import Bus, make_broker

    settings = GatewaySettings(database_url=database_url)
    broker = make_broker("gateway", settings, graceful_timeout_s=1.0)
    bus = Bus(broker, settings)
    pool = await create_pool(database_url, 2)
    recorder = EventRecorder(bus, JobRepository(pool), database_url=database_url, ack_wait_s=30.0)
    try:
        await broker.connect()
        await bus.ensure_topology()
        await bus.ensure_consumer(recorder.config)
        await broker.start()
        await recorder.start()
        deadline = time.monotonic() + 10
        while not (
            await bus.js.consumer_info(bus.topology.stream.name, recorder.spec.durable)
        ).num_waiting:
            assert time.monotonic() < deadline, "the recorder never asked for events"
            await asyncio.sleep(0.05)
        await recorder.stop()
        await bus.publish(
            StageProgress(job_id=uuid.uuid4(), stage=Stage.PITCH, fraction=0.5, attempt=1, seq=0)
        )
        started = time.monotonic()
        await broker.stop()
        # A liveness bound, not a speed target: well under a millisecond here, against the
        # drain's 10 s wait on an unread message.
        assert time.monotonic() - started < 5.0, "the connection's drain waited on the recorder"
    finally:
        await pool.close()
        await delete_namespace(NATS_URL, env["VJ_NAMESPACE"])


class Replicas:
    """Two gateway replicas' recorders on one consumer, each on its own NATS connection,
    the first slow to write (as on a loaded database): `slow` and `fast`, and a job to
    report on (published through the fast one's connection)."""

    def __init__(self, database_url: str, *, slow_write_s: float, ack_wait_s: float) -> None:
        from prometheus_client import CollectorRegistry

        from voicejury_gateway.db import JobRepository
        from voicejury_gateway.recorder import EventRecorder
        from voicejury_gateway.settings import GatewaySettings
        from voicejury_runtime.bus import Bus, make_broker

        class SlowRepository(JobRepository):
            async def record(self, event: Any) -> bool:
                await asyncio.sleep(slow_write_s)
                return await super().record(event)

        self.database_url = database_url
        settings = GatewaySettings(database_url=database_url)
        self.buses = [
            Bus(make_broker("gateway", settings, graceful_timeout_s=1.0), settings)
            for _ in range(2)
        ]
        self.registries = [CollectorRegistry(), CollectorRegistry()]

        def recorder(repo: type[JobRepository], index: int) -> EventRecorder:
            return EventRecorder(
                self.buses[index],
                repo(self.pool),
                database_url=database_url,
                ack_wait_s=ack_wait_s,
                registry=self.registries[index],
            )

        self._recorder = recorder
        self._repositories = (SlowRepository, JobRepository)
        self.job_id = uuid.uuid4()

    async def __aenter__(self) -> Replicas:
        from tests.conftest import reference_submitted
        from voicejury_contracts import AudioInput, JobSubmitted
        from voicejury_gateway.db import create_pool

        self.pool = await create_pool(self.database_url, 4)
        self.slow, self.fast = (
            self._recorder(repo, index) for index, repo in enumerate(self._repositories)
        )
        audio = reference_submitted().reference
        submitted = JobSubmitted(
            job_id=self.job_id,
            tenant="acme",
            performance=AudioInput.model_validate(audio.model_dump() | {"role": "performance"}),
            reference=audio,
            options=JobOptions(),
        )
        await self.slow.repo.insert_job(submitted, None, max_active=10)
        for bus in self.buses:
            await bus.broker.connect()
            await bus.ensure_topology()
            await bus.ensure_consumer(self.slow.config)
            await bus.broker.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.fast.stop()
        await self.slow.stop()
        for bus in self.buses:
            with contextlib.suppress(nats.errors.ConnectionClosedError):  # closed by a test
                await bus.broker.stop()
        await self.pool.close()

    def recorded(self, index: int) -> float:
        value = self.registries[index].get_sample_value(
            "voicejury_events_recorded_total", {"outcome": "recorded"}
        )
        return value or 0.0

    async def report(self, seqs: range, *, pause_s: float = 0.05) -> None:
        for seq in seqs:  # one after another, as a stage reports
            await self.buses[1].publish(pitch_report(self.job_id, seq, of=16))
            await asyncio.sleep(pause_s)

    async def logged(self) -> list[str]:
        events = await self.slow.repo.events_after(self.job_id, 0)
        return [e.data["message"] for e in events if e.type == "progress"]


async def until(condition: Any, what: str) -> None:
    deadline = time.monotonic() + 20  # a liveness bound, not a speed target
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def test_one_gateway_replica_records_at_a_time_and_another_takes_over(
    env: dict[str, str], database_url: str
) -> None:
    """Two gateway replicas' recorders on the one consumer: only the lease holder records.
    The holder here is slow to write, so, were both recording, the other would record a
    job's later reports first and the earlier ones would be dropped as late (B29's guard);
    with the lease every report is recorded, in the order the stage published it. Stopped,
    the holder gives the lease up and the other replica records the rest."""
    try:
        async with Replicas(database_url, slow_write_s=0.2, ack_wait_s=30.0) as r:
            await r.slow.start()
            await until(lambda: r.slow.lease.held, "the first replica never took the lease")
            await r.fast.start()
            await r.report(range(8))
            await until(lambda: r.recorded(0) == 8, "the lease holder did not record them all")
            assert not r.fast.lease.held
            assert r.recorded(1) == 0, "the standby replica recorded events"
            assert await r.logged() == [f"report {seq}" for seq in range(8)]

            await r.slow.stop()
            await until(lambda: r.fast.lease.held, "the standby never took the lease over")
            await r.report(range(8, 16))
            await until(lambda: r.recorded(1) == 8, "the new holder did not record them all")
            assert await r.logged() == [f"report {seq}" for seq in range(16)]
    finally:
        await delete_namespace(NATS_URL, env["VJ_NAMESPACE"])


async def test_a_replica_stopped_mid_batch_hands_its_events_over_at_once(
    env: dict[str, str], database_url: str
) -> None:
    """The recording replica stopped (a rolling update) with a fetched batch half written:
    the events it had not settled go back at once, ahead of anything later, so the replica
    taking over records them straight away and in order, not after the ack wait (60 s
    here, three times the test's bound)."""
    try:
        async with Replicas(database_url, slow_write_s=0.5, ack_wait_s=60.0) as r:
            await r.report(range(8), pause_s=0)  # waiting together: one fetch
            await r.slow.start()
            await until(lambda: r.recorded(0) >= 2, "the first replica recorded nothing")
            await r.fast.start()
            await r.slow.stop()
            written = int(r.recorded(0))
            assert written < 8, "the slow replica finished its batch before it was stopped"
            await until(lambda: r.recorded(1) == 8 - written, "the handed-back events waited")
            assert await r.logged() == [f"report {seq}" for seq in range(8)]
    finally:
        await delete_namespace(NATS_URL, env["VJ_NAMESPACE"])


async def test_a_recording_replica_cut_off_from_nats_hands_the_lease_on(
    env: dict[str, str], database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lease holder loses NATS but not PostgreSQL: it gives the lease up once
    JetStream has not answered for a while (1 s here), and the replica that can reach
    NATS records. Without that, nobody would record, and every job would stall."""
    from voicejury_gateway import recorder

    monkeypatch.setattr(recorder, "_STEP_DOWN_AFTER_S", 1.0)
    try:
        async with Replicas(database_url, slow_write_s=0.0, ack_wait_s=30.0) as r:
            await r.slow.start()
            await until(lambda: r.slow.lease.held, "the first replica never took the lease")
            await r.fast.start()
            await r.buses[0].broker.connection.close()  # the holder's NATS gone for good
            await until(lambda: r.fast.lease.held, "the cut-off holder kept the lease")
            await r.report(range(8))
            await until(lambda: r.recorded(1) == 8, "the new holder did not record them all")
            assert await r.logged() == [f"report {seq}" for seq in range(8)]
    finally:
        await delete_namespace(NATS_URL, env["VJ_NAMESPACE"])


async def test_the_recorders_consumer_deleted_is_created_again_unbounded(
    env: dict[str, str], database_url: str
) -> None:
    """Its durable consumer deleted while gateways run (by hand, or with its stream to
    change retention): the recording replica creates it again and records on, rather
    than stepping down in turn with the others and recording nothing. A stage creating
    the consumers it finds missing gives the gateway's unbounded deliveries too: with 5,
    an event refused through a 10 s database outage would be dropped for good."""
    from voicejury_contracts import Topology

    assert Topology().consumer(Stage.GATEWAY).max_deliver == -1
    try:
        async with Replicas(database_url, slow_write_s=0.0, ack_wait_s=30.0) as r:
            await r.fast.start()
            await until(lambda: r.fast.lease.held, "the replica never took the lease")
            await r.report(range(2))
            await until(lambda: r.recorded(1) == 2, "the first reports were not recorded")
            bus = r.buses[1]
            stream, durable = bus.topology.stream.name, r.fast.spec.durable
            await bus.js.delete_consumer(stream, durable)
            # Events published while it is gone have no interest in them and are dropped
            # (interest retention): the replica's next quiet fetch (5 s) notices.
            deadline = time.monotonic() + 20
            while True:
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    info = await bus.js.consumer_info(stream, durable)
                    break
                assert time.monotonic() < deadline, "the consumer was not created again"
                await asyncio.sleep(0.2)
            assert (info.config.max_deliver, info.config.ack_wait) == (-1, 30.0)
            await r.report(range(2, 4))
            await until(lambda: r.recorded(1) == 4, "nothing recorded after the deletion")
            assert r.fast.lease.held
            assert (await r.logged())[-2:] == ["report 2", "report 3"]
    finally:
        await delete_namespace(NATS_URL, env["VJ_NAMESPACE"])
