"""How a model stage's process gets its memory from the C allocator.

A model call on the CPU allocates and frees large buffers on every layer (HTDemucs: blocks
of tens to hundreds of MB per segment). glibc serves any block above its mmap threshold
(at most 32 MiB) with a fresh `mmap` and returns it with `munmap` when freed, so every
layer of every segment faults its pages in again and the kernel zeroes them: measured on
the separator (`bench/stages.py`), a million and more page faults and 15-25 % of the wall
time per separation, more in a worker thread than in the main one, since a thread's own
arena also trims its heaps.

`keep_freed_memory` makes the process keep what it freed for its next allocation: one
arena (threads share the main heap, whose blocks can be reused), no per-block `mmap`, no
trimming. The process then holds its peak (one separation's working set, which it reaches
again on every job anyway) instead of handing it back between layers. It must run before
the process starts other threads: a thread that already has its own arena keeps it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# <malloc.h> parameter numbers; values are C ints.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_INT_MAX = 2**31 - 1


def keep_freed_memory() -> bool:
    """Sets glibc's allocator to reuse freed memory; False where the C library is not
    glibc (musl, macOS), which is left as it is."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        log.info("not glibc: the C allocator is left as it is")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    applied = all(
        mallopt(param, value) == 1
        for param, value in (
            (_M_ARENA_MAX, 1),  # one heap for every thread, so freed blocks are found again
            (_M_MMAP_MAX, 0),  # large blocks from that heap too, not a mapping each
            (_M_TRIM_THRESHOLD, _INT_MAX),  # and its top kept, not returned after each free
        )
    )
    log.info("allocator keeps freed memory: %s", applied)
    return applied
