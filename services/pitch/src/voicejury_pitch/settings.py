"""Pitch settings: CREPE capacity per source, decoding, batching."""

from __future__ import annotations

from pydantic import Field, model_validator

from voicejury_runtime.settings import StageSettings


class PitchSettings(StageSettings):
    # The performance deserves the full network; the reference (usually a clean studio
    # vocal, and cached) is well served by tiny, as in the original app.
    pitch_model_performance: str = Field(default="full", pattern="^(tiny|full)$")
    pitch_model_reference: str = Field(default="tiny", pattern="^(tiny|full)$")
    pitch_model_version_performance: str | None = Field(
        default=None,
        description="pin: refuse to serve unless the performance's CREPE weights are this "
        "version (the `model_version` a result's provenance reports); None: any",
    )
    pitch_model_version_reference: str | None = Field(
        default=None,
        description="pin for the reference's CREPE weights, as above; None: any",
    )
    pitch_device: str = Field(default="auto", pattern="^(auto|cpu|cuda)$")
    pitch_convolution: str = Field(
        default="auto",
        pattern="^(auto|spectral|conv1d)$",
        description=(
            "spectral: CREPE's 64-tap convolutions as products of spectra (float32, same "
            "output); conv1d: as 1-D convolutions; auto: the faster, measured at load"
        ),
    )
    pitch_precision: str = Field(
        default="auto",
        pattern="^(auto|float32|bfloat16|float16)$",
        description=(
            "auto: the fastest of float32 and (conv1d only) float16 on CUDA or bfloat16 "
            "on CPUs that claim it, measured at load"
        ),
    )
    pitch_hop_s: float = Field(default=0.01, gt=0, le=0.05)
    pitch_decoder: str = Field(default="viterbi", pattern="^(viterbi|weighted_argmax|argmax)$")
    pitch_batch_frames: int = Field(default=512, ge=16, description="bounds peak memory")
    pitch_periodicity_threshold: float = Field(default=0.21, ge=0, le=1)
    pitch_silence_db: float = Field(
        default=-60.0,
        le=0,
        description=(
            "frames at or below this RMS level (dBFS) are unvoiced, never sent to CREPE: "
            "hum and bleed in a near-silent stem read as confident pitch otherwise"
        ),
    )
    # CREPE on the CPU: a quarter of a contour's time is page faults without it
    # (bench/stages.py).
    keep_freed_memory: bool = True

    @model_validator(mode="after")
    def _spectral_is_float32(self) -> PitchSettings:
        if self.pitch_convolution == "spectral" and self.pitch_precision not in ("auto", "float32"):
            raise ValueError(
                "VJ_PITCH_CONVOLUTION=spectral computes in float32; "
                f"VJ_PITCH_PRECISION={self.pitch_precision} needs VJ_PITCH_CONVOLUTION=conv1d "
                "(or auto)"
            )
        return self
