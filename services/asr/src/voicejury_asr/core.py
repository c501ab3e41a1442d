"""Lyrics transcription with faster-whisper: numpy in, `Transcript` out.

Whisper hallucinates on music (loops of one phrase, text over instrumental passages), so
segments are filtered on no-speech probability, log-probability and compression ratio, a
run of three or more segments saying the same thing keeps one, and runs of a phrase
repeated three or more times in a row collapse to one occurrence.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlparse

import faster_whisper
import numpy as np
import numpy.typing as npt

from voicejury_runtime.errors import PermanentStageError
from voicejury_runtime.models import ModelUnavailableError, host_reachable

logger = logging.getLogger(__name__)

SAMPLE_RATE: Final = 16_000
# Bump whenever a change here alters the transcript for the same input, model and
# settings (a guard, a threshold, repeat collapsing): cached reference transcripts carry
# it in their key, so a changed algorithm never serves words the old one made.
TRANSCRIPTION_VERSION: Final = "2"  # 2: repeats counted in any phase, unheard words aside
# Whisper's decoder context is 448 tokens and a prompt may use at most half of it; lyrics
# hotwords (repeated in every window) take their share of that half first.
MAX_PROMPT_TOKENS: Final = 223
MAX_HOTWORD_TOKENS: Final = 96
# faster-whisper refuses a window whose prompt plus max_new_tokens exceeds this.
DECODER_CONTEXT_TOKENS: Final = 448
# Around the prompt and hotwords faster-whisper adds <|startofprev|>, then the start
# sequence (<|startoftranscript|>, language, task) and at most <|notimestamps|>.
_PROMPT_FRAME_TOKENS: Final = 5
# A language Whisper detects with less confidence than this is a guess (on silence or
# noise it still names one), not something to pass on.
MIN_LANGUAGE_PROBABILITY: Final = 0.5
# Whisper loops are phrases of up to a sentence or two; a longer bound finds the same
# loops, each start costs up to this many slice comparisons.
MAX_LOOP_PHRASE_WORDS: Final = 30
# Progress a segment may report at most (its end over the duration): the last window can
# yield segments ending at the audio's end before others, and 1.0 means done.
_LAST_SEGMENT_PROGRESS: Final = 0.99
_WORD_KEY = re.compile(r"[^\w']+")
# Whisper's special tokens (<|endoftext|>, <|fr|>, <|notimestamps|>, <|0.00|>, ...) are
# plain text to the tokenizer's encoder, which turns them into control ids: lyrics holding
# one could end the prompt, switch language or task.
# A run of them, with the blanks around it, becomes one space.
_SPECIAL_TOKENS = re.compile(r"[ \t]*(?:<\|[^<>]*?\|>[ \t]*)+")

FloatArray = npt.NDArray[np.float32]
ProgressFn = Callable[[float], None]
StopFn = Callable[[], None]

# faster-whisper yields nothing for a 30 s window it judges not speech, so across a run of
# them a check made after each segment would not run for minutes on a large model. The
# model's encoder pass (once per window, and once to detect the language) calls the
# `should_stop` of the transcription running in its thread first: segments are decoded
# lazily, in the thread that iterates them, and one model may serve several threads.
_window_check = threading.local()
_window_check_install = threading.Lock()


@contextmanager
def _stopping_at_each_window(
    model: faster_whisper.WhisperModel, should_stop: StopFn | None
) -> Iterator[None]:
    """While inside, `model`'s encoder pass calls `should_stop` first in this thread."""
    with _window_check_install:
        if not getattr(model, "_voicejury_window_check", False):
            encode = model.encode

            def checked_encode(features: Any) -> Any:
                check: StopFn | None = getattr(_window_check, "should_stop", None)
                if check is not None:
                    check()
                return encode(features)

            model.encode = checked_encode
            model._voicejury_window_check = True
    _window_check.should_stop = should_stop
    try:
        yield
    finally:
        _window_check.should_stop = None


@dataclass(frozen=True)
class WhisperHandle:
    """A loaded faster-whisper model and its provenance."""

    model: faster_whisper.WhisperModel
    name: str
    device: str
    compute_type: str
    # What the weights are, not what they are called: faster-whisper's version and the
    # model.bin digest (see `model_version`). A name can point at other weights later.
    version: str


@dataclass(frozen=True)
class Word:
    """One recognised word; times in seconds from the start of the audio."""

    text: str
    start_s: float
    end_s: float
    probability: float


@dataclass(frozen=True)
class Transcript:
    """What was sung. `text` is the concatenation of `words` (after hallucination guards).

    `language` is the requested one, else the one Whisper detected when words survived the
    guards and it was at least `MIN_LANGUAGE_PROBABILITY` sure; None otherwise (silence or
    noise, where Whisper still names a language)."""

    language: str | None
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
            language=None if data["language"] is None else str(data["language"]),
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
        # Without its tokenizer.json faster-whisper fetches whisper-tiny's from the hub:
        # seconds of retries offline, and a vocabulary not the model's (large-v3's differs).
        for needed in ("model.bin", "tokenizer.json"):
            if not (path / needed).is_file():
                raise ModelUnavailableError(name_or_dir, setting, f"{path} holds no {needed}")
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
    `setting` when the model is neither local nor downloadable, and `ValueError` naming
    VJ_ASR_COMPUTE_TYPE for a compute type `device` cannot run: that is a
    misconfiguration to fix, not a missing model to run without (see `check_compute_type`).
    """
    resolved_type = compute_type or ("float16" if device == "cuda" else "int8")
    check_compute_type(resolved_type, device)
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
    return WhisperHandle(
        model=model,
        name=name_or_dir,
        device=device,
        compute_type=resolved_type,
        version=model_version(Path(model_path)),
    )


def check_compute_type(compute_type: str, device: str) -> None:
    """Raises `ValueError`, naming VJ_ASR_COMPUTE_TYPE and what `device` supports, for a
    compute type CTranslate2 cannot run there (float16 on a CPU, a typo). Checked before
    the model loads, so the error is not mistaken for a missing model (which the stage may
    run without, lyrics unscored)."""
    import ctranslate2

    if compute_type in ("default", "auto"):  # CTranslate2 picks one the device supports
        return
    try:
        supported = ctranslate2.get_supported_compute_types(device)
    except (RuntimeError, ValueError):
        return  # the device itself is unusable: the model load says so, naming the setting
    if compute_type not in supported:
        raise ValueError(
            f"VJ_ASR_COMPUTE_TYPE={compute_type} cannot run on {device}; "
            f"this machine supports {', '.join(sorted(supported))} (or leave it unset)"
        )


def model_version(model_dir: Path) -> str:
    """faster-whisper's version and a digest of the weights in `model_dir` (its model.bin,
    hashed once at load: about a second per GB), so provenance and cached transcripts
    change when the weights do, whatever the directory or size name."""
    digest = hashlib.sha256()
    with (model_dir / "model.bin").open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return f"faster-whisper=={faster_whisper.__version__};model.bin:{digest.hexdigest()[:16]}"


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
    words: Sequence[Word],
    *,
    min_repeats: int = 3,
    max_phrase_words: int = MAX_LOOP_PHRASE_WORDS,
    expected: Sequence[str] = (),
) -> list[Word]:
    """Keep one occurrence of any phrase (1..max_phrase_words words, compared without case
    or punctuation) that repeats `min_repeats` or more times back to back: Whisper's
    typical loop on music. Shorter repetitions (a chorus line sung twice) stay, and so do
    as many repeats as the `expected` words (the lyrics, as `expected_keys` gives them)
    have back to back: "na na na na" sung as written is not a loop."""
    keys = [_word_key(w.text) for w in words]
    heard = set(keys)
    kept: list[Word] = []
    i = 0
    while i < len(words):
        loop = _loop_at(keys, i, min_repeats, max_phrase_words)
        if loop is None:
            kept.append(words[i])
            i += 1
        else:
            n, repeats = loop
            allowed = _words_repeating_in(expected, keys[i : i + n], heard)
            kept.extend(words[i : i + min(n * repeats, max(n, allowed))])
            i += n * repeats
    return kept


def expected_keys(text: str | None) -> list[str]:
    """The words of `text` (lyrics) as the loop guards compare them."""
    if not text:
        return []
    return [k for k in (_word_key(w) for w in strip_special_tokens(text).split()) if k]


def _words_repeating_in(
    expected: Sequence[str], phrase: Sequence[str], heard: set[str] | frozenset[str]
) -> int:
    """How many words of `phrase` back to back, in any phase, the lyrics hold: the longest
    stretch of `expected` that repeats with the phrase's period and holds the phrase
    ("na na hey" x 3 holds "hey na na" too: an ad-lib "hey" before it shifts only the
    phase). Lyrics words never `heard` are left out first: a vocable Whisper does not
    write ("oh") between two runs of a line joins them into the one run it heard.
    0 when the lyrics do not repeat it. Linear in the lyrics (times the phrase's length)."""
    n = len(phrase)
    lyrics = [w for w in expected if w in heard]
    if not n or len(lyrics) < n:
        return 0
    members = set(phrase)
    doubled = list(phrase) * 2
    best = start = 0
    while start + n <= len(lyrics):
        end = start + n
        while end < len(lyrics) and lyrics[end] == lyrics[end - n]:
            end += 1
        window = lyrics[start : start + n]
        if (
            end - start > best
            and members.issuperset(window)
            and any(doubled[k : k + n] == window for k in range(n))
        ):
            best = end - start
        # Every window inside [start, end) is a rotation of the first: on past the run.
        start = max(start + 1, end - n + 1)
    return best


def _collapse_repeated_segments(
    segments: Sequence[tuple[tuple[str, ...], list[Word]]],
    min_repeats: int = 3,
    expected: Sequence[str] = (),
) -> list[list[Word]]:
    """The segments' words, with a run of `min_repeats` or more segments saying the same
    thing (compared without case or punctuation) kept once, or as many times as the
    `expected` words repeat it: Whisper looping across windows, whatever the phrase's
    length. A line sung twice stays twice."""
    kept: list[list[Word]] = []
    heard = frozenset(k for key, _ in segments for k in key)
    i = 0
    while i < len(segments):
        key = segments[i][0]
        run = 1
        while key and i + run < len(segments) and segments[i + run][0] == key:
            run += 1
        allowed = _words_repeating_in(expected, key, heard) // max(1, len(key))
        keep = run if run < min_repeats else max(1, min(run, allowed))
        kept.extend(s for _, s in segments[i : i + keep])
        i += run
    return kept


def strip_special_tokens(text: str) -> str:
    """`text` without anything shaped like a Whisper special token (`<|...|>`), however
    nested: lyrics are untrusted and must never steer the decoder."""
    while True:
        stripped = _SPECIAL_TOKENS.sub(" ", text)
        if stripped == text:
            return stripped
        text = stripped


def _prompt_tokens(handle: WhisperHandle, prompt: str, max_tokens: int) -> list[int]:
    """The first `max_tokens` tokens of the prompt: the start of the lyrics is what the
    first window hears, and faster-whisper would otherwise keep the end. Special tokens
    are removed from the text and any id from <|endoftext|> on is dropped: only text."""
    tokenizer = handle.model.hf_tokenizer
    encoding = tokenizer.encode(
        " " + strip_special_tokens(prompt).strip(), add_special_tokens=False
    )
    eot = tokenizer.token_to_id("<|endoftext|>")
    ids = [i for i in encoding.ids if eot is None or i < eot]
    return ids[:max_tokens]


def lyrics_vocabulary(lyrics: str) -> str:
    """The distinct words of the lyrics in order of first appearance (first spelling kept,
    punctuation dropped): hotwords that remind every 30 s window of the song's words,
    where the prompt only reaches the first."""
    seen: dict[str, str] = {}
    for token in strip_special_tokens(lyrics).split():
        word = token.strip('.,;:!?"()[]{}«»“”…-–—')
        key = _WORD_KEY.sub("", word.lower())
        if key and key not in seen:
            seen[key] = word
    return " ".join(seen.values())


def fit_hotwords(handle: WhisperHandle, hotwords: str, max_tokens: int) -> tuple[str, int]:
    """The longest run of whole words from the start of `hotwords` (special tokens
    removed: faster-whisper encodes this text as is) that fits in `max_tokens` tokens, and
    its token count."""
    tokenizer = handle.model.hf_tokenizer
    kept: list[str] = []
    used = 0
    for word in strip_special_tokens(hotwords).split():
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
    expected_text: str | None = None,
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
    Special tokens (`<|...|>`) in either are dropped (see `strip_special_tokens`).
    `max_new_tokens` is lowered to what fits in the decoder's context after the prompt.
    Segments are decoded lazily: `should_stop()` is called before decoding starts, before
    every 30 s window (those Whisper skips as not speech included) and after every segment;
    it raises to cancel. `on_progress` gets segment end / duration.
    A segment is dropped when it is probably not speech (no_speech_prob above
    `no_speech_threshold` and avg_logprob below `log_prob_threshold`), too repetitive
    (compression ratio above `compression_ratio_threshold`); a run of three or more
    segments with the same words (Whisper's loop across windows) keeps its first; then
    repeated phrases collapse (see `collapse_repeated_phrases`), except as many repeats as
    `expected_text` (the lyrics) has. Word times are seconds, clipped to [0, duration_s].
    `Transcript.language` is None when nothing was requested and no detection is worth
    passing on (see `Transcript`).

    Raises `PermanentStageError` (code "unsupported_language") for a `language` the model
    does not know: retrying cannot help.
    """
    audio = np.ascontiguousarray(np.asarray(audio_16k, dtype=np.float32))
    if audio.ndim != 1:
        raise ValueError(f"audio_16k must be mono (n,), got shape {audio.shape}")
    if language is not None and language not in handle.model.supported_languages:
        raise PermanentStageError(
            f"language {language!r} is not one this Whisper model knows; use an ISO 639-1 "
            f"code it supports ({', '.join(sorted(handle.model.supported_languages))}) "
            "or none to detect it",
            code="unsupported_language",
        )
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
    if max_new_tokens is not None:
        prompt_length = _PROMPT_FRAME_TOKENS + hot_tokens + len(prompt or ())
        fits = DECODER_CONTEXT_TOKENS - prompt_length
        if max_new_tokens > fits:
            logger.debug("max_new_tokens %d lowered to %d after the prompt", max_new_tokens, fits)
            max_new_tokens = fits
    with _stopping_at_each_window(handle.model, should_stop):
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
        # (words compared, words) per segment
        decoded: list[tuple[tuple[str, ...], list[Word]]] = []
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
                    seg_words = []
                    for w in segment.words or ():
                        start = min(max(float(w.start), 0.0), duration_s)
                        seg_words.append(
                            Word(
                                text=w.word,
                                start_s=start,
                                end_s=min(max(float(w.end), start), duration_s),
                                probability=float(w.probability),
                            )
                        )
                    key = tuple(k for k in (_word_key(w) for w in segment.text.split()) if k)
                    decoded.append((key, seg_words))
                if on_progress is not None and duration_s > 0:
                    # 1.0 only once all is done: a segment may end at the audio's end early
                    on_progress(min(segment.end / duration_s, _LAST_SEGMENT_PROGRESS))
                if should_stop is not None:
                    should_stop()
        finally:
            close = getattr(segments, "close", None)
            if close is not None:
                close()
    lyrics = expected_keys(expected_text)
    words = [w for seg in _collapse_repeated_segments(decoded, expected=lyrics) for w in seg]
    kept = collapse_repeated_phrases(words, expected=lyrics)
    if on_progress is not None:
        on_progress(1.0)
    if language is None and kept and info.language_probability >= MIN_LANGUAGE_PROBABILITY:
        language = str(info.language)
    return Transcript(
        language=language,
        text="".join(w.text for w in kept).strip(),
        words=tuple(kept),
        duration_s=duration_s,
    )
