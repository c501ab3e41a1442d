"""A stage whose model cannot be had fails the jobs that need it at once, naming the setting
to fix: one delivery, a stable code, no retry loop, and the process stays up."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.audio_fixtures import sung_tone
from tests.chaos.checker import read_stream
from tests.conftest import MODELS, NATS_URL, delete_namespace
from voicejury_contracts import (
    AudioInput,
    JobOptions,
    JobSubmitted,
    ObjectRef,
    Role,
    SourceKind,
    Stems,
    StemsSeparated,
)
from voicejury_runtime.store import job_key

pytestmark = pytest.mark.integration


async def wait_for_events(namespace: str, suffix: str) -> list[dict[str, Any]]:
    """The stream's `<namespace>.<suffix>` messages, once there is at least one."""
    deadline = time.monotonic() + 30
    while not (
        found := [
            json.loads(data)
            for subject, data in await read_stream(NATS_URL, namespace)
            if subject == f"{namespace}.{suffix}"
        ]
    ):
        assert time.monotonic() < deadline, f"no {suffix} event"
        await asyncio.sleep(0.2)
    return found


@pytest.mark.parametrize("cause", ["missing", "other-version"])
async def test_a_job_needing_a_missing_model_fails_once_naming_the_setting(
    env: dict[str, str], tmp_path: Path, cause: str
) -> None:
    """Weights that are not there, or not the pinned version: the same clear failure."""
    from voicejury_separator.app import build
    from voicejury_separator.settings import SeparatorSettings

    if cause == "missing":
        missing = tmp_path / "no-such-models"
        settings = SeparatorSettings(separator_model="htdemucs", separator_model_dir=missing)
        setting, named = "VJ_SEPARATOR_MODEL", str(missing)
    else:
        settings = SeparatorSettings(
            separator_model="tiny_randinit",
            separator_model_dir=MODELS / "demucs-tiny-random",
            separator_model_version="demucs==0.0.0;other;float32",
        )
        setting, named = "VJ_SEPARATOR_MODEL_VERSION", "demucs==0.0.0;other;float32"
    service = build(settings)
    job_id = uuid.uuid4()
    try:
        await service._on_start()
        reason = service.not_ready_reason()
        assert reason is not None
        assert setting in reason  # /readyz says what to fix
        await service.broker.start()
        original = await service.store.put_bytes(
            job_key(job_id, "uploads", "mix.wav"), sung_tone(), "audio/wav"
        )

        def mix(role: Role) -> AudioInput:
            return AudioInput(
                role=role,
                kind=SourceKind.MIX,
                original=original,
                duration_s=2.0,
                sample_rate=16_000,
                channels=1,
            )

        await service.bus.publish(
            JobSubmitted(
                job_id=job_id,
                tenant="acme",
                performance=mix(Role.PERFORMANCE),
                reference=mix(Role.REFERENCE),
                options=JobOptions(),
            )
        )
        namespace = env["VJ_NAMESPACE"]
        (event,) = await wait_for_events(namespace, "job.failed")
        assert event["code"] == "model_unavailable"
        assert event["stage"] == "separator"
        assert event["attempts"] == 1
        assert setting in event["message"]
        assert named in event["message"]
        # Terminated on its first delivery: nothing left pending for a retry.
        stream = service.bus.topology.stream.name
        durable = f"{namespace}-separator"
        deadline = time.monotonic() + 30
        while (info := await service.bus.js.consumer_info(stream, durable)).num_ack_pending:
            assert time.monotonic() < deadline, "the delivery was never settled"
            await asyncio.sleep(0.2)
        assert info.num_redelivered == 0
    finally:
        await service.broker.stop()
        await delete_namespace(NATS_URL, env["VJ_NAMESPACE"])


def _stems(role: Role) -> Stems:
    # Never read: without a model the asr decides before downloading anything.
    ref = ObjectRef(
        bucket="vj-test",
        key=f"x/{role.value}.wav",
        sha256="0" * 64,
        size=1,
        content_type="audio/wav",
    )
    return Stems(
        role=role, original=ref, vocals=ref, vocals_16k=ref, separated=False, duration_s=2.0
    )


@pytest.mark.parametrize("skip", [True, False], ids=["lyrics-skipped", "job-failed"])
async def test_without_an_asr_model_lyrics_are_skipped_or_the_job_fails_as_configured(
    env: dict[str, str], tmp_path: Path, skip: bool
) -> None:
    """`VJ_ASR_SKIP_WHEN_UNAVAILABLE` (default on): the job goes on without a transcript and
    says why (the scorer then renormalises the weights with a warning); off: it fails."""
    from voicejury_asr.app import build
    from voicejury_asr.settings import AsrSettings

    missing = tmp_path / "no-such-whisper"
    service = build(AsrSettings(asr_model=str(missing), asr_skip_when_unavailable=skip))
    job_id = uuid.uuid4()
    namespace = env["VJ_NAMESPACE"]
    try:
        await service._on_start()
        await service.broker.start()
        # Ready only when it can serve: skipping lyrics, or never.
        assert (service.not_ready_reason() is None) is skip
        await service.bus.publish(
            StemsSeparated(
                job_id=job_id,
                options=JobOptions(),
                performance=_stems(Role.PERFORMANCE),
                reference=_stems(Role.REFERENCE),
                provenance=(),
            )
        )
        if skip:
            (event,) = await wait_for_events(namespace, "analysis.transcript")
            assert event["performance"] is None
            assert "VJ_ASR_MODEL" in str(event["skipped_reason"])
        else:
            (event,) = await wait_for_events(namespace, "job.failed")
            assert event["code"] == "model_unavailable"
            assert event["stage"] == "asr"
            assert event["attempts"] == 1
            assert "VJ_ASR_MODEL" in str(event["message"])
    finally:
        await service.broker.stop()
        await delete_namespace(NATS_URL, namespace)
