"""Jury settings: the ordered model list, its endpoint and secret, and the time budget."""

from __future__ import annotations

from pydantic import Field, SecretStr

from voicejury_runtime.settings import StageSettings

from .core import JuryConfig
from .fallback import MIN_COMMENT_CHARS


class JurySettings(StageSettings):
    jury_models: tuple[str, ...] = Field(
        default=(), description='litellm model names in order, e.g. ["openai/gpt-4o-mini"]'
    )
    jury_api_base: str | None = None
    jury_api_key: SecretStr | None = None
    jury_call_timeout_s: float = Field(default=3.0, gt=0)
    jury_total_budget_s: float = Field(default=4.5, gt=0)
    jury_max_comment_chars: int = Field(default=600, ge=MIN_COMMENT_CHARS)

    @property
    def jury_config(self) -> JuryConfig:
        return JuryConfig(
            models=self.jury_models,
            api_base=self.jury_api_base,
            api_key=self.jury_api_key.get_secret_value() if self.jury_api_key else None,
            call_timeout_s=self.jury_call_timeout_s,
            total_budget_s=self.jury_total_budget_s,
            max_comment_chars=self.jury_max_comment_chars,
        )
