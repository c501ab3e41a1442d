"""Pitch settings: CREPE capacity per source, decoding, batching."""

from __future__ import annotations

from pydantic import Field

from voicejury_runtime.settings import StageSettings


class PitchSettings(StageSettings):
    # The performance deserves the full network; the reference (usually a clean studio
    # vocal, and cached) is well served by tiny, as in the original app.
    pitch_model_performance: str = Field(default="full", pattern="^(tiny|full)$")
    pitch_model_reference: str = Field(default="tiny", pattern="^(tiny|full)$")
    pitch_device: str = Field(default="auto", pattern="^(auto|cpu|cuda)$")
    pitch_precision: str = Field(
        default="auto",
        pattern="^(auto|float32|bfloat16|float16)$",
        description="auto: float16 on CUDA, bfloat16 on CPUs that have it, else float32",
    )
    pitch_hop_s: float = Field(default=0.01, gt=0, le=0.05)
    pitch_decoder: str = Field(default="viterbi", pattern="^(viterbi|weighted_argmax|argmax)$")
    pitch_batch_frames: int = Field(default=512, ge=16, description="bounds peak memory")
    pitch_periodicity_threshold: float = Field(default=0.21, ge=0, le=1)
