"""Small audio files the tests build themselves (real singing is read from ../shared)."""

from __future__ import annotations

import io

import numpy as np
import numpy.typing as npt
import soundfile as sf


def sung_tone(seconds: float = 2.0, sr: int = 16_000, f0_hz: float = 220.0) -> bytes:
    """A voice-like harmonic tone with 5.5 Hz vibrato, as 16-bit WAV bytes."""
    t = np.arange(int(seconds * sr)) / sr
    phase = 2 * np.pi * np.cumsum(f0_hz * 2 ** (0.3 / 12 * np.sin(2 * np.pi * 5.5 * t))) / sr
    x = sum(0.3 / k * np.sin(k * phase) for k in range(1, 6))
    return wav_bytes(np.asarray(x, dtype=np.float32), sr)


def wav_bytes(samples: npt.NDArray[np.float32], sr: int, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, sr, format="WAV", subtype=subtype)
    return buf.getvalue()


def silence(seconds: float = 2.0, sr: int = 16_000) -> bytes:
    return wav_bytes(np.zeros(int(seconds * sr), dtype=np.float32), sr)


PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
