"""The event contracts: a JSON Schema snapshot makes any breaking change visible in review."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from voicejury_contracts import (
    ALL_EVENTS,
    SCHEMA_VERSION,
    JobCancelled,
    ObjectRef,
    Stage,
    Topology,
)

SNAPSHOT = Path(__file__).parents[1] / "snapshots" / "contracts.schema.json"


def current_schemas() -> dict[str, object]:
    return {
        "schema_version": SCHEMA_VERSION,
        "events": {e.__name__: e.model_json_schema() for e in ALL_EVENTS},
        "subjects": {e.__name__: e.SUBJECT for e in ALL_EVENTS},
    }


def test_event_schemas_match_the_committed_snapshot() -> None:
    schemas = current_schemas()
    if os.environ.get("VJ_UPDATE_SNAPSHOTS") == "1":
        SNAPSHOT.write_text(json.dumps(schemas, indent=2, sort_keys=True) + "\n")
    # A missing snapshot fails rather than writes itself: deleting it must not pass.
    assert SNAPSHOT.exists(), f"{SNAPSHOT} is missing: rerun with VJ_UPDATE_SNAPSHOTS=1"
    committed = json.loads(SNAPSHOT.read_text())
    assert committed == json.loads(json.dumps(schemas)), (
        "event contracts changed: if intended, bump SCHEMA_VERSION when breaking and rerun "
        "with VJ_UPDATE_SNAPSHOTS=1 to refresh tests/snapshots/contracts.schema.json"
    )


def test_events_are_frozen_and_reject_unknown_fields() -> None:
    import uuid

    event = JobCancelled(job_id=uuid.uuid4())
    with pytest.raises(ValidationError):
        JobCancelled.model_validate({**event.model_dump(), "surprise": 1})
    with pytest.raises(ValidationError):
        event.reason = "changed"  # type: ignore[misc]


def test_object_ref_requires_a_real_sha256() -> None:
    with pytest.raises(ValidationError):
        ObjectRef(bucket="bkt", key="k", sha256="abc", size=1, content_type="audio/wav")


def test_dedup_id_is_one_per_job_and_effect() -> None:
    import uuid

    job = uuid.uuid4()
    assert JobCancelled(job_id=job).dedup_id() == JobCancelled(job_id=job, reason="x").dedup_id()
    assert JobCancelled(job_id=job).dedup_id() != JobCancelled(job_id=uuid.uuid4()).dedup_id()


def test_every_stage_consumer_lives_in_the_namespace_stream() -> None:
    topo = Topology("abc")
    assert topo.stream.subjects == ("abc.>",)
    durables = {topo.consumer(stage).durable for stage in Stage}
    assert len(durables) == len(Stage)
    for stage in Stage:
        assert topo.consumer(stage).filter_subject.startswith("abc.")


def test_committed_asyncapi_document_is_current() -> None:
    from voicejury_contracts.asyncapi import asyncapi_document

    committed = json.loads((Path(__file__).parents[2] / "docs" / "asyncapi.json").read_text())
    assert committed == json.loads(json.dumps(asyncapi_document())), (
        "docs/asyncapi.json is stale: python -m voicejury_contracts.asyncapi > docs/asyncapi.json"
    )


def test_speech_languages_are_whispers() -> None:
    """The gateway refuses a language the asr stage would fail on, so both lists are one."""
    from faster_whisper.tokenizer import _LANGUAGE_CODES

    from voicejury_contracts import SPEECH_LANGUAGES

    assert set(_LANGUAGE_CODES) == SPEECH_LANGUAGES


@pytest.mark.parametrize(
    "body",
    [b"", b"not json", b"[]", b'{"job_id": 7}', b'{"job_id": "x"}', b"[" * 50_000],
)
def test_a_body_without_a_readable_job_id_names_no_job(body: bytes) -> None:
    from voicejury_contracts import job_id_of

    assert job_id_of(body) is None  # never an exception: the caller drops the body
