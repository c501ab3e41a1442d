"""The separator process: loads Demucs once, then consumes JobSubmitted."""

from __future__ import annotations

from voicejury_contracts import Event, JobSubmitted, ReferenceSubmitted, Stage
from voicejury_runtime.models import pinned, resolve_device
from voicejury_runtime.stage import StageContext, StageService

from .core import load_separator
from .handlers import SeparatorState, prepare_reference, separate_job
from .settings import SeparatorSettings


def build(settings: SeparatorSettings | None = None) -> StageService:
    settings = settings or SeparatorSettings()
    service = StageService(Stage.SEPARATOR, settings)
    state = SeparatorState(settings)

    @service.on_startup
    async def load_model() -> None:
        await state.model.load(
            lambda: pinned(
                load_separator(
                    settings.separator_model,
                    settings.separator_model_dir,
                    resolve_device(settings.separator_device),
                    precision=settings.separator_precision,
                    segment_s=settings.separator_segment_s,
                    setting="VJ_SEPARATOR_MODEL / VJ_SEPARATOR_MODEL_DIR",
                ),
                settings.separator_model_version,
                "VJ_SEPARATOR_MODEL_VERSION",
            )
        )

    service.readiness(state.model.not_ready_reason)

    @service.handles(JobSubmitted, ReferenceSubmitted)
    async def on_submitted(
        event: JobSubmitted | ReferenceSubmitted, ctx: StageContext
    ) -> list[Event]:
        if isinstance(event, ReferenceSubmitted):
            return [await prepare_reference(event, ctx, state)]
        return [await separate_job(event, ctx, state)]

    return service
