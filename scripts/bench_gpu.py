#!/usr/bin/env python
"""llama.cpp's CUDA backend against its CPU backend, in one run, on the same files and tokens: prompt
and generation speed (ratios GPU/CPU), whether the numbers agree (mean KLD of a Q4_K_M file
against its F16 file scored on each backend, and their paired per-token difference), and the
server's batching engine (runtime/batch.py, as `neoxq serve --parallel 8` runs it, without HTTP):
the aggregate tokens per second of 1 and of 8 requests at once on each backend.

With --optimize, instead: `quantize --optimize --device cuda` (torch's calibration passes and GPTQ
on the GPU, neoxq.convert.gptq_torch) on cuts of Pythia-1.4B's and -6.9B's widths, each with an empty
cache: wall time, seconds per layer and their extrapolation to the whole depth, the GPU's peak
memory, and on the 1.4B cut the same run with `--device cpu`: the time ratio and the share of
levels both give alike. Needs a CUDA build of torch, not of llama.cpp.

Needs llama-cpp-python built with CUDA (`make venv CUDA=1`); without GPU offload it says so and
exits 2. The model is a Pythia-shaped checkpoint with random weights (benchlib, cached), so nothing
is downloaded.

    .venv/bin/python scripts/bench_gpu.py [--shape 410m] [--windows 8] [--ctx 512] [--json OUT]
    .venv/bin/python scripts/bench_gpu.py --optimize [--windows 8] [--ctx 512] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from neoxq.core.machine import init_process  # noqa: E402

init_process()
import neoxq.runtime  # noqa: E402, F401  (llama.cpp's libraries before numpy and torch: neoxq/runtime/__init__.py)

import benchlib  # noqa: E402
import numpy as np  # noqa: E402


def batched_rate(path: Path, layers: int, clients: int, tokens: int = 128) -> float:
    """Aggregate tokens per second of `clients` requests of `tokens` tokens each, submitted at once
    to the server's batching engine on 8 sequences."""
    import threading
    import time

    from neoxq.runtime.batch import Batcher, Job
    from neoxq.runtime.generate import SamplingOptions
    from neoxq.runtime.model import RuntimeOptions

    b = Batcher(path, RuntimeOptions(n_ctx=512, n_seq=8, n_gpu_layers=layers, repack=False), capacity=64)
    ids = b.model.prompt_ids("The history of the city begins")
    eos = {b.model.llm.token_eos(): -100.0}
    try:
        for n in (2, clients):  # a warm-up round, then the measured one
            done = threading.Semaphore(0)
            t0, before = time.perf_counter(), b.generated
            for i in range(n):
                opts = SamplingOptions(max_tokens=tokens, temperature=0.8, seed=i + 1)
                b.submit(Job(ids, opts, lambda x: x is None and done.release(), logit_bias=eos))
            for _ in range(n):
                done.acquire()
        return (b.generated - before) / (time.perf_counter() - t0)
    finally:
        b.close()


# (label, the cut's shape (hidden, layers, heads), the whole model's layers, compared with the CPU)
OPTIMIZE_CUTS = (("1.4b", (2048, 2, 16), 24, True), ("6.9b", (4096, 2, 32), 32, False))


def optimize_runs(work: Path, windows: int, ctx: int) -> list[dict]:
    """--optimize on each cut with an empty cache, on the GPU (and on the CPU where asked)."""
    import time

    import torch

    from neoxq.core.machine import environment
    from neoxq.optimize import OptimizeOptions, quantize_optimized

    calib = benchlib.eval_text().read_text(encoding="utf-8")[: windows * ctx * 4 + 4000]
    rows = []
    for label, shape, depth, compare in OPTIMIZE_CUTS:
        folder = benchlib.random_checkpoint(shape)
        f16 = benchlib.convert_f16(folder, work)
        row = {"shape": label, "layers": shape[1], "whole_layers": depth, "windows": windows, "ctx": ctx}
        for device in ("cuda", "cpu") if compare else ("cuda",):
            torch.cuda.reset_peak_memory_stats()
            out = work / f"{f16.stem}-Q4_K_M-opt-{device}.gguf"
            with environment({"NEOXQ_CACHE": str(work / f"opt-cache-{label}-{device}-{time.time_ns()}")}):
                t0 = time.perf_counter()
                opts = OptimizeOptions(calib, reference=str(folder), ctx=ctx, device=device)
                quantize_optimized(f16, "Q4_K_M", opts, output=out, force=True)
                wall = time.perf_counter() - t0
            row[device] = {"wall_s": wall, "per_layer_s": wall / shape[1], "whole_model_h": wall / shape[1] * depth / 3600}
            if device == "cuda":
                row[device]["peak_gpu_MiB"] = torch.cuda.max_memory_allocated() / 2**20
            print(
                f"--optimize {label} cut to {shape[1]} layers on {device}: {wall:.0f} s (~{row[device]['whole_model_h']:.2f} h at {depth})",
                flush=True,
            )
        if compare:
            cpu, gpu = (benchlib.file_levels(work / f"{f16.stem}-Q4_K_M-opt-{d}.gguf") for d in ("cpu", "cuda"))
            row["levels_equal"] = float((cpu == gpu).mean())
            row["levels_off_by_more_than_one"] = float((np.abs(cpu.astype(int) - gpu) > 1).mean())
            row["cpu_over_gpu_time"] = row["cpu"]["wall_s"] / row["cuda"]["wall_s"]
            print(f"  levels equal {row['levels_equal']:.4f}; CPU/GPU time {row['cpu_over_gpu_time']:.1f}x", flush=True)
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="410m", help="a Pythia shape benchlib knows (70m, 160m, 410m, 1b, 1.4b, 2.8b, 6.9b)")
    ap.add_argument("--windows", type=int, default=8, help="scored windows of --ctx tokens")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--optimize", action="store_true", help="time `quantize --optimize --device cuda` instead (needs a CUDA build of torch)")
    a = ap.parse_args()
    if a.optimize:
        import torch

        if not torch.cuda.is_available():
            print(f"torch {torch.__version__} sees no CUDA device; --optimize needs a CUDA build of torch on a GPU", file=sys.stderr)
            return 2
        work = benchlib.cache_dir() / "gpu"
        work.mkdir(parents=True, exist_ok=True)
        rows = optimize_runs(work, a.windows, a.ctx)
        if a.json:
            a.json.write_text(json.dumps({"optimize": rows}, indent=1))
        return 0

    from neoxq.runtime.model import NeoxModel, RuntimeOptions, gpu_offload_supported
    from neoxq.runtime.quantize import quantize
    from neoxq.runtime.score import GGUFReference, kld
    from neoxq.runtime.speed import measure

    if not gpu_offload_supported():
        print("this llama-cpp-python build has no GPU offload; build it with `make venv CUDA=1` on a machine with a GPU", file=sys.stderr)
        return 2
    work = benchlib.cache_dir() / "gpu"
    work.mkdir(parents=True, exist_ok=True)
    f16 = benchlib.convert_f16(benchlib.random_checkpoint(a.shape), work)
    q4 = work / f"{f16.stem.replace('-F16', '')}-Q4_K_M.gguf"
    if not q4.is_file():
        quantize(f16, "Q4_K_M", output=q4)
    ids_path, text = benchlib.eval_windows(f16, benchlib.eval_text(), a.windows, work, a.ctx)
    ids = [int(i) for i in np.load(ids_path)]
    out = {"shape": a.shape, "ctx": a.ctx, "windows": a.windows}
    scores = {}
    for name, layers in (("cpu", 0), ("gpu", -1)):
        opts = RuntimeOptions(n_ctx=a.ctx, n_batch=a.ctx, n_gpu_layers=layers)
        with NeoxModel(q4, opts) as m:
            s = measure(m, ids, a.ctx, 64)
            ref = GGUFReference(f16, opts)
            scores[name] = kld(m, ref, text.read_text(encoding="utf-8"), a.ctx, cache_dir=work / f"cache-{name}")
        out[name] = {"pp_tps": s.pp_tps, "tg_tps": s.tg_tps, "kld_mean": scores[name].kld_mean, "kld_mean_se": scores[name].kld_mean_se}
        out[name]["batched_tps"] = {n: batched_rate(q4, layers, n) for n in (1, 8)}
        print(
            f"{name}: batching engine, 1 request {out[name]['batched_tps'][1]:.0f} tok/s, 8 at once {out[name]['batched_tps'][8]:.0f} tok/s",
            flush=True,
        )
        print(
            f"{name}: prompt {s.pp_tps:9.1f} tok/s, generation {s.tg_tps:7.1f} tok/s, Q4_K_M KLD {scores[name].kld_mean:.6f} "
            f"± {scores[name].kld_mean_se:.6f}",
            flush=True,
        )
    diff = np.asarray(scores["gpu"].tokens.kld) - np.asarray(scores["cpu"].tokens.kld)
    out["ratios"] = {
        "pp": out["gpu"]["pp_tps"] / out["cpu"]["pp_tps"],
        "tg": out["gpu"]["tg_tps"] / out["cpu"]["tg_tps"],
        "kld": out["gpu"]["kld_mean"] / out["cpu"]["kld_mean"],
    }
    out["kld_paired_diff"] = {"mean": float(diff.mean()), "se": float(diff.std(ddof=1) / np.sqrt(len(diff))), "max_abs": float(np.abs(diff).max())}
    r = out["ratios"]
    print(
        f"GPU/CPU: prompt {r['pp']:.1f}x, generation {r['tg']:.1f}x; KLD ratio {r['kld']:.4f} "
        f"(paired difference {out['kld_paired_diff']['mean']:+.2e} ± {out['kld_paired_diff']['se']:.1e} per token)"
    )
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
