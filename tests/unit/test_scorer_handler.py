"""The scorer's handler on the joined pitch and transcript events, with an in-memory store."""

from __future__ import annotations

import asyncio
import hashlib
import io
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, cast

import numpy as np
import pytest

from voicejury_contracts import (
    ContourRef,
    JobOptions,
    ObjectRef,
    PitchExtracted,
    Role,
    Stage,
    StageRun,
    TranscriptReady,
)
from voicejury_runtime.stage import StageContext
from voicejury_scorer.handlers import score_job
from voicejury_scorer.settings import ScorerSettings


class MemoryContext:
    """What `score_job` uses of a `StageContext`: the store, progress and a worker thread."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    @property
    def store(self) -> MemoryContext:
        return self

    async def put_bytes(self, key: str, data: bytes, content_type: str) -> ObjectRef:
        self.objects[key] = data
        return ObjectRef(
            bucket="jobs",
            key=key,
            sha256=hashlib.sha256(data).hexdigest(),
            size=len(data),
            content_type=content_type,
        )

    async def get_bytes(self, ref: ObjectRef) -> bytes:
        return self.objects[ref.key]

    async def progress(self, fraction: float, message: str) -> None:
        pass

    async def run_blocking(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kwargs)

    def stage_run(self, **kwargs: Any) -> StageRun:
        return StageRun(
            stage=Stage.SCORER, started_at=datetime.now(UTC), seconds=0.1, attempt=1, **kwargs
        )


async def _contour(ctx: MemoryContext, role: Role) -> ContourRef:
    t = np.arange(0, 6.0, 0.01)
    f0 = 220.0 * 2 ** (np.floor(t) / 12)  # a note a second, up a semitone each
    f0[(t % 1.0) > 0.8] = 0.0  # a rest before each note
    buf = io.BytesIO()
    np.savez(buf, time_s=t, f0_hz=f0, periodicity=np.where(f0 > 0, 0.9, 0.0))
    ref = await ctx.put_bytes(f"{role.value}.npz", buf.getvalue(), "application/x-npz")
    return ContourRef(role=role, contour=ref, hop_s=0.01, frames=t.size, voiced_ratio=0.8)


@pytest.mark.parametrize(
    ("skipped_reason", "says"),
    [
        ("VJ_ASR_MODEL: /models/whisper does not exist", "speech recognition is not available"),
        (None, "no transcript of the performance"),
    ],
)
async def test_lyrics_unscored_say_whether_speech_recognition_was_skipped(
    skipped_reason: str | None, says: str
) -> None:
    ctx = MemoryContext()
    job_id = uuid.uuid4()
    options = JobOptions(lyrics="one two three")
    pitch = PitchExtracted(
        job_id=job_id,
        options=options,
        performance=await _contour(ctx, Role.PERFORMANCE),
        reference=await _contour(ctx, Role.REFERENCE),
        provenance=(),
    )
    transcript = TranscriptReady(
        job_id=job_id,
        options=options,
        performance=None,
        reference=None,
        skipped_reason=skipped_reason,
        provenance=(),
    )
    scored = await score_job(
        {"pitch": pitch.model_dump(mode="json"), "transcript": transcript.model_dump(mode="json")},
        cast(StageContext, ctx),
        ScorerSettings(),
    )
    (warning,) = (w for w in scored.result.warnings if w.code == "lyrics_not_scored")
    assert says in warning.message
    # What the operator must fix stays in the asr's provenance, not in the singer's words.
    assert "VJ_ASR_MODEL" not in warning.message
    assert scored.result.lyrics is None
