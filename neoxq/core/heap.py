"""Memory the C heap holds free, given back to the system at the points where a long job has let
its large temporaries go.

glibc's malloc serves a request below its mmap threshold from its heaps and keeps what is freed
there for reuse, and it raises that threshold (up to 32 MiB on 64-bit machines) each time a larger
mapped block is freed. A long run that allocates and frees many tensors of a few MiB (--optimize's
per-window activations, row chunks and per-head matrices) therefore ends up with them in the heaps,
where freed blocks that no later request fits stay resident: RSS above what is live, growing with
the run, which neoxq.preflight's plan cannot count. malloc_trim gives every whole free page in the
heaps back. A fixed threshold (MALLOC_MMAP_THRESHOLD_) would keep such blocks out of the heaps
altogether, but each new mapping is then faulted in and zeroed page by page, on every temporary of
that size: a price in --optimize's time (docs/benchmarks.md, "The heap") that a user who needs a
memory budget to hold can choose to pay; the trim here is paid once per layer."""

from __future__ import annotations

import ctypes
import os


def is_glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (ValueError, OSError, AttributeError):  # no such name on this platform
        return False


def give_back_free_memory() -> None:
    """The heaps' free pages returned to the system (glibc's malloc_trim); nothing elsewhere."""
    if is_glibc():
        ctypes.CDLL(None).malloc_trim(0)
