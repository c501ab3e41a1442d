"""One job is one trace across every service: the stack exports its spans over OTLP/HTTP to
a collector the test runs on loopback (the wire format a real collector receives)."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tests.conftest import AUDIO, NATS_URL, delete_namespace, free_port
from tests.e2e.test_pipeline import STACK_ENV, events, submit
from voicejury_devstack.stack import LocalStack

pytestmark = pytest.mark.e2e

SERVICES = {"gateway", "separator", "pitch", "asr", "scorer", "jury"}


@dataclass(frozen=True)
class Span:
    service: str  # without the `voicejury-` prefix
    name: str
    parent_id: bytes  # b"" for a trace's root


class Collector:
    """An OTLP/HTTP trace receiver: spans by trace id, as (service, span name), and by
    trace and span id with their parents."""

    def __init__(self) -> None:
        self.spans: dict[bytes, set[tuple[str, str]]] = defaultdict(set)
        self.by_id: dict[bytes, dict[bytes, Span]] = defaultdict(dict)
        self.lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                request = ExportTraceServiceRequest.FromString(body)
                with collector.lock:
                    for resource_spans in request.resource_spans:
                        service = next(
                            a.value.string_value
                            for a in resource_spans.resource.attributes
                            if a.key == "service.name"
                        )
                        for scope in resource_spans.scope_spans:
                            for span in scope.spans:
                                collector.spans[span.trace_id].add((service, span.name))
                                collector.by_id[span.trace_id][span.span_id] = Span(
                                    service.removeprefix("voicejury-"),
                                    span.name,
                                    span.parent_span_id,
                                )
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def trace(self, trace_id: bytes) -> dict[bytes, Span]:
        with self.lock:
            return dict(self.by_id[trace_id])

    def services_by_trace(self) -> dict[bytes, set[str]]:
        with self.lock:
            return {
                trace_id: {service.removeprefix("voicejury-") for service, _ in spans}
                for trace_id, spans in self.spans.items()
            }


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    c = Collector()
    yield c
    c.server.shutdown()


@pytest.fixture(scope="module")
def stack(collector: Collector, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    namespace = "o" + uuid.uuid4().hex[:10]
    env = {**STACK_ENV, "VJ_OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint}
    with LocalStack(
        namespace, tmp_path_factory.mktemp("traced"), env_overrides=env, tenant="otel"
    ) as st:
        yield st
    asyncio.run(delete_namespace(NATS_URL, namespace))


def test_a_job_is_one_trace_through_every_service(stack: LocalStack, collector: Collector) -> None:
    with httpx.Client(
        base_url=stack.base_url,
        headers={"Authorization": f"Bearer {stack.api_key}"},
        timeout=httpx.Timeout(30.0, read=60.0),
    ) as client:
        clip = AUDIO / "vocadito_10.wav"
        job_id = submit(client, clip, clip, language="en")
        assert events(client, job_id)[-1].event == "completed"
    # Spans leave each process in batches (every 5 s by default).
    deadline = time.monotonic() + 60
    while not any(s >= SERVICES for s in collector.services_by_trace().values()):
        assert time.monotonic() < deadline, collector.services_by_trace()
        time.sleep(0.5)
    (trace,) = [t for t, s in collector.services_by_trace().items() if s >= SERVICES]
    names = {name for _, name in collector.spans[trace]}
    # The job's events as the bus saw them: published by one service, processed by the next.
    assert any("job.submitted" in n for n in names), names
    assert any("job.completed" in n for n in names), names
    # The last spans of the job may come in the exporters' next batches.
    deadline = time.monotonic() + 30
    while problems := _unjoined(collector.trace(trace)):
        assert time.monotonic() < deadline, (problems, sorted(names))
        time.sleep(0.5)


def _unjoined(spans: dict[bytes, Span]) -> list[str]:
    """What the trace lacks of its joins (none: all there)."""
    problems = []

    def parents(of: list[Span]) -> set[str]:
        return {spans[s.parent_id].service for s in of if s.parent_id in spans}

    def named(service: str, suffix: str) -> list[Span]:
        return [s for s in spans.values() if s.service == service and s.name.endswith(suffix)]

    # The gateway's recorder joins the trace of what it records: its span of the terminal
    # event is a child of the jury's publish, not the root of a trace of its own.
    if "jury" not in parents(named("gateway", "job.completed record")):
        problems.append("no recorder span of job.completed under the jury's publish")
    # The fan-in: the scorer handles both halves, each within the trace of the stage that
    # published it, and scores under one of them. (The scorer links neither half to the
    # other: the span that scores has one parent, whichever half came second.)
    for subject, publisher in (("analysis.pitch", "pitch"), ("analysis.transcript", "asr")):
        if parents(named("scorer", f"{subject} process")) != {publisher}:
            problems.append(f"the scorer's {subject} not (only) under {publisher}")
    scored = named("scorer", "job.scored create")
    if not any({"pitch", "asr"} & {a.service for a in _ancestors(s, spans)} for s in scored):
        problems.append("job.scored not published under pitch's or asr's event")
    return problems


def _ancestors(span: Span, spans: dict[bytes, Span]) -> list[Span]:
    found = []
    while span.parent_id in spans:
        span = spans[span.parent_id]
        found.append(span)
    return found
