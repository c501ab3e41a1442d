"""Composition root of the gateway: settings in, a FastAPI app out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from prometheus_client import Counter, Gauge, start_http_server

from voicejury_contracts import Stage
from voicejury_runtime.bus import Bus, make_broker
from voicejury_runtime.logs import configure_logging
from voicejury_runtime.store import ObjectStore
from voicejury_runtime.telemetry import new_registry, setup_tracing

from .admission import AdmissionMiddleware
from .api import Services, job_in_logs, metrics_router, router
from .db import JobRepository, create_pool
from .housekeeping import Housekeeper
from .hub import EventHub
from .media import router as media_router
from .migrate import schema_head
from .problems import install_problem_handlers
from .recorder import EventRecorder, register_max_deliveries_watch
from .references import router as references_router
from .settings import GatewaySettings
from .uploads import UploadLimitMiddleware

# Form fields (lyrics: 20k characters, 80 kB in UTF-8) and multipart framing, beside the
# recordings.
_BODY_OVERHEAD_BYTES = 1 << 20


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()
    configure_logging(Stage.GATEWAY.value, settings.log_level, as_json=settings.log_json)
    schema = schema_head()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        registry = new_registry()
        metrics_server = None
        if settings.gateway_metrics_port is not None:  # first: a port taken fails at once
            metrics_server, _ = start_http_server(
                settings.gateway_metrics_port, addr=settings.http_host, registry=registry
            )
        tracer_provider = setup_tracing(Stage.GATEWAY.value, settings)
        broker = make_broker(
            Stage.GATEWAY.value, settings, tracer_provider=tracer_provider, registry=registry
        )
        bus = Bus(broker, settings)
        store = ObjectStore(settings)
        pool = await create_pool(settings.database_url, settings.database_pool_size)
        repo = JobRepository(pool)
        hub = EventHub(settings.database_url)
        await broker.connect()
        await bus.ensure_topology()
        await store.ensure_bucket()
        register_max_deliveries_watch(bus, repo)
        recorder = EventRecorder(
            bus,
            repo,
            database_url=settings.database_url,
            ack_wait_s=settings.gateway_recorder_ack_wait_s,
            tracer_provider=tracer_provider,
            registry=registry,
        )
        await bus.ensure_consumer(recorder.config)
        await broker.start()
        await recorder.start()
        await hub.start()
        housekeeper = Housekeeper(
            repo,
            bus,
            store,
            stall_timeout_s=settings.gateway_stall_timeout_s,
            queue_wait_max_s=settings.gateway_queue_wait_max_s,
            max_redrives=settings.gateway_max_redrives,
            audio_retention_s=settings.gateway_audio_retention_s,
            cache_retention_s=settings.gateway_cache_retention_s,
            interval_s=settings.gateway_housekeeping_interval_s,
            # Past any publish the gateway that recorded the job could still be waiting on.
            unacknowledged_after_s=max(60.0, 4 * settings.publish_timeout_s),
            event_log_retention_s=settings.gateway_event_log_retention_s,
        )
        await housekeeper.start()
        app.state.services = Services(
            settings=settings,
            schema=schema,
            repo=repo,
            bus=bus,
            store=store,
            hub=hub,
            registry=registry,
            accepted=Counter(
                "voicejury_jobs_accepted_total", "Jobs accepted (202)", registry=registry
            ),
            rejected=Counter(
                "voicejury_jobs_rejected_total",
                "Submissions refused, by problem code",
                ["code"],
                registry=registry,
            ),
            streams=Gauge("voicejury_sse_streams", "Open SSE streams", registry=registry),
        )
        try:
            yield
        finally:
            if metrics_server is not None:
                await asyncio.to_thread(metrics_server.shutdown)  # waits out its poll
                metrics_server.server_close()
            await housekeeper.stop()
            await hub.stop()
            await recorder.stop()
            await broker.stop()
            await pool.close()

    app = FastAPI(
        title="VoiceJury",
        version="1.0.0",
        summary="Scores singing against a reference: pitch, rhythm, lyrics and a jury of three.",
        lifespan=lifespan,
        dependencies=[Depends(job_in_logs)],
    )
    install_problem_handlers(app)
    app.include_router(router)
    if settings.gateway_metrics_port is None:
        app.include_router(metrics_router)
    app.include_router(media_router)
    app.include_router(references_router)
    max_upload = settings.gateway_max_upload_bytes
    app.add_middleware(
        UploadLimitMiddleware,
        # Bodies of the other routes are empty: the framing allowance is plenty.
        max_body_bytes=_BODY_OVERHEAD_BYTES,
        per_path={
            "/v1/jobs": 2 * max_upload + _BODY_OVERHEAD_BYTES,  # a performance, a reference
            "/v1/references": max_upload + _BODY_OVERHEAD_BYTES,
        },
    )
    # A refused submission is answered before any of its body is read.
    app.add_middleware(AdmissionMiddleware)
    if settings.gateway_cors_origins:
        # Outermost: preflights are answered, and refusals carry the CORS headers too.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.gateway_cors_origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "X-API-Key", "Idempotency-Key", "Last-Event-ID"],
            expose_headers=["Location", "Retry-After"],
            max_age=600,
        )
    return app
