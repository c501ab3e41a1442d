"""Distributed overhead and gateway capacity, measured side by side in one run.

    .venv/bin/python bench/pipeline.py [--runs 5] [--streams 200]

1. The same job (vocadito_1, 33 s, isolated vocals against a fresh copy of themselves, so
   nothing comes from a cache; lyrics given) is
   scored (a) through the whole stack — REST upload, NATS, the S3 server, PostgreSQL, six
   processes, SSE until the terminal event — and (b) by the same cores called one after
   the other in this process, models loaded beforehand in both cases. Runs alternate;
   medians are compared. The sum of the stack's own stage times is reported too: pitch
   and asr overlap, so the end-to-end time can be below it.
2. A reference prepared ahead (`POST /v1/references`) against one uploaded with the job:
   the job's end-to-end time and its model stages' time, on fresh copies of the song.
3. Gateway: latency of `GET /v1/jobs/{id}` (p50/p95 over sequential calls) and how many
   concurrent SSE streams one replica holds (all open at once, each must receive its
   events and the terminal one).

Writes its section of `docs/pipeline-performance.md` (`bench/recorder.py` writes another)
with this command and the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
import uuid
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import soundfile as sf

from voicejury_devstack.sse import follow_events
from voicejury_devstack.stack import LocalStack, find_repo_root
from voicejury_runtime.memory import keep_freed_memory
from voicejury_runtime.threads import prefer_passive_waits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from bench.sections import write_section

REPO = find_repo_root(Path(__file__))
SHARED = REPO.parent / "shared"
CLIP = SHARED / "data" / "audio" / "vocadito_1.wav"
LYRICS = (SHARED / "data" / "audio" / "vocadito_1_lyrics.txt").read_text()
OUT = REPO / "docs" / "pipeline-performance.md"


def in_process_models() -> dict[str, Any]:
    """The models the local stack's services load, loaded once here (not timed)."""
    from voicejury_asr.core import load_whisper
    from voicejury_pitch.core import load_crepe

    return {
        "crepe": load_crepe("tiny", "cpu"),
        "whisper": load_whisper(
            str(SHARED / "models" / "whisper-micro-random"), "cpu", None, local_files_only=True
        ),
    }


def in_process_job(models: dict[str, Any]) -> float:
    """What the pipeline does for the job, as plain calls in this process; wall seconds."""
    from voicejury_asr.core import transcribe
    from voicejury_jury.core import JuryConfig, convene_jury
    from voicejury_pitch.core import extract_pitch
    from voicejury_runtime.audio import read_audio, to_analysis
    from voicejury_scorer.core import Contour, ScoringConfig, Word, score_performance

    t0 = time.perf_counter()
    samples, sr = read_audio(CLIP)
    audio_16k = to_analysis(samples, sr)
    contours = []
    for _role in ("performance", "reference"):
        c = extract_pitch(models["crepe"], audio_16k)
        contours.append(Contour(c.time_s.astype(np.float64), c.f0_hz.astype(np.float64)))
    transcript = transcribe(models["whisper"], audio_16k, language=None, initial_prompt=LYRICS)
    words = [Word(w.text, w.start_s, w.end_s) for w in transcript.words]
    result = score_performance(
        contours[1],
        contours[0],
        reference_words=None,
        performance_words=words,
        lyrics=LYRICS,
        language=transcript.language,
        config=ScoringConfig(),
        performance_separated=False,
        reference_separated=False,
    )
    asyncio.run(convene_jury(result, language=None, config=JuryConfig()))
    return time.perf_counter() - t0


def run_job(
    client: httpx.Client, files: dict[str, Any], data: dict[str, str]
) -> tuple[float, dict[str, float]]:
    """Submits a job and follows its SSE stream to the end: (end-to-end seconds as the
    client sees them, each stage's own seconds from the result's provenance)."""
    t0 = time.perf_counter()
    r = client.post("/v1/jobs", files=files, data=data)
    r.raise_for_status()
    job_id = r.json()["job_id"]
    last = None
    for event in follow_events(client, f"/v1/jobs/{job_id}/events"):
        last = event
    elapsed = time.perf_counter() - t0
    assert last is not None, "no event"
    assert last.event == "completed", last
    provenance = client.get(f"/v1/jobs/{job_id}/result").json()["provenance"]
    return elapsed, {run["stage"]: float(run["seconds"]) for run in provenance}


def distributed_job(client: httpx.Client, reference: Path) -> tuple[float, float]:
    """(end-to-end seconds as the client sees them, sum of the stages' own seconds).
    `reference` must be new to the stack: a cached contour or transcript would spare the
    stack work that the in-process path does."""
    with CLIP.open("rb") as perf, reference.open("rb") as ref:
        elapsed, stages = run_job(
            client,
            {"performance": (CLIP.name, perf), "reference": (reference.name, ref)},
            {"performance_kind": "vocals", "reference_kind": "vocals", "lyrics": LYRICS},
        )
    return elapsed, sum(stages.values())


def fresh_song(workdir: Path, n: int) -> Path:
    """vocadito_1 with one sample nudged: audio no cache has seen (a new content hash)."""
    samples, sample_rate = sf.read(CLIP, dtype="float32")
    samples[n] += 1e-3  # about 33 steps of 16 bits: survives the WAV
    path = workdir / f"song-{n}.wav"
    sf.write(path, samples, sample_rate)
    return path


def prepare(client: httpx.Client, song: Path) -> tuple[str, float]:
    """POST /v1/references, then polls until ready: (reference id, seconds)."""
    t0 = time.perf_counter()
    with song.open("rb") as f:
        r = client.post("/v1/references", files={"audio": (song.name, f)}, data={"kind": "mix"})
    r.raise_for_status()
    reference_id: str = r.json()["reference_id"]
    while (ref := client.get(f"/v1/references/{reference_id}").json())["status"] == "preparing":
        time.sleep(0.1)
    assert ref["status"] == "ready", ref
    return reference_id, time.perf_counter() - t0


def reference_runs(client: httpx.Client, workdir: Path, runs: int) -> dict[str, list[float]]:
    """Jobs on a reference uploaded with them against jobs on one prepared ahead, each on
    its own fresh copy of the song (`mix`, no lyrics), alternating which goes first."""
    out: dict[str, list[float]] = {
        "unprepared": [],
        "prepared": [],
        "preparation": [],
        "unprepared_stages": [],
        "prepared_stages": [],
    }
    models = ("separator", "pitch", "asr")
    for i in range(runs):
        for which in ("unprepared", "prepared") if i % 2 == 0 else ("prepared", "unprepared"):
            song = fresh_song(workdir, 2 * i + (which == "prepared"))
            with CLIP.open("rb") as perf, song.open("rb") as ref:
                files: dict[str, Any] = {"performance": (CLIP.name, perf)}
                data = {"performance_kind": "vocals"}
                if which == "prepared":
                    reference_id, seconds = prepare(client, song)
                    out["preparation"].append(seconds)
                    data["reference_id"] = reference_id
                else:
                    files["reference"] = (song.name, ref)
                    data["reference_kind"] = "mix"
                elapsed, stages = run_job(client, files, data)
            out[which].append(elapsed)
            out[f"{which}_stages"].append(sum(stages[m] for m in models))
            print(f"  {which}: {elapsed:.2f} s", flush=True)
    return out


def status_latency_ms(client: httpx.Client, job_id: str, calls: int) -> tuple[float, float]:
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter()
        client.get(f"/v1/jobs/{job_id}").raise_for_status()
        samples.append((time.perf_counter() - t0) * 1000)
    samples.sort()
    return statistics.median(samples), samples[int(0.95 * (len(samples) - 1))]


async def concurrent_streams(base_url: str, headers: dict[str, str], streams: int) -> int:
    """Opens `streams` SSE streams on one running job; returns how many saw it complete."""
    limits = httpx.Limits(max_connections=streams + 10)
    timeout = httpx.Timeout(30.0, read=300.0)
    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, limits=limits, timeout=timeout
    ) as client:
        with CLIP.open("rb") as perf, CLIP.open("rb") as ref:
            r = await client.post(
                "/v1/jobs",
                files={
                    "performance": (CLIP.name, perf.read()),
                    "reference": (CLIP.name, ref.read()),
                },
                data={"performance_kind": "vocals", "reference_kind": "vocals"},
            )
        r.raise_for_status()
        job_id = r.json()["job_id"]

        async def follow() -> bool:
            async with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
                async for line in response.aiter_lines():
                    if line == "event: completed":
                        return True
            return False

        done = await asyncio.gather(*(follow() for _ in range(streams)), return_exceptions=True)
    return sum(1 for d in done if d is True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--streams", type=int, default=200)
    args = parser.parse_args()
    command = f".venv/bin/python bench/pipeline.py --runs {args.runs} --streams {args.streams}"

    # The in-process path on the allocator and OpenMP wait policy the model stages'
    # services run on, so that the ratio compares the distribution, not two configurations
    # (before torch or any model thread exists).
    prefer_passive_waits()
    if not keep_freed_memory():
        raise RuntimeError("keep_freed_memory did not apply (not glibc?)")
    models = in_process_models()
    in_process_job(models)  # warm-up: first-call compilation (numba, Viterbi) not counted
    namespace = "bench" + uuid.uuid4().hex[:6]
    env = {"VJ_GATEWAY_SSE_KEEPALIVE_S": "5", "VJ_LOG_LEVEL": "WARNING"}
    workdir = Path("/tmp") / namespace
    local: list[float] = []
    remote: list[float] = []
    stage_sums: list[float] = []
    with LocalStack(namespace, workdir, env_overrides=env, tenant="bench") as stack:
        headers = {"Authorization": f"Bearer {stack.api_key}"}
        with httpx.Client(base_url=stack.base_url, headers=headers, timeout=120) as client:
            fresh = iter(range(1000, 2000))  # song copies apart from reference_runs' ones
            distributed_job(client, fresh_song(workdir, next(fresh)))  # warm-up
            for _ in range(args.runs):
                local.append(in_process_job(models))
                e2e, stages = distributed_job(client, fresh_song(workdir, next(fresh)))
                remote.append(e2e)
                stage_sums.append(stages)
            reference = reference_runs(client, workdir, args.runs)
            listing = client.get("/v1/jobs", params={"limit": 1}).json()
            p50, p95 = status_latency_ms(client, listing["items"][0]["job_id"], 300)
        held = asyncio.run(concurrent_streams(stack.base_url, headers, args.streams))

    local_s, remote_s, stages_s = (statistics.median(x) for x in (local, remote, stage_sums))

    def runs(values: list[float]) -> str:
        return ", ".join(f"{x:.2f}" for x in values)

    ratio = remote_s / local_s
    median = {name: statistics.median(values) for name, values in reference.items()}
    prepared_ratio = median["prepared"] / median["unprepared"]
    saved = 1 - median["prepared_stages"] / median["unprepared_stages"]
    write_section(
        OUT,
        "pipeline",
        f"""# Pipeline performance: distributed overhead and gateway capacity

Command: `{command}` ({date.today()}, {platform.machine()}, 2 cores, shared and noisy:
compare the ratios, not the seconds). Models as in `make demo`: CREPE tiny (real weights)
for both recordings, the random-weight Whisper stand-in, the jury's fallback, and (for
`mix` references only) the random-weight tiny Demucs stand-in. This process runs on the
allocator and the OpenMP wait policy the model stages run on (`keep_freed_memory`,
`OMP_WAIT_POLICY={os.environ.get("OMP_WAIT_POLICY")}`), as their services do.

## Distributed overhead ({args.runs} alternating runs, medians)

Input: `vocadito_1.wav` (33 s) against itself, isolated vocals (no separation), lyrics
given; in the stack each job's reference is a fresh copy (one sample nudged), so that no
cached contour spares the stack work the in-process path does.

| path | runs (s) | median (s) |
|---|---|---|
| the same cores called in one process, one after the other | {runs(local)} | {local_s:.2f} |
| the stack: REST, NATS, S3, PostgreSQL, six processes, SSE | {runs(remote)} | {remote_s:.2f} |
| sum of the stack's own stage times (provenance) | {runs(stage_sums)} | {stages_s:.2f} |

Stack / in-process = **{ratio:.2f}** (target ≤ 1.10: {"met" if ratio <= 1.10 else "not met"}).
On this shared host the ratio moves from run to run by more than the target's margin
(runs of 3 pairs have given 0.94 and 1.22), hence 5 pairs by default. Earlier runs of
this command: 1.06 (2026-11-21, glibc's default allocator and OpenMP's spinning waits in
every process) and 1.11 (2026-11-22, this process on the stages' allocator, the stages'
OpenMP threads still spinning: pitch and asr, side by side on 2 cores, took the cores from
each other's work; the pitch stage alone went from 4.4-4.9 s to 3.3-3.6 s per job once
its threads slept, `voicejury_runtime.threads`), then 0.92 (2026-11-22) and 0.87
(2026-12-06), and 0.90 once the gateway's recorder kept each job's events in order
(2026-12-06, a slower hour of the host: the in-process path took 4.1 s where it took 2.9 s),
then 0.77 with one gateway replica recording under its lease (2026-12-06, third session:
the same 4.1 s in process, the stack's stage times 12 % lower than in the run before, so
read the spread of these runs rather than any one of them).
End to end versus the sum of stage times = {remote_s / stages_s:.2f}
({"below it" if remote_s < stages_s else "not below it"}: pitch and asr run in parallel).

## A reference prepared ahead ({args.runs} alternating pairs, medians)

Each job: the same performance (`vocadito_1.wav`, isolated vocals) against its own fresh
copy of the song (one sample nudged: a content hash no cache has seen) as a `mix`
reference, no lyrics, so the reference is separated, its contour taken and its words
transcribed. Either the reference is uploaded with the job, or it is prepared first
(`POST /v1/references`, polled until `ready`) and the job names it (`reference_id`).

| | runs (s) | median (s) |
|---|---|---|
| job on a reference uploaded with it | {runs(reference["unprepared"])} | {
            median["unprepared"]:.2f} |
| job on a reference prepared ahead | {runs(reference["prepared"])} | {median["prepared"]:.2f} |
| the preparation (POST to `ready`) | {runs(reference["preparation"])} | {
            median["preparation"]:.2f} |
| separator + pitch + asr, reference uploaded | {runs(reference["unprepared_stages"])} | {
            median["unprepared_stages"]:.2f} |
| separator + pitch + asr, reference prepared | {runs(reference["prepared_stages"])} | {
            median["prepared_stages"]:.2f} |

Prepared / uploaded, end to end: **{prepared_ratio:.2f}**: a job on a prepared reference
separates nothing and runs CREPE and Whisper on the performance only; the reference's
share (here, with the demo's small models, {saved:.0%} of the three model
stages' time) moves to the preparation, paid once per song, not once per singer.

## Gateway

- `GET /v1/jobs/{{id}}`: p50 {p50:.1f} ms, p95 {p95:.1f} ms over 300 sequential calls.
- Concurrent SSE streams on one replica: {held} of {args.streams} streams opened at once on
  one running job received its events through the terminal `completed`.
""",
    )
    print(OUT.read_text())


if __name__ == "__main__":
    main()
