"""Separator settings: which Demucs model, where its weights are, how it runs."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from voicejury_runtime.settings import StageSettings


class SeparatorSettings(StageSettings):
    separator_model: str = Field(default="htdemucs", description="Demucs model or bag name")
    separator_model_dir: Path | None = Field(
        default=None, description="local Demucs repo (`<sig>.th` + `<name>.yaml`); no download then"
    )
    separator_model_version: str | None = Field(
        default=None,
        description="pin: refuse to serve unless the loaded weights are this version (the "
        "`model_version` a result's provenance reports); None: any",
    )
    separator_device: str = Field(default="auto", pattern="^(auto|cpu|cuda)$")
    separator_precision: str = Field(
        default="auto",
        pattern="^(auto|float32|float16|bfloat16)$",
        description=(
            "auto: float32; float16 and bfloat16 (opt-in) run the model under "
            "torch.autocast (weights and stems stay float32); float16 needs CUDA"
        ),
    )
    separator_segment_s: float | None = Field(
        default=None,
        gt=0,
        description=(
            "seconds per segment; None: the model's own, which is also the most an HTDemucs "
            "accepts (checked at model load)"
        ),
    )
    separator_overlap: float = Field(default=0.25, ge=0, lt=1)
    separator_shifts: int = Field(
        default=0,
        ge=0,
        description=(
            "random-shift passes averaged, as demucs' --shifts (0: one unshifted pass); "
            "each pass costs a whole separation"
        ),
    )
    # Demucs on the CPU: a fifth of a separation is page faults without it (bench/stages.py).
    keep_freed_memory: bool = True

    @model_validator(mode="after")
    def _float16_needs_cuda(self) -> SeparatorSettings:
        # VJ_SEPARATOR_DEVICE=auto is checked once the device is resolved, at model load.
        if self.separator_device == "cpu" and self.separator_precision == "float16":
            raise ValueError(
                "VJ_SEPARATOR_PRECISION=float16 needs CUDA; on VJ_SEPARATOR_DEVICE=cpu use "
                "float32 or bfloat16 (or auto)"
            )
        return self
