"""The event contracts as an AsyncAPI 3.0 document, generated from the models themselves.

`python -m voicejury_contracts.asyncapi > docs/asyncapi.json` refreshes the committed copy;
a test fails when it is stale. The gateway also serves it at `/asyncapi.json`.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic.json_schema import models_json_schema

from .base import SCHEMA_VERSION, Event, Stage
from .events import (
    ALL_EVENTS,
    JobCancelled,
    JobCompleted,
    JobFailed,
    JobSubmitted,
    PitchExtracted,
    ReferencePitchReady,
    ReferenceSeparated,
    ReferenceSubmitted,
    ReferenceTranscriptReady,
    Scored,
    StageProgress,
    StemsSeparated,
    TranscriptReady,
)
from .topology import REDRIVE_HEADER, Topology

# Who publishes what. The gateway receives every event (it records them all).
_PRODUCERS: dict[Stage, tuple[type[Event], ...]] = {
    # JobFailed: a job or preparation its reconciler found stalled past its bound.
    Stage.GATEWAY: (JobSubmitted, JobCancelled, ReferenceSubmitted, JobFailed),
    Stage.SEPARATOR: (StemsSeparated, ReferenceSeparated, StageProgress, JobFailed),
    Stage.PITCH: (PitchExtracted, ReferencePitchReady, StageProgress, JobFailed),
    Stage.ASR: (TranscriptReady, ReferenceTranscriptReady, StageProgress, JobFailed),
    Stage.SCORER: (Scored, StageProgress, JobFailed),
    Stage.JURY: (JobCompleted, StageProgress, JobFailed),
}
_CONSUMERS: dict[Stage, tuple[type[Event], ...]] = {
    Stage.SEPARATOR: (JobSubmitted, ReferenceSubmitted),
    Stage.PITCH: (StemsSeparated, ReferenceSeparated),
    Stage.ASR: (StemsSeparated, ReferenceSeparated),
    Stage.SCORER: (PitchExtracted, TranscriptReady),
    Stage.JURY: (Scored,),
    Stage.GATEWAY: ALL_EVENTS,
}


def _dedup_form(event: type[Event]) -> str:
    """`Event.dedup_id` written with placeholders (`<job_id>:job.submitted`)."""
    if event is StageProgress:
        return f"`<job_id>:{event.SUBJECT}:<stage>:<attempt>:<seq>`"
    return f"`<job_id>:{event.SUBJECT}`"


def asyncapi_document(topology: Topology | None = None) -> dict[str, Any]:
    topology = topology or Topology()
    _, defs = models_json_schema(
        [(e, "validation") for e in ALL_EVENTS], ref_template="#/components/schemas/{model}"
    )
    channels: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for event in ALL_EVENTS:
        name = event.__name__
        messages[name] = {
            "name": name,
            "title": name,
            "summary": (event.__doc__ or name).strip().splitlines()[0],
            "contentType": "application/json",
            "headers": {
                "type": "object",
                "properties": {
                    "Nats-Msg-Id": {
                        "type": "string",
                        "description": f"deduplication id: {_dedup_form(event)}, one per "
                        "effect; a re-driven job's copies end in `:redrive:<n>`",
                    },
                    REDRIVE_HEADER: {
                        "type": "string",
                        "description": "on the events of a job the reconciler re-drove: "
                        "which re-drive (1..n). A stage whose effect is committed sends its "
                        "recorded outputs again instead of running twice",
                    },
                },
            },
            "payload": {"$ref": f"#/components/schemas/{name}"},
        }
        channels[name] = {
            "address": topology.subject(event),
            "messages": {name: {"$ref": f"#/components/messages/{name}"}},
        }
    operations: dict[str, Any] = {}
    for stage, events in _PRODUCERS.items():
        for event in events:
            operations[f"{stage.value}_sends_{event.__name__}"] = {
                "action": "send",
                "channel": {"$ref": f"#/channels/{event.__name__}"},
            }
    for stage, events in _CONSUMERS.items():
        spec = topology.consumer(stage)
        for event in events:
            operations[f"{stage.value}_receives_{event.__name__}"] = {
                "action": "receive",
                "channel": {"$ref": f"#/channels/{event.__name__}"},
                "description": f"durable pull consumer `{spec.durable}` "
                f"(filter `{spec.filter_subject}`, explicit ack)",
            }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "VoiceJury pipeline events",
            "version": str(SCHEMA_VERSION),
            "description": f"JetStream stream `{topology.stream.name}` holds every subject "
            f"`{topology.namespace}.>`; audio travels only as object references.",
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": defs["$defs"]},
    }


if __name__ == "__main__":
    print(json.dumps(asyncapi_document(), indent=2, sort_keys=True))
