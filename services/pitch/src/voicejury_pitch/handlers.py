"""StemsSeparated -> PitchExtracted: an f0 contour per recording, stored as `.npz`."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Literal, cast

import numpy as np

from voicejury_contracts import ContourRef, PitchExtracted, Role, Stems, StemsSeparated
from voicejury_runtime.audio import read_audio, to_mono
from voicejury_runtime.model_slot import ModelSlot
from voicejury_runtime.stage import StageContext
from voicejury_runtime.store import job_key

from .core import CrepeModel, PitchContour, extract_pitch
from .settings import PitchSettings

NPZ = "application/x-npz"


@dataclass
class PitchState:
    settings: PitchSettings
    models: dict[str, ModelSlot[CrepeModel]] = field(default_factory=dict)

    def capacity(self, role: Role) -> str:
        s = self.settings
        return s.pitch_model_performance if role is Role.PERFORMANCE else s.pitch_model_reference


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
    stems = (event.performance, event.reference)
    for index, stem in enumerate(stems):
        span = (index / len(stems), (index + 1) / len(stems))
        refs[stem.role] = await _contour_for(event, stem, ctx, state, span)
    details = {role.value: state.capacity(role) for role in refs}
    model = state.models[state.capacity(Role.PERFORMANCE)].require()
    reference = state.models[state.capacity(Role.REFERENCE)].require()
    run = ctx.stage_run(
        model=f"crepe-{details['performance']}/{details['reference']}",
        model_version=model.version,
        device=model.device,
        details={
            "decoder": state.settings.pitch_decoder,
            "hop_s": str(state.settings.pitch_hop_s),
            "network_performance": model.describe(),
            "network_reference": reference.describe(),
        },
    )
    return PitchExtracted(
        job_id=event.job_id,
        options=event.options,
        performance=refs[Role.PERFORMANCE],
        reference=refs[Role.REFERENCE],
        provenance=(*event.provenance, run),
    )


async def _contour_for(
    event: StemsSeparated,
    stem: Stems,
    ctx: StageContext,
    state: PitchState,
    span: tuple[float, float],
) -> ContourRef:
    s = state.settings
    model = state.models[state.capacity(stem.role)].require()
    path = await ctx.store.download(stem.vocals_16k, ctx.workdir / f"{stem.role.value}.wav")
    samples, _ = await ctx.run_blocking(read_audio, path)
    lo, hi = span
    contour: PitchContour = await ctx.run_blocking(
        extract_pitch,
        model,
        to_mono(samples),
        hop_s=s.pitch_hop_s,
        batch_frames=s.pitch_batch_frames,
        decoder=cast(Literal["viterbi", "weighted_argmax", "argmax"], s.pitch_decoder),
        periodicity_threshold=s.pitch_periodicity_threshold,
        on_progress=lambda f: ctx.report(lo + (hi - lo) * f, f"pitch of {stem.role.value}"),
        should_stop=ctx.should_stop,
    )
    ref = await ctx.store.put_bytes(
        job_key(event.job_id, stem.role.value, "pitch.npz"), contour_npz(contour), NPZ
    )
    frames = int(contour.f0_hz.size)
    voiced = float((contour.f0_hz > 0).mean()) if frames else 0.0
    return ContourRef(
        role=stem.role, contour=ref, hop_s=contour.hop_s, frames=frames, voiced_ratio=voiced
    )
