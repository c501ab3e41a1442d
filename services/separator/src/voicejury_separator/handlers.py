"""JobSubmitted -> StemsSeparated: vocals (full quality + 16 kHz mono) and accompaniment.

Isolated vocals skip separation. A reference's separation is cached by content hash,
model and parameters, so a second job on the same reference does no separation work
(isolated reference vocals: their 16 kHz copy is cached by content hash the same way);
ReferenceSubmitted -> ReferenceSeparated fills that cache ahead of any job, and hands the
stems on to pitch and asr, which cache their analysis of it.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from uuid import UUID

from voicejury_contracts import (
    AudioInput,
    JobSubmitted,
    ObjectRef,
    ReferenceSeparated,
    ReferenceSubmitted,
    Role,
    SourceKind,
    StageRun,
    Stems,
    StemsSeparated,
)
from voicejury_runtime.audio import (
    ANALYSIS_SAMPLE_RATE,
    ANALYSIS_VERSION,
    read_audio,
    to_analysis,
    write_wav,
)
from voicejury_runtime.errors import InvalidAudioError
from voicejury_runtime.model_slot import ModelSlot
from voicejury_runtime.stage import StageContext
from voicejury_runtime.store import job_key

from .core import SEPARATION_VERSION, SeparatorModel, separate_vocals
from .settings import SeparatorSettings

WAV = "audio/wav"


@dataclass
class SeparatorState:
    settings: SeparatorSettings
    model: ModelSlot[SeparatorModel] = field(default_factory=lambda: ModelSlot("Demucs"))

    def cache_prefix(self, audio: ObjectRef) -> str:
        """Where a reference's stems live: content hash + model version + parameters,
        precision included (a float32 and a bfloat16 separation differ), + the versions of
        the separation and of the analysis copy."""
        s = self.settings
        loaded = self.model.value
        precision = loaded.precision if loaded else s.separator_precision
        params = (
            f"{s.separator_segment_s}|{s.separator_overlap}|{s.separator_shifts}|{precision}|"
            f"{ANALYSIS_VERSION}|{SEPARATION_VERSION}"
        )
        model = loaded.version if loaded else s.separator_model
        sig = hashlib.sha256(f"{model}|{params}".encode()).hexdigest()[:16]
        return f"cache/separations/{audio.sha256}/{s.separator_model}-{sig}"

    @staticmethod
    def vocals_prefix(audio: ObjectRef) -> str:
        """Where isolated reference vocals' 16 kHz copy lives: content hash and how the copy
        is made (no model)."""
        return f"cache/vocals/{audio.sha256}/{ANALYSIS_VERSION}"


async def separate_job(
    event: JobSubmitted, ctx: StageContext, state: SeparatorState
) -> StemsSeparated:
    stems, run = await _separate(event.job_id, (event.performance, event.reference), ctx, state)
    return StemsSeparated(
        job_id=event.job_id,
        options=event.options,
        performance=stems[Role.PERFORMANCE],
        reference=stems[Role.REFERENCE],
        provenance=(run,),
    )


async def prepare_reference(
    event: ReferenceSubmitted, ctx: StageContext, state: SeparatorState
) -> ReferenceSeparated:
    """Separates a reference ahead of jobs, into the content-addressed cache they reuse."""
    stems, run = await _separate(event.job_id, (event.reference,), ctx, state)
    return ReferenceSeparated(
        job_id=event.job_id,
        stems=stems[Role.REFERENCE],
        language=event.language,
        transcribe=event.transcribe,
        provenance=(run,),
    )


async def _separate(
    job_id: UUID, inputs: tuple[AudioInput, ...], ctx: StageContext, state: SeparatorState
) -> tuple[dict[Role, Stems], StageRun]:
    stems: dict[Role, Stems] = {}
    model_s: list[float] = []  # seconds inside the model, per recording it ran on
    for index, audio in enumerate(inputs):
        span = (index / len(inputs), (index + 1) / len(inputs))
        stems[audio.role], seconds = await _stems_for(job_id, audio, ctx, state, span)
        if seconds is not None:
            model_s.append(seconds)
    ran_model = bool(model_s)
    model = state.model.value
    run = ctx.stage_run(
        model=model.name if model else None,
        model_version=model.version if model else None,
        device=model.device if model else None,
        skipped=not any(s.separated for s in stems.values()),
        cached=any(s.separated for s in stems.values()) and not ran_model,
        details={
            **{f"{role.value}_separated": str(s.separated).lower() for role, s in stems.items()},
            **({"precision": model.precision} if model else {}),
            # The rest of `seconds` is the stage's own cost: I/O, decoding, stems, uploads.
            **({"model_s": f"{sum(model_s):.3f}"} if ran_model else {}),
        },
    )
    return stems, run


async def _stems_for(
    job_id: UUID,
    audio: AudioInput,
    ctx: StageContext,
    state: SeparatorState,
    span: tuple[float, float],
) -> tuple[Stems, float | None]:
    """The stems of one recording and the seconds the model ran for it (None: it did not)."""
    role = audio.role.value
    if audio.kind is SourceKind.MIX and audio.role is Role.REFERENCE:
        prefix = state.cache_prefix(audio.original)
        cached = await _cached(ctx, prefix)
        if cached is not None:
            await ctx.progress(span[1], f"{role}: separation reused from cache")
            vocals, accompaniment, vocals_16k = cached
            return Stems(
                role=audio.role,
                original=audio.original,
                vocals=vocals,
                vocals_16k=vocals_16k,
                accompaniment=accompaniment,
                separated=True,
                cached=True,
                duration_s=audio.duration_s,
            ), None
    elif audio.role is Role.REFERENCE:
        prefix = state.vocals_prefix(audio.original)
        if (copy := await ctx.store.reuse(f"{prefix}/vocals_16k.wav")) is not None:
            await ctx.progress(span[1], f"{role}: isolated vocals, 16 kHz copy from cache")
            return _isolated(audio, copy, cached=True), None
    else:
        prefix = job_key(job_id, role)

    src = await ctx.store.download(audio.original, ctx.workdir / f"{role}.orig")
    try:
        samples, sample_rate = await ctx.run_blocking(read_audio, src)
    except Exception as exc:  # the gateway checked it; a failure here means it changed
        raise InvalidAudioError(f"{role} audio could not be decoded: {exc}") from exc

    if audio.kind is SourceKind.VOCALS:
        vocals_16k = await _put_analysis_copy(ctx, f"{prefix}/vocals_16k.wav", samples, sample_rate)
        await ctx.progress(span[1], f"{role}: isolated vocals, separation skipped")
        return _isolated(audio, vocals_16k, cached=False), None

    model = state.model.require()
    lo, hi = span
    t0 = time.perf_counter()
    result = await ctx.run_blocking(
        separate_vocals,
        model,
        samples,
        sample_rate,
        segment_s=state.settings.separator_segment_s,
        overlap=state.settings.separator_overlap,
        shifts=state.settings.separator_shifts,
        on_progress=lambda f: ctx.report(lo + (hi - lo) * f, f"separating {role}"),
        should_stop=ctx.should_stop,
    )
    model_s = time.perf_counter() - t0
    # Full quality (model rate, 24-bit) for listening; 16 kHz mono once for pitch and asr.
    # Three independent encodes and uploads, at once: the model is done and every core free.
    vocals, accompaniment, vocals_16k = await asyncio.gather(
        _put_wav(ctx, f"{prefix}/vocals.wav", result.vocals, result.sample_rate, "PCM_24"),
        _put_wav(
            ctx, f"{prefix}/accompaniment.wav", result.accompaniment, result.sample_rate, "PCM_24"
        ),
        _put_analysis_copy(ctx, f"{prefix}/vocals_16k.wav", result.vocals, result.sample_rate),
    )
    return Stems(
        role=audio.role,
        original=audio.original,
        vocals=vocals,
        vocals_16k=vocals_16k,
        accompaniment=accompaniment,
        separated=True,
        duration_s=audio.duration_s,
    ), model_s


def _isolated(audio: AudioInput, vocals_16k: ObjectRef, *, cached: bool) -> Stems:
    """Stems of isolated vocals: the upload is the vocals; only the 16 kHz copy is new."""
    return Stems(
        role=audio.role,
        original=audio.original,
        vocals=audio.original,
        vocals_16k=vocals_16k,
        accompaniment=None,
        separated=False,
        cached=cached,
        duration_s=audio.duration_s,
    )


async def _cached(ctx: StageContext, prefix: str) -> tuple[ObjectRef, ObjectRef, ObjectRef] | None:
    refs = [
        await ctx.store.reuse(f"{prefix}/{name}")
        for name in ("vocals.wav", "accompaniment.wav", "vocals_16k.wav")
    ]
    vocals, accompaniment, vocals_16k = refs
    if vocals is None or accompaniment is None or vocals_16k is None:
        return None
    return vocals, accompaniment, vocals_16k


async def _put_analysis_copy(
    ctx: StageContext, key: str, samples: object, sample_rate: int
) -> ObjectRef:
    """The 16 kHz mono copy pitch and asr read. Resampling a whole song takes seconds: off
    the event loop, like the model."""
    analysis = await ctx.run_blocking(to_analysis, samples, sample_rate)
    return await _put_wav(ctx, key, analysis, ANALYSIS_SAMPLE_RATE)


async def _put_wav(
    ctx: StageContext, key: str, samples: object, sample_rate: int, subtype: str = "PCM_16"
) -> ObjectRef:
    path = ctx.workdir / Path(key).name
    await ctx.run_blocking(write_wav, path, samples, sample_rate, subtype)
    return await ctx.store.put_file(key, path, WAV)
