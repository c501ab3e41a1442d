"""Lyrics transcription with faster-whisper: numpy in, `Transcript` out.

Whisper hallucinates on music (loops of one phrase, text over instrumental passages), so
segments are filtered on no-speech probability, log-probability and compression ratio,
and runs of a phrase repeated three or more times in a row collapse to one occurrence.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlparse

import faster_whisper
import numpy as np
import numpy.typing as npt

from voicejury_runtime.models import ModelUnavailableError, host_reachable

logger = logging.getLogger(__name__)

SAMPLE_RATE: Final = 16_000
# Whisper's decoder context is 448 tokens and a prompt may use at most half of it; lyrics
# hotwords (repeated in every window) take their share of that half first.
MAX_PROMPT_TOKENS: Final = 223
MAX_HOTWORD_TOKENS: Final = 96
_WORD_KEY = re.compile(r"[^\w']+")

FloatArray = npt.NDArray[np.float32]
ProgressFn = Callable[[float], None]
StopFn = Callable[[], None]


@dataclass(frozen=True)
class WhisperHandle:
    """A loaded faster-whisper model and its provenance."""

    model: faster_whisper.WhisperModel
    name: str
    device: str
    compute_type: str


@dataclass(frozen=True)
class Word:
    """One recognised word; times in seconds from the start of the audio."""

    text: str
    start_s: float
    end_s: float
    probability: float


@dataclass(frozen=True)
class Transcript:
    """What was sung. `text` is the concatenation of `words` (after hallucination guards)."""

    language: str
    text: str
    words: tuple[Word, ...]
    duration_s: float

    def to_json(self) -> dict[str, Any]:
        return {
            "language": self.language,
            "text": self.text,
            "duration_s": self.duration_s,
            "words": [
                {
                    "word": w.text,
                    "start_s": w.start_s,
                    "end_s": w.end_s,
                    "probability": w.probability,
                }
                for w in self.words
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Transcript:
        return cls(
            language=str(data["language"]),
            text=str(data["text"]),
            duration_s=float(data["duration_s"]),
            words=tuple(
                Word(
                    text=str(w["word"]),
                    start_s=float(w["start_s"]),
                    end_s=float(w["end_s"]),
                    probability=float(w["probability"]),
                )
                for w in data["words"]
            ),
        )


def _looks_like_path(name_or_dir: str) -> bool:
    return os.sep in name_or_dir or name_or_dir.startswith((".", "~"))


def _hub_host() -> str:
    from huggingface_hub import constants

    return urlparse(constants.ENDPOINT).hostname or "huggingface.co"


def _resolve_model_path(
    name_or_dir: str, download_root: str | None, local_files_only: bool, setting: str
) -> str:
    """A local directory holding the CTranslate2 model, downloading only when allowed and
    the hub answers (a machine without network fails in seconds, never hangs)."""
    from faster_whisper.utils import download_model

    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        if not (path / "model.bin").is_file():
            raise ModelUnavailableError(name_or_dir, setting, f"{path} holds no model.bin")
        return str(path)
    if _looks_like_path(name_or_dir):
        raise ModelUnavailableError(name_or_dir, setting, f"directory {path} does not exist")
    try:
        return str(download_model(name_or_dir, local_files_only=True, cache_dir=download_root))
    except ValueError as exc:  # not a known size nor an "org/name" id
        raise ModelUnavailableError(name_or_dir, setting, str(exc)) from exc
    except Exception as exc:
        if local_files_only:
            raise ModelUnavailableError(
                name_or_dir, setting, "not in the local Hugging Face cache and downloads are off"
            ) from exc
    host = _hub_host()
    if not host_reachable(host):
        raise ModelUnavailableError(
            name_or_dir, setting, f"not in the local Hugging Face cache and {host} is unreachable"
        )
    try:
        return str(download_model(name_or_dir, local_files_only=False, cache_dir=download_root))
    except Exception as exc:
        raise ModelUnavailableError(name_or_dir, setting, f"download failed: {exc}") from exc


def load_whisper(
    name_or_dir: str,
    device: str,
    compute_type: str | None = None,
    *,
    download_root: str | None = None,
    local_files_only: bool = False,
    cpu_threads: int = 0,
    setting: str = "VJ_ASR_MODEL",
) -> WhisperHandle:
    """Load a faster-whisper model once: a model directory, a size ("small") or a hub id.

    `device` is "cpu" or "cuda"; `compute_type` defaults to int8 on CPU and float16 on CUDA.
    `cpu_threads` = 0 lets CTranslate2 choose. Raises `ModelUnavailableError` naming
    `setting` when the model is neither local nor downloadable.
    """
    resolved_type = compute_type or ("float16" if device == "cuda" else "int8")
    model_path = _resolve_model_path(name_or_dir, download_root, local_files_only, setting)
    try:
        model = faster_whisper.WhisperModel(
            model_path,
            device=device,
            compute_type=resolved_type,
            cpu_threads=cpu_threads,
            local_files_only=True,
        )
    except (RuntimeError, ValueError, OSError) as exc:
        raise ModelUnavailableError(name_or_dir, setting, f"{type(exc).__name__}: {exc}") from exc
    return WhisperHandle(model=model, name=name_or_dir, device=device, compute_type=resolved_type)


def _word_key(text: str) -> str:
    return _WORD_KEY.sub("", text.lower())


def _loop_at(keys: Sequence[str], i: int, min_repeats: int, max_n: int) -> tuple[int, int] | None:
    """(phrase length, repeats) of the shortest phrase starting at `i` that repeats at
    least `min_repeats` times back to back, or None."""
    for n in range(1, max_n + 1):
        if i + n * min_repeats > len(keys):
            return None
        phrase = keys[i : i + n]
        repeats = 1
        while keys[i + repeats * n : i + (repeats + 1) * n] == phrase:
            repeats += 1
        if repeats >= min_repeats:
            return n, repeats
    return None


def collapse_repeated_phrases(
    words: Sequence[Word], *, min_repeats: int = 3, max_phrase_words: int = 8
) -> list[Word]:
    """Keep one occurrence of any phrase (1..max_phrase_words words, compared without case
    or punctuation) that repeats `min_repeats` or more times back to back: Whisper's
    typical loop on music. Shorter repetitions (a chorus line sung twice) stay."""
    keys = [_word_key(w.text) for w in words]
    kept: list[Word] = []
    i = 0
    while i < len(words):
        loop = _loop_at(keys, i, min_repeats, max_phrase_words)
        if loop is None:
            kept.append(words[i])
            i += 1
        else:
            n, repeats = loop
            kept.extend(words[i : i + n])
            i += n * repeats
    return kept


def _prompt_tokens(handle: WhisperHandle, prompt: str, max_tokens: int) -> list[int]:
    """The first `max_tokens` tokens of the prompt: the start of the lyrics is what the
    first window hears, and faster-whisper would otherwise keep the end."""
    encoding = handle.model.hf_tokenizer.encode(" " + prompt.strip(), add_special_tokens=False)
    return list(encoding.ids[:max_tokens])


def lyrics_vocabulary(lyrics: str) -> str:
    """The distinct words of the lyrics in order of first appearance (first spelling kept,
    punctuation dropped): hotwords that remind every 30 s window of the song's words,
    where the prompt only reaches the first."""
    seen: dict[str, str] = {}
    for token in lyrics.split():
        word = token.strip('.,;:!?"()[]{}«»“”…-–—')
        key = _WORD_KEY.sub("", word.lower())
        if key and key not in seen:
            seen[key] = word
    return " ".join(seen.values())


def fit_hotwords(handle: WhisperHandle, hotwords: str, max_tokens: int) -> tuple[str, int]:
    """The longest run of whole words from the start of `hotwords` that fits in
    `max_tokens` tokens, and its token count."""
    tokenizer = handle.model.hf_tokenizer
    kept: list[str] = []
    used = 0
    for word in hotwords.split():
        cost = len(tokenizer.encode(" " + word, add_special_tokens=False).ids)
        if used + cost > max_tokens:
            break
        kept.append(word)
        used += cost
    return " ".join(kept), used


def transcribe(
    handle: WhisperHandle,
    audio_16k: FloatArray,
    *,
    language: str | None = None,
    initial_prompt: str | None = None,
    hotwords: str | None = None,
    max_prompt_tokens: int = MAX_PROMPT_TOKENS,
    max_hotword_tokens: int = MAX_HOTWORD_TOKENS,
    beam_size: int = 1,
    temperature: float = 0.0,
    vad_filter: bool = True,
    max_new_tokens: int | None = None,
    no_speech_threshold: float = 0.6,
    log_prob_threshold: float = -1.0,
    compression_ratio_threshold: float = 2.4,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> Transcript:
    """Transcribe mono float32 (n,) audio at 16 kHz on `handle.device`, with word timestamps.

    `language` None lets Whisper detect it. `initial_prompt` (e.g. the reference lyrics)
    is truncated to its first `max_prompt_tokens` tokens; faster-whisper uses it for the
    first 30 s window only, since previous-text conditioning is off (it feeds loops).
    `hotwords` (e.g. `lyrics_vocabulary(lyrics)`) are offered to every window: whole words
    from the start, at most `max_hotword_tokens` tokens, taken from the prompt's budget so
    that both together stay within half the decoder's context.
    Segments are decoded lazily: `should_stop()` is called before decoding starts and after
    every segment (it raises to cancel); `on_progress` gets segment end / duration.
    A segment is dropped when it is probably not speech (no_speech_prob above
    `no_speech_threshold` and avg_logprob below `log_prob_threshold`) or too repetitive
    (compression ratio above `compression_ratio_threshold`); then repeated phrases collapse
    (see `collapse_repeated_phrases`). Word times are seconds, clipped to [0, duration_s].
    """
    audio = np.ascontiguousarray(np.asarray(audio_16k, dtype=np.float32))
    if audio.ndim != 1:
        raise ValueError(f"audio_16k must be mono (n,), got shape {audio.shape}")
    duration_s = audio.size / SAMPLE_RATE
    if should_stop is not None:
        should_stop()
    hot, hot_tokens = (
        fit_hotwords(handle, hotwords, min(max_hotword_tokens, max_prompt_tokens))
        if hotwords and hotwords.strip()
        else ("", 0)
    )
    prompt = (
        _prompt_tokens(handle, initial_prompt, max_prompt_tokens - hot_tokens)
        if initial_prompt and initial_prompt.strip()
        else None
    )
    segments, info = handle.model.transcribe(
        audio,
        language=language,
        task="transcribe",
        beam_size=beam_size,
        best_of=1,
        temperature=temperature,
        compression_ratio_threshold=compression_ratio_threshold,
        log_prob_threshold=log_prob_threshold,
        no_speech_threshold=no_speech_threshold,
        condition_on_previous_text=False,
        initial_prompt=prompt or None,
        hotwords=hot or None,
        word_timestamps=True,
        vad_filter=vad_filter,
        max_new_tokens=max_new_tokens,
    )
    words: list[Word] = []
    try:
        for segment in segments:
            not_speech = (
                segment.no_speech_prob > no_speech_threshold
                and segment.avg_logprob < log_prob_threshold
            )
            if not_speech or segment.compression_ratio > compression_ratio_threshold:
                logger.debug(
                    "dropped segment %.2f-%.2f s: %r", segment.start, segment.end, segment.text
                )
            else:
                for w in segment.words or ():
                    start = min(max(float(w.start), 0.0), duration_s)
                    words.append(
                        Word(
                            text=w.word,
                            start_s=start,
                            end_s=min(max(float(w.end), start), duration_s),
                            probability=float(w.probability),
                        )
                    )
            if on_progress is not None and duration_s > 0:
                on_progress(min(segment.end / duration_s, 1.0))
            if should_stop is not None:
                should_stop()
    finally:
        close = getattr(segments, "close", None)
        if close is not None:
            close()
    kept = collapse_repeated_phrases(words)
    if on_progress is not None:
        on_progress(1.0)
    return Transcript(
        language=str(info.language),
        text="".join(w.text for w in kept).strip(),
        words=tuple(kept),
        duration_s=duration_s,
    )
