"""The asr process: loads faster-whisper once, then consumes StemsSeparated (jobs) and
ReferenceSeparated (references prepared ahead)."""

from __future__ import annotations

from functools import partial

from voicejury_contracts import Event, ReferenceSeparated, Stage, StemsSeparated
from voicejury_runtime.models import pinned, resolve_device
from voicejury_runtime.stage import StageContext, StageService

from .core import WhisperHandle, load_whisper
from .handlers import AsrState, prepare_reference, transcribe_job
from .settings import AsrSettings


def ctranslate2_has_cuda() -> bool:
    import ctranslate2  # faster-whisper's runtime: the asr image has no torch to ask

    return int(ctranslate2.get_cuda_device_count()) > 0


def whisper_device(setting: str) -> str:
    """The device for Whisper, as CTranslate2 (which runs it) sees the machine."""
    return resolve_device(setting, cuda_available=ctranslate2_has_cuda)


def load_pinned_whisper(settings: AsrSettings) -> WhisperHandle:
    """The model the settings name, on their device, refused unless its weights are the
    pinned version (`VJ_ASR_MODEL_VERSION`)."""
    handle = load_whisper(
        settings.asr_model,
        whisper_device(settings.asr_device),
        settings.asr_compute_type,
        download_root=settings.asr_download_root,
        local_files_only=settings.asr_local_files_only,
        setting="VJ_ASR_MODEL",
    )
    return pinned(handle, settings.asr_model_version, "VJ_ASR_MODEL_VERSION")


def build(settings: AsrSettings | None = None) -> StageService:
    settings = settings or AsrSettings()
    service = StageService(Stage.ASR, settings)
    state = AsrState(settings)

    @service.on_startup
    async def load_model() -> None:
        await state.model.load(partial(load_pinned_whisper, settings))

    @service.readiness
    def model_loaded() -> str | None:
        # Allowed to run without a model (lyrics unscored, with a warning): ready once tried.
        if settings.asr_skip_when_unavailable and state.model.error is not None:
            return None
        return state.model.not_ready_reason()

    @service.handles(StemsSeparated, ReferenceSeparated)
    async def on_separated(
        event: StemsSeparated | ReferenceSeparated, ctx: StageContext
    ) -> list[Event]:
        if isinstance(event, ReferenceSeparated):
            return [await prepare_reference(event, ctx, state)]
        return [await transcribe_job(event, ctx, state)]

    return service
