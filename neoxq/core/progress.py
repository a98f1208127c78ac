"""Progress bars and status lines for people, silent in pipes and with --quiet.

Quiet is one process-wide switch (`set_quiet`), set once by the CLI; library code never threads a
`quiet` argument through its signatures. Bars are rich's (percentage, rate, ETA), drawn on stderr
only when stderr is a terminal.
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TaskProgressColumn, TextColumn, TimeRemainingColumn
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

    def __init__(self, label: str, total: int, unit: str = ""):
        self.total, self.unit = total, unit
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
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[note]}"),
            console=Console(stderr=True),
            transient=False,
        )
        self._bar.start()
        self._task = self._bar.add_task(label, total=total, rate="", note="")

    def update(self, n: int = 1, nbytes: int = 0, note: str = "") -> None:
        if self._bar is None:
            return
        self._bytes += nbytes
        task = self._bar.tasks[0]
        elapsed = max(task.elapsed or 0.0, 1e-9)
        done = task.completed + n
        rate = f"{self._bytes / elapsed / 1e6:.1f} MB/s" if self._bytes else f"{done / elapsed:.1f} {self.unit}/s"
        self._bar.update(self._task, advance=n, rate=rate, note=note)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
