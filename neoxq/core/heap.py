"""The C heap's rule for large blocks, set once per process by neoxq.core.machine.init_process.

glibc's malloc serves a request below its mmap threshold from its heaps and keeps what is freed
there for reuse, and it raises that threshold (up to 32 MiB on 64-bit machines) each time a larger
mapped block is freed. A long run that allocates and frees many tensors of a few MiB (--optimize's
per-window activations, row chunks and per-head matrices) therefore ends up with them in the heaps,
where freed blocks that no later request fits stay resident: the process's RSS grows above what is
live, and above what neoxq.preflight plans for a memory budget. A fixed threshold maps every block
of at least MMAP_THRESHOLD on its own and gives it back to the system when it is freed. The price
is the kernel zeroing each new mapping, about one write over the block, which a buffer that size
gets from whatever fills it anyway."""

from __future__ import annotations

import ctypes
import os

MMAP_THRESHOLD = 1 << 20
M_MMAP_THRESHOLD = -3  # mallopt's parameter number (glibc's malloc.h)
# the user's own choice of the threshold, which stands
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_",)
USER_TUNABLE = "glibc.malloc.mmap_threshold"


def is_glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (ValueError, OSError, AttributeError):  # no such name on this platform
        return False


def user_chose_threshold() -> bool:
    return any(k in os.environ for k in USER_SETTINGS) or USER_TUNABLE in os.environ.get("GLIBC_TUNABLES", "")


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """glibc's mmap threshold fixed at `threshold` bytes (which also stops it rising); False, and
    nothing changed, where the C library is not glibc or the user set the threshold."""
    if not is_glibc() or user_chose_threshold():
        return False
    return bool(ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, threshold))
