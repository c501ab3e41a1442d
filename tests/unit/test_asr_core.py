"""The ASR core on the random-weight micro Whisper stand-in and real speech (jfk.flac).

Random weights decode noise, so these tests check the contract (types, timestamps,
cancellation, JSON, guards), not the words.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import soundfile as sf
import soxr

from voicejury_asr.core import (
    MAX_HOTWORD_TOKENS,
    MAX_PROMPT_TOKENS,
    Transcript,
    WhisperHandle,
    Word,
    collapse_repeated_phrases,
    fit_hotwords,
    load_whisper,
    lyrics_vocabulary,
    transcribe,
)
from voicejury_runtime.models import ModelUnavailableError

SHARED = Path(__file__).resolve().parents[3] / "shared"
MICRO = SHARED / "models" / "whisper-micro-random"
JFK = SHARED / "data" / "audio" / "jfk.flac"


class Cancelled(Exception):
    pass


@pytest.fixture(scope="module")
def micro() -> WhisperHandle:
    return load_whisper(str(MICRO), "cpu", None, download_root=None, local_files_only=True)


@pytest.fixture(scope="module")
def jfk_16k() -> npt.NDArray[np.float32]:
    audio, sr = sf.read(JFK, dtype="float32", always_2d=True)
    return np.asarray(soxr.resample(audio.mean(axis=1), sr, 16_000), dtype=np.float32)


def _words(text: str) -> list[Word]:
    return [Word(f" {t}", float(i), i + 0.5, 0.9) for i, t in enumerate(text.split())]


def test_cpu_defaults_to_int8(micro: WhisperHandle) -> None:
    assert micro.compute_type == "int8"
    assert micro.device == "cpu"
    assert micro.name == str(MICRO)


def test_transcript_has_sane_types_and_timestamps(
    micro: WhisperHandle, jfk_16k: npt.NDArray[np.float32]
) -> None:
    progress: list[float] = []
    transcript = transcribe(
        micro,
        jfk_16k,
        language="en",
        initial_prompt="And so my fellow Americans, ask not " * 100,  # over-long: truncated
        max_new_tokens=16,
        on_progress=progress.append,
        should_stop=None,
    )
    assert transcript.language == "en"
    assert transcript.duration_s == pytest.approx(11.0, abs=0.1)
    assert isinstance(transcript.text, str)
    assert transcript.text == "".join(w.text for w in transcript.words).strip()
    for word in transcript.words:
        assert isinstance(word.text, str)
        assert 0.0 <= word.start_s <= word.end_s <= transcript.duration_s
        assert 0.0 <= word.probability <= 1.0
    starts = [w.start_s for w in transcript.words]
    assert starts == sorted(starts)
    assert progress
    assert progress[-1] == 1.0
    assert all(0.0 <= p <= 1.0 for p in progress)


def test_transcript_json_round_trip() -> None:
    transcript = Transcript(
        language="en", text="ask not", words=tuple(_words("ask not")), duration_s=11.0
    )
    data = json.loads(json.dumps(transcript.to_json()))
    assert set(data) == {"language", "text", "duration_s", "words"}
    assert set(data["words"][0]) == {"word", "start_s", "end_s", "probability"}
    assert Transcript.from_json(data) == transcript


def test_cancellation_stops_after_first_segment(
    micro: WhisperHandle, jfk_16k: npt.NDArray[np.float32]
) -> None:
    progress: list[float] = []
    checks: list[int] = []

    def stop_after_first_segment() -> None:
        checks.append(1)
        if len(checks) >= 2:  # the first check runs before decoding starts
            raise Cancelled

    with pytest.raises(Cancelled):
        transcribe(
            micro,
            jfk_16k,
            language="en",
            initial_prompt=None,
            max_new_tokens=16,
            vad_filter=False,
            on_progress=progress.append,
            should_stop=stop_after_first_segment,
        )
    assert len(progress) == 1


def test_local_only_model_name_fails_fast_naming_the_setting() -> None:
    started = time.monotonic()
    with pytest.raises(ModelUnavailableError) as info:
        load_whisper("small", "cpu", None, download_root=None, local_files_only=True)
    assert time.monotonic() - started < 10
    assert info.value.setting == "VJ_ASR_MODEL"
    assert info.value.model == "small"
    assert "VJ_ASR_MODEL" in str(info.value)


def test_missing_model_directory_fails(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailableError, match="VJ_ASR_MODEL"):
        load_whisper(
            str(tmp_path / "absent"), "cpu", None, download_root=None, local_files_only=False
        )
    with pytest.raises(ModelUnavailableError, match=r"model\.bin"):
        load_whisper(str(tmp_path), "cpu", None, download_root=None, local_files_only=False)


def test_download_without_network_fails_fast(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from voicejury_asr import core

    monkeypatch.setattr(core, "host_reachable", lambda *a, **k: False)
    started = time.monotonic()
    with pytest.raises(ModelUnavailableError, match="unreachable"):
        load_whisper("tiny", "cpu", None, download_root=str(tmp_path), local_files_only=False)
    assert time.monotonic() - started < 10


def test_phrase_repeated_three_times_collapses_to_one() -> None:
    words = _words("we sing la la la la and go go home home home")
    kept = [w.text.strip() for w in collapse_repeated_phrases(words)]
    assert kept == ["we", "sing", "la", "and", "go", "go", "home"]


def test_multi_word_loop_collapses_and_keeps_timestamps_of_first() -> None:
    words = _words("thank you. Thank you thank you! bye")
    kept = collapse_repeated_phrases(words)
    assert [w.text.strip() for w in kept] == ["thank", "you.", "bye"]
    assert [w.start_s for w in kept] == [0.0, 1.0, 6.0]


def test_chorus_sung_twice_is_kept() -> None:
    words = _words("let's go fishing let's go fishing today")
    assert collapse_repeated_phrases(words) == words


def test_lyrics_vocabulary_keeps_each_word_once_in_order() -> None:
    lyrics = "Aujourd'hui, maman est morte. Ou peut-être hier, je ne sais pas.\nMaman!"
    assert (
        lyrics_vocabulary(lyrics) == "Aujourd'hui maman est morte Ou peut-être hier je ne sais pas"
    )
    assert lyrics_vocabulary("  ... !! ") == ""


def test_hotwords_are_whole_words_within_their_budget(micro: WhisperHandle) -> None:
    vocabulary = lyrics_vocabulary(" ".join(f"word{k}" for k in range(500)))
    text, used = fit_hotwords(micro, vocabulary, 40)
    tokens = micro.model.hf_tokenizer.encode(" " + text, add_special_tokens=False).ids
    assert 30 < used <= 40
    assert len(tokens) == used
    assert vocabulary.startswith(text + " ")


def test_transcribe_takes_a_prompt_and_hotwords_together(
    micro: WhisperHandle, jfk_16k: npt.NDArray[np.float32]
) -> None:
    lyrics = "And so my fellow Americans, ask not what your country can do for you " * 60
    vocabulary = lyrics_vocabulary(lyrics + " ".join(f"extra{k}" for k in range(300)))
    # Both over-long on their own: the hotwords keep their share, the prompt the rest.
    transcript = transcribe(
        micro,
        jfk_16k,
        language="en",
        initial_prompt=lyrics,
        hotwords=vocabulary,
        max_new_tokens=16,
    )
    assert transcript.duration_s == pytest.approx(11.0, abs=0.1)
    assert MAX_HOTWORD_TOKENS < MAX_PROMPT_TOKENS
