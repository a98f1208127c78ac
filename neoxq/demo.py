"""`neoxq demo`: the main job on a model built here, offline, in a few minutes on 2 cores.

A 4-layer, 256-wide GPT-NeoX with its own BPE tokenizer is trained briefly on the Python standard
library's docstrings (text every machine has), then the full report runs on held-out docstrings.
"""

from __future__ import annotations

import sys
from pathlib import Path

from neoxq.core.progress import info, interactive
from .report import ReportOptions, run_report

TRAIN_CHARS, EVAL_CHARS = 400_000, 160_000


def _log(step: int, loss: float) -> None:
    if interactive():
        print(f"\rtraining the demo model: step {step}, loss {loss:.3f}", end="", file=sys.stderr, flush=True)


def run_demo(out: Path | str = "demo-out") -> Path:
    from neoxq.convert.tiny import TinySpec, build_trained, stdlib_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "tiny-neox"
    text = stdlib_text(TRAIN_CHARS + EVAL_CHARS)
    if not ((ckpt / "config.json").is_file() and (ckpt / "model.safetensors").is_file()):
        spec = TinySpec(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024, scale=1.0, vocab_pad=0)
        build_trained(ckpt, spec, text[:TRAIN_CHARS], steps=200, log=_log)
        if interactive():
            print(file=sys.stderr)
    eval_file = out / "stdlib-heldout.txt"
    if not eval_file.is_file() or eval_file.read_text(encoding="utf-8") != text[TRAIN_CHARS:]:
        eval_file.write_text(text[TRAIN_CHARS:], encoding="utf-8")
    info(f"model: {ckpt} (trained here); evaluation text: {eval_file} (held out from training)")
    return run_report(str(ckpt), eval_file, out / "report", ReportOptions(ctx=128))
