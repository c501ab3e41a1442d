"""The model stages' allocator setting, in a fresh process (it changes the whole process)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Allocates, touches and frees 256 MiB three times in a worker thread (where a stage runs
# its model) and reports the page faults of the last two rounds.
PROBE = """
import ctypes, json, resource, sys, threading
from voicejury_runtime.memory import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 256 << 20
faults = []
def work():
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=work)
thread.start()
thread.join()
print(json.dumps({"applied": applied, "faults": faults[1:]}))
"""


def probe(mode: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    )
    result: dict[str, object] = json.loads(out.stdout)
    return result


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_kept_memory_is_reused_without_faulting_its_pages_in_again() -> None:
    pages = (256 << 20) // 4096
    default = probe("default")
    kept = probe("keep")
    assert kept["applied"] is True
    # glibc's default maps a block this large afresh each time: every page faults again.
    assert all(f > pages // 2 for f in default["faults"]), default  # type: ignore[attr-defined]
    # Kept: the freed block is found again, already resident.
    assert all(f < pages // 50 for f in kept["faults"]), kept  # type: ignore[attr-defined]


def test_it_is_on_by_default_in_the_three_model_stages_only() -> None:
    from voicejury_asr.settings import AsrSettings
    from voicejury_pitch.settings import PitchSettings
    from voicejury_runtime.settings import StageSettings
    from voicejury_separator.settings import SeparatorSettings

    assert all(s().keep_freed_memory for s in (SeparatorSettings, PitchSettings, AsrSettings))
    assert not StageSettings().keep_freed_memory


def test_releasing_accelerator_memory_never_imports_torch() -> None:
    """The runtime gives cached GPU memory back after every delivery, in every stage: the
    scorer and the jury, which never use torch, must not pay its import for it."""
    probe = (
        "import sys\n"
        "from voicejury_runtime.models import release_accelerator_memory\n"
        "release_accelerator_memory()\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
