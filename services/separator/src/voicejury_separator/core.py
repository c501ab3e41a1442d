"""Vocal separation with Demucs: numpy in, `SeparatedStems` out.

No broker, storage or settings imports: the service's handlers call `load_separator` once
at start-up and `separate_vocals` per job, in a worker thread.
"""

from __future__ import annotations

import fractions
import hashlib
import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import soxr
import torch

from voicejury_runtime.models import ModelUnavailableError, host_reachable

logger = logging.getLogger(__name__)

ANALYSIS_SAMPLE_RATE: Final = 16_000
PRECISIONS: Final = ("auto", "float32", "float16", "bfloat16")
# Bump whenever a change here alters the stems for the same input, model and settings
# (normalisation, chunking, shifts): cached reference separations carry it in their key,
# so a changed algorithm never serves stems the old one made.
# 2: more channels than the model takes are mixed into each of its channels, not cut.
SEPARATION_VERSION: Final = "2"
_REMOTE_HOST: Final = "dl.fbaipublicfiles.com"
# demucs' `apply_model(shifts=...)`: each pass delays the track by up to half a second.
MAX_SHIFT_S: Final = 0.5
# The shifts are drawn from a fixed seed: the same input gives the same stems, whether a
# job is redelivered or a cached separation is recomputed.
_SHIFT_SEED: Final = 0
_AUTOCAST_DTYPES: Final[dict[str, torch.dtype]] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

FloatArray = npt.NDArray[np.float32]
ProgressFn = Callable[[float], None]
StopFn = Callable[[], None]


@dataclass(frozen=True)
class SeparatorModel:
    """A loaded Demucs model (a `BagOfModels` or a single `HTDemucs`) and its provenance.

    `precision` is the dtype the model computes in: "float32", or "float16" / "bfloat16"
    under `torch.autocast` (weights stay float32; the stems are float32 either way).
    """

    model: Any
    name: str
    version: str
    device: str
    samplerate: int
    audio_channels: int
    sources: tuple[str, ...]
    precision: str = "float32"


@dataclass(frozen=True, eq=False)
class SeparatedStems:
    """Vocals and accompaniment (sum of every other source), float32 (channels, samples)."""

    vocals: FloatArray
    accompaniment: FloatArray
    sample_rate: int

    @property
    def duration_s(self) -> float:
        return self.vocals.shape[-1] / self.sample_rate


def _model_classes() -> list[Any]:
    # torch >= 2.6 loads checkpoints with weights_only=True; Demucs packages pickle the
    # model class and Fraction-valued kwargs, so exactly those are allow-listed (never
    # weights_only=False, which would execute arbitrary pickles).
    from demucs.demucs import Demucs
    from demucs.hdemucs import HDemucs
    from demucs.htdemucs import HTDemucs

    return [Demucs, HDemucs, HTDemucs, fractions.Fraction]


def _remote_checkpoint_files(name: str) -> list[str] | None:
    """File names of the checkpoints a remote `name` needs, or None if demucs does not know it."""
    import yaml
    from demucs.pretrained import REMOTE_ROOT, _parse_remote_files

    urls = _parse_remote_files(REMOTE_ROOT / "files.txt")
    bag_file = REMOTE_ROOT / f"{name}.yaml"
    if name in urls:
        signatures = [name]
    elif bag_file.is_file():
        signatures = list(yaml.safe_load(bag_file.read_text())["models"])
    else:
        return None
    return [urls[sig].rsplit("/", 1)[-1] for sig in signatures if sig in urls]


def _local_version(name: str, repo: Path) -> str:
    """What a local model is: each checkpoint's name and the digest of its bytes, and the
    bag's own digest (its weights and segment change the stems too). Names alone do not
    tell: demucs accepts `<sig>.th` without a checksum, so a retrained model saved under
    the same name would keep its predecessor's cached separations."""
    import yaml

    bag_file = repo / f"{name}.yaml"
    signatures = (
        list(yaml.safe_load(bag_file.read_text())["models"]) if bag_file.is_file() else [name]
    )
    files = sorted(p for p in repo.glob("*.th") if p.stem.split("-", 1)[0] in signatures)
    parts = [f"{p.stem}@{_digest(p)}" for p in files]
    if bag_file.is_file():
        parts.append(f"{bag_file.name}@{_digest(bag_file)}")
    return ",".join(parts) or name


def _digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:12]


def resolve_precision(precision: str, device: str) -> str:
    """The dtype a `precision` setting computes in on `device` ("cpu" or "cuda"): "auto" is
    float32 everywhere. A reduced precision is opt-in: bfloat16 is measured here (on the
    CPU, stems within ~50 dB SNR of float32); float16 on a GPU is not measured by anything
    in this repository, so it is not a default.

    Raises `ValueError`, naming VJ_SEPARATOR_PRECISION, for an unknown value or float16 on
    the CPU: there bfloat16 is the reduced precision worth having (one 7.8 s segment of a
    real-size HTDemucs on 2 AMX cores: float32 3.6 s, bfloat16 2.4 s, float16 4.4 s).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"VJ_SEPARATOR_PRECISION must be one of {PRECISIONS}, got {precision!r}")
    cuda = device.startswith("cuda")
    if precision == "auto":
        return "float32"
    if precision == "float16" and not cuda:
        raise ValueError(
            f"VJ_SEPARATOR_PRECISION=float16 needs CUDA, but the separator runs on {device}; "
            "use float32 or bfloat16 (or auto)"
        )
    return precision


def load_separator(
    name: str,
    repo: Path | None,
    device: str,
    *,
    precision: str = "auto",
    segment_s: float | None = None,
    setting: str = "VJ_SEPARATOR_MODEL_DIR",
) -> SeparatorModel:
    """Load a Demucs model once, in eval mode, on `device` ("cpu" or "cuda"), to compute in
    `precision` (see `resolve_precision`; a refused one raises `ValueError` before any
    weights are read). The precision ends the model's version, as it changes the stems.
    A `segment_s` the model cannot run (see `check_segment_s`) raises `ValueError` once
    the model is read, so a misconfigured process never becomes ready.

    With `repo` (a local directory holding `<sig>-<sha>.th` files and `<name>.yaml` bags)
    nothing touches the network. With `repo=None`, demucs downloads from its remote store
    into the torch hub cache; when the checkpoints are not cached and the store cannot be
    reached, this fails within seconds. Every failure raises `ModelUnavailableError`
    naming `setting`.
    """
    import demucs
    from demucs.pretrained import get_model

    precision = resolve_precision(precision, device)
    if repo is not None:
        if not repo.is_dir():
            # get_model would call sys.exit via dora's fatal(); fail as an exception instead.
            raise ModelUnavailableError(name, setting, f"model directory {repo} does not exist")
        version = _local_version(name, repo)
    else:
        files = _remote_checkpoint_files(name)
        if files is None:
            raise ModelUnavailableError(
                name, setting, "not a known pretrained Demucs model and no model directory is set"
            )
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        cached = all((cache / f).is_file() for f in files)
        if not cached and not host_reachable(_REMOTE_HOST):
            raise ModelUnavailableError(
                name,
                setting,
                f"not in the torch hub cache ({cache}) and {_REMOTE_HOST} is unreachable",
            )
        version = ",".join(f.removesuffix(".th") for f in files)
    try:
        with torch.serialization.safe_globals(_model_classes()):
            model = get_model(name, repo=repo)
    except (Exception, SystemExit) as exc:
        raise ModelUnavailableError(name, setting, f"{type(exc).__name__}: {exc}") from exc
    check_segment_s(model, segment_s)
    model.to(torch.device(device))
    model.eval()
    return SeparatorModel(
        model=model,
        name=name,
        version=f"demucs=={demucs.__version__};{version};{precision}",
        device=device,
        samplerate=int(model.samplerate),
        audio_channels=int(model.audio_channels),
        sources=tuple(model.sources),
        precision=precision,
    )


def _resample(audio: FloatArray, sr_in: int, sr_out: int) -> FloatArray:
    """Resample (channels, samples) float32 with soxr (high quality).

    The result is a transposed view of soxr's interleaved output, not a contiguous copy:
    its one consumer, the normalisation in `separate_vocals`, writes a contiguous array.
    """
    if sr_in == sr_out:
        return audio
    out = soxr.resample(audio.T, sr_in, sr_out)
    resampled: FloatArray = np.asarray(out, dtype=np.float32).reshape(-1, audio.shape[0]).T
    return resampled


def _match_channels(audio: FloatArray, channels: int) -> FloatArray:
    """Mono → duplicated; more channels than the model takes → their mean, duplicated.

    Not the first `channels` (what demucs does): which channel is which depends on the
    container (WAV and FLAC put a 5.1 mix's centre third, Vorbis second) and is not known
    here, and a surround mix carries its voice mostly in the centre, which the first two
    (front left and right) lack. Every channel goes into every output equally, as the
    vocals path's mono mix (`to_mono`) does."""
    have = audio.shape[0]
    if have == channels:
        return audio
    if have > channels:
        audio = audio.mean(axis=0, keepdims=True)
    if channels == 1:
        return audio
    if audio.shape[0] == 1:
        return np.repeat(audio, channels, axis=0)
    raise ValueError(f"cannot map {have} channels to {channels}")


def _to_model_layout(
    audio: FloatArray, sample_rate: int, model_rate: int, model_channels: int
) -> FloatArray:
    """(channels, samples) at `sample_rate` -> (model_channels, samples') at `model_rate`.

    Channels are reduced before resampling and duplicated after it, so soxr never works on
    more channels than it must (an 8-channel 192 kHz upload is mixed to one channel, not
    resampled eight times and then mixed). Resampling is linear and per channel, so this
    equals resampling first: exactly for the duplication, to float rounding for the mix.
    """
    if audio.shape[0] > model_channels:
        audio = _match_channels(audio, 1)
    return _match_channels(_resample(audio, sample_rate, model_rate), model_channels)


def _segment_weight(segment_len: int) -> torch.Tensor:
    """demucs.apply's blending window: a triangle peaking mid-segment, max 1 (with the
    default transition_power of 1)."""
    half = segment_len // 2
    weight = torch.cat([torch.arange(1, half + 1), torch.arange(segment_len - half, 0, -1)]).float()
    return weight / weight.max()


def max_segment_s(model: Any) -> float:
    """The longest segment (seconds) `model` can separate at once: a transformer (HTDemucs)
    only runs on up to its training length (the shortest of a bag's), convolutional
    Demucs models on any length (inf). As `demucs.separate` computes it."""
    from demucs.apply import BagOfModels
    from demucs.htdemucs import HTDemucs

    if isinstance(model, BagOfModels):
        return float(model.max_allowed_segment)
    if isinstance(model, HTDemucs):
        return float(model.segment)
    return math.inf


def check_segment_s(model: Any, segment_s: float | None) -> None:
    """Raises `ValueError`, naming VJ_SEPARATOR_SEGMENT_S and the model's maximum, for a
    segment `model` cannot run: HTDemucs would fail on every job, deep inside the model."""
    if segment_s is None:
        return
    if segment_s <= 0:
        raise ValueError(f"VJ_SEPARATOR_SEGMENT_S must be positive, got {segment_s}")
    longest = max_segment_s(model)
    if segment_s > longest:
        raise ValueError(
            f"VJ_SEPARATOR_SEGMENT_S={segment_s} is longer than this model can separate at "
            f"once ({longest:g} s, its training length); set it to at most {longest:g} "
            "or leave it unset to use the model's own"
        )


def _segment_s(model: Any, segment_s: float | None) -> float:
    """The segment length demucs would use: the override, else the (first) model's own."""
    if segment_s is not None:
        return float(segment_s)
    inner = model.models[0] if hasattr(model, "models") else model
    return float(inner.segment)


def _chunk_at(track: torch.Tensor, start: int, n: int, margin: int) -> Any:
    """`n` samples of `track` (1, channels, samples) from `start`, as the `TensorChunk`
    `apply_model` pads with the real samples around it. A shifted pass starts before the
    track (`start` < 0, which `TensorChunk` refuses): there the chunk is cut from a copy
    that leads with zeros, as demucs' zero-padded track would, and carries `margin`
    real samples past its end for the padding."""
    from demucs.apply import TensorChunk

    if start >= 0:
        return TensorChunk(track, start, n)  # type: ignore[no-untyped-call]
    end = min(track.shape[-1], start + n + margin)
    window = torch.nn.functional.pad(track[..., :end], (-start, 0))
    return TensorChunk(window, 0, n)  # type: ignore[no-untyped-call]


def separate_vocals(
    model: SeparatorModel,
    audio: FloatArray,
    sample_rate: int,
    *,
    segment_s: float | None = None,
    overlap: float = 0.25,
    shifts: int = 0,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> SeparatedStems:
    """Split a mix into vocals and accompaniment.

    `audio` is float32 (channels, samples) at `sample_rate` Hz (any rate, any channel count,
    any strides; a 1-D array is taken as mono). It is mapped to `model.audio_channels`
    (extra channels dropped or averaged before resampling, a mono one duplicated after) and
    resampled to `model.samplerate` with soxr, normalised by the whole track's mean and standard
    deviation (as `demucs.separate` does), then separated segment by segment exactly as
    `demucs.apply.apply_model(split=True)` does it: windows of `segment_s` seconds (None:
    the model's own, at most `max_segment_s`) every `(1 - overlap) * segment_s` seconds,
    each padded with its real neighbouring samples, run on `model.device` in
    `model.precision` and blended with demucs' triangular weights. With `shifts` > 0 this
    runs `shifts` times, as `apply_model(shifts=shifts, split=True)` does: each pass delays
    the whole track by a random 0..0.5 s (leading zeros), separates it in the same
    segments, drops the delay, and the passes are averaged (time equivariance; `shifts`
    times the compute). The shifts come from a fixed seed, so stems are reproducible; a
    bag's models share each pass's shift (demucs draws one per model).
    Unlike `apply_model` the loop keeps only two stems, not every source, so besides the
    track itself (input and two stems, about 28 bytes per stereo sample at the model's
    rate, plus the caller's `audio`) the memory is that of one segment, whatever the song's
    length; the track stays on the CPU.

    `should_stop()` is called before every segment and raises to cancel; `on_progress(f)`
    receives the fraction of segments done over all passes (0..1).

    Returns stems at `model.samplerate`, float32 (model.audio_channels, samples), with the
    same number of samples as the resampled input; vocals + accompaniment equals the sum
    of all sources (the accompaniment also carries the mix's DC offset). With shifts=0 and
    float32 the stems equal `apply_model`'s to float rounding (with shifts too, given the
    same random draws); bfloat16 ones differ from
    float32's by 45-52 dB SNR (random-weight tiny and real-size HTDemucs, on the CPU).
    """
    from demucs.apply import apply_model

    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if shifts < 0:
        raise ValueError(f"shifts must be >= 0, got {shifts}")
    check_segment_s(model.model, segment_s)
    if "vocals" not in model.sources:
        raise ValueError(f"model {model.name} has no 'vocals' source: {model.sources}")
    mix = np.asarray(audio, dtype=np.float32)
    if mix.ndim == 1:
        mix = mix[None, :]
    if mix.ndim != 2:
        raise ValueError(f"audio must be (channels, samples), got shape {mix.shape}")
    sr = model.samplerate
    mix = _to_model_layout(mix, sample_rate, sr, model.audio_channels)
    channels, length = mix.shape

    reference = mix.mean(axis=0)
    mean = float(reference.mean()) if length else 0.0
    std = float(reference.std()) if length else 0.0
    std = std if std > 1e-8 else 1.0  # digital silence: keep the signal as is
    # In place in one new C-ordered array (`mix` may be a strided view of the caller's
    # audio or of soxr's output): the same float32 rounding as (mix - mean) / std, without
    # its temporary.
    scaled = np.subtract(mix, np.float32(mean), out=np.empty(mix.shape, np.float32))
    scaled /= np.float32(std)
    normalised = torch.from_numpy(scaled)[None]  # (1, channels, samples)
    del mix, reference  # a 10 min stereo track is ~200 MB per copy at 44.1 kHz

    segment = _segment_s(model.model, segment_s)
    segment_len = int(sr * segment)
    stride = int((1 - overlap) * segment_len)
    if segment_len < 1 or stride < 1:
        raise ValueError(f"segment_s={segment} with overlap={overlap} leaves no stride")
    window = _segment_weight(segment_len)
    vocals_idx = model.sources.index("vocals")
    vocals = torch.zeros(channels, length)
    accompaniment = torch.zeros(channels, length)
    device = torch.device(model.device)
    autocast_dtype = _AUTOCAST_DTYPES.get(model.precision)

    # Each pass p delays the track by delays[p] samples (0 without shifts) and blends its
    # segments into the stems already divided by that pass's own sum of weights, so
    # averaging the passes needs no per-pass copy of the stems.
    max_shift = int(MAX_SHIFT_S * sr)
    rng = random.Random(_SHIFT_SEED)
    # demucs draws the start in a track padded by max_shift on both sides; the delay is
    # what remains of the left padding.
    delays = [max_shift - rng.randint(0, max_shift) for _ in range(shifts)] if shifts else [0]
    passes = [range(0, length + delay, stride) for delay in delays]
    total = sum(len(offsets) for offsets in passes)
    done = 0
    for delay, offsets in zip(delays, passes, strict=True):
        sum_weight = torch.zeros(length)
        for offset in offsets:
            start = offset - delay
            lo, hi = max(start, 0), min(start + segment_len, length)
            if hi > lo:
                sum_weight[lo:hi] += window[lo - start : hi - start]
        # Every sample lies in at least one segment, where the triangle is positive.
        pass_scale = 1.0 / (len(delays) * sum_weight.clamp_min(1e-12))
        del sum_weight
        for offset in offsets:
            if should_stop is not None:
                should_stop()
            start = offset - delay  # in the track's own time
            n = min(segment_len, length - start)
            if start + n <= 0:  # all delay (a segment shorter than it): nothing to keep
                done += 1
                continue
            with (
                torch.inference_mode(),
                torch.autocast(
                    device.type,
                    dtype=autocast_dtype or torch.float32,
                    enabled=autocast_dtype is not None,
                ),
            ):
                estimates = (
                    apply_model(
                        model.model,
                        _chunk_at(normalised, start, n, segment_len),
                        shifts=0,
                        split=False,
                        device=device,
                        segment=segment_s,
                    )[0]
                    .cpu()
                    .float()
                )  # (sources, channels, n)
            # The delay's leading zeros are not part of the track: dropped, as demucs does.
            skip = max(-start, 0)
            lo, hi = start + skip, start + n
            weight = window[skip:n] * pass_scale[lo:hi]
            seg_vocals = estimates[vocals_idx, :, skip:n]
            vocals[:, lo:hi] += weight * seg_vocals
            accompaniment[:, lo:hi] += weight * (estimates[..., skip:n].sum(dim=0) - seg_vocals)
            del estimates
            done += 1
            if on_progress is not None:
                on_progress(done / total)

    vocals *= std
    accompaniment *= std
    # The DC offset removed before the network belongs to the accompaniment, so that
    # vocals + accompaniment reconstructs the mix for a perfect separator.
    accompaniment += mean
    return SeparatedStems(
        vocals=vocals.numpy(), accompaniment=accompaniment.numpy(), sample_rate=sr
    )


def to_mono_16k(x: FloatArray, sr: int) -> FloatArray:
    """Analysis copy: float32 mono (n,) at 16 kHz from (n,) or (channels, n) at `sr` Hz."""
    arr = np.asarray(x, dtype=np.float32)
    mono = arr.mean(axis=0) if arr.ndim == 2 else arr
    if mono.ndim != 1:
        raise ValueError(f"expected (n,) or (channels, n), got shape {arr.shape}")
    if sr == ANALYSIS_SAMPLE_RATE:
        return np.ascontiguousarray(mono)
    return np.asarray(soxr.resample(mono, sr, ANALYSIS_SAMPLE_RATE), dtype=np.float32)
