"""Progress bars and status lines for people, silent in pipes and with --quiet.

Quiet is one process-wide switch (`set_quiet`), set once by the CLI; library code never threads a
`quiet` argument through its signatures. Bars are rich's (percentage, rate, ETA), drawn on stderr
only when stderr is a terminal.

The ETA is the bar's remaining work at the average rate since the bar started, not rich's rate
over its last 30 seconds: a bar whose steps take minutes (a layer of a large model) would otherwise
show no estimate at all, and one whose steps differ in size (the matmuls of a layer) a jumpy one.
A bar whose steps repeat in a cycle of unequal steps (`cycle`: a layer's matmuls, the MLP's down
projection costing most) is estimated, once a whole cycle has been seen, step by step: each
remaining step at the mean time its place in the cycle took over the later half of the cycles seen.
The cycle's swings are then foreseen; a drift from cycle to cycle (later layers taking longer) is
followed, as the early cycles drop out of the mean; and one slow cycle moves it less than a
last-cycle estimate would.
"""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TaskProgressColumn, TextColumn
from rich.progress import Progress as RichProgress

_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = bool(quiet)


def is_quiet() -> bool:
    return _quiet


def interactive() -> bool:
    """True when a person is watching: stderr is a terminal and quiet is off."""
    return not _quiet and sys.stderr.isatty()


def info(msg: str) -> None:
    """A status line for people: stderr, only on a terminal and when not quiet (pipes get errors only)."""
    if interactive():
        print(msg, file=sys.stderr)


class Progress:
    """One bar: `label ━━━━  42% 17/40 unit  3.1 unit/s  0:00:07  note`; a no-op when not interactive.

    `nbytes` (when given) turns the rate into MB/s, for writers.
    """

    def __init__(self, label: str, total: int, unit: str = "", cycle: int = 0):
        self.label, self.total, self.unit, self.cycle = label, total, unit, cycle
        self.done, self._start = 0, time.monotonic()
        self._stamps: list[float] = []  # the clock at each step since the start (a cycled bar's)
        self._bar = None
        if not interactive():
            return

        self._bytes = 0
        self._bar = RichProgress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=24),
            TaskProgressColumn(),
            MofNCompleteColumn(),
            TextColumn(unit),
            TextColumn("{task.fields[rate]}"),
            TextColumn("ETA {task.fields[eta]}"),
            TextColumn("{task.fields[note]}"),
            console=Console(stderr=True),
            transient=False,
        )
        self._bar.start()
        self._task = self._bar.add_task(label, total=total, rate="", note="", eta="-:--:--")

    def elapsed(self) -> float:
        return time.monotonic() - self._start

    def restart_clock(self) -> None:
        """Count the rate from now: the work before it (a resumed run replaying what it had
        finished) is not a step of this bar and would make the ETA too long."""
        self._start = time.monotonic()
        self._stamps = []

    def eta(self) -> float | None:
        """Seconds left; None before the first step (module docstring)."""
        if self.done <= 0:
            return None
        return eta_seconds(self._start, self._stamps, self.done, self.total, self.cycle)

    def update(self, n: int = 1, nbytes: int = 0, note: str = "") -> None:
        self.done += n
        if self.cycle:
            self._stamps += [time.monotonic()] * n
        if self._bar is None:
            return
        self._bytes += nbytes
        elapsed = max(self.elapsed(), 1e-9)
        rate = f"{self._bytes / elapsed / 1e6:.1f} MB/s" if self._bytes else f"{self.done / elapsed:.1f} {self.unit}/s"
        self._bar.update(self._task, advance=n, rate=rate, note=note, eta=_clock(self.eta()))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def eta_seconds(start: float, stamps: list[float], done: int, total: int, cycle: int = 0) -> float:
    """Seconds left after `done` of `total` steps: with a `cycle` and a whole one among the steps'
    clock readings `stamps` (one per step since `start`), each step left at the mean time its place
    in the cycle took over the later half of the cycles seen; else the average rate since `start`."""
    left = max(total - done, 0)
    if cycle and len(stamps) >= cycle:
        took = [b - a for a, b in zip([start, *stamps[:-1]], stamps)]
        keep = max(1, (len(took) // cycle + 1) // 2)  # the later half of the cycles seen
        n = len(took)
        # the step after the last one seen has the place of the step `cycle` before it
        place = [took[n - cycle + j :: -cycle][:keep] for j in range(cycle)]
        per = [sum(p) / len(p) for p in place]
        return left // cycle * sum(per) + sum(per[: left % cycle])
    now = stamps[-1] if stamps else time.monotonic()
    return left * (now - start) / done if done else 0.0


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-:--:--"
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
