"""The jury: three personas comment on a scored performance and vote, within a time budget.

Order of sources, per persona and independently of the other two:

1. each model of `JuryConfig.models` in turn, each call bounded by `call_timeout_s`; an
   answer that fails validation (malformed JSON, wrong language, no moment cited from
   the evidence it was shown, or a time it does not contain) gets one corrective retry on
   the same model; an offensive one, one many times longer than asked, or one the checks
   themselves fail on (a bug, logged) moves straight to the next model;
2. the deterministic writer in `fallback.py`, from the same evidence.

All three personas run in parallel and share one deadline, `total_budget_s` after the
start, so the jury never takes much longer than the budget whatever the models do.
No broker or storage here: `handlers.py` calls `convene_jury` and publishes the result.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from voicejury_contracts.result import CommentSource, Jury, JuryComment, ScoreResult, Vote

from .citations import CitableFacts, citable_facts
from .evidence import Evidence, gather_evidence
from .fallback import MIN_COMMENT_CHARS, write_fallback
from .llm import (
    Rejected,
    TokenUsage,
    complete,
    exercise_call_path,
    load_litellm,
    parse_judgement,
)
from .personas import PERSONAS, Persona
from .prompting import PROMPT_VERSION, Message, build_messages, retry_message
from .safety import normalise_language, truncate

__all__ = ["MIN_COMMENT_CHARS", "PROMPT_VERSION", "JuryConfig", "convene_jury", "warm_up"]

log = logging.getLogger(__name__)

# Starting a call with less time than this left is pointless: no model answers that fast,
# and the persona is better served by the fallback now.
MIN_CALL_S = 0.2
# Slack for the outer guard over the persona tasks. The per-call timeouts already keep each
# task inside the budget; this only catches a task stuck somewhere unexpected.
GUARD_GRACE_S = 0.25
# At most this much of a rejected answer is echoed back in the corrective retry.
MAX_ECHO_CHARS = 2000

QUALIFIED = "qualified"
ELIMINATED = "eliminated"


@dataclass(frozen=True)
class JuryConfig:
    """Everything the jury needs from settings; built by `settings.py`, never from env here.

    `models` are litellm model names in order of preference (e.g. `"openai/gpt-4o-mini"`,
    `"ollama_chat/llama3.1"`); empty means "fallback only, no network". `api_base` and
    `api_key` apply to every model in the list; `api_base=None` means each provider's
    default endpoint (`llm.resolve_api_base`; for openai and ollama, never one from the
    process environment).
    `max_comment_chars` is at least `MIN_COMMENT_CHARS`, the length at which every
    fallback comment still cites the evidence and keeps its vote.
    """

    models: tuple[str, ...] = ()
    api_base: str | None = None
    api_key: str | None = None
    call_timeout_s: float = 3.0
    total_budget_s: float = 4.5
    max_comment_chars: int = 600

    def __post_init__(self) -> None:
        if self.call_timeout_s <= 0 or self.total_budget_s <= 0:
            raise ValueError("call_timeout_s and total_budget_s must be positive")
        if self.max_comment_chars < MIN_COMMENT_CHARS:
            raise ValueError(
                f"max_comment_chars below {MIN_COMMENT_CHARS} cannot hold a fallback comment "
                "with its citation and its vote"
            )


def warm_up(config: JuryConfig | None = None) -> None:
    """Pay litellm's start-up costs now, so the first job's budget is spent on its models.

    Blocking, seconds of CPU: call once at service start-up, in a thread
    (`await asyncio.to_thread(warm_up, settings.jury_config)`). Imports litellm, then runs
    each configured model's provider code once against a refusing loopback port for its
    lazy imports (~2 s more); no request leaves the machine. Without it the first job still
    gets a full jury, but its first calls spend ~2 s of their budget importing, on the
    event loop, and may time out into the fallback.
    """
    exercise_call_path(config.models if config else ())


def _elapsed_ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)


def _fallback_comment(
    persona: Persona, ev: Evidence, language: str, config: JuryConfig, started: float
) -> JuryComment:
    text, vote = write_fallback(persona, ev, language, max_chars=config.max_comment_chars)
    return JuryComment(
        persona=persona.id,
        name=persona.name,
        comment=truncate(text, config.max_comment_chars),
        vote=vote,
        source=CommentSource.FALLBACK,
        model=None,
        # Includes the time spent on models that failed: it is how long this comment took.
        latency_ms=_elapsed_ms(started),
    )


async def _ask_models(
    persona: Persona,
    ev: Evidence,
    facts: CitableFacts,
    language: str,
    config: JuryConfig,
    started: float,
    deadline: float,
) -> JuryComment | None:
    """The first acceptable model answer for one persona, or None when none came in time.

    The answer's token counts are those of every call that got an answer for this persona,
    rejected ones and other models' included: all of them were paid for.
    """
    base: list[Message] = build_messages(
        persona, ev, language=language, max_chars=config.max_comment_chars
    )
    fields = {"persona": persona.id, "prompt_version": PROMPT_VERSION}
    spent: TokenUsage | None = None
    for model in config.models:
        messages = base
        for attempt in (1, 2):
            remaining = deadline - time.monotonic()
            if remaining < MIN_CALL_S:
                log.info("jury budget spent", extra={"fields": {**fields, "model": model}})
                return None
            call_started = time.monotonic()
            try:
                answer = await complete(
                    model,
                    messages,
                    api_base=config.api_base,
                    api_key=config.api_key,
                    timeout_s=min(config.call_timeout_s, remaining),
                    max_tokens=max(256, config.max_comment_chars // 2),
                )
            except Exception as exc:  # any provider error means "try the next model"
                log.warning(
                    "jury model call failed",
                    extra={
                        "fields": {
                            **fields,
                            "model": model,
                            "attempt": attempt,
                            "error": type(exc).__name__,
                            "call_ms": _elapsed_ms(call_started),
                        }
                    },
                )
                break
            usage = answer.usage
            if usage is not None:
                spent = usage if spent is None else spent + usage
            call_fields = {
                **fields,
                "model": model,
                "attempt": attempt,
                "call_ms": _elapsed_ms(call_started),
                "prompt_tokens": usage.prompt_tokens if usage else None,
                "completion_tokens": usage.completion_tokens if usage else None,
            }
            try:
                judgement = parse_judgement(
                    answer.content,
                    language=language,
                    facts=facts,
                    max_chars=config.max_comment_chars,
                    played_back=ev.played_back,
                )
            except Rejected as rejected:
                log.warning(
                    "jury model answer rejected",
                    extra={"fields": {**call_fields, "reason": rejected.reason}},
                )
                if rejected.retryable and attempt == 1:
                    messages = [
                        *base,
                        {"role": "assistant", "content": answer.content[:MAX_ECHO_CHARS]},
                        retry_message(rejected.reason, language=language),
                    ]
                    continue
                break
            except Exception:
                # A bug in the checks, met on this answer: asking again would likely meet it
                # again, so the answer is refused and the next model gets its chance; the
                # persona task must not crash, which would skip the rest of the list.
                log.exception("jury model answer unreadable", extra={"fields": call_fields})
                break
            log.info("jury model answered", extra={"fields": call_fields})
            return JuryComment(
                persona=persona.id,
                name=persona.name,
                comment=judgement.comment,
                vote=judgement.vote,
                source=CommentSource.LLM,
                model=model,
                latency_ms=_elapsed_ms(started),
                prompt_tokens=spent.prompt_tokens if spent else None,
                completion_tokens=spent.completion_tokens if spent else None,
            )
    return None


async def convene_jury(
    result: ScoreResult,
    *,
    language: str | None,
    config: JuryConfig,
    title: str | None = None,
) -> Jury:
    """Three comments and votes on `result`, in `language` (`None`/unsupported -> `"en"`).

    Never raises for model trouble and never returns fewer than three members: a persona
    whose models all fail, time out or answer badly gets a fallback comment. `title` (like
    the lyrics inside `result`) is user data and only ever reaches a model as quoted data.
    """
    lang = normalise_language(language)
    ev = gather_evidence(result, title)
    facts = citable_facts(ev)
    if config.models:
        # A no-op after warm_up(); otherwise the import runs off the event loop and before the
        # budget starts, so the budget measures model calls, not Python imports.
        await asyncio.to_thread(load_litellm)
    started = time.monotonic()
    deadline = started + config.total_budget_s

    answers: list[JuryComment | None] = [None] * len(PERSONAS)
    if config.models:
        tasks = [
            asyncio.create_task(_ask_models(p, ev, facts, lang, config, started, deadline))
            for p in PERSONAS
        ]
        done, pending = await asyncio.wait(tasks, timeout=config.total_budget_s + GUARD_GRACE_S)
        for task in pending:
            task.cancel()
        for i, task in enumerate(tasks):
            if task not in done or task.cancelled():
                continue
            if task.exception() is not None:
                # A bug in our own code must cost one persona its LLM comment, not the job.
                log.error("jury persona task crashed", exc_info=task.exception())
                continue
            answers[i] = task.result()

    members = tuple(
        answer if answer is not None else _fallback_comment(persona, ev, lang, config, started)
        for persona, answer in zip(PERSONAS, answers, strict=True)
    )
    yes_votes = sum(m.vote == Vote.YES for m in members)
    return Jury(members=members, verdict=QUALIFIED if yes_votes >= 2 else ELIMINATED, language=lang)
