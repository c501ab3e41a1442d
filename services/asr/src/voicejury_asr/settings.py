"""ASR settings: which Whisper model, where, how it decodes, and whether it may be skipped."""

from __future__ import annotations

from pydantic import Field

from voicejury_runtime.settings import StageSettings


class AsrSettings(StageSettings):
    asr_model: str = Field(
        default="small", description="faster-whisper size name or a local CTranslate2 directory"
    )
    asr_model_version: str | None = Field(
        default=None,
        description="pin: refuse to serve unless the loaded weights are this version (the "
        "`model_version` a result's provenance reports); None: any",
    )
    asr_download_root: str | None = None
    asr_local_files_only: bool = Field(
        default=False, description="true on air-gapped nodes: never try the hub"
    )
    asr_device: str = Field(default="auto", pattern="^(auto|cpu|cuda)$")
    asr_compute_type: str | None = Field(
        default=None, description="None: int8 on CPU, float16 on CUDA"
    )
    asr_beam_size: int = Field(default=1, ge=1)
    asr_vad_filter: bool = True
    asr_max_new_tokens: int | None = Field(default=None, ge=1)
    asr_no_speech_threshold: float = Field(default=0.6, ge=0, le=1)
    asr_compression_ratio_threshold: float = Field(default=2.4, gt=0)
    asr_prompt_max_chars: int = Field(default=600, ge=0)
    asr_lyrics_hotwords: bool = Field(
        default=True,
        description="offer the lyrics' words as hotwords to every 30 s window, not only "
        "the first (which the lyrics prompt reaches)",
    )
    asr_skip_when_unavailable: bool = Field(
        default=True,
        description="without a model, finish jobs with lyrics unscored (and a warning)",
    )
    # Whisper on the CPU: a quarter of a transcription is page faults without it
    # (bench/stages.py).
    keep_freed_memory: bool = True
