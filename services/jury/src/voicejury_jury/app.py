"""The jury process: three personas through litellm, with a deterministic fallback."""

from __future__ import annotations

import asyncio

from voicejury_contracts import Event, Scored, Stage
from voicejury_runtime.stage import StageContext, StageService

from .core import warm_up
from .handlers import judge
from .settings import JurySettings


def build(settings: JurySettings | None = None) -> StageService:
    settings = settings or JurySettings()
    service = StageService(Stage.JURY, settings)

    @service.on_startup
    async def import_litellm() -> None:
        if settings.jury_models:
            await asyncio.to_thread(warm_up, settings.jury_config)

    @service.handles(Scored)
    async def on_scored(event: Scored, ctx: StageContext) -> list[Event]:
        return [await judge(event, ctx, settings)]

    return service
