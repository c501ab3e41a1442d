"""Settings every VoiceJury process shares. Each service subclasses `CommonSettings` once.

All settings come from the environment with the `VJ_` prefix (e.g. `VJ_NATS_URL`); a
service's own settings are named after it (`VJ_PITCH_MODEL_PERFORMANCE`). Nothing else in
the code reads the environment.
"""

from __future__ import annotations

from typing import Self

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from voicejury_contracts import ConsumerSpec, StreamSpec, Topology


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VJ_", extra="ignore", frozen=True)

    nats_url: str = "nats://127.0.0.1:4222"
    namespace: str = Field(default="vj", pattern=r"^[a-z][a-z0-9_]{0,30}$")
    stream_replicas: int = Field(default=1, ge=1, le=5)
    stream_max_bytes: int = Field(default=1 << 30, gt=0)
    stream_duplicate_window_s: float = Field(
        default=StreamSpec.duplicate_window_s,
        gt=0,
        description="the jobs stream's Nats-Msg-Id deduplication window: longer than any "
        "publisher's retry horizon (RELIABILITY.md: 10-30 min). Short only in the fault "
        "suite, to replay events past it",
    )
    publish_timeout_s: float = Field(default=5.0, gt=0)

    s3_endpoint: str = "127.0.0.1:9000"
    s3_access_key: SecretStr = SecretStr("voicejury")
    s3_secret_key: SecretStr = SecretStr("voicejury-secret")
    s3_bucket: str = "voicejury"
    s3_secure: bool = False
    s3_region: str = "us-east-1"
    s3_public_endpoint: str | None = Field(
        default=None,
        description="host[:port] where clients outside the cluster reach the store; "
        "presigned URLs are signed for it (the host is part of the signature). "
        "Default: s3_endpoint",
    )
    s3_public_secure: bool | None = Field(
        default=None, description="https for s3_public_endpoint; default: s3_secure"
    )

    otel_exporter_otlp_endpoint: str | None = None
    log_level: str = "INFO"
    log_json: bool = True

    @property
    def topology(self) -> Topology:
        return Topology(self.namespace, duplicate_window_s=self.stream_duplicate_window_s)


class StageSettings(CommonSettings):
    """Consumer behaviour shared by the five pipeline stages (RELIABILITY.md starting points)."""

    ack_wait_s: float = Field(default=60.0, gt=0)
    heartbeat_s: float = Field(default=15.0, gt=0)
    heartbeats: bool = Field(
        default=True, description="off only to prove the harness sees redelivery"
    )
    max_deliver: int = Field(default=5, ge=1)
    retry_backoff_s: tuple[float, ...] = (2.0, 10.0, 30.0, 60.0)
    concurrency: int = Field(default=1, ge=1, description="messages in flight per replica")
    max_ack_pending: int = Field(
        default=ConsumerSpec.max_ack_pending,
        ge=1,
        description="messages in flight across all replicas of the stage (the shared durable "
        "consumer's max_ack_pending): at least the most replicas × concurrency it scales to",
    )
    cancel_poll_s: float = Field(default=2.0, gt=0)
    progress_min_interval_s: float = Field(
        default=0.5,
        ge=0,
        description="at most one progress event per interval (and per 5 % step) from a "
        "stage's work: each one is a message, a database row and an SSE frame",
    )
    http_host: str = "0.0.0.0"
    http_port: int = Field(default=8081, ge=0, le=65535)
    keep_freed_memory: bool = Field(
        default=False,
        description="glibc keeps freed memory for reuse (one arena, no per-block mmap, no "
        "trim): on for model stages on the CPU, whose layers allocate large buffers",
    )

    @model_validator(mode="after")
    def _heartbeat_fits_ack_wait(self) -> Self:
        # Three heartbeats per ack window: one lost or late heartbeat never causes a redelivery.
        if self.heartbeats and self.ack_wait_s < 3 * self.heartbeat_s:
            raise ValueError("ack_wait_s must be at least three heartbeat_s intervals")
        if self.max_ack_pending < self.concurrency:
            raise ValueError("max_ack_pending must be at least concurrency")
        return self

    def backoff_for(self, attempt: int) -> float:
        """Delay before delivery `attempt + 1` after a transient failure of delivery `attempt`."""
        return self.retry_backoff_s[min(attempt, len(self.retry_backoff_s)) - 1]
