"""`neoxq ARGS` in a process of its own per call, forked from one server that imported the CLI
once: each call still gets a fresh process (its own exit code, signals, crashes and hangs, stdin
closed, stdout and stderr its own), without the interpreter's start and the imports every time.

The server is a plain `python cli_forks.py` child, set up as `python -m neoxq` sets itself up
(neoxq.core.machine.init_process before llama.cpp loads) and never computing anything itself, so a
forked call starts as a new process would: no thread pools, no loaded model, no state of another
call. The protocol is one JSON line per call each way on the server's stdin and stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


class CliForks:
    """The client: `run(argv, timeout)` → subprocess.CompletedProcess, as subprocess.run gives for
    `python -m neoxq ARGV` (returncode -N for a signal; a call over `timeout` is killed and raises
    subprocess.TimeoutExpired)."""

    def __init__(self):
        self._server = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve())], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )

    def run(self, argv, timeout: float = 60) -> subprocess.CompletedProcess:
        args = [str(a) for a in argv]
        self._server.stdin.write(json.dumps({"argv": args, "timeout": timeout}) + "\n")
        self._server.stdin.flush()
        line = self._server.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork server ended (exit {self._server.wait()})")
        answer = json.loads(line)
        if answer["timed_out"]:
            raise subprocess.TimeoutExpired(["neoxq", *args], timeout)
        return subprocess.CompletedProcess(["neoxq", *args], answer["rc"], answer["stdout"], answer["stderr"])

    def close(self) -> None:
        self._server.stdin.close()
        self._server.wait(timeout=60)


def _child(argv: list[str], out: int, err: int) -> None:
    """In the forked process: `python -m neoxq ARGV` with stdin empty and stdout/stderr on `out`/`err`;
    never returns."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(err, 2)
    sys.argv = ["neoxq", *argv]
    code = 1
    try:
        from neoxq.cli import main

        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except BaseException:  # as the interpreter would: the traceback on stderr, exit 1
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _wait(pid: int, timeout: float) -> tuple[int | None, bool]:
    """(return code as subprocess gives it, timed out) for a forked child, killed past `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), False
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            return None, True
        time.sleep(0.005)


def serve() -> None:
    """Answer one JSON line per call read from stdin, until it closes."""
    from neoxq.core.machine import init_process

    init_process()  # what `python -m neoxq` does first, before llama.cpp loads
    import neoxq.cli.app  # noqa: F401  the CLI and what its import loads, once
    import neoxq.runtime  # noqa: F401  llama.cpp's libraries

    requests, answers = sys.stdin, os.fdopen(os.dup(1), "w")
    for line in requests:
        call = json.loads(line)
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            pid = os.fork()
            if pid == 0:
                _child(call["argv"], out.fileno(), err.fileno())
            rc, timed_out = _wait(pid, call["timeout"])
            texts = []
            for f in (out, err):
                f.seek(0)
                texts.append(f.read().decode("utf-8", "replace"))
        answers.write(json.dumps({"rc": rc, "timed_out": timed_out, "stdout": texts[0], "stderr": texts[1]}) + "\n")
        answers.flush()


if __name__ == "__main__":
    serve()
