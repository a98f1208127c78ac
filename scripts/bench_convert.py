#!/usr/bin/env python3
"""Convert benchmark: builds a 70M-shaped and a 410M-shaped random GPT-NeoX checkpoint (fp16
safetensors, Pythia's layout) and converts each to F16 in a child process, printing wall time,
peak RSS and checkpoint size. Memory should follow the largest tensor, not the checkpoint:
the ratios printed are measured against a baseline child (same imports, no conversion) in the same run.

    .venv/bin/python scripts/bench_convert.py [--keep DIR] [--only 70m]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    "70m": dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=2048),
    "410m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}
VOCAB = 50304  # Pythia's padded embedding rows

CHILD = """
import resource, sys, time
t = time.perf_counter()
from neoxq.convert.converter import convert
import gguf, numpy, safetensors, torch  # the baseline child holds the same libraries
if sys.argv[1] != "-":
    convert(sys.argv[1], "f16", output=sys.argv[2], force=True)
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def build(folder: Path, shape: dict) -> Path:
    import torch
    from safetensors.torch import save_file

    from neoxq.convert.tiny import TinySpec, build_config, train_tokenizer, _rewrite_config

    if (folder / "model.safetensors").is_file():
        return folder
    n_tok = train_tokenizer(folder, __import__("convert.tiny", fromlist=["x"]).stdlib_text(50_000))
    spec = TinySpec(**shape, max_position_embeddings=2048, vocab_pad=VOCAB - n_tok, dtype="float16")
    cfg = build_config(spec, VOCAB)
    cfg.save_pretrained(folder)
    _rewrite_config(folder / "config.json", spec)
    # Random fp16 tensors of the real shapes, straight to disk (no model instantiation).
    from transformers import GPTNeoXForCausalLM

    with torch.device("meta"):
        meta = GPTNeoXForCausalLM(cfg)
    g = torch.Generator().manual_seed(0)
    sd = {n: (torch.randn(p.shape, generator=g) * 0.02).half() for n, p in meta.state_dict().items()}
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def child(src: str, out: str) -> tuple[float, int, float]:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, src, out], capture_output=True, text=True, check=True)
    secs, rss = proc.stdout.split()
    return float(secs), int(rss), time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=Path, help="keep checkpoints here (reused on the next run)")
    ap.add_argument("--only", choices=list(SHAPES))
    a = ap.parse_args()
    root = a.keep or Path(tempfile.mkdtemp(prefix="neoxq-bench-"))
    _, base_rss, _ = child("-", "-")
    print(f"baseline child (imports only): peak RSS {base_rss / 2**20:.0f} MiB")
    rows = []
    for name, shape in SHAPES.items():
        if a.only and name != a.only:
            continue
        folder = build(root / name, shape)
        ckpt_bytes = (folder / "model.safetensors").stat().st_size
        largest = VOCAB * shape["hidden_size"] * 4  # the embedding, as float32 while converting
        secs, rss, wall = child(str(folder), str(root / f"{name}-F16.gguf"))
        extra = rss - base_rss
        row = {"model": name, "checkpoint_MiB": round(ckpt_bytes / 2**20, 1), "convert_s": round(secs, 2),
               "peak_rss_MiB": round(rss / 2**20, 1), "above_baseline_MiB": round(extra / 2**20, 1),
               "largest_tensor_f32_MiB": round(largest / 2**20, 1),
               "above_baseline/checkpoint": round(extra / ckpt_bytes, 3),
               "above_baseline/largest_tensor": round(extra / largest, 2),
               "MB_per_s": round(ckpt_bytes / 1e6 / secs, 1)}
        rows.append(row)
        print(json.dumps(row))
    print(f"\n{'model':<6} {'ckpt MiB':>9} {'sec':>6} {'peak RSS':>9} {'above base':>11} {'/ckpt':>6} {'/largest':>9}")
    for r in rows:
        print(f"{r['model']:<6} {r['checkpoint_MiB']:>9} {r['convert_s']:>6} {r['peak_rss_MiB']:>9} "
              f"{r['above_baseline_MiB']:>11} {r['above_baseline/checkpoint']:>6} {r['above_baseline/largest_tensor']:>9}")


if __name__ == "__main__":
    main()
