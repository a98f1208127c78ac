"""The typer app and `main()`: the one place where errors and signals become exit codes.

- a NeoxqError (a user's mistake) → `error: <one line>`, exit 1 (the traceback with --debug or
  NEOXQ_DEBUG=1);
- Ctrl-C → `interrupted`, exit 130; SIGTERM → `terminated`, exit 143. Both unwind the stack as
  an exception (not KeyboardInterrupt, which click would swallow into a return value), so every
  `finally` runs and temporary files are removed;
- any typer.Exit code reaches the shell.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from neoxq import __version__
from neoxq.core.errors import NeoxqError

from . import build_cmds, cache_cmds, report_cmds, run_cmds

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="GPT-NeoX / Pythia checkpoints → GGUF, run on llama.cpp, and measure what quantization costs.",
)
for module, names in (
    (build_cmds, ("convert", "quantize", "imatrix", "types")),
    (run_cmds, ("run", "tokenize", "perplexity", "kld", "compare", "serve", "info")),
    (report_cmds, ("report", "sweep", "evaluate", "demo", "publish")),
):
    for name in names:
        app.command("eval" if name == "evaluate" else name)(getattr(module, name))
app.add_typer(cache_cmds.app, name="cache")


def _version(value: bool) -> None:
    if value:
        print(f"neoxq {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors (or set NEOXQ_DEBUG=1).")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
):
    _flags["debug"] = debug


class Interrupted(BaseException):
    """Raised by our SIGINT/SIGTERM handlers: a BaseException, so `except Exception` never eats it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum, _frame):
    raise Interrupted(signum)


_flags = {"debug": False}  # set by the root callback for this process; never written into the environment


def _debug() -> bool:
    return _flags["debug"] or os.environ.get("NEOXQ_DEBUG") == "1" or "--debug" in sys.argv[1:2]


def _usage_error_types() -> tuple[type, ...]:
    """typer ships its own copy of click in recent versions; accept either's ClickException."""
    import importlib

    found = []
    for mod in ("typer._click.exceptions", "click.exceptions"):
        try:
            found.append(importlib.import_module(mod).ClickException)
        except ImportError:
            pass
    return tuple(found)


def _load_llama_first() -> None:
    """On a CUDA build, load llama.cpp's libraries before any command imports numpy (see
    neoxq/runtime/__init__.py); a CPU build skips the import, which costs start-up time."""
    from importlib.util import find_spec

    spec = find_spec("llama_cpp")
    if spec and spec.origin and any(Path(spec.origin).parent.glob("lib/libggml-cuda*")):
        import neoxq.runtime  # noqa: F401


def main() -> None:
    from neoxq.core.machine import init_process

    init_process()  # before llama.cpp loads
    _load_llama_first()
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    sys.exit(_run())


def _run() -> int:
    try:
        rv = app(args=sys.argv[1:], prog_name="neoxq", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except Interrupted as exc:
        print("interrupted" if exc.signum == signal.SIGINT else "terminated", file=sys.stderr)
        return 128 + exc.signum
    except typer.Exit as exc:
        return exc.exit_code
    except NeoxqError as exc:
        if _debug():
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # usage errors from click, and the unexpected
        if isinstance(exc, _usage_error_types()):
            print(f"error: {exc.format_message()} (see `neoxq {' '.join(sys.argv[1:2])} --help`)", file=sys.stderr)
            return 1
        if _debug():
            raise
        print(f"error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
