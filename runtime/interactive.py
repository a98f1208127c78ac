"""`neoxq run` printing completions: one prompt, or a prompt loop as llama-cli's and `ollama run`'s.

On a terminal the loop reads lines with readline (editing, and history kept between sessions in
the cache folder's `run_history`); Ctrl-C stops the generation under way within one token and
comes back to the prompt (at the prompt it clears the line); Ctrl-D exits. Fed through a pipe
(`-i`), every line is a prompt. A prompt that does not fit the context is one error line and the
loop goes on. Pythia is a plain language model: each line is completed on its own, not a chat.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, Iterator

from neoxq.core.errors import UsageError

from .generate import GenerationStats, SamplingOptions, generate
from .model import NeoxModel

HISTORY_LINES = 1000


def print_completion(
    model: NeoxModel, text: str, opts: SamplingOptions, cancel: threading.Event | None = None, finished: Callable[[], None] | None = None
) -> bool:
    """The prompt and its completion on stdout as they come, the speeds on stderr; False when
    `cancel` stopped it. finished() is called when the last token is in, before the line ends (a
    reader that waits for the line may act at once: a Ctrl-C then is no longer the generation's)."""
    stats = GenerationStats()
    ids = model.prompt_ids(text)  # a prompt that does not fit is refused before anything is printed
    sys.stdout.write(text)
    sys.stdout.flush()
    for piece in generate(model, ids, opts, stats, cancel):
        sys.stdout.write(piece)
        sys.stdout.flush()
    if finished:
        finished()
    sys.stdout.write("\n")
    stopped = cancel is not None and cancel.is_set()
    print(("[stopped] " if stopped else "") + stats.line(), file=sys.stderr)
    return not stopped


def prompt_loop(model: NeoxModel, opts: SamplingOptions, history: Path | None = None) -> None:
    """Complete each line read until end of input (Ctrl-D); see the module's docstring."""
    cancel = threading.Event()
    generating = threading.Event()

    def on_sigint(signum, frame):
        if generating.is_set():
            cancel.set()  # completion_steps checks it before every token
        elif tty or not callable(old):
            raise KeyboardInterrupt  # at a terminal's prompt: clears the line (_lines)
        else:
            old(signum, frame)  # fed by a pipe: Ctrl-C ends the program as everywhere else (exit 130)

    tty = sys.stdin.isatty()
    old = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, on_sigint)
    else:
        old = None
    try:
        with _history(history if tty else None):
            for line in _lines(tty):
                cancel.clear()
                generating.set()
                try:
                    print_completion(model, line, opts, cancel, finished=generating.clear)
                except UsageError as exc:
                    print(f"error: {exc}", file=sys.stderr)
                finally:
                    generating.clear()
    finally:
        if old is not None:
            signal.signal(signal.SIGINT, old)


def _lines(tty: bool) -> Iterator[str]:
    while True:
        if tty:
            try:
                line = input("> ")
            except KeyboardInterrupt:
                print("\n(Ctrl-D exits)", file=sys.stderr)
                continue
            except EOFError:
                print(file=sys.stderr)
                return
        else:
            raw = sys.stdin.buffer.readline()
            if not raw:
                return
            try:
                line = raw.decode("utf-8").rstrip("\n")
            except UnicodeDecodeError:
                print("error: that line is not UTF-8 text; skipped (type or pipe UTF-8)", file=sys.stderr)
                continue
        if line.strip():
            yield line


@contextlib.contextmanager
def _history(path: Path | None):
    """readline's line editing and history, read from and written back to `path`."""
    try:
        import readline
    except ImportError:  # a Python built without it: plain input()
        yield
        return
    if path is not None:
        with contextlib.suppress(OSError):
            readline.read_history_file(path)
    readline.set_history_length(HISTORY_LINES)
    try:
        yield
    finally:
        if path is not None:
            with contextlib.suppress(OSError):
                path.parent.mkdir(parents=True, exist_ok=True)
                readline.write_history_file(path)
