"""The jury's litellm path against a real OpenAI-compatible HTTP server on loopback.

The server (`tests/jury_fixtures.py`, shared with `bench/jury.py`) is a small Starlette app
run by uvicorn in a thread. Its behaviour is chosen by the model name in the request
(`good-*`, `slow-*`, `e500-*`, ...), so one server serves every test and tests cannot
disturb each other. Nothing in litellm is patched: requests go through litellm's OpenAI
provider and the OpenAI client over real HTTP.
"""

from __future__ import annotations

import logging
import socket
import time
import unicodedata
from collections.abc import Iterator
from typing import Any

import pytest

from tests.jury_fixtures import (
    DECOY_PREFIX,
    FakeProvider,
    RunningProvider,
    make_result,
    serve_provider,
)
from voicejury_contracts.result import (
    CommentSource,
    Jury,
    Vote,
)
from voicejury_jury import JuryConfig, convene_jury, warm_up
from voicejury_jury.citations import citable_facts, find_citations
from voicejury_jury.evidence import gather_evidence
from voicejury_jury.llm import PROVIDER_API_BASES, resolve_api_base

pytestmark = pytest.mark.integration

# Generous against scheduler noise on a loaded 2-core CI box, small against the budget:
# a jury that ignored its deadline would overshoot by a whole call timeout.
BUDGET_MARGIN_S = 0.6


@pytest.fixture(scope="module")
def llm_server() -> Iterator[RunningProvider]:
    with serve_provider(FakeProvider()) as server:
        yield server


@pytest.fixture(scope="module", autouse=True)
def litellm_warm() -> None:
    # Seconds of imports, paid once here as the service pays them at start-up, not per job.
    warm_up(JuryConfig(models=("openai/any",)))


def config_for(server: RunningProvider, *models: str, **overrides: Any) -> JuryConfig:
    return JuryConfig(
        models=tuple(f"openai/{m}" for m in models),
        api_base=server.api_base,
        api_key="test",
        **overrides,
    )


async def timed_jury(config: JuryConfig, language: str = "en") -> tuple[Jury, float]:
    started = time.monotonic()
    jury = await convene_jury(
        make_result(), language=language, config=config, title="Bohemian Rhapsody"
    )
    return jury, time.monotonic() - started


def assert_full_jury(jury: Jury, config: JuryConfig, elapsed_s: float) -> None:
    assert [m.persona for m in jury.members] == ["coach", "showman", "technician"]
    assert all(m.vote in (Vote.YES, Vote.NO) for m in jury.members)
    assert all(m.comment for m in jury.members)
    assert all(len(m.comment) <= config.max_comment_chars for m in jury.members)
    assert jury.verdict in ("qualified", "eliminated")
    assert elapsed_s < config.total_budget_s + BUDGET_MARGIN_S


def failed_calls(caplog: pytest.LogCaptureFixture, model: str) -> list[logging.LogRecord]:
    """The jury's own record of calls that failed (timeouts included), as the client saw them.

    Used where the server's view would race: an abandoned request may reach the server's
    handler after the test has already asserted.
    """
    return [
        r
        for r in caplog.records
        if r.getMessage() == "jury model call failed" and r.__dict__["fields"]["model"] == model
    ]


def assert_sources(jury: Jury, source: CommentSource, model: str | None) -> None:
    for member in jury.members:
        assert member.source is source, member
        assert member.model == model, member


# --- tests -------------------------------------------------------------------------------


@pytest.mark.parametrize("language", ["en", "fr"])
async def test_responsive_model_writes_all_three_comments(
    llm_server: RunningProvider, language: str
) -> None:
    config = config_for(llm_server, f"good-{language}")

    jury, elapsed = await timed_jury(config, language)

    assert_full_jury(jury, config, elapsed)
    assert_sources(jury, CommentSource.LLM, f"openai/good-{language}")
    assert jury.language == language
    # The model cited the worst line the jury sent it: 1:12, 41 cents.
    assert all("1:12" in m.comment and "41 cents" in m.comment for m in jury.members)
    assert [m.vote for m in jury.members] == [Vote.YES, Vote.YES, Vote.NO]
    assert jury.verdict == "qualified"
    assert all((m.prompt_tokens, m.completion_tokens) == (900, 60) for m in jury.members)
    assert all(0 < m.latency_ms < 1000 * config.total_budget_s for m in jury.members)


async def test_token_usage_is_null_when_the_provider_reports_none(
    llm_server: RunningProvider,
) -> None:
    config = config_for(llm_server, "nousage-1")

    jury, elapsed = await timed_jury(config)

    assert_full_jury(jury, config, elapsed)
    assert_sources(jury, CommentSource.LLM, "openai/nousage-1")
    # Not 0: litellm fills in a zero usage, which would read as a free call.
    assert all((m.prompt_tokens, m.completion_tokens) == (None, None) for m in jury.members)


async def test_slow_model_times_out_and_the_next_model_answers(
    llm_server: RunningProvider, caplog: pytest.LogCaptureFixture
) -> None:
    config = config_for(llm_server, "slow-1", "good-1", call_timeout_s=1.0, total_budget_s=3.0)

    jury, elapsed = await timed_jury(config)

    assert_full_jury(jury, config, elapsed)
    assert_sources(jury, CommentSource.LLM, "openai/good-1")
    assert len(failed_calls(caplog, "openai/slow-1")) == 3
    assert elapsed >= config.call_timeout_s  # it did wait for the slow model first
    assert all(m.latency_ms >= 1000 * config.call_timeout_s for m in jury.members)


async def test_only_slow_models_fall_back_within_the_budget(
    llm_server: RunningProvider, caplog: pytest.LogCaptureFixture
) -> None:
    config = config_for(llm_server, "slow-2", "slow-3", call_timeout_s=1.0, total_budget_s=1.5)

    jury, elapsed = await timed_jury(config)

    assert_full_jury(jury, config, elapsed)
    assert_sources(jury, CommentSource.FALLBACK, None)
    # The second model only got what was left of the budget, then the fallback took over.
    assert len(failed_calls(caplog, "openai/slow-2")) == 3
    assert len(failed_calls(caplog, "openai/slow-3")) == 3


async def test_default_budget_holds_against_a_model_that_never_answers(
    llm_server: RunningProvider,
) -> None:
    config = config_for(llm_server, "slow-4", "slow-5", "slow-6")

    jury, elapsed = await timed_jury(config)

    assert_full_jury(jury, config, elapsed)
    assert_sources(jury, CommentSource.FALLBACK, None)
    assert elapsed < 5.0  # the product's "jury under 5 s", even in the worst case


@pytest.mark.parametrize("failing", ["e500-1", "e429-1"])
async def test_http_errors_move_to_the_next_model(
    llm_server: RunningProvider, failing: str
) -> None:
    good = f"good-after-{failing}"
    config = config_for(llm_server, failing, good)

    jury, elapsed = await timed_jury(config)

    assert_full_jury(jury, config, elapsed)
    assert_sources(jury, CommentSource.LLM, f"openai/{good}")
    # No hidden retries in litellm or the OpenAI client: one request per persona.
    assert len(llm_server.provider.calls(failing)) == 3


@pytest.mark.parametrize("failing", ["e500-2", "e429-2"])
async def test_http_errors_on_every_model_fall_back(
    llm_server: RunningProvider, failing: str
) -> None:
    config = config_for(llm_server, failing)

    jury, elapsed = await timed_jury(config)

    assert_full_jury(jury, config, elapsed)
    assert_sources(jury, CommentSource.FALLBACK, None)
    # A 429 with retry-after: 30 must not make anyone wait 30 s.
    assert elapsed < 1.0


async def test_malformed_json_is_retried_once_then_falls_back(llm_server: RunningProvider) -> None:
    config = config_for(llm_server, "malformed-1")

    jury, elapsed = await timed_jury(config)

    assert_full_jury(jury, config, elapsed)
    assert_sources(jury, CommentSource.FALLBACK, None)
    calls = llm_server.provider.calls("malformed-1")
    assert len(calls) == 6
    assert sorted(c.is_retry for c in calls) == [False] * 3 + [True] * 3


async def test_malformed_json_once_is_fixed_by_the_retry(llm_server: RunningProvider) -> None:
    config = config_for(llm_server, "flaky-1", "good-unused")

    jury, elapsed = await timed_jury(config)

    assert_full_jury(jury, config, elapsed)
    assert_sources(jury, CommentSource.LLM, "openai/flaky-1")
    assert llm_server.provider.calls("good-unused") == []
    # Both calls were paid for: the rejected answer's tokens are counted with the accepted one's.
    assert all((m.prompt_tokens, m.completion_tokens) == (1800, 120) for m in jury.members)


async def test_malformed_model_hands_over_to_the_next_model(llm_server: RunningProvider) -> None:
    config = config_for(llm_server, "malformed-2", "good-2")

    jury, elapsed = await timed_jury(config)

    assert_full_jury(jury, config, elapsed)
    assert_sources(jury, CommentSource.LLM, "openai/good-2")
    # Two rejected answers from the first model, one accepted from the second.
    assert all((m.prompt_tokens, m.completion_tokens) == (2700, 180) for m in jury.members)


@pytest.mark.parametrize("language", ["en", "fr"])
async def test_answer_in_the_wrong_language_is_not_published(
    llm_server: RunningProvider, language: str
) -> None:
    model = f"wronglang-{language}"
    config = config_for(llm_server, model)

    jury, elapsed = await timed_jury(config, language)

    assert_full_jury(jury, config, elapsed)
    assert_sources(jury, CommentSource.FALLBACK, None)
    assert jury.language == language
    assert len(llm_server.provider.calls(model)) == 6  # asked once more, in vain


async def test_offensive_answer_falls_back_without_retrying(llm_server: RunningProvider) -> None:
    config = config_for(llm_server, "offensive-1")

    jury, elapsed = await timed_jury(config)

    assert_full_jury(jury, config, elapsed)
    assert_sources(jury, CommentSource.FALLBACK, None)
    assert all("idiot" not in m.comment for m in jury.members)
    assert len(llm_server.provider.calls("offensive-1")) == 3


async def test_long_answer_is_truncated(llm_server: RunningProvider) -> None:
    config = config_for(llm_server, "verbose-1", max_comment_chars=300)

    jury, elapsed = await timed_jury(config)

    assert_full_jury(jury, config, elapsed)
    assert_sources(jury, CommentSource.LLM, "openai/verbose-1")
    assert all(m.comment.endswith("…") for m in jury.members)


async def test_runaway_answer_is_refused_unread_and_the_next_model_answers(
    llm_server: RunningProvider, caplog: pytest.LogCaptureFixture
) -> None:
    # Reading 3 MB for its JSON, language and citations took seconds of CPU on the event
    # loop per persona, long past the budget: the whole jury fell back.
    config = config_for(llm_server, "runaway-1", "good-after-runaway")

    jury, elapsed = await timed_jury(config)

    assert_full_jury(jury, config, elapsed)
    assert_sources(jury, CommentSource.LLM, "openai/good-after-runaway")
    assert len(llm_server.provider.calls("runaway-1")) == 3  # no retry: it would run away again
    rejected = [r for r in caplog.records if r.getMessage() == "jury model answer rejected"]
    assert {r.__dict__["fields"]["model"] for r in rejected} == {"openai/runaway-1"}
    assert elapsed < config.call_timeout_s


async def test_answer_citing_only_invented_moments_is_retried_once_then_falls_back(
    llm_server: RunningProvider,
) -> None:
    config = config_for(llm_server, "invented-1")

    jury, elapsed = await timed_jury(config)

    assert_full_jury(jury, config, elapsed)
    assert_sources(jury, CommentSource.FALLBACK, None)
    assert all("2:47" not in m.comment for m in jury.members)
    calls = llm_server.provider.calls("invented-1")
    assert sorted(c.is_retry for c in calls) == [False] * 3 + [True] * 3
    # The corrective turn names what was invented, so the model knows what to fix.
    assert all("2:47" in c.last_turn for c in calls if c.is_retry)


async def test_answer_citing_only_invented_moments_hands_over_to_the_next_model(
    llm_server: RunningProvider,
) -> None:
    config = config_for(llm_server, "invented-2", "good-after-invented")

    jury, elapsed = await timed_jury(config)

    assert_full_jury(jury, config, elapsed)
    assert_sources(jury, CommentSource.LLM, "openai/good-after-invented")
    assert all("1:12" in m.comment and "2:47" not in m.comment for m in jury.members)


async def test_invented_moment_corrected_on_the_retry_is_published(
    llm_server: RunningProvider,
) -> None:
    config = config_for(llm_server, "unfounded-1", "good-unused-2")

    jury, elapsed = await timed_jury(config)

    assert_full_jury(jury, config, elapsed)
    assert_sources(jury, CommentSource.LLM, "openai/unfounded-1")
    assert all("1:12" in m.comment for m in jury.members)
    assert llm_server.provider.calls("good-unused-2") == []


async def test_real_moment_cited_in_another_notation_is_accepted(
    llm_server: RunningProvider,
) -> None:
    config = config_for(llm_server, "reformatted-1")

    jury, elapsed = await timed_jury(config)

    assert_full_jury(jury, config, elapsed)
    assert_sources(jury, CommentSource.LLM, "openai/reformatted-1")
    assert all("72 s" in m.comment for m in jury.members)
    assert len(llm_server.provider.calls("reformatted-1")) == 3  # accepted at once


async def test_control_characters_from_the_model_never_reach_the_result(
    llm_server: RunningProvider,
) -> None:
    config = config_for(llm_server, "controls-1")

    jury, elapsed = await timed_jury(config)

    assert_full_jury(jury, config, elapsed)
    assert_sources(jury, CommentSource.LLM, "openai/controls-1")
    assert all("1:12" in m.comment for m in jury.members)
    assert not any(unicodedata.category(ch) == "Cc" for m in jury.members for ch in m.comment)
    # What the gateway stores: PostgreSQL jsonb refuses \u0000.
    assert "\\u0000" not in jury.model_dump_json()


async def test_unreachable_endpoint_falls_back_at_once() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens here once the socket closes
    config = JuryConfig(
        models=("openai/anything",), api_base=f"http://127.0.0.1:{port}/v1", api_key="test"
    )

    jury, elapsed = await timed_jury(config)

    assert_full_jury(jury, config, elapsed)
    assert_sources(jury, CommentSource.FALLBACK, None)
    assert elapsed < 1.0


@pytest.mark.parametrize(
    ("models", "source", "answered_by"),
    [
        (("german-1", "good-after-german"), CommentSource.LLM, "openai/good-after-german"),
        (("german-2",), CommentSource.FALLBACK, None),
    ],
    ids=["next-model", "fallback"],
)
async def test_answer_in_german_to_a_french_job_is_not_published(
    llm_server: RunningProvider,
    models: tuple[str, ...],
    source: CommentSource,
    answered_by: str | None,
) -> None:
    config = config_for(llm_server, *models)

    jury, elapsed = await timed_jury(config, "fr")

    assert_full_jury(jury, config, elapsed)
    assert_sources(jury, source, answered_by)
    assert jury.language == "fr"
    assert all("Zeile" not in m.comment for m in jury.members)
    calls = llm_server.provider.calls(models[0])
    assert sorted(c.is_retry for c in calls) == [False] * 3 + [True] * 3
    assert all("requested language (fr)" in c.last_turn for c in calls if c.is_retry)
    if source is CommentSource.LLM:
        # 2 German answers and the accepted French one, 900 + 60 tokens each.
        assert all((m.prompt_tokens, m.completion_tokens) == (2700, 180) for m in jury.members)


async def test_personas_get_their_own_criteria_and_cite_their_own_moments(
    llm_server: RunningProvider,
) -> None:
    config = config_for(llm_server, "persona-1")

    jury, elapsed = await timed_jury(config)

    assert_full_jury(jury, config, elapsed)
    assert_sources(jury, CommentSource.LLM, "openai/persona-1")
    calls = {c.persona: c for c in llm_server.provider.calls("persona-1")}
    assert sorted(calls) == ["Max", "Nina", "Viktor"]
    criteria = {
        name: c.system.split("- Criteria:", 1)[1].split("\n- ", 1)[0] for name, c in calls.items()
    }
    assert len(set(criteria.values())) == 3
    assert len({c.system for c in calls.values()}) == 3
    # Each comment cites a moment of the scorer's result, and not the same one.
    facts = citable_facts(gather_evidence(make_result(), title="Bohemian Rhapsody"))
    cited = [find_citations(m.comment, facts) for m in jury.members]
    assert all(c.verified and not c.invented for c in cited), [m.comment for m in jury.members]
    # make_result(): best line 0:12 (91 % in tune), latest entrance 0:45 (140 ms), worst
    # pitch 1:12 (41 cents flat).
    assert [c.verified for c in cited] == [("0:12",), ("0:45", "140 ms"), ("1:12", "41 cents")]


def test_api_base_comes_from_the_settings_or_the_provider_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for variable in ("OPENAI_BASE_URL", "OPENAI_API_BASE", "OLLAMA_API_BASE"):
        monkeypatch.setenv(variable, "http://elsewhere.invalid/v1")

    assert resolve_api_base("openai/gpt-4o-mini", None) == "https://api.openai.com/v1"
    assert resolve_api_base("gpt-4o-mini", None) == "https://api.openai.com/v1"
    assert resolve_api_base("ollama_chat/llama3.1", None) == "http://localhost:11434"
    assert resolve_api_base("ollama/llama3.1", None) == "http://localhost:11434"
    assert resolve_api_base("openai/x", "http://llm.internal/v1") == "http://llm.internal/v1"
    # Providers without an entry keep litellm's own resolution.
    assert resolve_api_base("anthropic/claude-3-5-haiku-latest", None) is None


@pytest.mark.parametrize("configured", [False, True], ids=["unset", "set"])
async def test_provider_env_vars_never_redirect_the_jury(
    llm_server: RunningProvider, monkeypatch: pytest.MonkeyPatch, configured: bool
) -> None:
    # The environment points at the decoy route; the jury must reach `/v1` either through
    # its setting or, when unset, through the provider default (here the same server, as
    # the real default would leave the machine).
    decoy = llm_server.api_base.replace("/v1", f"{DECOY_PREFIX}/v1")
    monkeypatch.setenv("OPENAI_BASE_URL", decoy)
    monkeypatch.setenv("OPENAI_API_BASE", decoy)
    monkeypatch.setitem(PROVIDER_API_BASES, "openai", llm_server.api_base)
    model = f"good-env-{configured}"
    config = JuryConfig(
        models=(f"openai/{model}",),
        api_base=llm_server.api_base if configured else None,
        api_key="test",
    )

    jury, elapsed = await timed_jury(config)

    assert_full_jury(jury, config, elapsed)
    assert_sources(jury, CommentSource.LLM, f"openai/{model}")
    assert [c.path for c in llm_server.provider.calls(model)] == ["/v1/chat/completions"] * 3
