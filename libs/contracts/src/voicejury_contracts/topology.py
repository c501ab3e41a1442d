"""Subject names, the stream and every durable consumer, derived from one namespace.

The namespace lets tests (and side-by-side deployments) use disjoint subjects, streams,
consumers and buckets on one nats-server. Settings here are the defaults of
RELIABILITY.md; deployments override them through each service's settings.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import PIPELINE_STAGES, Event, Stage
from .events import PitchExtracted, Scored, StemsSeparated

# Message header on the events of a job the gateway's reconciler re-drove (value: which
# re-drive, 1..n): their Nats-Msg-Id gets `:redrive:<n>`, so JetStream keeps them.
REDRIVE_HEADER = "VJ-Redrive"


@dataclass(frozen=True)
class StreamSpec:
    name: str
    subjects: tuple[str, ...]
    # Interest retention (see voicejury_runtime.bus): a message goes once every consumer
    # that wants it has acknowledged it. The age bound only clears what no one ever will
    # (a message past max deliveries that the gateway could not delete).
    max_age_s: float = 7 * 24 * 3600
    max_bytes: int = 1 << 30
    # Longer than any publisher's retry horizon, so a retried publish is always deduplicated.
    duplicate_window_s: float = 20 * 60
    replicas: int = 1


@dataclass(frozen=True)
class ConsumerSpec:
    durable: str
    filter_subject: str
    # ack_wait must exceed three heartbeat intervals (see StageSettings.heartbeat_s).
    ack_wait_s: float = 60.0
    max_deliver: int = 5
    # Messages in flight across *all* replicas sharing the consumer (JetStream counts them
    # per consumer, not per subscriber): above the most replicas × concurrency a stage is
    # scaled to, or the replicas past it sit idle. Each replica's own bound is its
    # concurrency (`StageSettings.concurrency`).
    max_ack_pending: int = 256


@dataclass(frozen=True)
class Topology:
    namespace: str = "vj"
    # The jobs stream's Nats-Msg-Id window (`StreamSpec.duplicate_window_s` unless a
    # deployment sets `VJ_STREAM_DUPLICATE_WINDOW_S`).
    duplicate_window_s: float = StreamSpec.duplicate_window_s

    def subject(self, event: type[Event] | Event) -> str:
        return f"{self.namespace}.{event.SUBJECT}"

    @property
    def stream(self) -> StreamSpec:
        return StreamSpec(
            name=f"{self.namespace.upper()}_JOBS",
            subjects=(f"{self.namespace}.>",),
            duplicate_window_s=self.duplicate_window_s,
        )

    @property
    def cancel_bucket(self) -> str:
        """KV bucket: key = job id, present = cancelled. Stages read it at checkpoints."""
        return f"{self.namespace}_cancelled"

    @property
    def join_bucket(self) -> str:
        """KV bucket where the scorer joins pitch and asr results of a job (fan-in)."""
        return f"{self.namespace}_joins"

    def stages_reading(self, event: type[Event]) -> tuple[Stage, ...]:
        """The pipeline stages whose consumer's filter takes `event` (the gateway aside,
        which records them all): those that fail a job over an unreadable copy of it."""
        tokens = self.subject(event).split(".")
        return tuple(
            stage
            for stage in PIPELINE_STAGES
            if _filter_takes(self.consumer(stage).filter_subject.split("."), tokens)
        )

    def consumer(self, stage: Stage) -> ConsumerSpec:
        """The one durable consumer a stage's replicas share (so replicas add throughput)."""
        durable = f"{self.namespace}-{stage}"
        filters: dict[Stage, str] = {
            # job.submitted and reference.submitted (one filter: nats-server 2.9).
            Stage.SEPARATOR: f"{self.namespace}.*.submitted",
            # stems.separated and reference.separated (a job's stems, a preparation's).
            Stage.PITCH: f"{self.namespace}.*.{StemsSeparated.SUBJECT.split('.')[1]}",
            Stage.ASR: f"{self.namespace}.*.{StemsSeparated.SUBJECT.split('.')[1]}",
            # One wildcard rather than two filters: nats-server 2.9 allows a single filter.
            Stage.SCORER: f"{self.namespace}.{PitchExtracted.SUBJECT.split('.')[0]}.>",
            Stage.JURY: self.subject(Scored),
            # The gateway records every event (progress, results, failures) in PostgreSQL.
            Stage.GATEWAY: f"{self.namespace}.>",
        }
        if stage is Stage.GATEWAY:
            # Unbounded deliveries: a job's record must never be dropped for a passing
            # database outage, whoever (re)creates the consumer; 30 s, the recorder's
            # default ack wait (`VJ_GATEWAY_RECORDER_ACK_WAIT_S`).
            return ConsumerSpec(durable, filters[stage], ack_wait_s=30.0, max_deliver=-1)
        return ConsumerSpec(durable=durable, filter_subject=filters[stage])


def _filter_takes(pattern: list[str], tokens: list[str]) -> bool:
    """NATS subject matching, token by token: `*` takes one token, a final `>` the rest."""
    for i, want in enumerate(pattern):
        if want == ">":
            return len(tokens) > i
        if i >= len(tokens) or (want != "*" and want != tokens[i]):
            return False
    return len(tokens) == len(pattern)
