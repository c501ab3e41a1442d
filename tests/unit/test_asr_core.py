"""The ASR core on the random-weight micro Whisper stand-in and real speech (jfk.flac).

Random weights decode noise, so these tests check the contract (types, timestamps,
cancellation, JSON, guards), not the words.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import pytest
import soundfile as sf
import soxr

from voicejury_asr.core import (
    DECODER_CONTEXT_TOKENS,
    MAX_HOTWORD_TOKENS,
    MAX_PROMPT_TOKENS,
    Transcript,
    WhisperHandle,
    Word,
    collapse_repeated_phrases,
    expected_keys,
    fit_hotwords,
    load_whisper,
    lyrics_vocabulary,
    transcribe,
)
from voicejury_asr.handlers import AsrState
from voicejury_asr.settings import AsrSettings
from voicejury_contracts import ObjectRef, Role, Stems
from voicejury_runtime.errors import PermanentStageError
from voicejury_runtime.model_slot import ModelSlot
from voicejury_runtime.models import ModelUnavailableError

SHARED = Path(__file__).resolve().parents[3] / "shared"
MICRO = SHARED / "models" / "whisper-micro-random"
TINY = SHARED / "models" / "whisper-tiny-random"
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


def test_progress_reaches_one_only_when_the_transcription_is_done(
    jfk_16k: npt.NDArray[np.float32],
) -> None:
    # The tiny stand-in's segments run to the audio's end before later ones: each such
    # 1.0 mid-work would say "done" early, and pass the runtime's throttle.
    tiny = load_whisper(str(TINY), "cpu", None, download_root=None, local_files_only=True)
    progress: list[float] = []
    transcribe(
        tiny,
        jfk_16k,
        language="en",
        vad_filter=False,
        max_new_tokens=40,
        no_speech_threshold=1.0,
        compression_ratio_threshold=100.0,
        on_progress=progress.append,
    )
    assert len(progress) > 2
    assert progress[-1] == 1.0
    assert max(progress[:-1]) < 1.0


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
        if len(checks) >= 3:  # the first two run before decoding and before the window
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


def test_windows_whisper_skips_as_not_speech_are_checkpoints_too(
    micro: WhisperHandle, jfk_16k: npt.NDArray[np.float32]
) -> None:
    # Thresholds that make faster-whisper skip every 30 s window as "no speech": it then
    # yields no segment at all, so only a check before each window can stop the work.
    take = np.tile(jfk_16k, 7)  # 77 s: three windows
    checks: list[int] = []
    transcript = transcribe(
        micro,
        take,
        language="en",
        max_new_tokens=16,
        vad_filter=False,
        should_stop=lambda: checks.append(1),
        no_speech_threshold=-1.0,
        log_prob_threshold=0.0,
    )
    assert transcript.words == ()
    assert len(checks) >= 1 + 3  # before decoding, then before each window

    checks.clear()

    def stop_at_second_window() -> None:
        checks.append(1)
        if len(checks) >= 3:
            raise Cancelled

    with pytest.raises(Cancelled):
        transcribe(
            micro,
            take,
            language="en",
            max_new_tokens=16,
            vad_filter=False,
            should_stop=stop_at_second_window,
            no_speech_threshold=-1.0,
            log_prob_threshold=0.0,
        )
    # The model is shared: a transcription without a check is not stopped by the last one.
    assert transcribe(micro, jfk_16k, language="en", max_new_tokens=16).duration_s > 0


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


def test_model_directory_without_its_tokenizer_fails_without_going_online(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    def no_hub(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    model = tmp_path / "whisper"
    model.mkdir()
    for f in MICRO.iterdir():
        if f.name != "tokenizer.json":
            (model / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ModelUnavailableError, match=r"tokenizer\.json.*VJ_ASR_MODEL"):
        load_whisper(str(model), "cpu", None, download_root=None, local_files_only=True)


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


def test_special_tokens_in_lyrics_never_reach_the_prompt_or_hotwords(
    micro: WhisperHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    from voicejury_asr import core

    lyrics = "La la <|endoftext|> love <|fr|><|translate|> <|notimestamps|> song <|0.00|>"
    tokenizer = micro.model.hf_tokenizer
    eot = tokenizer.token_to_id("<|endoftext|>")
    assert any(i >= eot for i in tokenizer.encode(lyrics, add_special_tokens=False).ids)

    prompt = core._prompt_tokens(micro, lyrics, 50)
    assert prompt == tokenizer.encode(" La la love song", add_special_tokens=False).ids
    vocabulary = lyrics_vocabulary(lyrics)
    assert vocabulary == "La love song"
    hot, used = fit_hotwords(micro, "a <|<|x|>endoftext|> b<|en|>", 96)
    assert "<|" not in hot
    assert all(i < eot for i in tokenizer.encode(" " + hot, add_special_tokens=False).ids)
    assert used == len(tokenizer.encode(" " + hot, add_special_tokens=False).ids)

    # And what faster-whisper is handed: token ids below eot, hotwords without specials.
    seen: dict[str, Any] = {}
    monkeypatch.setattr(micro.model, "transcribe", _recording_transcribe(seen))
    transcribe(
        micro, np.zeros(16_000, np.float32), language="en", initial_prompt=lyrics, hotwords=lyrics
    )
    assert all(i < eot for i in seen["initial_prompt"])
    assert "<|" not in seen["hotwords"]


def _recording_transcribe(seen: dict[str, Any]) -> Any:
    def fake(audio: Any, **kwargs: Any) -> Any:
        seen.update(kwargs)
        return iter(()), SimpleNamespace(language="en", language_probability=1.0)

    return fake


def test_max_new_tokens_is_lowered_to_what_fits_after_the_prompt(
    micro: WhisperHandle, jfk_16k: npt.NDArray[np.float32]
) -> None:
    """faster-whisper refuses a prompt plus max_new_tokens over 448 tokens (ValueError,
    retried as if transient); the lyrics prompt takes up to 223 of them."""
    lyrics = "And so my fellow Americans, ask not what your country can do for you " * 60
    transcript = transcribe(
        micro,
        jfk_16k[: 2 * 16_000],
        language="en",
        initial_prompt=lyrics,
        hotwords=lyrics_vocabulary(lyrics),
        vad_filter=False,
        max_new_tokens=400,
    )
    assert transcript.language == "en"
    assert MAX_PROMPT_TOKENS + 5 + 220 <= DECODER_CONTEXT_TOKENS


def test_max_new_tokens_that_fits_is_passed_as_is(
    micro: WhisperHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setattr(micro.model, "transcribe", _recording_transcribe(seen))
    lyrics = "ask not what your country can do for you " * 60
    transcribe(micro, np.zeros(16_000, np.float32), language="en", max_new_tokens=64)
    assert seen["max_new_tokens"] == 64
    transcribe(micro, np.zeros(16_000, np.float32), language="en", max_new_tokens=10_000)
    assert seen["max_new_tokens"] == DECODER_CONTEXT_TOKENS - 5
    transcribe(
        micro,
        np.zeros(16_000, np.float32),
        language="en",
        initial_prompt=lyrics,
        max_new_tokens=10_000,
    )
    assert seen["max_new_tokens"] + len(seen["initial_prompt"]) + 5 == DECODER_CONTEXT_TOKENS


def test_unknown_language_is_a_permanent_error(
    micro: WhisperHandle, jfk_16k: npt.NDArray[np.float32]
) -> None:
    with pytest.raises(PermanentStageError, match="'xx'") as info:
        transcribe(micro, jfk_16k, language="xx", max_new_tokens=16)
    assert info.value.code == "unsupported_language"


@pytest.mark.parametrize("compute_type", ["float16", "int8_float16", "bogus"])
async def test_unsupported_compute_type_is_a_configuration_error_not_a_missing_model(
    compute_type: str,
) -> None:
    """A missing model may leave lyrics unscored (VJ_ASR_SKIP_WHEN_UNAVAILABLE); a compute
    type the machine cannot run must stop the process from starting instead."""
    with pytest.raises(ValueError, match=f"VJ_ASR_COMPUTE_TYPE={compute_type}") as info:
        load_whisper(str(MICRO), "cpu", compute_type, local_files_only=True)
    assert not isinstance(info.value, ModelUnavailableError)
    assert "int8" in str(info.value)  # what the machine supports
    slot: ModelSlot[WhisperHandle] = ModelSlot("Whisper")
    with pytest.raises(ValueError, match="VJ_ASR_COMPUTE_TYPE"):
        await slot.load(lambda: load_whisper(str(MICRO), "cpu", compute_type))
    assert slot.error is None


def _reference_stem() -> Stems:
    ref = ObjectRef(bucket="bkt", key="k", sha256="0" * 64, size=1, content_type="audio/wav")
    return Stems(
        role=Role.REFERENCE,
        original=ref,
        vocals=ref,
        vocals_16k=ref,
        separated=False,
        duration_s=1.0,
    )


def test_model_version_is_the_weights_not_the_name(
    micro: WhisperHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny = load_whisper(str(TINY), "cpu", None, local_files_only=True)
    assert micro.version.startswith("faster-whisper==")
    assert micro.version != tiny.version
    assert load_whisper(str(MICRO), "cpu", "int8").version == micro.version
    # VJ_ASR_MODEL=/models/whisper, whose contents were replaced
    same_name = [dataclasses.replace(h, name="/models/whisper") for h in (micro, tiny)]
    state = AsrState(AsrSettings())
    keys = {state.cache_key(_reference_stem(), h, None) for h in same_name}
    assert len(keys) == 2
    # A changed transcription (its version bumped) does not reuse the old transcripts.
    from voicejury_asr import handlers

    monkeypatch.setattr(handlers, "TRANSCRIPTION_VERSION", "next")
    assert state.cache_key(_reference_stem(), same_name[0], None) not in keys


def test_silence_has_no_language(micro: WhisperHandle) -> None:
    """Whisper names a language even for an all-zero stem (kk, here); only one heard in
    words is reported, else the requested one."""
    silence = np.zeros(3 * 16_000, np.float32)
    transcript = transcribe(micro, silence, max_new_tokens=16)
    assert transcript.words == ()
    assert transcript.language is None
    asked = transcribe(micro, silence, language="fr", max_new_tokens=16)
    assert asked.language == "fr"
    assert Transcript.from_json(json.loads(json.dumps(transcript.to_json()))) == transcript


def test_detected_language_needs_confidence(monkeypatch: pytest.MonkeyPatch) -> None:
    for probability, expected in ((0.9, "de"), (0.3, None)):
        handle = _fake_handle(
            [_segment(0.0, 2.0, "ein zwei drei")], language="de", probability=probability
        )
        assert transcribe(handle, np.zeros(32_000, np.float32)).language == expected


def test_twelve_word_phrase_looped_four_times_collapses() -> None:
    phrase = "subtitles by the amara org community please like and subscribe thank you"
    words = _words(" ".join([phrase] * 4) + " bye")
    kept = [w.text.strip() for w in collapse_repeated_phrases(words)]
    assert kept == [*phrase.split(), "bye"]


def test_a_loop_of_long_segments_keeps_one_and_a_line_sung_twice_stays() -> None:
    long = " ".join(f"word{k}" for k in range(35))  # longer than any phrase loop
    handle = _fake_handle(
        [
            _segment(0.0, 2.0, "Thank you for watching."),
            _segment(2.0, 4.0, "thank you, for watching"),  # a line sung twice: kept
            _segment(4.0, 6.0, "and goodbye"),
            *(_segment(6.0 + 2 * k, 8.0 + 2 * k, long) for k in range(4)),  # a loop
        ]
    )
    transcript = transcribe(handle, np.zeros(14 * 16_000, np.float32), language="en")
    assert transcript.text == (
        "Thank you for watching. thank you, for watching and goodbye " + long
    )
    assert transcript.words[-1].start_s < 8.0


def _segment(start: float, end: float, text: str) -> SimpleNamespace:
    tokens = text.split()
    step = (end - start) / len(tokens)
    return SimpleNamespace(
        start=start,
        end=end,
        text=" " + text,
        words=[
            SimpleNamespace(
                word=" " + t, start=start + k * step, end=start + (k + 1) * step, probability=0.9
            )
            for k, t in enumerate(tokens)
        ],
        no_speech_prob=0.0,
        avg_logprob=-0.2,
        compression_ratio=1.0,
    )


def _fake_handle(
    segments: list[SimpleNamespace], language: str = "en", probability: float = 1.0
) -> WhisperHandle:
    """A handle whose model decodes to `segments`: the guards after decoding, in isolation."""

    class FakeModel:
        supported_languages = ("de", "en", "fr")

        def transcribe(self, audio: Any, **kwargs: Any) -> Any:
            return iter(segments), SimpleNamespace(
                language=language, language_probability=probability
            )

        def encode(self, features: Any) -> Any:  # WhisperModel's encoder pass, per window
            raise AssertionError("the fake decodes nothing")

    return WhisperHandle(
        model=cast(Any, FakeModel()),
        name="fake",
        device="cpu",
        compute_type="int8",
        version="fake",
    )


async def _transcribe_job(
    handle: WhisperHandle,
    monkeypatch: pytest.MonkeyPatch,
    options: Any,
    transcript_for: Callable[..., Awaitable[tuple[Any, float]]],
) -> Any:
    """`handlers.transcribe_job` on one job (the stand-in reference as both recordings),
    each recording's transcript made by `transcript_for` instead of the model."""
    import uuid
    from datetime import UTC, datetime

    from voicejury_asr import handlers
    from voicejury_contracts import Stage, StageRun, StemsSeparated

    class Context:
        def stage_run(self, **fields: Any) -> StageRun:
            return StageRun(
                stage=Stage.ASR, started_at=datetime.now(UTC), seconds=0.0, attempt=1, **fields
            )

    monkeypatch.setattr(handlers, "_transcript_for", transcript_for)
    state = AsrState(AsrSettings())
    state.model.value = handle
    reference = _reference_stem()
    event = StemsSeparated(
        job_id=uuid.uuid4(),
        options=options,
        performance=reference.model_copy(update={"role": Role.PERFORMANCE}),
        reference=reference,
        provenance=(),
    )
    return await handlers.transcribe_job(event, cast(Any, Context()), state)


@pytest.mark.parametrize(("heard", "passed_on"), [(None, None), ("de", "de")])
async def test_only_a_language_heard_in_words_is_passed_to_the_performance(
    micro: WhisperHandle,
    monkeypatch: pytest.MonkeyPatch,
    heard: str | None,
    passed_on: str | None,
) -> None:
    """The reference is transcribed first; a silent one (None in its reference: none heard)
    must not impose Whisper's guess on the performance."""
    import uuid

    from voicejury_contracts import JobOptions, TranscriptRef

    asked: dict[Role, str | None] = {}

    async def transcript_for(
        job_id: uuid.UUID, stem: Stems, ctx: Any, state: Any, handle: Any, language: Any, *_: Any
    ) -> tuple[TranscriptRef, float]:
        asked[stem.role] = language
        ref = TranscriptRef(
            role=stem.role,
            transcript=stem.vocals_16k,
            language=heard if stem.role is Role.REFERENCE else "de",
            word_count=0,
        )
        return ref, 0.1

    ready = await _transcribe_job(micro, monkeypatch, JobOptions(), transcript_for)
    assert asked == {Role.REFERENCE: None, Role.PERFORMANCE: passed_on}
    run = ready.provenance[-1]
    assert run.model_version == micro.version
    assert run.details["compute_type"] == "int8"


@pytest.mark.parametrize(
    ("lyrics", "reference_transcribed"),
    [(None, True), ("\n", True), ("♪ ♪ ♪", True), ("Let it be", False)],
)
async def test_lyrics_without_a_word_are_no_lyrics(
    micro: WhisperHandle,
    monkeypatch: pytest.MonkeyPatch,
    lyrics: str | None,
    reference_transcribed: bool,
) -> None:
    """The scorer compares the words sung with the lyrics when they hold a word, else with
    the reference's transcript: that transcript must then exist."""
    import uuid

    from voicejury_contracts import JobOptions, TranscriptRef

    transcribed: list[Role] = []

    async def transcript_for(
        job_id: uuid.UUID, stem: Stems, *_: Any
    ) -> tuple[TranscriptRef, float]:
        transcribed.append(stem.role)
        ref = TranscriptRef(role=stem.role, transcript=stem.vocals_16k, word_count=0)
        return ref, 0.1

    options = JobOptions(lyrics=lyrics, language="en")
    ready = await _transcribe_job(micro, monkeypatch, options, transcript_for)
    assert (Role.REFERENCE in transcribed) is reference_transcribed
    assert (ready.reference is not None) is reference_transcribed


@pytest.mark.parametrize(
    ("lyrics", "heard"),
    [
        # A vocable Whisper does not write ("oh") joins two runs of the line into one.
        (
            "in times of trouble let it be let it be oh let it be let it be",
            "in times of trouble let it be let it be let it be let it be",
        ),
        # An ad-lib "hey" before the chant shifts only the phase of its repeats.
        ("na na hey na na hey na na hey goodbye", "hey na na hey na na hey na na hey goodbye"),
    ],
)
def test_repeats_sung_as_the_lyrics_have_them_stay_whatever_their_phase(
    lyrics: str, heard: str
) -> None:
    words = _words(heard)
    assert collapse_repeated_phrases(words, expected=expected_keys(lyrics)) == words


def test_repeats_the_lyrics_have_are_sung_not_looped() -> None:
    """ "na na na na" and a chorus line sung three times, as written, stay; beyond what the
    lyrics repeat, the loop guards still cut."""
    handle = _fake_handle(
        [
            _segment(0.0, 2.0, "na na na na"),
            *(_segment(2.0 + 2 * k, 4.0 + 2 * k, "hey jude don't be afraid") for k in range(5)),
        ]
    )
    lyrics = (
        "Na na na na\nHey Jude, don't be afraid\nhey jude don't be afraid\nHey Jude don't be afraid"
    )
    transcript = transcribe(
        handle, np.zeros(12 * 16_000, np.float32), language="en", expected_text=lyrics
    )
    assert transcript.text.split().count("na") == 4
    assert transcript.text.count("afraid") == 3  # five decoded, three written
    without = transcribe(handle, np.zeros(12 * 16_000, np.float32), language="en")
    assert without.text.split().count("na") == 1
    assert without.text.count("afraid") == 1


def test_the_asr_runs_without_torch_as_its_image_does() -> None:
    """The asr's own dependencies (its image) have no torch: `VJ_ASR_DEVICE=auto`, the
    default, must ask CTranslate2 for a GPU, and the model load without torch. In a
    process of its own with torch made unimportable (this one may have imported it)."""
    import subprocess
    import sys

    script = f"""
import sys
sys.modules["torch"] = None  # as if not installed: importing it raises ImportError
from voicejury_asr.app import build, whisper_device
from voicejury_asr.core import load_whisper
build()
device = whisper_device("auto")
load_whisper({str(MICRO)!r}, device)
print(device)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] in ("cpu", "cuda")
