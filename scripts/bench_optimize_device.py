#!/usr/bin/env python3
"""`--optimize` on another device: how far its file may be from the CPU path's, on the 31M benchmark
model (4 × 256, 50k vocabulary, trained here), Q4_K_M, one calibration pass shared by every run:

  cpu        the CPU path (numpy and LAPACK): the baseline
  torch-cpu  the rounding's dense algebra sent to torch (neoxq.convert.gptq_torch), on the CPU: the very
             code `--device cuda` runs on a GPU
  nudged     the CPU path with every re-solved bias moved by one float32 ulp: how much the method's
             levels follow float rounding of their inputs (the bound on what any other device can give)
  cuda       `--device cuda`, when torch sees a GPU

For each: the share of levels equal to the baseline's and the share more than one step off, the
paired KL-divergence ratio to the baseline on held-out text (95 % interval), and the wall time.

    .venv/bin/python scripts/bench_optimize_device.py [--windows 8] [--json out.json]
    .venv/bin/python scripts/bench_optimize_device.py --markdown out.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from neoxq.core.machine import init_process  # noqa: E402

init_process()
import neoxq.runtime  # noqa: E402, F401  (llama.cpp's libraries before numpy and torch)

import benchlib  # noqa: E402
import numpy as np  # noqa: E402

CTX = 512
QTYPE = "Q4_K_M"


def _nudged_biases():
    """gptq.corrected_bias with its result moved one float32 ulp up, for the block."""
    from unittest import mock

    from neoxq.core import gptq

    orig = gptq.corrected_bias
    return mock.patch.object(
        gptq, "corrected_bias", lambda *a, **k: np.nextafter(orig(*a, **k).astype(np.float32), np.float32(np.inf)).astype(np.float64)
    )


def _torch_rounding():
    """accelerator.rounding_device answering `cpu` for the block: the rounding goes to
    neoxq.convert.gptq_torch."""
    from unittest import mock

    from neoxq import accelerator

    return mock.patch.object(accelerator, "rounding_device", lambda device: "cpu")


def variants() -> dict:
    """name → (the device option, the context the run happens in)."""
    import contextlib

    import torch

    out = {"cpu": ("cpu", contextlib.nullcontext), "torch-cpu": ("cpu", _torch_rounding), "nudged": ("cpu", _nudged_biases)}
    if torch.cuda.is_available():
        out["cuda"] = ("cuda", contextlib.nullcontext)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=8, help="calibration windows of 512")
    benchlib.add_record_args(ap)
    a = ap.parse_args()
    if benchlib.printed_earlier(a, markdown):
        return
    from neoxq.core.machine import environment
    from neoxq.core.stats import compare
    from neoxq.optimize import OptimizeOptions, quantize_optimized
    from neoxq.runtime.model import NeoxModel, RuntimeOptions
    from neoxq.runtime.score import GGUFReference, kld

    record = benchlib.run_record(sys.argv)
    ckpt = benchlib.trained_50k()
    work = benchlib.cache_dir() / "optimize-device"
    work.mkdir(parents=True, exist_ok=True)
    f16 = benchlib.convert_f16(ckpt, work)
    body = benchlib.eval_text().read_text(encoding="utf-8")
    n = a.windows * CTX * 4 + 4000
    calib, scored = body[:n], body[n : n + 120_000]
    scores, lv = {}, {}
    with tempfile.TemporaryDirectory(prefix="neoxq-device-") as cache, environment({"NEOXQ_CACHE": cache}):
        for name, (device, context) in variants().items():
            out = work / f"{QTYPE}-opt-{name}.gguf"
            opts = OptimizeOptions(calib, reference=str(ckpt), ctx=CTX, device=device)
            t0 = time.perf_counter()
            with context():
                quantize_optimized(f16, QTYPE, opts, output=out, force=True)
            wall = time.perf_counter() - t0
            with NeoxModel(out, RuntimeOptions(n_ctx=CTX, n_batch=CTX)) as m:
                scores[name] = kld(m, GGUFReference(f16), scored, CTX, cache_dir=work / "scores")
            lv[name] = benchlib.file_levels(out)
            base = lv["cpu"]
            row = {
                "variant": name,
                "device": device,
                "wall_s": wall,
                "kld_mean": scores[name].kld_mean,
                "levels_equal": float((lv[name] == base).mean()),
                "levels_off_by_more_than_one": float((np.abs(lv[name] - base) > 1).mean()),
                "kld_vs_cpu": compare(scores[name].tokens, scores["cpu"].tokens)["kld"] if name != "cpu" else None,
            }
            record["rows"].append(row)
            print(_line(row), flush=True)
    record["windows"], record["type"] = a.windows, QTYPE
    if a.json:
        benchlib.write_record(a.json, record)


def _line(r: dict) -> str:
    return (
        f"{r['variant']:9s} levels equal {r['levels_equal']:.4f} (off by >1: {r['levels_off_by_more_than_one']:.4f}), "
        f"KLD {r['kld_mean']:.5f}, vs cpu {benchlib.ratio_cell(r['kld_vs_cpu'])}, {r['wall_s']:.0f} s"
    )


def markdown(data: dict) -> str:
    lines = [
        f"| variant ({data['type']}, {data['windows']} windows of {CTX}) | levels equal to the CPU path's | more than one step off | "
        "mean KLD | KLD / CPU path's (95 % interval) | s |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for r in data["rows"]:
        lines.append(
            f"| {r['variant']} | {100 * r['levels_equal']:.2f} % | {100 * r['levels_off_by_more_than_one']:.2f} % | {r['kld_mean']:.5f} | "
            f"{benchlib.ratio_cell(r['kld_vs_cpu'])} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
