"""The scorer process: warms up the scoring core, then joins pitch and asr of each job
and scores it."""

from __future__ import annotations

from voicejury_contracts import Event, PitchExtracted, Stage, TranscriptReady
from voicejury_runtime.model_slot import ModelSlot
from voicejury_runtime.stage import StageContext, StageService

from .handlers import join, score_job, warm_up
from .settings import ScorerSettings


def build(settings: ScorerSettings | None = None) -> StageService:
    settings = settings or ScorerSettings()
    service = StageService(Stage.SCORER, settings)
    # Like a stage's model: prepared at startup off the event loop, and `/readyz` answers
    # ready only once it is done, so the first job does not pay numba's compile time.
    warmed: ModelSlot[float] = ModelSlot("scorer warm-up")

    @service.on_startup
    async def warm_up_core() -> None:
        await warmed.load(warm_up)

    @service.readiness
    def warmed_up() -> str | None:
        return warmed.not_ready_reason()

    # The first of a job's two halves is only noted: the scorer starts with the second.
    @service.handles(PitchExtracted, TranscriptReady, announce_start=False)
    async def on_analysis(
        event: PitchExtracted | TranscriptReady, ctx: StageContext
    ) -> list[Event]:
        state = await join(event, ctx)
        if state is None:
            return []  # the other half has not arrived yet
        await ctx.progress(0.0, "started")
        return [await score_job(state, ctx, settings)]

    return service
