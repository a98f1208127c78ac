"""Helpers shared by the test modules (one home; test modules never import each other)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

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


def run_cli(*args, env=None, cwd=None, stdin=None, timeout=600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "neoxq", *map(str, args)], capture_output=True, text=True, env=full_env, cwd=cwd, input=stdin, timeout=timeout
    )


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
