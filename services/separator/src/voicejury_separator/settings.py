"""Separator settings: which Demucs model, where its weights are, how it runs."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from voicejury_runtime.settings import StageSettings


class SeparatorSettings(StageSettings):
    separator_model: str = Field(default="htdemucs", description="Demucs model or bag name")
    separator_model_dir: Path | None = Field(
        default=None, description="local Demucs repo (`<sig>.th` + `<name>.yaml`); no download then"
    )
    separator_device: str = Field(default="auto", pattern="^(auto|cpu|cuda)$")
    separator_segment_s: float | None = Field(default=None, gt=0)
    separator_overlap: float = Field(default=0.25, ge=0, lt=1)
    separator_shifts: int = Field(default=0, ge=0)
    # Demucs on the CPU: a fifth of a separation is page faults without it (bench/stages.py).
    keep_freed_memory: bool = True
