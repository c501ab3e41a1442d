"""The gateway's settings: env prefix `VJ_`, its own named `VJ_GATEWAY_*` and `VJ_DATABASE_URL`."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from voicejury_runtime.audio import MAX_SAMPLES, AudioLimits
from voicejury_runtime.settings import CommonSettings
from voicejury_runtime.store import CACHE_REFRESH_S


class AuthMode(StrEnum):
    API_KEY = "api_key"
    # Explicit opt-in for a laptop demo: every caller is tenant `demo`. Never the default.
    DEMO = "demo"


class GatewaySettings(CommonSettings):
    database_url: str = "postgresql://postgres@127.0.0.1:5432/voicejury"
    database_pool_size: int = Field(default=10, ge=1)
    http_host: str = "0.0.0.0"
    http_port: int = Field(default=8000, ge=0, le=65535)
    gateway_metrics_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="serve /metrics on this port of http_host instead of on the API's, so "
        "that what routes the public API cannot expose them (none: on the API's port)",
    )

    gateway_auth_mode: AuthMode = AuthMode.API_KEY
    gateway_max_upload_bytes: int = Field(default=50 * 1024 * 1024, gt=0)
    gateway_max_duration_s: float = Field(default=600.0, gt=0)
    gateway_min_duration_s: float = Field(default=0.5, gt=0)
    gateway_max_channels: int = Field(default=8, ge=1)
    gateway_max_samples: int = Field(
        default=MAX_SAMPLES,
        ge=1,
        # Not above what every stage decodes (voicejury_runtime.audio.MAX_SAMPLES): a job
        # accepted over it would only fail later with invalid_audio.
        le=MAX_SAMPLES,
        description="channels x sample rate x duration of an upload, checked from its header "
        "before decoding (default: 10 min of 96 kHz stereo, 461 MB as float32)",
    )
    gateway_sse_keepalive_s: float = Field(default=15.0, gt=0)
    gateway_max_backlog: int = Field(
        default=200, ge=1, description="queued jobs before new submissions get 503"
    )
    gateway_max_concurrent_uploads: int = Field(
        default=16,
        ge=1,
        description="uploads one gateway replica receives at once; more get 503 before their "
        "body is read",
    )
    gateway_max_uploads_per_tenant: int = Field(
        default=8,
        ge=1,
        description="uploads one tenant sends one gateway replica at once; more get 429 "
        "before their body is read",
    )
    gateway_max_active_jobs_per_tenant: int = Field(
        default=100,
        ge=1,
        description="queued or running jobs one tenant may have; more submissions get 429",
    )
    gateway_cors_origins: tuple[str, ...] = Field(
        default=(),
        description='browser origins allowed to call the API, e.g. ["https://app.example"] '
        "(none: no CORS headers, for same-origin or server-side clients)",
    )
    gateway_stall_timeout_s: float = Field(
        default=1800.0, gt=0, description="a job with no event for this long is failed"
    )
    gateway_max_redrives: int = Field(
        default=2,
        ge=0,
        description="times a job that stopped moving is re-driven (its events sent again) "
        "before it is failed with job_stalled",
    )
    gateway_queue_wait_max_s: float = Field(
        default=6 * 3600.0,
        gt=0,
        description="a job with no event, waiting at a stage that still has a backlog, is "
        "failed only after this long (the stall timeout applies once the stage's queue "
        "is empty)",
    )
    gateway_audio_retention_s: float = Field(
        default=7 * 24 * 3600.0,
        gt=0,
        description="job audio is deleted this long after the job ends",
    )
    gateway_event_log_retention_s: float = Field(
        default=7 * 24 * 3600.0,
        gt=0,
        description="a finished job's progress reports are deleted from its event log this "
        "long after it ended (its stage and terminal events stay)",
    )
    gateway_cache_retention_s: float = Field(
        default=30 * 24 * 3600.0,
        # A cache entry's age restarts when a job reuses it only once it is older than
        # CACHE_REFRESH_S (a day); with a shorter retention the sweep could delete stems a
        # running job reused a moment before. A second day covers the jobs in flight.
        ge=2 * CACHE_REFRESH_S,
        description="cached reference separations and analyses, deleted once unused this "
        "long (at least two days)",
    )
    gateway_presign_ttl_s: int = Field(default=300, ge=10, le=3600)
    gateway_housekeeping_interval_s: float = Field(default=30.0, gt=0)
    gateway_recorder_ack_wait_s: float = Field(default=30.0, gt=0)

    @property
    def audio_limits(self) -> AudioLimits:
        return AudioLimits(
            max_duration_s=self.gateway_max_duration_s,
            min_duration_s=self.gateway_min_duration_s,
            max_channels=self.gateway_max_channels,
            max_samples=self.gateway_max_samples,
        )
