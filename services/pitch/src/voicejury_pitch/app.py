"""The pitch process: loads CREPE (one network per configured capacity) once, then
consumes StemsSeparated (jobs) and ReferenceSeparated (references prepared ahead)."""

from __future__ import annotations

from functools import partial
from typing import cast

from voicejury_contracts import Event, ReferenceSeparated, Stage, StemsSeparated
from voicejury_runtime.model_slot import ModelSlot
from voicejury_runtime.models import pinned, resolve_device
from voicejury_runtime.stage import StageContext, StageService

from .core import Convolution, CrepeModel, Precision, load_crepe
from .handlers import PitchState, extract_job, prepare_reference
from .settings import PitchSettings

_SETTING = "VJ_PITCH_MODEL_PERFORMANCE / VJ_PITCH_MODEL_REFERENCE"


def load_pinned_crepe(settings: PitchSettings, capacity: str, device: str) -> CrepeModel:
    """CREPE `capacity`, refused unless its weights are the version each role using it pins."""
    model = load_crepe(
        capacity,
        device,
        precision=cast(Precision, settings.pitch_precision),
        convolution=cast(Convolution, settings.pitch_convolution),
        setting=_SETTING,
    )
    pins = (
        (
            settings.pitch_model_performance,
            settings.pitch_model_version_performance,
            "VJ_PITCH_MODEL_VERSION_PERFORMANCE",
        ),
        (
            settings.pitch_model_reference,
            settings.pitch_model_version_reference,
            "VJ_PITCH_MODEL_VERSION_REFERENCE",
        ),
    )
    for role_capacity, expected, setting in pins:
        if role_capacity == capacity:
            pinned(model, expected, setting)
    return model


def build(settings: PitchSettings | None = None) -> StageService:
    settings = settings or PitchSettings()
    service = StageService(Stage.PITCH, settings)
    state = PitchState(settings)

    @service.on_startup
    async def load_models() -> None:
        device = resolve_device(settings.pitch_device)
        for capacity in sorted({settings.pitch_model_performance, settings.pitch_model_reference}):
            slot: ModelSlot[CrepeModel] = ModelSlot(f"CREPE {capacity}")
            await slot.load(partial(load_pinned_crepe, settings, capacity, device))
            state.models[capacity] = slot

    @service.readiness
    def models_loaded() -> str | None:
        reasons = [slot.not_ready_reason() for slot in state.models.values()]
        return next((r for r in reasons if r), None if state.models else "CREPE is loading")

    @service.handles(StemsSeparated, ReferenceSeparated)
    async def on_separated(
        event: StemsSeparated | ReferenceSeparated, ctx: StageContext
    ) -> list[Event]:
        if isinstance(event, ReferenceSeparated):
            return [await prepare_reference(event, ctx, state)]
        return [await extract_job(event, ctx, state)]

    return service
