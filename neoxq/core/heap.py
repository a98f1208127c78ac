"""A stated memory budget held against the C heap: freed temporaries leave RSS.

glibc's malloc serves a request below its mmap threshold from its heaps and keeps what is freed
there for reuse, and it raises that threshold (up to 32 MiB on 64-bit machines) each time a larger
mapped block is freed. A long run that allocates and frees many tensors of a few MiB (--optimize's
per-window activations, row chunks and per-head matrices) therefore ends up with them in the heaps,
where freed blocks that no later request fits stay resident: RSS above what is live, growing with
the run, which neoxq.preflight's plan cannot count. A fixed threshold keeps such blocks out of the
heaps: each is mapped when made and unmapped when freed, so RSS follows what is live. The price is
that every such block is faulted in and zeroed page by page, a cost in time that weighs more the
narrower the model (docs/benchmarks.md, "The heap"); it is therefore paid only where a budget is
stated (--max-memory), and malloc_trim, which gives back whole free pages, cannot undo what is
fragmented inside a phase."""

from __future__ import annotations

import ctypes
import os

M_MMAP_THRESHOLD = -3  # mallopt's parameter (malloc.h)
# Blocks of this size and larger are mapped: above the small objects a heap serves well, below
# the few-MiB tensors that fragment it.
BUDGET_MMAP_THRESHOLD = 1 << 20
# the user's own choice of the threshold, which stands: glibc's variable, or its tunable
USER_SETTING = "MALLOC_MMAP_THRESHOLD_"
USER_TUNABLE = "glibc.malloc.mmap_threshold"


def is_glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (ValueError, OSError, AttributeError):  # no such name on this platform
        return False


M_ARENA_MAX = -8  # mallopt's parameter (malloc.h)
# the user's own choice of the number of heaps, which stands
ARENA_USER_SETTING = "MALLOC_ARENA_MAX"
ARENA_USER_TUNABLE = "glibc.malloc.arena_max"


def _user_chose(setting: str, tunable: str) -> bool:
    return setting in os.environ or tunable in os.environ.get("GLIBC_TUNABLES", "")


def user_chose_threshold() -> bool:
    return _user_chose(USER_SETTING, USER_TUNABLE)


def one_arena() -> bool:
    """Every thread's malloc served from glibc's main heap for the rest of the process (threads
    that start later; those with a heap of their own keep it); False, and nothing changed, where
    the C library is not glibc, the user chose the number of heaps, or glibc refuses.

    Why: glibc gives each new thread a heap (arena) of its own, and the heap of a thread that ended
    to the next thread that starts; which one a library's worker thread gets then depends on
    timing. After llama.cpp's quantizer had run its threads in the process, --optimize could write
    one of two files for the same inputs (its bfloat16 quantized stream), with one heap the same
    file every time. The price is the threads' waits for that heap's lock (its cost:
    docs/benchmarks.md, "Reproducible runs"); MALLOC_ARENA_MAX set by the user declines it."""
    if not is_glibc() or _user_chose(ARENA_USER_SETTING, ARENA_USER_TUNABLE):
        return False
    return bool(ctypes.CDLL(None).mallopt(M_ARENA_MAX, 1))


def keep_temporaries_out_of_heaps() -> bool:
    """glibc's mmap threshold fixed at BUDGET_MMAP_THRESHOLD for the rest of the process (which
    also ends its rise); False, and nothing changed, where the C library is not glibc, the user set
    the threshold, or glibc refuses."""
    if not is_glibc() or user_chose_threshold():
        return False
    return bool(ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, BUDGET_MMAP_THRESHOLD))
