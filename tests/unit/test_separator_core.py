"""The separator core on the random-weight tiny Demucs stand-in (1 s segments) and a real
song excerpt."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import shutil
import time
from pathlib import Path
from typing import Any

import demucs.apply
import numpy as np
import numpy.typing as npt
import pytest
import soundfile as sf
import soxr
import torch
from demucs.apply import TensorChunk
from pydantic import ValidationError

from voicejury_contracts import ObjectRef
from voicejury_runtime.models import ModelUnavailableError, pinned
from voicejury_separator import core
from voicejury_separator.core import (
    SeparatorModel,
    load_separator,
    max_segment_s,
    resolve_precision,
    separate_vocals,
    to_mono_16k,
)
from voicejury_separator.handlers import SeparatorState
from voicejury_separator.settings import SeparatorSettings

SHARED = Path(__file__).resolve().parents[3] / "shared"
TINY_REPO = SHARED / "models" / "demucs-tiny-random"
SONG = SHARED / "data" / "audio" / "karissa_hobbs_lets_go_fishin.ogg"


class Cancelled(Exception):
    pass


@pytest.fixture(scope="module")
def tiny() -> SeparatorModel:
    return load_separator("tiny_randinit", TINY_REPO, "cpu")


@pytest.fixture(scope="module")
def song() -> tuple[npt.NDArray[np.float32], int]:
    audio, sr = sf.read(SONG, dtype="float32", start=30 * 44_100, frames=2 * 44_100, always_2d=True)
    return np.ascontiguousarray(audio.T), int(sr)


def test_the_version_is_the_weights_not_their_file_names(tmp_path: Path) -> None:
    """demucs accepts `<sig>.th` without a checksum in the name: a model retrained and saved
    under the same name must get another version, or its cached separations are served."""
    (checkpoint,) = TINY_REPO.glob("*.th")
    repo = tmp_path / "models"
    repo.mkdir()
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)

    def version_of(scale: float) -> str:
        retrained = {**saved, "state": {k: v * scale for k, v in saved["state"].items()}}
        torch.save(retrained, repo / "mysep.th")
        return load_separator("mysep", repo, "cpu").version

    first, again, retrained = version_of(1.0), version_of(1.0), version_of(1.5)
    assert first == again
    assert first != retrained


def test_loaded_model_carries_provenance(tiny: SeparatorModel) -> None:
    assert tiny.name == "tiny_randinit"
    assert "b1b1b1b1-ebff2a7b" in tiny.version
    assert tiny.version.startswith("demucs==")
    assert tiny.version.endswith(";float32")  # auto on the CPU
    assert tiny.precision == "float32"
    assert tiny.device == "cpu"
    assert tiny.samplerate == 44_100
    assert tiny.audio_channels == 2
    assert "vocals" in tiny.sources


def test_stems_come_back_at_model_rate_and_channels(tiny: SeparatorModel) -> None:
    mono_22k = np.random.default_rng(0).standard_normal(22_050).astype(np.float32) * 0.1
    stems = separate_vocals(tiny, mono_22k, 22_050, on_progress=None, should_stop=None)
    assert stems.sample_rate == 44_100
    assert stems.vocals.shape == (2, 44_100)
    assert stems.accompaniment.shape == (2, 44_100)
    assert stems.vocals.dtype == np.float32
    assert stems.accompaniment.dtype == np.float32
    assert np.isfinite(stems.vocals).all()
    assert stems.duration_s == pytest.approx(1.0)


def test_stems_equal_apply_model_on_the_whole_track(
    tiny: SeparatorModel, song: tuple[npt.NDArray[np.float32], int]
) -> None:
    audio, sr = song
    stems = separate_vocals(tiny, audio, sr, on_progress=None, should_stop=None)

    ref = audio.mean(axis=0)
    mean, std = float(ref.mean()), float(ref.std())
    with torch.inference_mode():
        sources = (
            demucs.apply.apply_model(
                tiny.model, torch.from_numpy((audio - mean) / std)[None], shifts=0, overlap=0.25
            )[0].numpy()
            * std
        )
    vocals = sources[tiny.sources.index("vocals")]
    np.testing.assert_allclose(stems.vocals, vocals, atol=1e-4)
    np.testing.assert_allclose(
        stems.vocals + stems.accompaniment, sources.sum(axis=0) + mean, atol=1e-4
    )


def fake_apply_model(model: Any, mix: Any, **kwargs: Any) -> torch.Tensor:
    """A perfect "separator" that splits each segment into fixed fractions of itself."""
    x: torch.Tensor = (
        mix.padded(mix.length)  # type: ignore[no-untyped-call]
        if isinstance(mix, TensorChunk)
        else mix
    )
    fractions = torch.tensor([0.1, 0.2, 0.3, 0.4])
    return fractions[None, :, None, None] * x[:, None]


def test_segment_blending_reconstructs_the_mix_exactly(
    tiny: SeparatorModel, song: tuple[npt.NDArray[np.float32], int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Any seam or weighting error between overlapping segments shows up as a mismatch.
    monkeypatch.setattr(demucs.apply, "apply_model", fake_apply_model)
    audio, sr = song
    stems = separate_vocals(
        tiny, audio, sr, segment_s=0.7, overlap=0.3, on_progress=None, should_stop=None
    )
    assert stems.vocals.shape == audio.shape
    np.testing.assert_allclose(stems.vocals + stems.accompaniment, audio, atol=1e-5)
    ref = audio.mean(axis=0)
    np.testing.assert_allclose(stems.vocals, 0.4 * (audio - ref.mean()), atol=1e-5)


@pytest.mark.parametrize("model_channels", [2, 1], ids=["stereo-model", "mono-model"])
def test_many_channels_are_reduced_to_the_models_before_resampling(
    tiny: SeparatorModel,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    model_channels: int,
) -> None:
    """A 6-channel 48 kHz take: soxr sees one channel, the mix of all six (a 5.1 mix's voice
    is in its centre, which the first two lack), and the stems are those of resampling
    all six first (the order before), to float rounding."""
    from voicejury_runtime.audio import read_audio

    monkeypatch.setattr(demucs.apply, "apply_model", fake_apply_model)
    real_resample = soxr.resample
    resampled_channels: list[int] = []

    def spy(x: npt.NDArray[np.float32], *args: Any, **kwargs: Any) -> Any:
        resampled_channels.append(x.shape[1])
        return real_resample(x, *args, **kwargs)

    monkeypatch.setattr(soxr, "resample", spy)
    frames = (0.2 * np.random.default_rng(6).standard_normal((48_000, 6))).astype(np.float32)
    sf.write(tmp_path / "six.wav", frames, 48_000, subtype="FLOAT")
    audio, sr = read_audio(tmp_path / "six.wav")  # a strided view, as the handler passes it
    model = dataclasses.replace(tiny, audio_channels=model_channels)

    stems = separate_vocals(
        model, audio, sr, segment_s=0.7, overlap=0.3, on_progress=None, should_stop=None
    )

    assert resampled_channels == [1]
    all_six = real_resample(frames, 48_000, 44_100).T
    expected = np.repeat(all_six.mean(axis=0, keepdims=True), model_channels, axis=0)
    assert stems.vocals.shape == expected.shape == (model_channels, 44_100)
    np.testing.assert_allclose(stems.vocals + stems.accompaniment, expected, atol=1e-5)
    np.testing.assert_allclose(
        stems.vocals, 0.4 * (expected - expected.mean(axis=0).mean()), atol=1e-5
    )


def test_a_voice_in_the_centre_channel_of_a_surround_mix_reaches_the_model() -> None:
    """5.1 in WAV order (FL, FR, FC, LFE, BL, BR), the voice in the centre only: the stereo
    the model separates must carry it, not the front pair alone."""
    t = np.arange(44_100) / 44_100
    voice = (0.5 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    surround = np.zeros((6, t.size), dtype=np.float32)
    surround[2] = voice
    surround[[0, 1, 4, 5]] = 0.01
    stereo = core._to_model_layout(surround, 44_100, 44_100, 2)
    assert stereo.shape == (2, t.size)
    heard = np.corrcoef(stereo[0], voice)[0, 1]
    assert heard > 0.99


def test_progress_is_reported_once_per_segment(
    tiny: SeparatorModel, song: tuple[npt.NDArray[np.float32], int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(demucs.apply, "apply_model", fake_apply_model)
    audio, sr = song
    progress: list[float] = []
    # 2 s in 1 s segments every 0.75 s: offsets 0, 0.75, 1.5.
    stems = separate_vocals(tiny, audio, sr, on_progress=progress.append, should_stop=None)
    assert stems.vocals.shape == audio.shape
    assert progress == pytest.approx([1 / 3, 2 / 3, 1.0])


def test_cancellation_stops_within_one_segment(
    tiny: SeparatorModel, song: tuple[npt.NDArray[np.float32], int], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real_apply = demucs.apply.apply_model

    def counting_apply(model: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if model is tiny.model:  # a bag recurses into its sub-models
            calls.append(1)
        return real_apply(model, *args, **kwargs)

    monkeypatch.setattr(demucs.apply, "apply_model", counting_apply)
    checks: list[int] = []

    def stop_on_second_check() -> None:
        checks.append(1)
        if len(checks) >= 2:
            raise Cancelled

    audio, sr = song
    with pytest.raises(Cancelled):
        separate_vocals(tiny, audio, sr, on_progress=None, should_stop=stop_on_second_check)
    assert len(calls) == 1


def snr_db(reference: npt.NDArray[np.float32], other: npt.NDArray[np.float32]) -> float:
    return float(10 * np.log10((reference**2).sum() / ((reference - other) ** 2).sum()))


@pytest.mark.parametrize("shifts", [1, 2])
def test_shifts_equal_apply_model_with_the_same_random_draws(
    tiny: SeparatorModel,
    song: tuple[npt.NDArray[np.float32], int],
    monkeypatch: pytest.MonkeyPatch,
    shifts: int,
) -> None:
    """demucs shifts the whole track by random.randint(0, max_shift) per pass; given the
    draws our seed makes, its apply_model(shifts=..., split=True) is what we compute."""
    audio, sr = song
    stems = separate_vocals(tiny, audio, sr, shifts=shifts)

    assert len(tiny.model.models) == 1  # a bag draws once per sub-model
    monkeypatch.setattr(demucs.apply, "random", random.Random(core._SHIFT_SEED))
    ref = audio.mean(axis=0)
    mean, std = float(ref.mean()), float(ref.std())
    with torch.inference_mode():
        sources = (
            demucs.apply.apply_model(
                tiny.model, torch.from_numpy((audio - mean) / std)[None], shifts=shifts
            )[0].numpy()
            * std
        )
    assert stems.vocals.shape == stems.accompaniment.shape == audio.shape
    np.testing.assert_allclose(stems.vocals, sources[tiny.sources.index("vocals")], atol=1e-5)
    np.testing.assert_allclose(
        stems.vocals + stems.accompaniment, sources.sum(axis=0) + mean, atol=1e-5
    )
    # Random weights are not time-equivariant, but the passes still see the same song:
    # 10-11 dB from the unshifted stems on this excerpt.
    assert snr_db(separate_vocals(tiny, audio, sr).vocals, stems.vocals) > 6.0


def test_shifted_passes_of_a_perfect_separator_reconstruct_the_mix(
    tiny: SeparatorModel, song: tuple[npt.NDArray[np.float32], int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A segment shorter than the 0.5 s shift: some segments hold nothing but the delay.
    monkeypatch.setattr(demucs.apply, "apply_model", fake_apply_model)
    audio, sr = song
    progress: list[float] = []
    unshifted = separate_vocals(tiny, audio, sr, segment_s=0.3, overlap=0.3)
    stems = separate_vocals(
        tiny, audio, sr, segment_s=0.3, overlap=0.3, shifts=3, on_progress=progress.append
    )
    assert stems.vocals.shape == audio.shape
    np.testing.assert_allclose(stems.vocals, unshifted.vocals, atol=1e-5)
    np.testing.assert_allclose(stems.vocals + stems.accompaniment, audio, atol=1e-5)
    assert progress[-1] == pytest.approx(1.0)
    assert progress == sorted(progress)
    assert len(progress) > 3 * int(2.0 / (0.7 * 0.3))  # three passes over every segment


def test_segment_longer_than_the_model_accepts_is_refused_naming_the_setting(
    tiny: SeparatorModel,
) -> None:
    assert max_segment_s(tiny.model) == 1.0
    with pytest.raises(ValueError, match=r"VJ_SEPARATOR_SEGMENT_S=2.0 .* \(1 s"):
        load_separator("tiny_randinit", TINY_REPO, "cpu", segment_s=2.0)
    with pytest.raises(ValueError, match="VJ_SEPARATOR_SEGMENT_S"):
        separate_vocals(tiny, np.zeros((2, 44_100), np.float32), 44_100, segment_s=1.5)
    assert load_separator("tiny_randinit", TINY_REPO, "cpu", segment_s=1.0).name == "tiny_randinit"


def test_bfloat16_on_cpu_gives_stems_close_to_float32(
    tiny: SeparatorModel, song: tuple[npt.NDArray[np.float32], int]
) -> None:
    """Measured on three 2 s excerpts of the song: vocals 49.8 dB SNR (correlation
    0.999998), accompaniment 51.5 dB (0.99999); the bound leaves ~10 dB for other CPUs."""
    bf16 = load_separator("tiny_randinit", TINY_REPO, "cpu", precision="bfloat16")
    assert bf16.precision == "bfloat16"
    assert bf16.version == tiny.version.removesuffix("float32") + "bfloat16"
    audio, sr = song

    full = separate_vocals(tiny, audio, sr)
    reduced = separate_vocals(bf16, audio, sr)

    for name in ("vocals", "accompaniment"):
        exact, close = getattr(full, name), getattr(reduced, name)
        assert close.dtype == np.float32
        assert close.shape == exact.shape
        assert not np.array_equal(close, exact)  # autocast did run in bfloat16
        assert snr_db(exact, close) > 40.0, name


def test_float16_on_cpu_is_refused_naming_the_setting() -> None:
    with pytest.raises(ValueError, match="VJ_SEPARATOR_PRECISION=float16 needs CUDA"):
        load_separator("tiny_randinit", TINY_REPO, "cpu", precision="float16")
    with pytest.raises(ValidationError, match="VJ_SEPARATOR_PRECISION=float16 needs CUDA"):
        SeparatorSettings(separator_device="cpu", separator_precision="float16")


def test_auto_precision_is_float32_and_reduced_precision_is_opt_in() -> None:
    assert resolve_precision("auto", "cuda") == "float32"
    assert resolve_precision("auto", "cpu") == "float32"
    assert resolve_precision("float16", "cuda") == "float16"
    assert resolve_precision("float16", "cuda") == "float16"
    assert resolve_precision("bfloat16", "cpu") == "bfloat16"
    with pytest.raises(ValueError, match="VJ_SEPARATOR_PRECISION"):
        resolve_precision("int8", "cpu")


def test_separation_cache_key_differs_by_precision_and_version(
    tiny: SeparatorModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    audio = ObjectRef(
        bucket="bkt", key="ref.flac", sha256="0" * 64, size=1, content_type="audio/flac"
    )
    prefixes = set()
    for precision in ("float32", "bfloat16"):
        state = SeparatorState(SeparatorSettings(separator_precision=precision))
        prefixes.add(state.cache_prefix(audio))  # before the model is loaded
        state.model.value = load_separator("tiny_randinit", TINY_REPO, "cpu", precision=precision)
        prefixes.add(state.cache_prefix(audio))
    assert len(prefixes) == 4
    assert all(p.startswith(f"cache/separations/{audio.sha256}/") for p in prefixes)
    # auto resolves at load: on the CPU it shares float32's separations.
    auto = SeparatorState(SeparatorSettings(separator_precision="auto"))
    auto.model.value = tiny
    explicit = SeparatorState(SeparatorSettings(separator_precision="float32"))
    explicit.model.value = load_separator("tiny_randinit", TINY_REPO, "cpu", precision="float32")
    before = explicit.cache_prefix(audio)
    assert auto.cache_prefix(audio) == before
    # A changed separation (its version bumped) does not reuse the old stems.
    from voicejury_separator import handlers

    monkeypatch.setattr(handlers, "SEPARATION_VERSION", "next")
    assert explicit.cache_prefix(audio) != before


def test_invalid_overlap_is_rejected(tiny: SeparatorModel) -> None:
    with pytest.raises(ValueError, match="overlap"):
        separate_vocals(tiny, np.zeros((2, 100), np.float32), 44_100, overlap=1.0)


def test_missing_model_directory_fails_fast_naming_the_setting(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(ModelUnavailableError) as info:
        load_separator("htdemucs", tmp_path / "absent", "cpu", setting="VJ_SEPARATOR_MODEL_DIR")
    assert time.monotonic() - started < 5
    assert info.value.setting == "VJ_SEPARATOR_MODEL_DIR"
    assert info.value.model == "htdemucs"
    assert "VJ_SEPARATOR_MODEL_DIR" in str(info.value)


def test_a_pinned_version_serves_those_weights_only(tiny: SeparatorModel) -> None:
    """`VJ_SEPARATOR_MODEL_VERSION`: the version a result's provenance reports."""
    assert pinned(tiny, None, "VJ_SEPARATOR_MODEL_VERSION") is tiny
    assert pinned(tiny, tiny.version, "VJ_SEPARATOR_MODEL_VERSION") is tiny
    other = tiny.version.replace("float32", "bfloat16")
    with pytest.raises(ModelUnavailableError) as info:
        pinned(tiny, other, "VJ_SEPARATOR_MODEL_VERSION")
    assert info.value.setting == "VJ_SEPARATOR_MODEL_VERSION"
    assert tiny.version in str(info.value)
    assert other in str(info.value)


def test_missing_model_name_in_directory_fails_fast() -> None:
    with pytest.raises(ModelUnavailableError, match="VJ_SEPARATOR_MODEL_DIR"):
        load_separator("htdemucs", TINY_REPO, "cpu")


def test_download_without_network_fails_fast(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(core, "host_reachable", lambda *a, **k: False)
    started = time.monotonic()
    with pytest.raises(ModelUnavailableError, match="VJ_SEPARATOR_MODEL_DIR"):
        load_separator("htdemucs", None, "cpu")
    assert time.monotonic() - started < 5


def test_unknown_remote_name_fails_without_network() -> None:
    with pytest.raises(ModelUnavailableError, match="VJ_SEPARATOR_MODEL_DIR"):
        load_separator("no_such_model", None, "cpu")


def test_analysis_copy_is_mono_16k() -> None:
    stereo = np.zeros((2, 44_100), dtype=np.float32)
    mono = to_mono_16k(stereo, 44_100)
    assert mono.shape == (16_000,)
    assert mono.dtype == np.float32
    assert to_mono_16k(np.ones(16_000, dtype=np.float32), 16_000).shape == (16_000,)


class _ThreadedStore:
    """What `_stems_for` needs of the object store: a download that writes the upload, and
    puts that hand back a reference."""

    def __init__(self, upload: Path) -> None:
        self.upload = upload

    async def download(self, ref: ObjectRef, path: Path) -> Path:
        await asyncio.to_thread(shutil.copyfile, self.upload, path)
        return path

    async def put_file(self, key: str, path: Path, content_type: str) -> ObjectRef:
        size = (await asyncio.to_thread(path.stat)).st_size
        return ObjectRef(
            bucket="bkt", key=key, sha256="0" * 64, size=size, content_type=content_type
        )

    async def reuse(self, key: str) -> ObjectRef | None:
        return None


class _ThreadedContext:
    """A `StageContext` stand-in whose `run_blocking` runs in a worker thread, as the real one."""

    def __init__(self, workdir: Path, upload: Path) -> None:
        self.workdir = workdir
        self.store = _ThreadedStore(upload)

    async def run_blocking(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def progress(self, fraction: float, message: str = "") -> None:
        pass

    def report(self, fraction: float, message: str = "") -> None:
        pass

    def should_stop(self) -> None:
        pass


@pytest.mark.parametrize("kind", ["mix", "vocals"])
def test_analysis_copy_is_resampled_off_the_event_loop(
    tiny: SeparatorModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """Resampling a 10-minute song to 16 kHz takes seconds: on the event loop it would stall
    heartbeats and NATS pings."""
    import threading
    import uuid

    from voicejury_contracts import AudioInput, Role, SourceKind
    from voicejury_runtime.audio import to_analysis as real_to_analysis
    from voicejury_separator import handlers

    monkeypatch.setattr(demucs.apply, "apply_model", fake_apply_model)
    threads: list[threading.Thread] = []

    def spy(*args: Any) -> Any:
        threads.append(threading.current_thread())
        return real_to_analysis(*args)

    monkeypatch.setattr(handlers, "to_analysis", spy)
    upload = tmp_path / "upload.wav"
    sf.write(upload, np.zeros((22_050, 2), np.float32), 44_100)
    ref = ObjectRef(bucket="bkt", key="u", sha256="1" * 64, size=1, content_type="audio/wav")
    audio = AudioInput(
        role=Role.PERFORMANCE,
        kind=SourceKind(kind),
        original=ref,
        duration_s=0.5,
        sample_rate=44_100,
        channels=2,
    )
    state = SeparatorState(SeparatorSettings())
    state.model.value = tiny
    ctx: Any = _ThreadedContext(tmp_path, upload)

    stems, _ = asyncio.run(handlers._stems_for(uuid.uuid4(), audio, ctx, state, (0.0, 1.0)))

    assert stems.vocals_16k.key.endswith("vocals_16k.wav")
    assert len(threads) == 1
    assert threads[0] is not threading.main_thread()
