"""What commands print for people: result lines on stdout only on a terminal, never with --quiet."""

from __future__ import annotations

import sys

from neoxq.core.progress import is_quiet


def result_line(msg: str) -> None:
    if not is_quiet() and sys.stdout.isatty():
        print(msg)
