"""The scorer process: joins pitch and asr of each job, then scores it."""

from __future__ import annotations

from voicejury_contracts import Event, PitchExtracted, Stage, TranscriptReady
from voicejury_runtime.stage import StageContext, StageService

from .handlers import join, score_job
from .settings import ScorerSettings


def build(settings: ScorerSettings | None = None) -> StageService:
    settings = settings or ScorerSettings()
    service = StageService(Stage.SCORER, settings)

    @service.handles(PitchExtracted, TranscriptReady)
    async def on_analysis(
        event: PitchExtracted | TranscriptReady, ctx: StageContext
    ) -> list[Event]:
        state = await join(event, ctx)
        if state is None:
            return []  # the other half has not arrived yet
        return [await score_job(state, ctx, settings)]

    return service
