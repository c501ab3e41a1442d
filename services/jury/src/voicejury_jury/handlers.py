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
        jury = await convene_jury(
            result, language=language, title=event.options.title, config=settings.jury_config
        )
    sources = sorted({m.model or m.source.value for m in jury.members}) if jury else []
    run = ctx.stage_run(
        model=",".join(sources) or None,
        model_version=f"prompts-{PROMPT_VERSION}",
        skipped=jury is None,
    )
    # Everything the scorer decided, as is; the jury adds itself and its provenance.
    scored = {name: getattr(result, name) for name in type(result).model_fields}
    final = JobResult(
        **scored, job_id=str(event.job_id), jury=jury, provenance=(*event.provenance, run)
    )
    return JobCompleted(job_id=event.job_id, result=final)
