"""Distributed overhead and gateway capacity, measured side by side in one run.

    .venv/bin/python bench/pipeline.py [--runs 5] [--streams 200]

1. The same job (vocadito_1, 33 s, isolated vocals against a fresh copy of themselves, so
   nothing comes from a cache; lyrics given) is scored (a) through the whole stack — REST
   upload, NATS, the S3 server, PostgreSQL, six processes, SSE until the terminal event —
   and (b) in this process by the functions the stages' handlers call, with the settings
   their services read and the models they load, arranged as the pipeline arranges them:
   both recordings decoded to 16 kHz, then pitch (both recordings, one after the other) and
   asr (the performance, with the lyrics' prompt, hotwords and expected text) at once in
   two worker threads, then scoring and the jury. Models loaded beforehand in both cases.
   Pairs alternate which path goes first; medians are compared, and each part of the
   in-process job beside the stack's stage that does it (the stage's own `seconds`). The
   sum of the stack's stage times is reported too: pitch and asr overlap, so the
   end-to-end time can be below it.
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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

import httpx
import numpy as np
import soundfile as sf

from voicejury_contracts import JobOptions, Role
from voicejury_devstack.sse import follow_events
from voicejury_devstack.stack import LocalStack, find_repo_root, model_env_defaults
from voicejury_runtime.memory import keep_freed_memory
from voicejury_runtime.threads import prefer_passive_waits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from bench.sections import write_section

if TYPE_CHECKING:  # the model modules load torch and CTranslate2: imported in functions,
    # after `main` has set the OpenMP wait policy they read when they load.
    import numpy.typing as npt

    from voicejury_asr.core import Transcript, WhisperHandle
    from voicejury_asr.settings import AsrSettings
    from voicejury_jury.settings import JurySettings
    from voicejury_pitch.core import CrepeModel
    from voicejury_pitch.settings import PitchSettings
    from voicejury_scorer.core import Contour
    from voicejury_scorer.settings import ScorerSettings

    FloatArray = npt.NDArray[np.float32]

REPO = find_repo_root(Path(__file__))
SHARED = REPO.parent / "shared"
CLIP = SHARED / "data" / "audio" / "vocadito_1.wav"
LYRICS = (SHARED / "data" / "audio" / "vocadito_1_lyrics.txt").read_text()
OUT = REPO / "docs" / "pipeline-performance.md"
T = TypeVar("T")


@dataclass(frozen=True)
class InProcess:
    """The model stages' settings, as the local stack's services read them from the same
    environment, and the models they load with them (loaded once here, not timed)."""

    pitch: PitchSettings
    asr: AsrSettings
    scorer: ScorerSettings
    jury: JurySettings
    crepe: dict[str, CrepeModel]
    whisper: WhisperHandle
    pool: ThreadPoolExecutor


def in_process_models() -> InProcess:
    """Settings and models exactly as the stack's pitch and asr services build them: the
    stack's model defaults (`model_env_defaults`) under this environment, as `LocalStack`
    gives its services, and the services' own loaders (`load_pinned_crepe`,
    `load_pinned_whisper`)."""
    from voicejury_asr.app import load_pinned_whisper
    from voicejury_asr.settings import AsrSettings
    from voicejury_jury.settings import JurySettings
    from voicejury_pitch.app import load_pinned_crepe
    from voicejury_pitch.settings import PitchSettings
    from voicejury_runtime.models import resolve_device
    from voicejury_scorer.settings import ScorerSettings

    for name, value in model_env_defaults(SHARED).items():
        os.environ.setdefault(name, value)  # what `LocalStack` gives its services too
    pitch, asr = PitchSettings(), AsrSettings()
    device = resolve_device(pitch.pitch_device)
    crepe = {
        capacity: load_pinned_crepe(pitch, capacity, device)
        for capacity in sorted({pitch.pitch_model_performance, pitch.pitch_model_reference})
    }
    whisper = load_pinned_whisper(asr)
    # Two workers: the pitch stage's and the asr stage's blocking calls, side by side.
    pool = ThreadPoolExecutor(2, thread_name_prefix="stage")
    return InProcess(pitch, asr, ScorerSettings(), JurySettings(), crepe, whisper, pool)


def _no_progress(_fraction: float) -> None:
    """The stages report progress as messages (the stack's overhead); here, nowhere."""


def _never_stop() -> None:
    """The stages' cancellation checkpoint (`StageContext.should_stop`), never cancelled."""


def in_process_pitch(m: InProcess, stems: dict[Role, FloatArray]) -> dict[Role, Contour]:
    """What the pitch stage does with a job's two 16 kHz stems: one after the other, each
    with its role's CREPE and the stage's settings (`handlers._contour_for`)."""
    from voicejury_pitch.core import extract_pitch
    from voicejury_pitch.handlers import PitchState
    from voicejury_scorer.core import Contour

    s = m.pitch
    contours = {}
    for role in (Role.PERFORMANCE, Role.REFERENCE):
        c = extract_pitch(
            m.crepe[PitchState(s).capacity(role)],
            stems[role],
            hop_s=s.pitch_hop_s,
            batch_frames=s.pitch_batch_frames,
            decoder=cast(Literal["viterbi", "weighted_argmax", "argmax"], s.pitch_decoder),
            periodicity_threshold=s.pitch_periodicity_threshold,
            silence_db=s.pitch_silence_db,
            on_progress=_no_progress,
            should_stop=_never_stop,
        )
        # As the scorer reads the stored contour back (`handlers._contour`).
        contours[role] = Contour(
            time_s=c.time_s.astype(np.float64),
            f0_hz=c.f0_hz.astype(np.float64),
            periodicity=c.periodicity.astype(np.float64),
        )
    return contours


def in_process_asr(m: InProcess, performance: FloatArray, options: JobOptions) -> Transcript:
    """What the asr stage does for a job with lyrics: the performance only, by the stage's
    own call (`transcribe_stem`) with the hints it derives from the lyrics."""
    from voicejury_asr.handlers import LyricsHints, transcribe_stem

    return transcribe_stem(
        m.whisper,
        performance,
        language=options.language,
        hints=LyricsHints.of(options.lyrics, m.asr),
        settings=m.asr,
        on_progress=_no_progress,
        should_stop=_never_stop,
    )


# Each part of the in-process job beside the stage of the stack that does that work (the
# stage names of a result's provenance).
PARTS: tuple[tuple[str, str], ...] = (
    ("separator", "both recordings decoded to 16 kHz mono / the separator"),
    ("pitch", "pitch of both recordings, one after the other / the pitch stage"),
    ("asr", "the performance's transcript, with the lyrics' hints / the asr stage"),
    ("pitch+asr", "pitch and asr side by side, until both are done (wall)"),
    ("scorer", "scoring / the scorer"),
    ("jury", "the jury (its fallback) / the jury stage"),
)


def _timed(fn: Callable[[], T]) -> tuple[float, T]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def in_process_job(m: InProcess) -> dict[str, float]:
    """The job's work as plain calls in this process, arranged as the pipeline arranges
    it: both recordings decoded to 16 kHz mono (the separator's work for isolated vocals),
    then pitch and asr at once in two worker threads (as their two services run side by
    side on the same cores), then scoring and the jury. Wall seconds of each part (keys of
    `PARTS`) and of the whole (`total`)."""
    from voicejury_jury.core import convene_jury
    from voicejury_runtime.audio import read_audio, to_analysis
    from voicejury_scorer.core import Word, analyse_performance
    from voicejury_scorer.handlers import scoring_config

    options = JobOptions(lyrics=LYRICS)  # the job's form: lyrics, every other option default
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    stems: dict[Role, FloatArray] = {}
    for role in (Role.PERFORMANCE, Role.REFERENCE):
        samples, sr = read_audio(CLIP)
        stems[role] = to_analysis(samples, sr)
    t["separator"] = time.perf_counter() - t0
    pitch = m.pool.submit(_timed, lambda: in_process_pitch(m, stems))
    asr = m.pool.submit(_timed, lambda: in_process_asr(m, stems[Role.PERFORMANCE], options))
    (t["pitch"], contours), (t["asr"], transcript) = pitch.result(), asr.result()
    t["pitch+asr"] = time.perf_counter() - t0 - t["separator"]
    heard = transcript.language
    config = scoring_config(m.scorer, options)
    t1 = time.perf_counter()
    analysis = analyse_performance(
        contours[Role.REFERENCE],
        contours[Role.PERFORMANCE],
        reference_words=None,  # lyrics given: the reference is not transcribed
        performance_words=[Word(w.text, w.start_s, w.end_s) for w in transcript.words],
        lyrics=options.lyrics,
        language=options.language or heard,
        config=config,
        performance_separated=False,
        reference_separated=False,
    )
    t2 = time.perf_counter()
    asyncio.run(
        convene_jury(
            analysis.result,
            language=options.language or heard,
            title=options.title,
            config=m.jury.jury_config,
        )
    )
    t3 = time.perf_counter()
    t.update(scorer=t2 - t1, jury=t3 - t2, total=t3 - t0)
    return t


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


def distributed_job(client: httpx.Client, reference: Path) -> tuple[float, dict[str, float]]:
    """(end-to-end seconds as the client sees them, each stage's own seconds).
    `reference` must be new to the stack: a cached contour or transcript would spare the
    stack work that the in-process path does."""
    with CLIP.open("rb") as perf, reference.open("rb") as ref:
        elapsed, stages = run_job(
            client,
            {"performance": (CLIP.name, perf), "reference": (reference.name, ref)},
            {"performance_kind": "vocals", "reference_kind": "vocals", "lyrics": LYRICS},
        )
    return elapsed, stages


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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="pairs of each comparison")
    parser.add_argument("--streams", type=int, default=200, help="SSE streams held at once")
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
    local: list[dict[str, float]] = []
    remote: list[float] = []
    stage_runs: list[dict[str, float]] = []
    with LocalStack(namespace, workdir, env_overrides=env, tenant="bench") as stack:
        headers = {"Authorization": f"Bearer {stack.api_key}"}
        with httpx.Client(base_url=stack.base_url, headers=headers, timeout=120) as client:
            fresh = iter(range(1000, 2000))  # song copies apart from reference_runs' ones
            distributed_job(client, fresh_song(workdir, next(fresh)))  # warm-up
            for i in range(args.runs):
                # Alternating which goes first, so that drift in the host's load hits both.
                for which in ("local", "stack") if i % 2 == 0 else ("stack", "local"):
                    if which == "local":
                        local.append(in_process_job(models))
                        print(f"  in process: {local[-1]['total']:.2f} s", flush=True)
                    else:
                        e2e, stages = distributed_job(client, fresh_song(workdir, next(fresh)))
                        remote.append(e2e)
                        stage_runs.append(stages)
                        print(f"  stack: {e2e:.2f} s", flush=True)
            reference = reference_runs(client, workdir, args.runs)
            listing = client.get("/v1/jobs", params={"limit": 1}).json()
            p50, p95 = status_latency_ms(client, listing["items"][0]["job_id"], 300)
        held = asyncio.run(concurrent_streams(stack.base_url, headers, args.streams))
    models.pool.shutdown()

    local_total = [run["total"] for run in local]
    stage_sums = [sum(run.values()) for run in stage_runs]
    local_s, remote_s, stages_s = (statistics.median(x) for x in (local_total, remote, stage_sums))

    def runs(values: list[float]) -> str:
        return ", ".join(f"{x:.2f}" for x in values)

    def part_row(key: str, label: str) -> str:
        here = statistics.median(run[key] for run in local)
        there = [run[key] for run in stage_runs if key in run]
        cell = f"{statistics.median(there):.2f}" if there else "—"
        return f"| {label} | {here:.2f} | {cell} |"

    parts = "\n".join(part_row(key, label) for key, label in PARTS)

    def critical_path(run: dict[str, float]) -> float:
        """The stages' own seconds along the job's longest path (pitch beside asr)."""
        get = run.get
        return (
            get("separator", 0.0)
            + max(get("pitch", 0.0), get("asr", 0.0))
            + sum(get(stage, 0.0) for stage in ("scorer", "jury"))
        )

    hops = statistics.median(
        e2e - critical_path(run) for e2e, run in zip(remote, stage_runs, strict=True)
    )
    pitch_in = statistics.median(run["pitch"] for run in local)
    asr_in = statistics.median(run["asr"] for run in local)
    pitch_stack = statistics.median(run.get("pitch", 0.0) for run in stage_runs)
    asr_stack = statistics.median(run.get("asr", 0.0) for run in stage_runs)
    pair_ratios = [r / lo for r, lo in zip(remote, local_total, strict=True)]
    ratio = remote_s / local_s
    median = {name: statistics.median(values) for name, values in reference.items()}
    prepared_ratio = median["prepared"] / median["unprepared"]
    saved = 1 - median["prepared_stages"] / median["unprepared_stages"]
    write_section(
        OUT,
        "pipeline",
        f"""# Pipeline performance: distributed overhead and gateway capacity

Command: `{command}` ({date.today()}, {platform.machine()}, {os.cpu_count()} cores,
shared and noisy: compare the ratios, not the seconds). Models as in `make demo`: CREPE
tiny (real weights) for both recordings, the random-weight Whisper stand-in, the jury's
fallback, and (for `mix` references only) the random-weight tiny Demucs stand-in. This
process runs on the allocator and the OpenMP wait policy the model stages run on
(`keep_freed_memory`, `OMP_WAIT_POLICY={os.environ.get("OMP_WAIT_POLICY")}`), as their
services do.

## Distributed overhead ({args.runs} alternating pairs, medians)

Input: `vocadito_1.wav` (33 s) against itself, isolated vocals (no separation), lyrics
given; in the stack each job's reference is a fresh copy (one sample nudged), so that no
cached contour spares the stack work the in-process path does.

The in-process path does the job's work the way the stack does it, without the
distribution: the settings the stages' services read from the same environment
(`PitchSettings`, `AsrSettings`, `ScorerSettings`, `JurySettings`), the models their own
loaders load (`load_pinned_crepe`, `load_pinned_whisper`), and the functions their handlers
call: both recordings decoded to 16 kHz mono; then, in two worker threads at once (as
the pitch and asr services run side by side on the same cores), `extract_pitch` on the
performance and then the reference, and `transcribe` on the performance with the hints
the asr handler derives from the lyrics (the prompt cut to `asr_prompt_max_chars`, the
lyrics' vocabulary as hotwords via `lyrics_vocabulary`, the lyrics as `expected_text`);
then `analyse_performance` and `convene_jury`.

| path | runs (s) | median (s) |
|---|---|---|
| the same work in one process, pitch and asr side by side | {runs(local_total)} | {local_s:.2f} |
| the stack: REST, NATS, S3, PostgreSQL, six processes, SSE | {runs(remote)} | {remote_s:.2f} |
| sum of the stack's own stage times (provenance) | {runs(stage_sums)} | {stages_s:.2f} |

Stack / in-process = **{ratio:.2f}** (pairs: {", ".join(f"{r:.2f}" for r in pair_ratios)};
target ≤ 1.10: {"met" if ratio <= 1.10 else "NOT met"}): what the distribution costs a job
end to end, {remote_s - local_s:+.2f} s on the medians. Where it goes, part by part (medians;
a stage's own `seconds` run from its delivery to its result: download, decoding, the
work, upload, progress; the hops between stages, the gateway's upload and the SSE stream
are in the end-to-end time only):

| part: in process / in the stack | in process (s) | the stack's stage (s) |
|---|---|---|
{parts}

End to end versus the sum of stage times = {remote_s / stages_s:.2f}
({"below it" if remote_s < stages_s else "not below it"}: pitch and asr run in parallel).
What the distribution adds outside the stages (end to end minus the stages' own seconds
along the longest path, separator + the longer of pitch and asr + scorer + jury: the
gateway's upload and records, the hops over NATS, the SSE stream), median of the runs:
**{hops:.2f} s**, {hops / local_s:.0%} of the in-process job.

How to read the ratio: it compares whole jobs, so it counts the distribution's cost
together with whatever difference separate processes make. In process, pitch and asr are
two threads of one interpreter (one GIL, one allocator) on the two cores; in the stack
each has its own process. The model parts here took {pitch_in:.2f} s (pitch) and
{asr_in:.2f} s (asr) in process against {pitch_stack:.2f} s and {asr_stack:.2f} s as
stages (a stage's seconds include its downloads, decoding and uploads); the line above
is the distribution's own cost. On this shared host the ratio also moves from
run to run by more than the target's margin (the pair ratios of this run alone span
{min(pair_ratios):.2f}-{max(pair_ratios):.2f}). Earlier runs of this like-for-like
comparison, all on 2026-12-06: 1.32 (the first, the in-process job always run before the
stack's; pairs 1.15-1.66) and 1.04 (pairs alternating which goes first; 0.76-1.22), both
with other tenants' test suites running on the host, then 0.87 (pairs
0.83-1.06; in process pitch 4.64 s and asr 1.06 s, as stages 3.86 s and 0.77 s).

Earlier runs of this command compared the stack with a baseline that ran pitch (twice)
and then asr one after the other, with another prompt for asr (the whole lyrics, no
hotwords, no `expected_text`): 1.06 (2026-11-21, glibc's default allocator and OpenMP's
spinning waits in every process), 1.11 (2026-11-22, this process on the stages'
allocator, the stages' OpenMP threads still spinning: pitch and asr, side by side on 2
cores, took the cores from each other's work; the pitch stage alone went from 4.4-4.9 s
to 3.3-3.6 s per job once its threads slept, `voicejury_runtime.threads`), then 0.92
(2026-11-22), 0.87, 0.90 and 0.77 (2026-12-06). Against that baseline the stack gained
the overlap of pitch and asr on the two cores, so those ratios understated the
distribution's cost and are not comparable with this one.

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
