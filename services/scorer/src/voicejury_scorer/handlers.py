"""PitchExtracted + TranscriptReady -> Scored: the fan-in, then the pure scoring core.

pitch and asr finish in either order, possibly on different scorer replicas. Each arrival
is merged into the job's join record in a NATS KV bucket with compare-and-set, so exactly
one arrival sees the record become complete and scores; the runtime's effect marker and
`Nats-Msg-Id` dedup make a redelivered arrival a no-op afterwards.
"""

from __future__ import annotations

import io
import json
import logging
import time
from typing import Any

import nats.js.errors
import numpy as np
import numpy.typing as npt

from voicejury_contracts import (
    Event,
    JobOptions,
    PitchExtracted,
    Scored,
    StageRun,
    TranscriptReady,
    TranscriptRef,
)
from voicejury_runtime.stage import StageContext
from voicejury_runtime.store import job_key

from .core import Contour, ScoringAnalysis, ScoringConfig, Word, analyse_performance
from .settings import ScorerSettings

_PARTS: dict[type[Event], str] = {PitchExtracted: "pitch", TranscriptReady: "transcript"}
_CAS_ATTEMPTS = 20

log = logging.getLogger(__name__)


def warm_up() -> float:
    """Scores a small synthetic take once and returns how long it took (s).

    The first `analyse_performance` of a process compiles the numba alignment kernels
    (seconds when the compile cache is empty) and loads what the lyrics, onsets and
    expression code import lazily; doing it at startup keeps that off the first job. It
    never fails the process: an error is logged and the first job pays the cost instead.
    """
    started = time.perf_counter()
    try:
        hop = 0.01
        t = np.arange(0.0, 6.0, hop)
        # A little melody: eight notes with rests, vibrato, an unvoiced gap.
        notes = 220.0 * 2.0 ** (np.array([0, 2, 4, 5, 7, 5, 4, 0]) / 12.0)
        f0 = notes[np.minimum((t / 0.75).astype(int), notes.size - 1)]
        f0 = f0 * 2.0 ** (15.0 * np.sin(2 * np.pi * 5.5 * t) / 1200.0)
        f0[(t % 0.75) > 0.65] = 0.0
        periodicity = np.where(f0 > 0, 0.9, 0.05)
        reference = Contour(t, f0, periodicity)
        # Sung a tone higher, 120 ms late and 5 % slower.
        performance = Contour(t * 1.05 + 0.12, f0 * 2.0 ** (200.0 / 1200.0), periodicity)
        words = [Word("la", k * 0.75, k * 0.75 + 0.6) for k in range(8)]
        analysis = analyse_performance(
            reference,
            performance,
            reference_words=words,
            performance_words=words[:-1],
            lyrics="la la la la\nla la la la",
            language="en",
            config=ScoringConfig(),
            performance_separated=False,
            reference_separated=False,
        )
        aligned_pitch_json(analysis)
    except Exception:  # a warm-up must not take the process down
        log.exception("scorer warm-up failed; the first job will pay the compile time")
    elapsed = time.perf_counter() - started
    log.info("scorer warmed up in %.2f s", elapsed)
    return elapsed


async def join(event: PitchExtracted | TranscriptReady, ctx: StageContext) -> dict[str, Any] | None:
    """Adds `event` to its job's join record; returns the record if this made it complete."""
    kv = await ctx.bus.kv(ctx.bus.topology.join_bucket)
    key = str(event.job_id)
    part = _PARTS[type(event)]
    for _ in range(_CAS_ATTEMPTS):
        try:
            entry = await kv.get(key)
            state: dict[str, Any] = json.loads(entry.value or b"{}")
            revision: int | None = entry.revision
        except nats.js.errors.KeyNotFoundError:
            state, revision = {}, None
        if "completed_by" not in state:
            state[part] = event.model_dump(mode="json")
            if set(_PARTS.values()) <= state.keys():
                state["completed_by"] = part
            try:
                data = json.dumps(state).encode()
                if revision is None:
                    await kv.create(key, data)
                else:
                    await kv.update(key, data, last=revision)
            except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.BadRequestError):
                continue  # another arrival won the race; merge into its version
        # Only the arrival that completed the record scores (again, if it is redelivered
        # after a crash: scoring is idempotent); the other half never does.
        return state if state.get("completed_by") == part else None
    raise RuntimeError(f"join of job {key} kept conflicting")


def scoring_config(settings: ScorerSettings, options: JobOptions) -> ScoringConfig:
    """How a job is scored: the stage's settings and the job's own options."""
    return ScoringConfig(
        weights=settings.scorer_weights,
        difficulty=options.difficulty.value,
        allow_key_change=options.allow_key_change,
        dtw_band_s=settings.scorer_dtw_band_s,
        max_global_offset_s=settings.scorer_max_global_offset_s,
        max_duration_s=settings.scorer_max_duration_s,
    )


async def score_job(state: dict[str, Any], ctx: StageContext, settings: ScorerSettings) -> Scored:
    pitch = PitchExtracted.model_validate(state["pitch"])
    transcript = TranscriptReady.model_validate(state["transcript"])
    await ctx.progress(0.1, "loading contours")
    reference = await _contour(ctx, pitch.reference.contour)
    performance = await _contour(ctx, pitch.performance.contour)
    reference_words = await _words(ctx, transcript.reference)
    performance_words = await _words(ctx, transcript.performance)
    options = pitch.options
    heard = transcript.performance.language if transcript.performance else None
    config = scoring_config(settings, options)
    separator = next((run for run in pitch.provenance if run.stage.value == "separator"), None)
    await ctx.progress(0.3, "aligning and scoring")
    analysis: ScoringAnalysis = await ctx.run_blocking(
        analyse_performance,
        reference,
        performance,
        reference_words=reference_words,
        performance_words=performance_words,
        lyrics=options.lyrics,
        language=options.language or heard,
        config=config,
        performance_separated=_separated(pitch, "performance", separator),
        reference_separated=_separated(pitch, "reference", separator),
        transcription_skipped=transcript.skipped_reason is not None,
    )
    aligned = await ctx.store.put_bytes(
        job_key(pitch.job_id, "scoring", "aligned_pitch.json"),
        await ctx.run_blocking(aligned_pitch_json, analysis),
        "application/json",
    )
    return Scored(
        job_id=pitch.job_id,
        options=options,
        result=analysis.result,
        aligned_pitch=aligned,
        detected_language=heard,
        provenance=_merge(pitch.provenance, transcript.provenance, (ctx.stage_run(),)),
    )


def aligned_pitch_json(analysis: ScoringAnalysis) -> bytes:
    """The aligned contours as JSON, NaN (unvoiced, not sung) as null, cents to 0.1."""

    def column(values: npt.NDArray[np.float64]) -> list[float | None]:
        return [None if np.isnan(v) else round(float(v), 1) for v in values]

    return json.dumps(
        {
            "time_s": [round(float(t), 3) for t in analysis.time_s],
            "reference_cents": column(analysis.reference_cents),
            "performance_cents": column(analysis.performance_cents),
            "global_offset_ms": round(analysis.global_offset_ms, 1),
        }
    ).encode()


def _separated(pitch: PitchExtracted, role: str, separator: StageRun | None) -> bool:
    flags = separator.details if separator else {}
    return flags.get(f"{role}_separated", "false") == "true"


def _merge(*runs: tuple[StageRun, ...]) -> tuple[StageRun, ...]:
    """One entry per stage, in pipeline order of first appearance."""
    seen: dict[str, StageRun] = {}
    for group in runs:
        for run in group:
            seen.setdefault(run.stage.value, run)
    return tuple(seen.values())


async def _contour(ctx: StageContext, ref: Any) -> Contour:
    data = await ctx.store.get_bytes(ref)
    with np.load(io.BytesIO(data)) as npz:
        return Contour(
            time_s=npz["time_s"].astype(np.float64),
            f0_hz=npz["f0_hz"].astype(np.float64),
            periodicity=npz["periodicity"].astype(np.float64),
        )


async def _words(ctx: StageContext, ref: TranscriptRef | None) -> list[Word] | None:
    if ref is None:
        return None
    doc = json.loads(await ctx.store.get_bytes(ref.transcript))
    return [Word(w["word"], float(w["start_s"]), float(w["end_s"])) for w in doc["words"]]
