"""The separator process: loads Demucs once, then consumes JobSubmitted."""

from __future__ import annotations

from voicejury_contracts import Event, JobSubmitted, Stage
from voicejury_runtime.models import resolve_device
from voicejury_runtime.stage import StageContext, StageService

from .core import load_separator
from .handlers import SeparatorState, separate_job
from .settings import SeparatorSettings


def build(settings: SeparatorSettings | None = None) -> StageService:
    settings = settings or SeparatorSettings()
    service = StageService(Stage.SEPARATOR, settings)
    state = SeparatorState(settings)

    @service.on_startup
    async def load_model() -> None:
        await state.model.load(
            lambda: load_separator(
                settings.separator_model,
                settings.separator_model_dir,
                resolve_device(settings.separator_device),
                setting="VJ_SEPARATOR_MODEL / VJ_SEPARATOR_MODEL_DIR",
            )
        )

    service.readiness(state.model.not_ready_reason)

    @service.handles(JobSubmitted)
    async def on_job_submitted(event: JobSubmitted, ctx: StageContext) -> list[Event]:
        return [await separate_job(event, ctx, state)]

    return service
