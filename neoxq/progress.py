"""Progress lines on a terminal; silent in pipes and with --quiet."""

from __future__ import annotations

import sys
import time


class Progress:
    """A one-line counter redrawn with \\r: `label: done/total unit (rate)`."""

    def __init__(self, label: str, total: int, unit: str = "", quiet: bool = False, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = not quiet and self.stream.isatty()
        self.label, self.total, self.unit = label, total, unit
        self.done = 0
        self.bytes = 0
        self.start = time.perf_counter()

    def update(self, n: int = 1, nbytes: int = 0, note: str = "") -> None:
        self.done += n
        self.bytes += nbytes
        if not self.enabled:
            return
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = f" {self.bytes / elapsed / 1e6:.1f} MB/s" if self.bytes else f" {self.done / elapsed:.1f} {self.unit}/s"
        self.stream.write(f"\r{self.label}: {self.done}/{self.total} {self.unit}{rate} {note}".ljust(79)[:160])
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def info(msg: str, quiet: bool = False) -> None:
    """A status line for people: stderr, only on a terminal and when not quiet (pipes get errors only)."""
    if not quiet and sys.stderr.isatty():
        print(msg, file=sys.stderr)
