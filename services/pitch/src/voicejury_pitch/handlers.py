"""StemsSeparated -> PitchExtracted: an f0 contour per recording, stored as `.npz`.

A reference's contour is cached by the content hash of its 16 kHz vocals, the model and
the parameters (`cache/pitch/...`, swept with the separations' retention), so a second job
on the same reference runs CREPE on the performance only; ReferenceSeparated ->
ReferencePitchReady fills that cache for a reference prepared ahead of jobs. A
performance's contour stays under its job, deleted with the job's audio.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from typing import Any, Literal, cast
from uuid import UUID

import numpy as np
import numpy.typing as npt

from voicejury_contracts import (
    ContourRef,
    ObjectRef,
    PitchExtracted,
    ReferencePitchReady,
    ReferenceSeparated,
    Role,
    Stems,
    StemsSeparated,
)
from voicejury_runtime.audio import read_audio, to_mono
from voicejury_runtime.model_slot import ModelSlot
from voicejury_runtime.stage import StageContext
from voicejury_runtime.store import job_key

from .core import PITCH_ALGORITHM_VERSION, CrepeModel, PitchContour, extract_pitch, frame_hop_s
from .settings import PitchSettings

NPZ = "application/x-npz"


@dataclass
class PitchState:
    settings: PitchSettings
    models: dict[str, ModelSlot[CrepeModel]] = field(default_factory=dict)

    def capacity(self, role: Role) -> str:
        s = self.settings
        return s.pitch_model_performance if role is Role.PERFORMANCE else s.pitch_model_reference

    def cache_key(self, stem: Stems, model: CrepeModel) -> str:
        """Where a reference's contour lives: input hash + model + algorithm version + every
        output-changing knob.

        Not how the weights compute (`model.config`: convolution and precision): with
        `auto` each replica times the candidates at load and keeps the fastest of those
        that agree with float32 (`_PROBE_TOLERANCE`), so replicas of one deployment differ
        there by timing noise, and a key carrying it missed whenever another replica took
        the job. The contours agree to a few cents (a third of a pitch bin at most)."""
        s = self.settings
        knobs = (
            f"{PITCH_ALGORITHM_VERSION}|{model.version}|{s.pitch_decoder}|"
            f"{frame_hop_s(s.pitch_hop_s)}|{s.pitch_periodicity_threshold}|{s.pitch_silence_db}"
        )
        sig = hashlib.sha256(knobs.encode()).hexdigest()[:16]
        return f"cache/pitch/{stem.vocals_16k.sha256}/{model.capacity}-{sig}/pitch.npz"


def contour_npz(contour: PitchContour) -> bytes:
    buf = io.BytesIO()
    np.savez(
        buf,
        time_s=contour.time_s.astype(np.float64),
        f0_hz=contour.f0_hz.astype(np.float32),
        periodicity=contour.periodicity.astype(np.float32),
    )
    return buf.getvalue()


async def extract_job(
    event: StemsSeparated, ctx: StageContext, state: PitchState
) -> PitchExtracted:
    refs: dict[Role, ContourRef] = {}
    reused = False
    stems = (event.performance, event.reference)
    for index, stem in enumerate(stems):
        span = (index / len(stems), (index + 1) / len(stems))
        refs[stem.role], from_cache = await _contour_for(event.job_id, stem, ctx, state, span)
        reused = reused or from_cache
    details = {role.value: state.capacity(role) for role in refs}
    model = state.models[state.capacity(Role.PERFORMANCE)].require()
    reference = state.models[state.capacity(Role.REFERENCE)].require()
    run = ctx.stage_run(
        model=f"crepe-{details['performance']}/{details['reference']}",
        model_version=model.version,
        device=model.device,
        details={
            "decoder": state.settings.pitch_decoder,
            "hop_s": str(frame_hop_s(state.settings.pitch_hop_s)),
            "network_performance": model.describe(),
            "network_reference": reference.describe(),
            # `model_version` is the performance's weights; the reference's may differ.
            "model_version_reference": reference.version,
            "reference_cached": str(reused).lower(),
        },
    )
    return PitchExtracted(
        job_id=event.job_id,
        options=event.options,
        performance=refs[Role.PERFORMANCE],
        reference=refs[Role.REFERENCE],
        provenance=(*event.provenance, run),
    )


async def prepare_reference(
    event: ReferenceSeparated, ctx: StageContext, state: PitchState
) -> ReferencePitchReady:
    """A reference prepared ahead of jobs: its contour, into the cache its jobs look in."""
    contour, reused = await _contour_for(event.job_id, event.stems, ctx, state, (0.0, 1.0))
    model = state.models[state.capacity(Role.REFERENCE)].require()
    run = ctx.stage_run(
        model=f"crepe-{model.capacity}",
        model_version=model.version,
        device=model.device,
        cached=reused,
        details={
            "decoder": state.settings.pitch_decoder,
            "hop_s": str(frame_hop_s(state.settings.pitch_hop_s)),
            "network_reference": model.describe(),
        },
    )
    return ReferencePitchReady(job_id=event.job_id, contour=contour, provenance=(run,))


async def _contour_for(
    job_id: UUID,
    stem: Stems,
    ctx: StageContext,
    state: PitchState,
    span: tuple[float, float],
) -> tuple[ContourRef, bool]:
    """The contour of one recording, and whether it came from the reference cache."""
    s = state.settings
    model = state.models[state.capacity(stem.role)].require()
    lo, hi = span
    cache_key = state.cache_key(stem, model) if stem.role is Role.REFERENCE else None
    if cache_key is not None and (cached := await ctx.store.reuse(cache_key)) is not None:
        with np.load(io.BytesIO(await ctx.store.get_bytes(cached))) as saved:
            f0_hz = saved["f0_hz"]
        await ctx.progress(hi, f"pitch of {stem.role.value} reused from cache")
        # The hop the contour was made with (whole samples), as a fresh one reports it.
        return _contour_ref(stem.role, cached, f0_hz, frame_hop_s(s.pitch_hop_s)), True
    path = await ctx.store.download(stem.vocals_16k, ctx.workdir / f"{stem.role.value}.wav")
    samples, _ = await ctx.run_blocking(read_audio, path)
    contour: PitchContour = await ctx.run_blocking(
        extract_pitch,
        model,
        to_mono(samples),
        hop_s=s.pitch_hop_s,
        batch_frames=s.pitch_batch_frames,
        decoder=cast(Literal["viterbi", "weighted_argmax", "argmax"], s.pitch_decoder),
        periodicity_threshold=s.pitch_periodicity_threshold,
        silence_db=s.pitch_silence_db,
        on_progress=lambda f: ctx.report(lo + (hi - lo) * f, f"pitch of {stem.role.value}"),
        should_stop=ctx.should_stop,
    )
    key = cache_key or job_key(job_id, stem.role.value, "pitch.npz")
    ref = await ctx.store.put_bytes(key, contour_npz(contour), NPZ)
    return _contour_ref(stem.role, ref, contour.f0_hz, contour.hop_s), False


def _contour_ref(
    role: Role, ref: ObjectRef, f0_hz: npt.NDArray[np.floating[Any]], hop_s: float
) -> ContourRef:
    frames = int(f0_hz.size)
    voiced = float((f0_hz > 0).mean()) if frames else 0.0
    return ContourRef(role=role, contour=ref, hop_s=hop_s, frames=frames, voiced_ratio=voiced)
