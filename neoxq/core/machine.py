"""Facts about this machine: usable cores, platform, package versions (nothing of llama.cpp's)."""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version

import numpy as np

from . import heap
from .numbers import check_number


def default_threads() -> int:
    """Every core this process may use (llama.cpp's own default counts all cores of the host)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def check_threads(threads: int | None) -> int | None:
    """--threads within the cores this process may use: llama.cpp's threads spin-wait for each
    other, so oversubscribing stalls them."""
    return check_number(threads, "--threads", 1, default_threads(), integer=True)  # the upper bound: the cores this process may use


def describe() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cores": default_threads(),
        "python": platform.python_version(),
    }


def versions() -> dict:
    """Installed versions of what a result depends on, for report provenance."""
    out = {}
    for pkg in ("neoxq", "llama-cpp-python", "gguf", "transformers", "torch", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def available_memory() -> int:
    """Bytes this process can still use: MemAvailable, capped by a cgroup (v2) limit if one is set."""
    avail = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        used = int(open("/sys/fs/cgroup/memory.current").read().strip())
        if limit != "max":
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return max(avail, 0)


GOMP_SPINCOUNT = "30000"  # libgomp's idle spins after each graph (neoxq.runtime's docstring says why)


_process = {"initialised": False}


def init_process() -> None:
    """Process-wide settings neoxq's commands want, made explicitly by the CLI (never at import):
    llama.cpp's OpenMP workers spin less after each graph, unless the user set GOMP_SPINCOUNT (must
    run before llama.cpp's libgomp loads); numpy's large arrays in ordinary pages
    (no_hugepage_advice); and neoxq's llama.cpp log callback, once installed, stays for the whole
    process (neoxq.runtime.capi.captured_errors; without this call it is scoped); every thread's
    malloc from one heap, before llama.cpp and torch start their threads (neoxq.core.heap.one_arena:
    runs are then reproducible)."""
    os.environ.setdefault("GOMP_SPINCOUNT", GOMP_SPINCOUNT)
    no_hugepage_advice()
    heap.one_arena()
    _process["initialised"] = True


def no_hugepage_advice() -> None:
    """Stop numpy from advising the kernel to back its large arrays with huge pages. Where
    transparent huge pages are on for advised memory only, with defrag on fault (Linux's common
    `madvise` setting), each fault of an advised fresh array may compact memory first: --optimize's
    [in, in] buffers, made afresh for every matrix, then spent more time faulting in than being
    computed on (docs/benchmarks.md, "Where the code's constants come from"). Ordinary pages fault
    in at a steady rate. numpy's switch is private, so it is looked up with care."""
    core = getattr(np, "_core", None) or np.core  # numpy 2's name, else 1.x's
    setter = getattr(core.multiarray, "_set_madvise_hugepage", None)
    if setter is not None:
        setter(False)


def process_initialised() -> bool:
    return _process["initialised"]


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """os.environ with `values` set for the block (what child processes started in it inherit),
    and every one of those variables put back as it was afterwards, unset ones unset."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
