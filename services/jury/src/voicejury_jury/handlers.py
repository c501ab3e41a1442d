"""Scored -> JobCompleted: the jury's three comments and votes, then the final result."""

from __future__ import annotations

from voicejury_contracts import JobCompleted, JobResult, Scored
from voicejury_runtime.stage import StageContext

from .core import convene_jury
from .prompting import PROMPT_VERSION
from .settings import JurySettings


async def judge(event: Scored, ctx: StageContext, settings: JurySettings) -> JobCompleted:
    result = event.result
    jury = None
    if event.options.jury:
        await ctx.progress(0.1, "the jury deliberates")
        language = event.options.language or event.detected_language
        jury = await convene_jury(result, language=language, config=settings.jury_config)
    sources = sorted({m.model or m.source.value for m in jury.members}) if jury else []
    run = ctx.stage_run(
        model=",".join(sources) or None,
        model_version=f"prompts-{PROMPT_VERSION}",
        skipped=jury is None,
    )
    final = JobResult(
        job_id=str(event.job_id),
        score=result.score,
        pitch=result.pitch,
        rhythm=result.rhythm,
        lyrics=result.lyrics,
        lines=result.lines,
        expression=result.expression,
        jury=jury,
        warnings=result.warnings,
        weights=result.weights,
        performance_separated=result.performance_separated,
        reference_separated=result.reference_separated,
        provenance=(*event.provenance, run),
    )
    return JobCompleted(job_id=event.job_id, result=final)
