"""What the jury tests (and `bench/jury.py`) share.

- `make_result()`: a scorer result, a plausible 5-line verse and chorus;
- `FakeProvider` and `serve_provider()`: an OpenAI-compatible chat-completions server on
  loopback (a Starlette app run by uvicorn in a thread). Its behaviour is chosen by the
  model name in the request (`good-*`, `slow-*`, `e500-*`, ...), so one server serves every
  test and tests cannot disturb each other.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from voicejury_contracts.result import (
    Expression,
    HeldNote,
    LineFeedback,
    LyricsScore,
    PitchScore,
    ResultWarning,
    RhythmScore,
    ScoreResult,
    Weights,
)

SLOW_SLEEP_S = 8.0
# `runaway-*` answers: about 3 MB of comment.
RUNAWAY_REPEATS = 1_000_000
LANGUAGE_RE = re.compile(r"Language for your answer: \w+ \((\w+)\)")
NAME_RE = re.compile(r"You are (\w+),")
DECOY_PREFIX = "/from-environment"


def make_result(
    *,
    score: float = 68.4,
    pitch_score: float = 71.0,
    rhythm_score: float = 74.0,
    mean_abs_error_cents: float = 31.0,
    tempo_ratio: float = 1.01,
    key_offset_cents: float = 0.0,
    warnings: tuple[ResultWarning, ...] = (),
    lines: tuple[LineFeedback, ...] | None = None,
    expression: Expression | None = None,
) -> ScoreResult:
    """A plausible 5-line verse-and-chorus, as the scorer would publish it."""
    if lines is None:
        lines = (
            LineFeedback(
                index=0,
                start_s=12.3,
                end_s=16.0,
                text="Is this the real life",
                pitch_accuracy=0.91,
                mean_signed_cents=-6.0,
                timing_offset_ms=22.0,
            ),
            LineFeedback(
                index=1,
                start_s=16.4,
                end_s=20.1,
                text="Is this just fantasy",
                pitch_accuracy=0.78,
                mean_signed_cents=12.0,
                timing_offset_ms=-35.0,
            ),
            LineFeedback(
                index=2,
                start_s=45.2,
                end_s=49.8,
                text="Caught in a landslide",
                pitch_accuracy=0.55,
                mean_signed_cents=-18.0,
                timing_offset_ms=140.0,
                words_missed=("landslide",),
            ),
            LineFeedback(
                index=3,
                start_s=72.0,
                end_s=77.5,
                text="No escape from reality",
                pitch_accuracy=0.42,
                mean_signed_cents=-41.0,
                timing_offset_ms=60.0,
            ),
            LineFeedback(
                index=4,
                start_s=95.7,
                end_s=101.0,
                text="Open your eyes",
                pitch_accuracy=0.83,
                mean_signed_cents=9.0,
                timing_offset_ms=-12.0,
            ),
        )
    return ScoreResult(
        score=score,
        weights=Weights(pitch=0.4, rhythm=0.3, lyrics=0.3),
        pitch=PitchScore(
            score=pitch_score,
            accuracy=0.69,
            mean_abs_error_cents=mean_abs_error_cents,
            key_offset_cents=key_offset_cents,
            key_offset_counted=False,
            octave_errors_folded=14,
            octave_switches=1,
            voiced_frames=6120,
            tolerance_cents=50.0,
        ),
        rhythm=RhythmScore(
            score=rhythm_score,
            global_offset_ms=182.0,
            onset_precision=0.81,
            onset_recall=0.77,
            mean_abs_timing_ms=54.0,
            tempo_ratio=tempo_ratio,
        ),
        lyrics=LyricsScore(
            score=58.0,
            wer=0.21,
            against="lyrics",
            words_expected=24,
            words_missed=3,
            words_wrong=2,
            words_extra=0,
        ),
        lines=lines,
        expression=expression,
        warnings=warnings,
        performance_separated=True,
        reference_separated=True,
    )


def make_expression(*, vibrato: bool = True, steadiness_cents: float = 6.0) -> Expression:
    """Expression with one long held note at 1:13 (with or without vibrato) and 3 scoops."""
    held = HeldNote(
        start_s=73.4,
        end_s=76.2,
        vibrato_rate_hz=5.6 if vibrato else None,
        vibrato_extent_cents=42.0 if vibrato else None,
        steadiness_cents=steadiness_cents,
        drift_cents=-8.0,
    )
    return Expression(
        notes=41,
        held_notes=6,
        vibrato_notes=4 if vibrato else 0,
        vibrato_rate_hz=5.6 if vibrato else None,
        vibrato_extent_cents=42.0 if vibrato else None,
        steadiness_cents=steadiness_cents,
        scoops=3,
        scoop_starts_s=(16.4, 45.1, 96.0),
        longest_notes=(held,),
    )


# --- the fake provider -------------------------------------------------------------------


@dataclass
class Seen:
    model: str
    persona: str
    is_retry: bool
    last_turn: str  # the last user message: the corrective one on a retry
    system: str
    path: str  # which route of the server the request reached


@dataclass
class FakeProvider:
    """Answers like a chat-completions endpoint would, in the mode the model name asks for."""

    seen: list[Seen] = field(default_factory=list)

    def calls(self, model: str) -> list[Seen]:
        return [s for s in self.seen if s.model == model]

    @staticmethod
    def _data(user: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(
            user.split("<performance_data>")[1].split("</performance_data>")[0]
        )
        return data

    @staticmethod
    def _highlight(data: dict[str, Any], name: str) -> dict[str, Any]:
        """The record of the line a highlight names (highlights only say which line)."""
        ref = data["highlights"][name]
        line: dict[str, Any] = next(li for li in data["lines"] if li["line"] == ref["line"])
        return line

    @staticmethod
    def _comment(name: str, language: str, at: str, cents: int, score: int) -> str:
        if language == "fr":
            return (
                f"Ici {name} : la ligne à {at} était {cents} cents trop basse, et ta note "
                f"globale est de {score}/100. Travaille le souffle."
            )
        return (
            f"{name} here: the line at {at} was {cents} cents flat, and your overall score "
            f"is {score}/100. Work on the breath."
        )

    def _good_comment(self, name: str, language: str, user: str) -> str:
        # Cites what the jury actually sent: proves the evidence reached the model.
        data = self._data(user)
        worst = self._highlight(data, "worst_pitch_line")
        at, cents = worst["at"], abs(worst["mean_signed_cents"])
        return self._comment(name, language, at, cents, data["overall_score"])

    def _invented_comment(self, name: str, language: str, user: str) -> str:
        # Well-formed, in the right language, full of numbers, none of them a moment sent:
        # no line near 2:47 and no 57-cent figure in make_result(); only the score is real.
        return self._comment(name, language, "2:47", 57, self._data(user)["overall_score"])

    @staticmethod
    def _german_comment(name: str, user: str) -> str:
        # A real moment, in German: only the language is wrong.
        data = FakeProvider._data(user)
        worst = FakeProvider._highlight(data, "worst_pitch_line")
        return (
            f"Hier ist {name}: Die Zeile bei {worst['at']} war {abs(worst['mean_signed_cents'])} "
            f"Cent zu tief, und deine Gesamtnote ist {data['overall_score']}/100. Arbeite an "
            "der Atmung, dann wird das noch besser."
        )

    def _persona_comment(self, name: str, system: str, user: str) -> str:
        # Follows the criteria the persona's own prompt gives it: proves each persona gets
        # different instructions, and that each cites a different moment of the evidence.
        data = self._data(user)
        criteria = system.split("- Criteria:", 1)[1].split("\n- ", 1)[0]
        if "rhythm and momentum first" in criteria:
            line = self._highlight(data, "worst_timing_line")
            figure = f"{abs(line['timing_offset_ms'])} ms off the beat"
        elif "intonation above all" in criteria:
            line = self._highlight(data, "worst_pitch_line")
            figure = f"{abs(line['mean_signed_cents'])} cents off the note"
        else:
            line = self._highlight(data, "best_line")
            figure = f"{line['pitch_accuracy_pct']}% of the notes in tune"
        return f"{name} here: the line at {line['at']} was {figure}. That is what I judge."

    def _reformatted_comment(self, name: str, user: str) -> str:
        # A real moment in other notations than the data's `m:ss`: seconds and a lyric quote.
        worst = self._highlight(self._data(user), "worst_pitch_line")
        minutes, seconds = worst["at"].split(":")
        return (
            f"{name} here: at {int(minutes) * 60 + int(seconds)} s, “{worst['lyrics']}” sank "
            f"under the note. Work on the breath."
        )

    async def chat_completions(self, request: Request) -> Response:
        body = await request.json()
        model: str = body["model"]
        messages: list[dict[str, Any]] = body["messages"]
        system, user = messages[0]["content"], messages[1]["content"]
        name_match, language_match = NAME_RE.search(system), LANGUAGE_RE.search(user)
        assert name_match is not None
        assert language_match is not None
        name, language = name_match.group(1), language_match.group(1)
        is_retry = any(m["role"] == "assistant" for m in messages)
        self.seen.append(
            Seen(
                model=model,
                persona=name,
                is_retry=is_retry,
                last_turn=messages[-1]["content"],
                system=system,
                path=request.url.path,
            )
        )
        mode = model.split("-", 1)[0]

        if mode == "slow":
            await asyncio.sleep(SLOW_SLEEP_S)
        elif mode == "e500":
            return JSONResponse({"error": {"message": "boom", "type": "server_error"}}, 500)
        elif mode == "e429":
            return JSONResponse(
                {"error": {"message": "slow down", "type": "rate_limit_exceeded"}},
                429,
                headers={"retry-after": "30"},
            )

        comment = self._good_comment(name, language, user)
        if mode == "malformed" or (mode == "flaky" and not is_retry):
            content = '{"comment": "the line at 1:12 was great", "vote": '  # cut off
        elif mode == "wronglang":
            other = "en" if language == "fr" else "fr"
            content = json.dumps({"comment": self._good_comment(name, other, user), "vote": "yes"})
        elif mode == "german":
            content = json.dumps({"comment": self._german_comment(name, user), "vote": "yes"})
        elif mode == "persona":
            content = json.dumps(
                {"comment": self._persona_comment(name, system, user), "vote": "yes"}
            )
        elif mode == "offensive":
            content = json.dumps(
                {"comment": f"At 1:12 you sounded like an idiot. {comment}", "vote": "no"}
            )
        elif mode == "verbose":
            content = json.dumps({"comment": " ".join([comment] * 20), "vote": "yes"})
        elif mode == "invented" or (mode == "unfounded" and not is_retry):
            content = json.dumps(
                {"comment": self._invented_comment(name, language, user), "vote": "yes"}
            )
        elif mode == "reformatted":
            content = json.dumps({"comment": self._reformatted_comment(name, user), "vote": "yes"})
        elif mode == "runaway":
            # A model stuck in a loop, on a server that ignores `max_tokens`: megabytes.
            content = json.dumps({"comment": comment + " la" * RUNAWAY_REPEATS, "vote": "yes"})
        elif mode == "controls":
            # JSON escapes, as a model's tokenizer can emit them: \u0000 is valid JSON.
            dirty = "\x00" + comment.replace(" ", " \x00\x07", 3) + "\x1b[0m\x9b"
            content = json.dumps({"comment": dirty, "vote": "yes"})
        else:
            vote = "no" if name == "Viktor" else "yes"
            content = json.dumps({"comment": comment, "vote": vote})

        body = {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                }
            ],
        }
        if mode != "nousage":  # some servers (llama.cpp builds, proxies) report no usage
            body["usage"] = {"prompt_tokens": 900, "completion_tokens": 60, "total_tokens": 960}
        return JSONResponse(body)


@dataclass
class RunningProvider:
    provider: FakeProvider
    api_base: str


@contextmanager
def serve_provider(provider: FakeProvider) -> Iterator[RunningProvider]:
    """`provider` behind uvicorn on a free loopback port, in a daemon thread, until exit."""
    app = Starlette(
        routes=[
            Route("/v1/chat/completions", provider.chat_completions, methods=["POST"]),
            # Where the environment variables of the api_base tests point: a request
            # reaching it came from the environment, not from the jury's settings.
            Route(
                f"{DECOY_PREFIX}/v1/chat/completions", provider.chat_completions, methods=["POST"]
            ),
        ]
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # Short graceful shutdown: "slow" requests the jury abandoned would otherwise hold the
    # server open for SLOW_SLEEP_S at teardown.
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "fake provider did not start"
        time.sleep(0.01)
    try:
        yield RunningProvider(provider=provider, api_base=f"http://127.0.0.1:{port}/v1")
    finally:
        server.should_exit = True
        thread.join(timeout=5)
        sock.close()
