"""OpenTelemetry tracing and Prometheus metrics, set up once per process.

Trace context travels in NATS headers (FastStream's telemetry middleware injects it on
publish and extracts it on consume), so one job is one trace across every service.
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from prometheus_client import CollectorRegistry

from .settings import CommonSettings


def setup_tracing(service: str, settings: CommonSettings) -> TracerProvider:
    """A tracer provider exporting over OTLP/HTTP when an endpoint is configured, else none."""
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: f"voicejury-{service}"}))
    if settings.otel_exporter_otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        endpoint = settings.otel_exporter_otlp_endpoint.rstrip("/") + "/v1/traces"
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    trace.set_tracer_provider(provider)
    return provider


def new_registry() -> CollectorRegistry:
    """A registry per app, so tests can run several apps in one process without clashes."""
    return CollectorRegistry()
