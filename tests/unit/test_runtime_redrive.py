"""What a stage records of its committed effect, for a re-drive to send again."""

from __future__ import annotations

import uuid
from types import SimpleNamespace

from voicejury_contracts import Stage, StageProgress
from voicejury_runtime.stage import _commit_record, _committed_outputs, _redrive_of


def test_committed_outputs_come_back_as_the_same_events_byte_for_byte() -> None:
    outputs = [
        StageProgress(job_id=uuid.uuid4(), stage=Stage.PITCH, fraction=f, attempt=1, seq=i)
        for i, f in enumerate((0.25, 1 / 3))
    ]
    again = _committed_outputs(_commit_record(outputs))
    assert again == outputs
    assert [e.model_dump_json() for e in again] == [e.model_dump_json() for e in outputs]


def test_a_record_too_big_for_nats_is_a_bare_marker_and_an_old_marker_has_no_outputs() -> None:
    huge = StageProgress(
        job_id=uuid.uuid4(), stage=Stage.JURY, fraction=1, message="x" * 600_000, attempt=1, seq=0
    )
    assert _commit_record([huge]) == b"1"
    assert _committed_outputs(b"1") == []
    assert _committed_outputs(b'[["no.such.subject", {}]]') == []


def test_the_re_drive_number_is_read_from_the_header_and_nonsense_is_none() -> None:
    assert _redrive_of(SimpleNamespace(headers={"VJ-Redrive": "2"})) == 2
    for headers in (None, {}, {"VJ-Redrive": "x"}, {"VJ-Redrive": "-3"}):
        assert _redrive_of(SimpleNamespace(headers=headers)) == 0
