"""Audio decoding, checking and encoding shared by the gateway and the stages.

Arrays are float32, shaped (channels, samples), in [-1, 1]; sample rates in Hz.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import soundfile as sf
import soxr

from .errors import InvalidAudioError

FloatArray = npt.NDArray[np.float32]

ANALYSIS_SAMPLE_RATE = 16_000
"""Pitch and asr both work on mono 16 kHz; the separator writes this copy once for both."""

# How `to_analysis` and the 16 kHz stems are made; part of the separator's cache keys, so
# that a change of resampler, downmix or encoding never serves copies made the old way.
# Bump it with any such change.
ANALYSIS_VERSION = "a1"

MAX_SAMPLES = 600 * 96_000 * 2
"""Samples over all channels (channels x frames) any stage decodes: 10 min of 96 kHz stereo.

Decoded as float32 that is 461 MB, which the separator holds besides its model and stems.
A duration, a rate and a channel count each within their own limit can still multiply to
gigabytes (8 x 192 kHz x 10 min is 3.7 GB, from a FLAC of a few MB), so this product is
bounded on its own: by the gateway from the header, and by `read_audio` in every stage.
"""


@dataclass(frozen=True)
class AudioInfo:
    sample_rate: int
    channels: int
    frames: int
    format: str
    subtype: str

    @property
    def duration_s(self) -> float:
        return self.frames / self.sample_rate


class AudioRejectedError(Exception):
    """An upload the system will not process; maps to an HTTP problem (status, code, detail)."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class AudioLimits:
    max_duration_s: float = 600.0
    min_duration_s: float = 0.5
    max_channels: int = 8
    min_sample_rate: int = 8_000
    max_sample_rate: int = 192_000
    silence_dbfs: float = -60.0
    # Float masters may clip a little over full scale; +40 dBFS (100x) is decoder garbage
    # or a float blow-up that would overflow float32 once squared downstream.
    max_peak_dbfs: float = 40.0
    # channels x frames; see MAX_SAMPLES, which the stages enforce whatever this says.
    max_samples: int = MAX_SAMPLES


@dataclass(frozen=True)
class AudioContent:
    """What decoding the whole file found: its true length and its peak level."""

    frames: int
    peak_dbfs: float


ACCEPTED_FORMATS = frozenset({"WAV", "WAVEX", "RF64", "FLAC", "OGG", "MP3", "AIFF"})
"""libsndfile containers the API promises; the many others it parses are attack surface."""

# What libsndfile reports as `frames` when the header does not say (e.g. a FLAC stream whose
# STREAMINFO total is 0): SF_COUNT_MAX. Such a length is only known by decoding.
_UNKNOWN_FRAMES = 1 << 62

# A RIFF header walk stops here: real files have a handful of chunks before `data`.
_MAX_WAV_CHUNKS = 1_000


def _sniff_container(head: bytes) -> bool:
    """True when the first bytes look like an accepted container.

    Checked before libsndfile sees the file, so a hostile upload never reaches the parsers
    of the dozen formats libsndfile also knows (MAT, PAF, SDS, ...) but the API does not.
    """
    if head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE":
        return True
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return True
    if head[:4] in (b"fLaC", b"OggS") or head[:3] == b"ID3":
        return True
    # An MPEG audio frame: 11 sync bits.
    return len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0


def _libsndfile_reason(exc: Exception) -> str:
    # str(LibsndfileError) names the server-side temporary path; its error_string does not.
    return str(getattr(exc, "error_string", None) or type(exc).__name__)


def probe_audio(path: Path, limits: AudioLimits) -> AudioInfo:
    """Reads only the header: format, rate, channels, length. Raises AudioRejectedError.

    A length the header does not state (`frames` unknown) is left to
    `check_audio_content`, which stops decoding at the duration limit.
    """
    with path.open("rb") as f:
        head = f.read(12)
    if not _sniff_container(head):
        raise AudioRejectedError(
            415,
            "unsupported_media_type",
            "not an audio file of a supported format (WAV, FLAC, OGG, MP3, AIFF)",
        )
    try:
        raw = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise AudioRejectedError(
            415,
            "unsupported_media_type",
            f"not a decodable audio file (WAV, FLAC, OGG, MP3, AIFF): {_libsndfile_reason(exc)}",
        ) from exc
    info = AudioInfo(
        int(raw.samplerate), int(raw.channels), int(raw.frames), raw.format, raw.subtype
    )
    if info.format not in ACCEPTED_FORMATS:
        raise AudioRejectedError(
            415,
            "unsupported_media_type",
            f"{info.format} audio is not accepted; use WAV, FLAC, OGG, MP3 or AIFF",
        )
    if info.frames <= 0:
        raise AudioRejectedError(422, "empty_audio", "the audio file contains no samples")
    if info.format == "WAV" and _wav_is_truncated(path):
        raise AudioRejectedError(
            422,
            "corrupt_audio",
            "the WAV file is truncated: its data is shorter than its header says",
        )
    if not limits.min_sample_rate <= info.sample_rate <= limits.max_sample_rate:
        raise AudioRejectedError(
            422,
            "unsupported_sample_rate",
            f"sample rate {info.sample_rate} Hz is outside "
            f"{limits.min_sample_rate}..{limits.max_sample_rate} Hz",
        )
    if info.channels > limits.max_channels:
        raise AudioRejectedError(
            422, "too_many_channels", f"{info.channels} channels; at most {limits.max_channels}"
        )
    if info.frames < _UNKNOWN_FRAMES:
        _check_duration(info.duration_s, limits)
        if info.channels * info.frames > limits.max_samples:
            raise _too_large(info.channels, info.sample_rate, info.frames, limits.max_samples)
    return info


def _check_duration(duration_s: float, limits: AudioLimits) -> None:
    if duration_s > limits.max_duration_s:
        raise AudioRejectedError(
            413,
            "audio_too_long",
            f"{duration_s:.1f} s of audio; at most {limits.max_duration_s:.0f} s",
        )
    if duration_s < limits.min_duration_s:
        raise AudioRejectedError(
            422,
            "audio_too_short",
            f"{duration_s:.2f} s of audio; at least {limits.min_duration_s:.1f} s",
        )


def _too_large(
    channels: int, sample_rate: int, frames: int, max_samples: int, *, decoding: bool = False
) -> AudioRejectedError:
    """`decoding`: `frames` is how far decoding got, not the whole length."""
    samples = channels * frames
    over = "over " if decoding else ""
    return AudioRejectedError(
        413,
        "audio_too_large",
        f"{channels} channels x {sample_rate} Hz x {over}{frames / sample_rate:.0f} s is "
        f"{over}{samples:,} samples ({samples * 4 / 1e9:.1f} GB as float32); at most "
        f"{max_samples:,}: send fewer channels, a lower sample rate or a shorter clip",
    )


def _wav_is_truncated(path: Path) -> bool:
    """True when the RIFF `data` chunk declares more bytes than the file holds.

    libsndfile quietly decodes what is there, so a cut-off upload would otherwise pass.
    A header that declares hours over a body of seconds is caught here, before decoding.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        if f.read(4) != b"RIFF":
            return False
        f.seek(12)
        for _ in range(_MAX_WAV_CHUNKS):
            header = f.read(8)
            if len(header) < 8:
                return False
            chunk_id, chunk_size = header[:4], int.from_bytes(header[4:], "little")
            if chunk_id == b"data":
                # 0 and 0xFFFFFFFF mark streamed WAVs whose writer never knew the length.
                return chunk_size not in (0, 0xFFFFFFFF) and f.tell() + chunk_size > size
            f.seek(chunk_size + (chunk_size & 1), 1)
    raise AudioRejectedError(
        422, "corrupt_audio", f"the WAV file has more than {_MAX_WAV_CHUNKS} chunks before its data"
    )


def check_audio_content(
    path: Path, limits: AudioLimits, block_frames: int = 1 << 16
) -> AudioContent:
    """Decodes the file in blocks (bounded memory and, by the duration and sample limits,
    bounded time).

    Rejects truncated or corrupt streams, NaN/Inf or absurdly large samples, silence, and
    a decoded length outside the duration or sample limits (the header may not state it,
    or lie).
    """
    peak = 0.0
    frames = 0
    try:
        with sf.SoundFile(str(path)) as f:
            max_frames = int(limits.max_duration_s * f.samplerate)
            max_sample_frames = limits.max_samples // f.channels
            # Not f.blocks(): it sizes its loop by the header's frame count and hands back
            # the uninitialised tail of its buffer when a stream ends early (a cut MP3).
            # read() trims to what was really decoded.
            while len(block := f.read(block_frames, dtype="float32", always_2d=True)):
                if not np.isfinite(block).all():
                    raise AudioRejectedError(
                        422, "invalid_samples", "the audio contains NaN or infinite samples"
                    )
                if block.size:
                    peak = max(peak, float(np.abs(block).max()))
                frames += len(block)
                if frames > max_frames:
                    raise AudioRejectedError(
                        413,
                        "audio_too_long",
                        f"more than {limits.max_duration_s:.0f} s of audio",
                    )
                if frames > max_sample_frames:
                    raise _too_large(
                        f.channels, f.samplerate, frames, limits.max_samples, decoding=True
                    )
            sample_rate = f.samplerate
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise AudioRejectedError(
            422, "corrupt_audio", f"the audio could not be decoded: {_libsndfile_reason(exc)}"
        ) from exc
    if frames == 0:
        raise AudioRejectedError(422, "empty_audio", "the audio file contains no samples")
    _check_duration(frames / sample_rate, limits)
    peak_dbfs = float(20 * np.log10(peak)) if peak > 0 else -np.inf
    if peak_dbfs > limits.max_peak_dbfs:
        raise AudioRejectedError(
            422,
            "invalid_samples",
            f"the audio peaks at {peak_dbfs:.0f} dBFS: samples far outside full scale",
        )
    if peak_dbfs < limits.silence_dbfs:
        raise AudioRejectedError(
            422, "silent_audio", f"the audio is silent (peak {peak_dbfs:.0f} dBFS)"
        )
    return AudioContent(frames=frames, peak_dbfs=peak_dbfs)


def read_audio(path: Path, max_samples: int = MAX_SAMPLES) -> tuple[FloatArray, int]:
    """Returns (audio float32 (channels, samples), sample_rate).

    The array is the transpose of what libsndfile decodes (frames, channels), a view rather
    than a copy, so the file costs one array's memory: rows are strided, not contiguous, and
    `audio.T` is the interleaved layout soxr takes as is.

    More than `max_samples` samples over all channels raises InvalidAudioError (permanent:
    the job fails on this delivery) before anything is decoded, or for a stream whose
    header does not state its length, as soon as decoding passes the bound. The gateway
    refuses such uploads; this guards objects that reach a stage by any other path.
    """
    with sf.SoundFile(str(path)) as f:
        channels, sample_rate, frames = f.channels, f.samplerate, f.frames
        max_frames = max_samples // max(channels, 1)
        if frames < _UNKNOWN_FRAMES:
            if frames > max_frames:
                raise _too_large_for_stage(channels, sample_rate, frames, max_samples)
            data = f.read(dtype="float32", always_2d=True)
        else:
            # f.read() would size its buffer by SF_COUNT_MAX frames and fail. The blocks and
            # their concatenation briefly hold two copies, both within the bound.
            blocks: list[FloatArray] = []
            frames = 0
            while len(block := f.read(1 << 16, dtype="float32", always_2d=True)):
                frames += len(block)
                if frames > max_frames:
                    raise _too_large_for_stage(
                        channels, sample_rate, frames, max_samples, decoding=True
                    )
                blocks.append(block)
            data = np.concatenate(blocks) if blocks else np.zeros((0, channels), np.float32)
    return data.T, int(sample_rate)


def _too_large_for_stage(
    channels: int, sample_rate: int, frames: int, max_samples: int, *, decoding: bool = False
) -> InvalidAudioError:
    refused = _too_large(channels, sample_rate, frames, max_samples, decoding=decoding)
    return InvalidAudioError(f"too large to decode: {refused.detail}")


def to_mono(audio: FloatArray) -> FloatArray:
    """(channels, samples) or (samples,) -> (samples,) float32."""
    return np.asarray(audio.mean(axis=0) if audio.ndim == 2 else audio, dtype=np.float32)


def resample(audio: FloatArray, from_hz: int, to_hz: int) -> FloatArray:
    """Resamples (channels, samples) or (samples,) float32 with soxr (high quality)."""
    if from_hz == to_hz:
        return audio.astype(np.float32, copy=False)
    if audio.ndim == 1:
        return np.asarray(soxr.resample(audio, from_hz, to_hz), dtype=np.float32)
    out = soxr.resample(audio.T, from_hz, to_hz)
    return np.ascontiguousarray(out.T, dtype=np.float32)


def to_analysis(audio: FloatArray, sample_rate: int) -> FloatArray:
    """Mono 16 kHz float32 (samples,) for pitch and asr."""
    return resample(to_mono(audio), sample_rate, ANALYSIS_SAMPLE_RATE)


def write_wav(path: Path, audio: FloatArray, sample_rate: int, subtype: str = "PCM_16") -> None:
    """Writes (channels, samples) or (samples,) float32 as WAV, clipping to [-1, 1]."""
    data = np.clip(audio, -1.0, 1.0)
    sf.write(
        str(path), data.T if data.ndim == 2 else data, sample_rate, subtype=subtype, format="WAV"
    )
