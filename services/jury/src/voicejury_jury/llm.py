"""One call to one model through litellm, and the checks its answer must pass.

litellm is imported lazily: importing it costs ~5 s of CPU here, and by default it fetches
a model cost map from the internet at import, which hangs on machines without egress.
`load_litellm()` forces the bundled cost map and is meant to be called once at service
start-up (`warm_up()` in `core`), outside any job's time budget.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import re
import socket
from dataclasses import dataclass
from functools import cache
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from voicejury_contracts.result import Vote

from .citations import CitableFacts, Citations, find_citations
from .prompting import Message
from .safety import is_offensive, looks_like, stated_vote, strip_control_chars, truncate

# litellm routes on the model prefix ("openai/...", "ollama_chat/...") and, for most
# providers, reads a key from the environment when none is passed. Keys come only from the
# config handed to the jury, so an explicit placeholder stops that lookup; an endpoint that
# needs no key (Ollama, a local server) ignores it, one that needs a key answers 401.
NO_API_KEY = "not-configured"

# Where a model's requests go when the jury's settings name no endpoint (`VJ_JURY_API_BASE`
# unset): the provider's public default, passed explicitly. Passing `api_base=None` would
# let litellm take `OPENAI_BASE_URL` / `OPENAI_API_BASE` or `OLLAMA_API_BASE` from the
# process environment, so a variable set for some other tool would silently send the
# jury's prompts, and its API key, somewhere else. Other providers (anthropic, mistral...)
# keep litellm's own resolution: see docs/jury.md.
PROVIDER_API_BASES: dict[str, str] = {
    "openai": "https://api.openai.com/v1",
    "ollama": "http://localhost:11434",
    "ollama_chat": "http://localhost:11434",
}


class Rejected(Exception):
    """A model's answer that cannot be published.

    `retryable` answers (malformed JSON, wrong language, nothing cited from the evidence, an
    invented time) are worth one more attempt on the same model with the reason spelled
    out; an offensive or a runaway one is not.
    """

    def __init__(self, reason: str, *, retryable: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable


class Judgement(BaseModel):
    """The structured answer a persona must give; extra keys from chatty models are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    comment: str = Field(min_length=1)
    vote: Vote

    @field_validator("comment", mode="before")
    @classmethod
    def _strip_control_chars(cls, value: object) -> object:
        # Before the length check, so a comment made only of NULs is rejected as empty.
        return strip_control_chars(value) if isinstance(value, str) else value

    @field_validator("vote", mode="before")
    @classmethod
    def _accept_casing_and_french(cls, value: object) -> object:
        # Models answering in French often translate the enum itself.
        if isinstance(value, str):
            folded = value.strip().lower()
            return {"oui": "yes", "non": "no"}.get(folded, folded)
        return value


@dataclass(frozen=True)
class TokenUsage:
    prompt_tokens: int
    completion_tokens: int

    def __add__(self, other: TokenUsage) -> TokenUsage:
        return TokenUsage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
        )


@dataclass(frozen=True)
class ModelAnswer:
    content: str
    usage: TokenUsage | None


@cache
def load_litellm() -> Any:
    """Import litellm once, with no network access and no console chatter."""
    # Must be set before the import: litellm reads it while building `litellm.model_cost`.
    # setdefault keeps an operator's explicit choice.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    # Typed as Any: litellm is untyped for mypy, and only a handful of attributes are used.
    litellm: Any = importlib.import_module("litellm")
    litellm.suppress_debug_info = True
    if hasattr(litellm, "telemetry"):
        litellm.telemetry = False
    return litellm


def resolve_api_base(model: str, api_base: str | None) -> str | None:
    """The endpoint to pass for `model`: the configured one, else its provider's default.

    `None` only for a provider without an entry in `PROVIDER_API_BASES`, or a model name
    litellm cannot route (it then refuses the call itself).
    """
    if api_base:
        return api_base
    try:
        # The provider as litellm routes it, so an unprefixed "gpt-4o-mini" is "openai" too.
        provider = load_litellm().get_llm_provider(model)[1]
    except Exception:
        return None
    return PROVIDER_API_BASES.get(str(provider))


def _request(
    model: str,
    messages: list[Message],
    *,
    api_base: str | None,
    api_key: str | None,
    timeout_s: float,
    max_tokens: int,
) -> dict[str, Any]:
    """The keyword arguments of one litellm call; shared by the real and warm-up paths."""
    return {
        "model": model,
        "messages": messages,
        "api_base": api_base,
        "api_key": api_key or NO_API_KEY,
        "timeout": timeout_s,
        # Retries are off in litellm and in the OpenAI client beneath it: the jury decides
        # what to retry against its own deadline, and a hidden 429 back-off would blow it.
        "max_retries": 0,
        "num_retries": 0,
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "response_format": {"type": "json_object"},
        # Providers without JSON mode still answer; the prompt asks for JSON anyway.
        "drop_params": True,
    }


def exercise_call_path(models: tuple[str, ...]) -> None:
    """Run each model's provider code once against a loopback port that refuses connections.

    Blocking (seconds); run it in a thread. litellm defers ~500 module imports (provider
    clients, its proxy types) to the first real call, about 2 s of CPU here, which a job's
    first call would otherwise pay inside its budget. The port is bound but never
    listened on, so it refuses at once, no packet leaves the machine and nobody else can
    take the port meanwhile. The sync `completion` imports the same modules as
    `acompletion` and, unlike a private event loop in this thread, leaves no async HTTP
    client bound to the wrong loop in litellm's client cache.
    """
    litellm = load_litellm()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as refusing:
        refusing.bind(("127.0.0.1", 0))
        port = refusing.getsockname()[1]
        for model in dict.fromkeys(models or ("openai/warm-up",)):
            request = _request(
                model,
                [{"role": "user", "content": "warm-up"}],
                api_base=f"http://127.0.0.1:{port}/v1",
                api_key=None,
                timeout_s=5.0,
                max_tokens=1,
            )
            try:
                litellm.completion(**request)
            except Exception:  # the refusal is the expected outcome
                continue


async def complete(
    model: str,
    messages: list[Message],
    *,
    api_base: str | None,
    api_key: str | None,
    timeout_s: float,
    max_tokens: int,
) -> ModelAnswer:
    """Ask one model once. Raises on any transport, HTTP or timeout error.

    `api_base=None` means the provider's default endpoint (`resolve_api_base`): for the
    openai and ollama providers, never one taken from the process environment.
    """
    litellm = load_litellm()
    request = _request(
        model,
        messages,
        api_base=resolve_api_base(model, api_base),
        api_key=api_key,
        timeout_s=timeout_s,
        max_tokens=max_tokens,
    )
    # The outer timeout is the guarantee; litellm's own `timeout` lets it close the HTTP
    # request cleanly in the common case.
    async with asyncio.timeout(timeout_s):
        response: Any = await litellm.acompletion(**request)
    content = response.choices[0].message.content or ""
    return ModelAnswer(content=str(content), usage=_usage(getattr(response, "usage", None)))


def _usage(usage: Any) -> TokenUsage | None:
    """The tokens a provider reported, or None when it reported none.

    litellm fills in a zero usage for a response without one; no real call has a zero-token
    prompt, so zero on both sides means "not reported", not "free".
    """
    prompt = int(getattr(usage, "prompt_tokens", 0) or 0)
    completion = int(getattr(usage, "completion_tokens", 0) or 0)
    if prompt == 0 and completion == 0:
        return None
    return TokenUsage(prompt_tokens=prompt, completion_tokens=completion)


_FENCE_RE = re.compile(r"^```(?:json)?\s*|\s*```$", re.IGNORECASE)
# An answer longer than this many times `max_chars` is refused before it is read. The model
# was asked for at most `max(256, max_chars // 2)` tokens, which an honest answer, JSON
# escapes included, fills well within this; megabytes from a model stuck in a loop would
# cost seconds of regex and JSON work on the event loop, per persona, after the call's
# timeout has stopped counting.
MAX_ANSWER_FACTOR = 8


def parse_judgement(
    content: str, *, language: str, facts: CitableFacts, max_chars: int, played_back: bool = False
) -> Judgement:
    """Validate a model's raw answer, or raise `Rejected` saying why.

    The returned comment is the one to publish: control characters stripped and bounded
    to `max_chars`. Its citations are checked on that bounded text against `facts`, what
    the model was shown, so a citation the cut removed or one the model invented does not
    count, and one invented time or misstated figure refuses the answer. An answer over
    `MAX_ANSWER_FACTOR` times `max_chars` is refused before any of this. A "yes" for a take
    the scorer found to be the reference played back (`played_back`) is refused: no judge
    passes a playback.
    """
    if len(content) > MAX_ANSWER_FACTOR * max_chars:
        # Not worth a retry: a model that ran away once is likely to again.
        raise Rejected(
            f"the answer was over {MAX_ANSWER_FACTOR} times the length asked for", retryable=False
        )
    text = _FENCE_RE.sub("", content.strip())
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        raise Rejected("the answer was not a JSON object", retryable=True)
    try:
        judgement = Judgement.model_validate_json(text[start : end + 1])
    except (ValidationError, json.JSONDecodeError) as exc:
        raise Rejected(
            'the JSON did not match {"comment": string, "vote": "yes" | "no"}',
            retryable=True,
        ) from exc
    if is_offensive(judgement.comment, language=language, song=facts.song_text):
        raise Rejected("the comment attacked the singer, not the singing", retryable=False)
    if not looks_like(judgement.comment, language):
        raise Rejected(
            f"the comment was not written in the requested language ({language})", retryable=True
        )
    stated = stated_vote(judgement.comment)
    if stated is not None and stated != judgement.vote.value:
        raise Rejected(
            f'the comment announced a "{stated}" but the vote was "{judgement.vote.value}"',
            retryable=True,
        )
    if played_back and judgement.vote is Vote.YES:
        raise Rejected(
            "the analysis found the take to be the reference recording played back, not "
            'sung (warning "matches_reference_recording"): vote "no" and say why',
            retryable=True,
        )
    published = truncate(judgement.comment, max_chars)
    cited = find_citations(published, facts)
    if cited.invented_times or cited.misstated or not cited.verified:
        reason = _uncited_reason(cited, judgement.comment, facts, max_chars=max_chars)
        raise Rejected(reason, retryable=True)
    return judgement.model_copy(update={"comment": published})


def _uncited_reason(cited: Citations, comment: str, facts: CitableFacts, *, max_chars: int) -> str:
    """Why the published text cites no moment, or an invented one, in our own words.

    Invented citations are named as `find_citations` re-renders them (`2:47`, `57 cents`),
    so no text of the model's reaches the retry turn.
    """
    how = (
        'cite a line, held note or scoop by its "at" time (m:ss), with its own cents or ms '
        "figure exactly as the data gives it, and no other time"
    )
    whole = find_citations(comment, facts)
    whole_fine = whole.verified and not (whole.invented_times or whole.misstated)
    if len(comment) > max_chars and whole_fine:
        return f"its citations came after the first {max_chars} characters; {how}, earlier"
    if cited.invented:
        return f"it cited {', '.join(cited.invented[:4])}, which the data does not contain; {how}"
    return (
        "it cited no moment from the data (song-wide figures such as the tolerance, the "
        f"latency or the mean errors are the same for every moment); {how}"
    )
