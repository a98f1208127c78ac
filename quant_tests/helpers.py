"""Helpers shared by the test modules (one home; test modules never import each other)."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from neoxq.core.machine import environment

REPO = Path(__file__).resolve().parent.parent


def hf_logits(folder: Path, ids: list[int]) -> np.ndarray:
    """The independent reference: transformers' GPTNeoXForCausalLM in fp32 on the same weights."""
    import torch

    from neoxq.convert.reference import load_reference

    model = load_reference(folder)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def kl_stats(ref_logits: np.ndarray, logits: np.ndarray) -> tuple[float, float]:
    """(mean KL(ref || test), top-1 agreement) over positions."""

    def log_softmax(x):
        x = x.astype(np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(ref_logits), log_softmax(logits)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    return float(kl.mean()), float((ref_logits.argmax(-1) == logits.argmax(-1)).mean())


def run_cli(*args, env=None, cwd=None, stdin=None, timeout=600, separate=False) -> subprocess.CompletedProcess:
    """`neoxq ARGS` as a user runs it, its exit code and output. In this process, through the CLI's
    own entry (`neoxq.cli.app._run`, which turns errors into exit codes), unless the call needs a
    process of its own: an environment other than neoxq's own variables (huggingface_hub reads its
    variables at import; neoxq reads NEOXQ_* only when it uses them, so those are set here for the
    call), a working folder, standard input, --debug's traceback, or `separate` (signals, exit
    behaviour, a timeout, Ray). A process costs the interpreter's start and every import again,
    seconds with torch."""
    argv = [str(a) for a in args]
    own_env = all(k.startswith("NEOXQ_") for k in env or {})
    if not own_env or cwd or stdin is not None or separate or "--debug" in argv:
        full_env = {**os.environ, **(env or {})}
        return subprocess.run(
            [sys.executable, "-m", "neoxq", *argv], capture_output=True, text=True, env=full_env, cwd=cwd, input=stdin, timeout=timeout
        )
    with environment(env or {}):
        return _in_process(argv)


def _in_process(argv: list[str]) -> subprocess.CompletedProcess:
    """The CLI run in this process with its output captured; the process-wide state a command can
    change (the quiet flag, --debug) put back afterwards."""
    import importlib

    from neoxq.core import progress

    cli = importlib.import_module("neoxq.cli.app")  # the module (neoxq.cli.app is also the Typer object's name)

    out, err = io.StringIO(), io.StringIO()
    saved = (sys.argv, progress.is_quiet(), dict(cli._flags))
    sys.argv = ["neoxq", *argv]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = cli._run()
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    finally:
        sys.argv = saved[0]
        progress.set_quiet(saved[1])
        cli._flags.update(saved[2])
    return subprocess.CompletedProcess(["neoxq", *argv], rc, out.getvalue(), err.getvalue())


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 1, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n.lower() in lines[0].lower(), lines[0]


def no_gguf_left(folder: Path) -> bool:
    return not list(folder.glob("*.gguf")) and not list(folder.glob(".*.partial"))


def correlated_layer(seed: int, tokens: int, cols: int, rows: int, mix: float) -> tuple[np.ndarray, np.ndarray]:
    """(H, W): the second moments of inputs whose columns are correlated (`mix` of a random map
    added to the identity) and small random weights [rows, cols]: a layer GPTQ has work to do on."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, cols)) @ (np.eye(cols) + mix * rng.standard_normal((cols, cols)))
    return x.T @ x / len(x), (0.05 * rng.standard_normal((rows, cols))).astype(np.float32)
