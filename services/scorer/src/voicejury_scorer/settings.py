"""Scorer settings: the weights of the total and the alignment band."""

from __future__ import annotations

import math

from pydantic import Field, field_validator

from voicejury_runtime.settings import StageSettings

from .core import MAX_DTW_BAND_S, MIN_DTW_BAND_S, ScoringConfig


class ScorerSettings(StageSettings):
    scorer_weights: tuple[float, float, float] = Field(
        default=(0.4, 0.3, 0.3), description="pitch, rhythm, lyrics"
    )
    scorer_dtw_band_s: float = Field(
        default=ScoringConfig.dtw_band_s,
        ge=MIN_DTW_BAND_S,
        le=MAX_DTW_BAND_S,
        allow_inf_nan=False,
        description="how far (s) the alignment may stray from the take's course; a band "
        "of a few frames cannot follow a take a little slower than its course",
    )
    scorer_max_global_offset_s: float = Field(default=ScoringConfig.max_global_offset_s, gt=0)
    scorer_max_duration_s: float = Field(
        default=ScoringConfig.max_duration_s,
        gt=0,
        allow_inf_nan=False,
        description="pitch frames later than this (s) are ignored; well above the gateway's "
        "longest accepted recording",
    )

    @field_validator("scorer_weights")
    @classmethod
    def _positive_total(cls, weights: tuple[float, float, float]) -> tuple[float, float, float]:
        # NaN compares false with everything, so it would pass the sign checks below.
        if not all(math.isfinite(w) for w in weights):
            raise ValueError("weights must be finite")
        if min(weights) < 0 or sum(weights) <= 0:
            raise ValueError("weights must be non-negative and not all zero")
        return weights
