"""`neoxq demo`: the main job on a model built here, offline, in a few minutes on 2 cores.

A 4-layer, 256-wide GPT-NeoX with its own BPE tokenizer is trained briefly on the Python standard
library's docstrings (text every machine has), then the full report runs on held-out docstrings.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Iterator

from neoxq.convert.hubcache import write_snapshot
from neoxq.convert.tiny import TinySpec, build_trained, build_training_run, stdlib_text
from neoxq.core.machine import environment
from neoxq.core.progress import info, interactive

from .report import ReportOptions, run_report
from .sweep import SweepOptions, run_sweep

TRAIN_CHARS, EVAL_CHARS = 400_000, 160_000


def _log(step: int, loss: float) -> None:
    if interactive():
        print(f"\rtraining the demo model: step {step}, loss {loss:.3f}", end="", file=sys.stderr, flush=True)


def demo_spec():
    return TinySpec(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024, scale=1.0, vocab_pad=0)


def build_demo_model(ckpt: Path) -> tuple[Path, str]:
    """The demo checkpoint (trained here once, reused) and the held-out text after its training text."""
    text = stdlib_text(TRAIN_CHARS + EVAL_CHARS)
    if not ((ckpt / "config.json").is_file() and (ckpt / "model.safetensors").is_file()):
        build_trained(ckpt, demo_spec(), text[:TRAIN_CHARS], steps=200, log=_log)
        if interactive():
            print(file=sys.stderr)
    return ckpt, text[TRAIN_CHARS:]


def run_demo(out: Path | str = "demo-out") -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt, heldout = build_demo_model(out / "tiny-neox")
    text = heldout  # evaluation text: never seen in training
    eval_file = out / "stdlib-heldout.txt"
    if not eval_file.is_file() or eval_file.read_text(encoding="utf-8") != text:
        eval_file.write_text(text, encoding="utf-8")
    info(f"model: {ckpt} (trained here); evaluation text: {eval_file} (held out from training)")
    return run_report(str(ckpt), eval_file, out / "report", ReportOptions(ctx=128, optimize=True))


DEMO_REPO = "neoxq-demo/tiny-neox"
SWEEP_STEPS = [0, 10, 25, 50, 100, 200]


@contextlib.contextmanager
def local_hub_cache(cache: Path) -> Iterator[None]:
    """huggingface_hub pointed at `cache`, offline, for the block: the environment (which spawned
    sweep workers read) and its constants (which it reads at call time); both put back afterwards,
    so a test or a library caller is left as it was."""
    from huggingface_hub import constants

    consts = {k: getattr(constants, k) for k in ("HF_HUB_OFFLINE", "HF_HUB_CACHE")}
    with environment({"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}):
        constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE = True, str(cache)
        try:
            yield
        finally:
            for k, v in consts.items():
                setattr(constants, k, v)


def build_demo_hub(out: Path) -> Path:
    """Train the demo model, saving checkpoints along the way as hub branches step0 … step200 (and
    `main`, byte-identical to step200, as on the hub) in a local cache; return the cache folder."""
    cache = out / "hub-cache"
    if (cache / f"models--{DEMO_REPO.replace('/', '--')}" / "refs" / "main").is_file():
        return cache
    saved = build_training_run(out / "training", demo_spec(), stdlib_text(TRAIN_CHARS), SWEEP_STEPS, ctx=128, batch=16, log=_log)
    for step, folder in saved.items():
        commit = write_snapshot(cache, DEMO_REPO, f"step{step}", folder)
    write_snapshot(cache, DEMO_REPO, "main", saved[max(saved)], commit=commit)
    return cache


def run_demo_sweep(out: Path | str = "demo-out") -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with local_hub_cache(out / "hub-cache"):
        build_demo_hub(out)
        if interactive():
            print(file=sys.stderr)
        eval_file = out / "stdlib-heldout-sweep.txt"
        eval_file.write_text(stdlib_text(TRAIN_CHARS + 40_000)[TRAIN_CHARS:], encoding="utf-8")
        info(f"sweeping {DEMO_REPO} (local cache {out / 'hub-cache'}) on {eval_file}")
        opts = SweepOptions(types="Q8_0,Q4_K_M,Q2_K", ctx=128, imatrix=None)
        return run_sweep(DEMO_REPO, f"step0..step{max(SWEEP_STEPS)},main", eval_file, out / "sweep", opts)
