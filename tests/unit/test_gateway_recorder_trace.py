"""The recorder's span joins the trace of the event it records, read from the W3C
`traceparent` header FastStream's telemetry middleware writes on every publish."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from opentelemetry import propagate
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from voicejury_contracts import Stage, StageProgress, Topology
from voicejury_gateway.recorder import EventRecorder


class RecordingRepo:
    async def record(self, event: Any) -> bool:
        return True


class Delivery:
    """A JetStream message as the recorder's fetch hands it over."""

    def __init__(self, subject: str, headers: dict[str, str]) -> None:
        self.subject = subject
        self.headers = headers
        self.metadata = SimpleNamespace(num_delivered=1)
        self.acked = False

    async def ack(self) -> None:
        self.acked = True


@pytest.fixture
def global_propagator_without_tracecontext() -> Iterator[None]:
    """OTEL_PROPAGATORS set to a format FastStream does not write (b3, jaeger, none)."""
    before = propagate.get_global_textmap()
    propagate.set_global_textmap(CompositePropagator([]))
    yield
    propagate.set_global_textmap(before)


@pytest.mark.usefixtures("global_propagator_without_tracecontext")
def test_a_record_span_is_a_child_of_the_publish_whatever_the_global_propagator() -> None:
    publisher = TracerProvider().get_tracer("stage")
    headers: dict[str, str] = {}
    with publisher.start_as_current_span("analysis.pitch publish") as publish:
        TraceContextTextMapPropagator().inject(headers)  # what FastStream writes

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    topology = Topology("trec")
    recorder = EventRecorder(
        SimpleNamespace(topology=topology),  # type: ignore[arg-type]
        RecordingRepo(),  # type: ignore[arg-type]
        database_url="postgresql://unused",
        ack_wait_s=30,
        tracer_provider=provider,
    )
    event = StageProgress(job_id=uuid.uuid4(), stage=Stage.PITCH, fraction=1, attempt=1, seq=0)
    delivery = Delivery(topology.subject(event), headers)
    assert asyncio.run(recorder._record(delivery, event))  # type: ignore[arg-type]

    assert delivery.acked
    (record,) = exporter.get_finished_spans()
    assert record.name.endswith("record")
    assert record.parent is not None, "the record started a trace of its own"
    assert record.context.trace_id == publish.get_span_context().trace_id
    assert record.parent.span_id == publish.get_span_context().span_id
