"""How a model stage's compute threads wait for work.

torch and CTranslate2 run their parallel layers on OpenMP (libgomp) threads, which by
default spin for a while after each parallel region before sleeping, to start the next
one sooner. In a process that also runs an event loop, progress and heartbeats, and on
cores it shares (pitch and asr run side by side; a pod's CPU quota counts spinning as
use), those spinning threads take the cores from the threads with work to do: measured
on the local stack (2 cores, pitch beside asr), a job's pitch stage took 4.4-4.9 s with
spinning and 3.3-3.6 s without (`docs/pipeline-performance.md`).
"""

from __future__ import annotations

import os

PASSIVE = "PASSIVE"


def prefer_passive_waits() -> str:
    """Makes OpenMP threads sleep as soon as they run out of work, unless the deployment
    set `OMP_WAIT_POLICY` itself. libgomp reads it once, when it loads: call this before
    torch or CTranslate2 are imported (first thing in a stage's `__main__`). Returns the
    policy in force."""
    return os.environ.setdefault("OMP_WAIT_POLICY", PASSIVE)
