"""StemsSeparated -> TranscriptReady: words with timestamps from the vocals stems.

The performance is always transcribed; the reference only when no lyrics were given
(its transcript is then what the lyrics are judged against). A reference's transcript is
cached by the content hash of its 16 kHz vocals, the model, the language (None: detected)
and the decoding options (`cache/transcripts/...`), so a second job on the same reference
transcribes the performance only; ReferenceSeparated -> ReferenceTranscriptReady fills
that cache for a reference prepared ahead of jobs.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple
from uuid import UUID

from voicejury_contracts import (
    ReferenceSeparated,
    ReferenceTranscriptReady,
    Role,
    Stems,
    StemsSeparated,
    TranscriptReady,
    TranscriptRef,
)
from voicejury_runtime.audio import FloatArray, read_audio, to_mono
from voicejury_runtime.model_slot import ModelSlot
from voicejury_runtime.stage import StageContext
from voicejury_runtime.store import job_key

from .core import (
    TRANSCRIPTION_VERSION,
    Transcript,
    WhisperHandle,
    lyrics_vocabulary,
    transcribe,
)
from .settings import AsrSettings


@dataclass
class AsrState:
    settings: AsrSettings
    model: ModelSlot[WhisperHandle] = field(default_factory=lambda: ModelSlot("Whisper"))

    def cache_key(self, stem: Stems, handle: WhisperHandle, language: str | None) -> str:
        """Where a reference's transcript lives: input hash + model (its weights' version,
        not only its name) + every output knob + the transcription's own version."""
        s = self.settings
        knobs = (
            f"{handle.name}|{handle.version}|{handle.compute_type}|{language}|{s.asr_beam_size}|"
            f"{s.asr_vad_filter}|{s.asr_max_new_tokens}|{s.asr_no_speech_threshold}|"
            f"{s.asr_compression_ratio_threshold}|{TRANSCRIPTION_VERSION}"
        )
        sig = hashlib.sha256(knobs.encode()).hexdigest()[:16]
        return f"cache/transcripts/{stem.vocals_16k.sha256}/{sig}/transcript.json"


def _unavailable(state: AsrState) -> str | None:
    """Why lyrics are skipped (no model, and the settings allow it), else None."""
    if not state.model.available and state.settings.asr_skip_when_unavailable:
        return str(state.model.error or "no ASR model loaded")
    return None


async def transcribe_job(
    event: StemsSeparated, ctx: StageContext, state: AsrState
) -> TranscriptReady:
    settings = state.settings
    if (reason := _unavailable(state)) is not None:
        await ctx.progress(1.0, "lyrics skipped: no ASR model")
        return TranscriptReady(
            job_id=event.job_id,
            options=event.options,
            performance=None,
            reference=None,
            skipped_reason=reason,
            provenance=(*event.provenance, ctx.stage_run(skipped=True, details={"reason": reason})),
        )
    handle = state.model.require()
    # The reference first: when the job names no language, the one detected on the
    # reference (a clean vocal, and cached with its transcript) is the performance's too.
    # Without lyrics, the words sung are compared with the reference's transcript.
    hints = LyricsHints.of(event.options.lyrics, settings)
    stems: list[Stems] = [event.performance]
    if hints.lyrics is None:
        stems.insert(0, event.reference)
    refs: dict[Role, TranscriptRef] = {}
    model_s = 0.0  # seconds inside transcription; the rest of the stage's time is its own
    reused = False
    language = event.options.language
    for index, stem in enumerate(stems):
        span = (index / len(stems), (index + 1) / len(stems))
        refs[stem.role], seconds = await _transcript_for(
            event.job_id, stem, ctx, state, handle, language, hints, span
        )
        if seconds is None:
            reused = True
        else:
            model_s += seconds
        # Only a language heard in words is passed on (None on silence or noise).
        language = language or refs[stem.role].language
    run = ctx.stage_run(
        model=handle.name,
        model_version=handle.version,
        device=handle.device,
        details={
            "compute_type": handle.compute_type,
            "model_s": f"{model_s:.3f}",
            **({"reference_cached": str(reused).lower()} if Role.REFERENCE in refs else {}),
        },
    )
    return TranscriptReady(
        job_id=event.job_id,
        options=event.options,
        performance=refs[Role.PERFORMANCE],
        reference=refs.get(Role.REFERENCE),
        provenance=(*event.provenance, run),
    )


async def prepare_reference(
    event: ReferenceSeparated, ctx: StageContext, state: AsrState
) -> ReferenceTranscriptReady:
    """A reference prepared ahead of jobs: its transcript, into the cache its jobs look in
    (under its language, or None = detected, as a job naming no language looks it up)."""
    if event.transcribe:
        reason = _unavailable(state)
    else:
        reason = "lyrics came with the reference: its transcript is never needed"
    if reason is not None:
        await ctx.progress(1.0, f"reference transcript skipped: {reason}")
        return ReferenceTranscriptReady(
            job_id=event.job_id,
            transcript=None,
            skipped_reason=reason,
            provenance=(ctx.stage_run(skipped=True, details={"reason": reason}),),
        )
    handle = state.model.require()
    transcript, seconds = await _transcript_for(
        event.job_id,
        event.stems,
        ctx,
        state,
        handle,
        event.language,
        LyricsHints(None, None, None),
        (0.0, 1.0),
    )
    run = ctx.stage_run(
        model=handle.name,
        model_version=handle.version,
        device=handle.device,
        cached=seconds is None,
        details={"compute_type": handle.compute_type, "model_s": f"{seconds or 0.0:.3f}"},
    )
    return ReferenceTranscriptReady(job_id=event.job_id, transcript=transcript, provenance=(run,))


class LyricsHints(NamedTuple):
    """What the job's lyrics tell the transcription: a prompt for the first window, hotwords
    for every window, and the words a repeat must be found in to be kept (not a loop)."""

    prompt: str | None
    hotwords: str | None
    lyrics: str | None

    @classmethod
    def of(cls, lyrics: str | None, settings: AsrSettings) -> LyricsHints:
        """The hints of a job's lyrics. Lyrics without a word ("\n", "♪ ♪ ♪"), which the
        scorer cannot compare with, are none."""
        if not lyrics or not any(ch.isalnum() for ch in lyrics):
            return cls(None, None, None)
        hotwords = lyrics_vocabulary(lyrics) if settings.asr_lyrics_hotwords else None
        return cls(lyrics[: settings.asr_prompt_max_chars], hotwords, lyrics)


def transcribe_stem(
    handle: WhisperHandle,
    samples: FloatArray,
    *,
    language: str | None,
    hints: LyricsHints,
    settings: AsrSettings,
    on_progress: Callable[[float], None],
    should_stop: Callable[[], None],
) -> Transcript:
    """The stage's transcription of one 16 kHz stem (any channels), by its settings and
    the job's hints. Blocking: the stage runs it in a worker thread."""
    return transcribe(
        handle,
        to_mono(samples),
        language=language,
        initial_prompt=hints.prompt,
        hotwords=hints.hotwords,
        expected_text=hints.lyrics,
        beam_size=settings.asr_beam_size,
        vad_filter=settings.asr_vad_filter,
        max_new_tokens=settings.asr_max_new_tokens,
        no_speech_threshold=settings.asr_no_speech_threshold,
        compression_ratio_threshold=settings.asr_compression_ratio_threshold,
        on_progress=on_progress,
        should_stop=should_stop,
    )


async def _transcript_for(
    job_id: UUID,
    stem: Stems,
    ctx: StageContext,
    state: AsrState,
    handle: WhisperHandle,
    language: str | None,
    hints: LyricsHints,
    span: tuple[float, float],
) -> tuple[TranscriptRef, float | None]:
    """Transcribes one stem, with the hints the job's lyrics give, if any.
    Returns the transcript's reference and the seconds spent transcribing (None: the
    reference's transcript came from the cache)."""
    # Only a reference transcribed without lyrics (no prompt, no hotwords) is cached.
    cacheable = stem.role is Role.REFERENCE and hints.prompt is None and hints.hotwords is None
    cache_key = state.cache_key(stem, handle, language) if cacheable else None
    if cache_key is not None and (cached := await ctx.store.reuse(cache_key)) is not None:
        saved = json.loads(await ctx.store.get_bytes(cached))
        await ctx.progress(span[1], f"{stem.role.value} transcript reused from cache")
        return TranscriptRef(
            role=stem.role,
            transcript=cached,
            language=saved["language"] or None,
            word_count=len(saved["words"]),
        ), None
    path = await ctx.store.download(stem.vocals_16k, ctx.workdir / f"{stem.role.value}.wav")
    samples, _ = await ctx.run_blocking(read_audio, path)
    lo, hi = span
    t0 = time.perf_counter()
    transcript: Transcript = await ctx.run_blocking(
        transcribe_stem,
        handle,
        samples,
        language=language,
        hints=hints,
        settings=state.settings,
        on_progress=lambda f: ctx.report(lo + (hi - lo) * f, f"transcribing {stem.role.value}"),
        should_stop=ctx.should_stop,
    )
    model_s = time.perf_counter() - t0
    ref = await ctx.store.put_bytes(
        cache_key or job_key(job_id, stem.role.value, "transcript.json"),
        json.dumps(transcript.to_json(), ensure_ascii=False).encode(),
        "application/json",
    )
    return TranscriptRef(
        role=stem.role,
        transcript=ref,
        language=transcript.language,  # None: none heard (the scorer and jury use the job's)
        word_count=len(transcript.words),
    ), model_s
