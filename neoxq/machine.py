"""Facts about this machine and llama.cpp's build: thread count, quiet logging, versions."""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
from typing import Iterator


def default_threads() -> int:
    """Every core this process may use (llama.cpp's own default counts all cores of the host)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


@contextlib.contextmanager
def llama_log_captured() -> Iterator[list[str]]:
    """Silence llama.cpp's log for a block; yield the error lines it printed, for our own message."""
    import llama_cpp
    import llama_cpp._logger as lg

    errors: list[str] = []
    last = [0]

    @llama_cpp.llama_log_callback
    def cb(level, text, user_data):
        # ggml.h: ERROR = 4, CONT = 5 (continues the previous line's level).
        if level == 4 or (level == 5 and last[0] == 4):
            errors.append(text.decode("utf-8", errors="replace"))
        if level != 5:
            last[0] = level

    llama_cpp.llama_log_set(cb, ctypes.c_void_p(0))
    try:
        yield errors
    finally:
        llama_cpp.llama_log_set(lg.llama_log_callback, ctypes.c_void_p(0))


def describe() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cores": default_threads(), "python": platform.python_version()}
