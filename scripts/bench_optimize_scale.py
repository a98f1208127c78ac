#!/usr/bin/env python3
"""`neoxq quantize --optimize` at scale, on checkpoints of Pythia's shapes with
random fp16 weights and the 50k vocabulary:

  big   Pythia-6.9B's widths (4096 hidden, 16384 MLP, 32 heads, 50k vocabulary) cut to --layers
        layers (default 2: the peak is one layer's, so a 2-layer cut measures the 32-layer peak;
        the time grows by layer): `--optimize --max-memory 8GB` from an empty cache. Peak RSS against
        the budget and the preflight's estimate (neoxq.preflight.optimize_plan), whether the first
        pass streamed, seconds per layer and their extrapolation to 32 layers, and each progress
        bar's ETA against the time it really had left. With --kill, the same command again,
        SIGKILLed inside a random layer and rerun: the layer it resumed from, its time, and whether
        its file is byte-identical to the uninterrupted run's.
  resume the big part's command from an empty cache, SIGKILLed inside a random layer and rerun, its
        file compared byte for byte with --against: the file an uninterrupted run of the same inputs
        wrote (bench_heap.py's memory part keeps its own), for a run too long to make twice.
  probe the same 6.9B-wide cut: one --mix sensitivity probe (one MLP down projection at Q4_K, every
        other matrix F16) as a folder of GGUF splits (neoxq.runtime.probe_files) against the former
        whole probe file written by llama.cpp's quantizer: bytes written, seconds to write and to
        score, and their extrapolation to 32 layers and the ~64 probes of a mix.
  410m  Pythia-410M's shape: `neoxq quantize --optimize` (the F16 file already converted) against a
        plain `neoxq report --types T --imatrix none` from the checkpoint, both on --windows windows
        of 512 (calibration and scored text of the same length): the ratio of their wall times.
  floor the dense arithmetic `--optimize` does at Pythia-410M's shape on --windows windows (the
        moments, each matrix's Cholesky, its target's triangular solves, GPTQ's compensation, the
        passes' matmuls), counted in FLOPs from the shape and timed at this machine's own rates for
        each kind (torch, measured here): a lower bound on --optimize's time with this method, next to
        the 410m part's plain report when both run.

    .venv/bin/python scripts/bench_optimize_scale.py [--parts big,resume,probe,410m,floor] [--layers 2] [--windows 4]
                                                     [--type Q4_K_M] [--budget 8GB] [--kill] [--against F] [--json out.json]
    .venv/bin/python scripts/bench_optimize_scale.py --markdown out.json
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from neoxq.core.machine import init_process  # noqa: E402

init_process()
import benchlib  # noqa: E402

PY = sys.executable
CTX = 512
BIG = (4096, 32, 32)  # Pythia-6.9B: hidden, layers, heads


def texts(work: Path, windows: int) -> tuple[Path, Path]:
    """Calibration and scored text of `windows` windows each (~3 characters per token here, so 4
    per token leaves a margin), not overlapping."""
    body = benchlib.eval_text(400_000).read_text(encoding="utf-8")
    n = windows * CTX * 4 + 4000
    calib, scored = work / f"calib-{windows}.txt", work / f"scored-{windows}.txt"
    calib.write_text(body[:n], encoding="utf-8")
    scored.write_text(body[n : 2 * n], encoding="utf-8")
    return calib, scored


# the library call `neoxq quantize --optimize --max-memory` makes, with the first pass streamed as
# it is at 32 layers (a 2-layer cut's fp32 model would fit the budget and be kept in memory); every
# progress step is logged with the ETA a person watching the bar is shown at that moment
CHILD = r"""
import json, sys, time
from neoxq.core.machine import init_process
init_process()
from neoxq.core import progress
from neoxq.core.sizes import parse_size
from neoxq.core.textfile import read_text
from neoxq.optimize import OptimizeOptions, quantize_optimized
f16, qtype, calib, ref, budget, ctx, out, eta_log = sys.argv[1:9]
log, step = open(eta_log, "a"), progress.Progress.update
def logged(self, n=1, nbytes=0, note=""):
    step(self, n, nbytes, note)
    log.write(json.dumps({"t": time.time(), "label": self.label, "done": self.done, "total": self.total, "eta_s": self.eta()}) + "\n")
    log.flush()
progress.Progress.update = logged
opts = OptimizeOptions(read_text(calib), reference=ref, ctx=int(ctx), max_memory=parse_size(budget, "budget"), first_pass="streamed")
print(json.dumps(quantize_optimized(f16, qtype, opts, output=out, force=True).as_json()))
"""


def eta_truth(eta_log: Path, started: float) -> list[dict]:
    """For each progress bar of the run: the ETA it showed at its first step and at a quarter, half
    and three quarters of its steps, against the time that bar really had left."""
    steps = [json.loads(line) for line in eta_log.read_text().splitlines()]
    rows = []
    for label in dict.fromkeys(s["label"] for s in steps):
        mine = [s for s in steps if s["label"] == label]
        end = mine[-1]["t"]
        for frac in (0.0, 0.25, 0.5, 0.75):
            s = next(x for x in mine if x["done"] >= max(1, frac * x["total"]))
            rows.append({"bar": label, "at_s": s["t"] - started, "done": s["done"], "total": s["total"], "eta_s": s["eta_s"], "left_s": end - s["t"]})
    return rows


def estimate(folder: Path, windows: int, budget: int, first_pass: str = "auto"):
    from neoxq.convert.checkpoint import open_checkpoint
    from neoxq.convert.neox import GPTNeoXArgs
    from neoxq.preflight import optimize_plan

    return optimize_plan(GPTNeoXArgs.from_config(open_checkpoint(str(folder)).config), CTX, windows, budget, first_pass)


def big_command(work: Path, layers: int, windows: int, qtype: str, budget: str, cache: Path) -> tuple[Path, list, dict]:
    """The 6.9B-wide cut's checkpoint, and the child command (less its output and progress log) and
    environment that optimise it with `cache` as NEOXQ_CACHE, emptied first: the one command the
    big and resume parts run, so that their files may be compared byte for byte."""
    folder = benchlib.random_checkpoint((BIG[0], layers, BIG[2]))
    f16 = benchlib.convert_f16(folder, work)
    calib, _ = texts(work, windows)
    shutil.rmtree(cache, ignore_errors=True)
    return folder, [PY, "-c", CHILD, f16, qtype, calib, folder, budget, CTX], {"NEOXQ_CACHE": str(cache)}


def big(work: Path, layers: int, windows: int, qtype: str, budget: str, kill: bool) -> dict:
    """The uninterrupted run (its time, peak and ETAs, from an empty cache); with `kill`, the same
    command again, SIGKILLed inside a random layer, then rerun: it must resume and give the same bytes."""
    from neoxq.core.sizes import parse_size

    full = benchlib.config_for(BIG, 0)
    from neoxq.convert.neox import GPTNeoXArgs
    from neoxq.preflight import optimize_plan

    plan32 = optimize_plan(GPTNeoXArgs.from_config(full), CTX, 32, parse_size(budget, "--budget"))
    print(f"estimate at 32 layers and 32 windows: {plan32.peak / 2**20:.0f} MiB, first pass {'streamed' if plan32.streamed else 'in memory'}")
    cache, out, eta_log = work / f"cache-{layers}", work / f"big-{layers}-{qtype}-opt.gguf", work / f"eta-{layers}.jsonl"
    folder, cmd, env = big_command(work, layers, windows, qtype, budget, cache)
    eta_log.unlink(missing_ok=True)
    started = time.time()
    r = benchlib.run_child([*cmd, out, eta_log], env=env)
    res = json.loads(r["stdout"].strip().splitlines()[-1])
    eta = eta_truth(eta_log, started)
    used = next((e["total"] for e in eta if e["bar"].startswith("calibration")), windows)  # the windows the text gave
    plan = estimate(folder, used, parse_size(budget, "--budget"), "streamed")
    row = {
        "layers": layers,
        "windows": windows,
        "windows_used": used,
        "type": qtype,
        "budget": budget,
        "peak_rss_MiB": r["peak_rss_MiB"],
        "estimate_MiB": plan.peak / 2**20,
        "first_pass_streamed": plan.streamed,
        "wall_s": r["wall_s"],
        "size_bytes": res["size_bytes"],
        "estimate_32_layers_32_windows_MiB": plan32.peak / 2**20,
        "eta": eta,
    }
    row["rounding_steps_s"], row["rounding_eta_shown_s"] = step_times(eta_log, started)  # for the replayed cycle-aware ETA
    row["per_layer_s"] = r["wall_s"] / layers  # an upper bound: the embedding and output matrix are included
    row["extrapolated_32_layers_h"] = row["per_layer_s"] * BIG[1] / 3600
    print(
        f"6.9B-shaped, {layers} layers, {windows} windows of {CTX}, {qtype}, --max-memory {budget}: peak RSS "
        f"{row['peak_rss_MiB']:.0f} MiB (estimate {row['estimate_MiB']:.0f}, first pass {'streamed' if plan.streamed else 'in memory'}), "
        f"{r['wall_s']:.0f} s ({row['per_layer_s']:.0f} s per layer: ~{row['extrapolated_32_layers_h']:.1f} h at 32 layers)"
    )
    if kill:
        print("the uninterrupted run's row:", json.dumps(row), flush=True)  # kept should the second run be stopped
        row["resume"] = killed_and_resumed(cmd, env, work / f"big-{layers}-{qtype}-resumed.gguf", out, layers, work)
    out.unlink(missing_ok=True)
    return row


def resume_against(work: Path, layers: int, windows: int, qtype: str, budget: str, whole: Path) -> dict:
    """The big part's command from an empty cache, SIGKILLed inside a random layer and rerun, its file
    compared with `whole`: the file an uninterrupted run of the same inputs wrote (bench_heap.py's
    memory part keeps its own), so a run too long to make twice in a sitting is made once more."""
    from neoxq.core.imatrix_io import file_sha256

    cache = work / f"cache-resume-{layers}"
    _, cmd, env = big_command(work, layers, windows, qtype, budget, cache)
    digest = file_sha256(whole)
    res = killed_and_resumed(cmd, env, work / f"big-{layers}-{qtype}-resumed.gguf", whole, layers, work)
    shutil.rmtree(cache, ignore_errors=True)
    return {
        "layers": layers,
        "windows": windows,
        "type": qtype,
        "budget": budget,
        "against": whole.name,
        "against_sha256": digest,
        "resume": res,
    }


def killed_and_resumed(cmd: list, env: dict, out: Path, whole: Path, layers: int, work: Path) -> dict:
    """Start `cmd` again (the first pass now read from the cache the whole run wrote), SIGKILL it
    inside a layer drawn at random once that layer's rounding has begun, rerun it to the end and
    compare its file with the uninterrupted run's."""
    from neoxq.convert.calibrate import LAYER_MODULES

    per_layer = len(LAYER_MODULES)
    layer = random.SystemRandom().randrange(1, layers) if layers > 1 else 0
    eta_log = work / f"eta-{layers}-killed.jsonl"
    eta_log.unlink(missing_ok=True)
    killed_started = time.time()
    proc = subprocess.Popen([*map(str, cmd), str(out), str(eta_log)], env={**os.environ, **env}, stdout=subprocess.DEVNULL)
    done = 0
    while proc.poll() is None:
        steps = [json.loads(x) for x in eta_log.read_text().splitlines()] if eta_log.exists() else []
        done = max((s["done"] for s in steps if s["label"].startswith("rounding")), default=0)
        if done > layer * per_layer:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.2)
    killed_at = proc.wait()
    killed_wall = time.time() - killed_started
    layer = done // per_layer  # the layer it was rounding when killed (its matmuls done: done % per_layer)
    resumed_log = work / f"eta-{layers}-resumed.jsonl"
    resumed_log.unlink(missing_ok=True)
    started = time.time()
    r = benchlib.run_child([*cmd, out, resumed_log], env=env)
    totals = [json.loads(x)["total"] for x in resumed_log.read_text().splitlines() if json.loads(x)["label"].startswith("rounding")]
    same = filecmp.cmp(out, whole, shallow=False)
    res = {
        "killed_in_layer": layer,
        "killed_rc": killed_at,
        "killed_after_s": killed_wall,
        "resumed_from_layer": layers - (totals[0] - 1) // per_layer,
        "resumed_wall_s": r["wall_s"],
        "resumed_peak_rss_MiB": r["peak_rss_MiB"],
        "byte_identical": same,
        "eta": eta_truth(resumed_log, started),
    }
    print(
        f"SIGKILL inside layer {layer} (rc {killed_at}); the rerun resumed from layer {res['resumed_from_layer']} in {r['wall_s']:.0f} s; byte-identical: {same}"
    )
    out.unlink(missing_ok=True)
    return res


def twelve_b(work: Path, layers: int, windows: int, qtype: str) -> dict:
    """Pythia-12B's widths cut to `layers` layers: convert, a plain report against the streamed fp32
    reference, and `--optimize` with its first pass streamed. The report runs under the budget that
    makes the cut stream as the whole model does under --max-memory 20GB (same planned peak: one
    layer and the head's chunks); `--optimize` under 20GB. Peaks against the plans, and the times
    per layer extrapolated to 36 layers."""
    from neoxq.convert.checkpoint import open_checkpoint
    from neoxq.convert.reference import plan_reference
    from neoxq.core.sizes import parse_size

    h, n, heads, vocab = benchlib.SHAPES["12b"]
    folder = benchlib.random_checkpoint((h, layers, heads, vocab))
    whole = SimpleNamespace(config=benchlib.config_for("12b", 0), bytes_per_param=2)
    ref36 = plan_reference(whole, CTX, windows, parse_size("20GB", "budget"))
    budget = f"{-(-ref36.peak_bytes // 2**30) + 1}GiB"  # streams the cut at the whole model's peak
    ref = plan_reference(open_checkpoint(str(folder)), CTX, windows, parse_size(budget, "budget"))
    f16 = benchlib.convert_f16(folder, work)  # for --optimize; the report converts on its own, inside its time
    calib, scored = texts(work, windows)
    shutil.rmtree(work / "report-12b", ignore_errors=True)
    cmd = [PY, "-m", "neoxq", "report", folder, "--text", scored, "--types", qtype, "--imatrix", "none", "--ctx", CTX]
    rep = benchlib.run_child(cmd + ["--max-memory", budget, "-o", work / "report-12b", "--quiet"])
    out = work / f"12b-{layers}-{qtype}-opt.gguf"
    opt = benchlib.run_child([PY, "-c", CHILD, f16, qtype, calib, folder, "20GB", CTX, out, work / "eta-12b.jsonl"])
    plan = estimate(folder, windows, parse_size("20GB", "budget"), "streamed")
    row = {
        "layers": layers,
        "windows": windows,
        "type": qtype,
        "report_budget": budget,
        "report_mode": ref.mode,
        "report_s": rep["wall_s"],
        "report_peak_rss_MiB": rep["peak_rss_MiB"],
        "report_estimate_MiB": ref.peak_bytes / 2**20,
        "report_36_layers_estimate_MiB": ref36.peak_bytes / 2**20,
        "optimize_s": opt["wall_s"],
        "optimize_peak_rss_MiB": opt["peak_rss_MiB"],
        "optimize_estimate_MiB": plan.peak / 2**20,
        "checkpoint_GB_36_layers": benchlib.checkpoint_bytes("12b") / 1e9,
    }
    for k in ("report", "optimize"):  # upper bounds: the embedding and the head are included
        row[f"{k}_extrapolated_36_layers_h"] = row[f"{k}_s"] / layers * n / 3600
    print(
        f"12B widths, {layers} layers: report ({ref.mode}, --max-memory {budget}) {row['report_s']:.0f} s, peak "
        f"{row['report_peak_rss_MiB']:.0f} MiB (plan {row['report_estimate_MiB']:.0f}); --optimize {row['optimize_s']:.0f} s, "
        f"peak {row['optimize_peak_rss_MiB']:.0f} MiB (plan {row['optimize_estimate_MiB']:.0f})"
    )
    out.unlink(missing_ok=True)
    return row


PROBE_CHILD = r"""
import json, shutil, sys, time
from pathlib import Path
from neoxq.core.machine import default_threads, init_process
init_process()
from neoxq.core.gguf_info import read_info
from neoxq.runtime import capi
from neoxq.core.mix_plan import quantizable
from neoxq.core.qtypes import QuantType
from neoxq.runtime.sensitivity import KLDProbe
from neoxq.runtime.model import NeoxModel, RuntimeOptions
f16, calib, ctx, windows, cache = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])
info = read_info(f16)
with NeoxModel(f16, RuntimeOptions(n_ctx=ctx)) as m:
    ids = m.tokenize(open(calib, encoding="utf-8").read())[:ctx * windows]
t0 = time.perf_counter()
probe = KLDProbe(info, ids, ctx, cache, None, default_threads())  # scores the F16 file once, writes its splits
setup, base = time.perf_counter() - t0, probe.bytes_written
mats = [t.name for t in quantizable(info)]
name = next(n for n in mats if n.endswith("ffn_down.weight"))
t0 = time.perf_counter()
probe.kld({name: "Q4_K"})
split_s, split_bytes = time.perf_counter() - t0, probe.bytes_written - base
probe.close()
call = capi.QuantizeCall(ftype=QuantType.Q8_0.ftype, nthread=default_threads())  # every matrix overridden below
call.tensor_types = {n: ("Q4_K" if n == name else "F16") for n in mats}
whole = cache / "whole-probe.gguf"
t0 = time.perf_counter()
rc, _ = capi.quantize(f16, str(whole), call)
whole_write_s, whole_bytes = time.perf_counter() - t0, whole.stat().st_size
whole.unlink()
print(json.dumps({"setup_s": setup, "base_bytes": base, "split_probe_s": split_s, "split_probe_bytes": split_bytes,
                  "whole_write_s": whole_write_s, "whole_bytes": whole_bytes, "tokens": len(ids)}))
"""


def probe_cost(work: Path, layers: int, windows: int) -> dict:
    folder = benchlib.random_checkpoint((BIG[0], layers, BIG[2]))
    f16 = benchlib.convert_f16(folder, work)
    calib, _ = texts(work, windows)
    cache = work / "probe-cache"
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir()
    r = benchlib.run_child([PY, "-c", PROBE_CHILD, f16, calib, CTX, windows, cache])
    d = json.loads(r["stdout"].strip().splitlines()[-1])
    full = benchlib.checkpoint_bytes(BIG)  # the 32-layer F16 model's bytes
    scale = full / f16.stat().st_size
    score_s = d["split_probe_s"]  # quantize one matrix, link, load, score: scoring dominates
    row = {
        **d,
        "layers": layers,
        "windows": windows,
        "peak_rss_MiB": r["peak_rss_MiB"],
        "at_32_layers": {
            "f16_bytes": full,
            "whole_file_probe_bytes": d["whole_bytes"] * scale,
            "split_probe_bytes": d["split_probe_bytes"],
            "whole_write_s": d["whole_write_s"] * scale,
            "score_s": score_s * scale,
            "mix_64_probes_bytes_whole": 64 * d["whole_bytes"] * scale,
            "mix_64_probes_bytes_split": full + 64 * d["split_probe_bytes"],
        },
    }
    a = row["at_32_layers"]
    print(
        f"--mix probe, 6.9B-wide, {layers} layers, {d['tokens']} tokens: split probe writes {d['split_probe_bytes'] / 2**20:.0f} MiB "
        f"and takes {d['split_probe_s']:.1f} s; the whole probe file wrote {d['whole_bytes'] / 2**30:.2f} GiB in {d['whole_write_s']:.1f} s "
        f"(F16 splits once: {d['base_bytes'] / 2**30:.2f} GiB). At 32 layers: a mix of 64 probes writes "
        f"{a['mix_64_probes_bytes_split'] / 2**30:.0f} GiB instead of {a['mix_64_probes_bytes_whole'] / 2**30:.0f} GiB; "
        f"each probe scores for ~{a['score_s'] / 60:.0f} min on this machine"
    )
    return row


def shape_410m(work: Path, windows: int, qtype: str) -> dict:
    folder = benchlib.random_checkpoint("410m")
    f16 = benchlib.convert_f16(folder, work)
    calib, scored = texts(work, windows)
    shutil.rmtree(work / "report-410m", ignore_errors=True)  # a fresh report: nothing reused
    rep = benchlib.run_child(
        [
            PY,
            "-m",
            "neoxq",
            "report",
            folder,
            "--text",
            scored,
            "--types",
            qtype,
            "--imatrix",
            "none",
            "--ctx",
            CTX,
            "-o",
            work / "report-410m",
            "--quiet",
        ]
    )
    out = work / f"410m-{qtype}-opt.gguf"
    fresh = work / "fresh-cache"
    shutil.rmtree(fresh, ignore_errors=True)
    stage_json = work / "410m-stage-times.json"
    stage_json.unlink(missing_ok=True)
    opt = benchlib.run_child(
        [
            PY,
            Path(__file__).resolve().parent / "stage_times.py",  # the library calls' time, measured in the same run
            stage_json,
            "--",
            "quantize",
            f16,
            "--type",
            qtype,
            "--optimize",
            "--calib",
            calib,
            "--reference",
            folder,
            "--ctx",
            CTX,
            "-o",
            out,
            "--force",
            "--quiet",
        ],
        env={"NEOXQ_CACHE": str(fresh)},  # nothing reused: no cached calibration pass
    )
    shutil.rmtree(fresh, ignore_errors=True)
    row = {
        "windows": windows,
        "type": qtype,
        "report_s": rep["wall_s"],
        "optimize_s": opt["wall_s"],
        "ratio": opt["wall_s"] / rep["wall_s"],
        "optimize_peak_rss_MiB": opt["peak_rss_MiB"],
        "report_peak_rss_MiB": rep["peak_rss_MiB"],
        "library_s": json.loads(stage_json.read_text())["timed_s"],
    }
    print(
        f"410M-shaped, {windows} windows of {CTX}, {qtype}: plain report {rep['wall_s']:.0f} s, --optimize {opt['wall_s']:.0f} s: "
        f"{row['ratio']:.2f}x; peak RSS {opt['peak_rss_MiB']:.0f} MiB"
    )
    out.unlink(missing_ok=True)
    return row


# Pythia-410M: hidden, layers, MLP, vocabulary
SHAPE_410M = (1024, 24, 4096, 50304)


def _best_rate(fn, flop: float, repeats: int = 3) -> float:
    """FLOP/s of fn's best of `repeats` timed runs (after one warm-up)."""
    import time

    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return flop / best


def machine_rates(tokens: int) -> dict[str, float]:
    """This machine's rates (FLOP/s) for the kinds of arithmetic --optimize does, at the 410M shape's sizes."""
    import torch

    h, _, f, _ = SHAPE_410M
    x32 = torch.randn(tokens, f)
    w32 = torch.randn(h, f)
    a64 = torch.randn(f, f, dtype=torch.float64)
    spd = a64 @ a64.T + f * torch.eye(f, dtype=torch.float64)
    chol = torch.linalg.cholesky(spd)
    rhs = torch.randn(f, h, dtype=torch.float64)
    xb, wb = x32.bfloat16(), w32.bfloat16()
    return {
        "gemm_fp32": _best_rate(lambda: x32.T @ x32, 2.0 * tokens * f * f),
        "gemm_bf16": _best_rate(lambda: xb @ wb.T, 2.0 * tokens * f * h),
        "gemm_fp64": _best_rate(lambda: a64 @ rhs, 2.0 * f * f * h),
        "cholesky_fp64": _best_rate(lambda: torch.linalg.cholesky(spd), f**3 / 3),
        "trsm_fp64": _best_rate(lambda: torch.linalg.solve_triangular(chol, rhs, upper=False), 1.0 * f * f * h),
    }


def floor_flops(tokens: int) -> dict[str, dict[str, float]]:
    """FLOPs per kind of arithmetic in --optimize at the 410M shape: {stage: {rate kind: FLOPs}}."""
    h, layers, f, vocab = SHAPE_410M
    mats = [(3 * h, h), (h, h), (f, h), (h, f)]  # QKV, attention output, MLP up, MLP down: (out, in)
    out_mat = (vocab, h)
    per_token = 2.0 * sum(o * i for o, i in mats)  # one layer's matmuls, forward
    every = mats * layers + [out_mat]
    # the output matrix's moments from its inputs' Gram matrices where that is fewer products, as
    # neoxq.convert.calibrate chooses (Moments.through)
    head = min(tokens * h * h + 2.0 * tokens * vocab * h, 2.1 * h * h * tokens + 2.0 * vocab * h * h)
    return {
        "moments (Σ x xᵀ half, Σ y xᵀ)": {"gemm_fp32": sum(tokens * i * i + 2.0 * tokens * o * i for o, i in mats) * layers + head},
        "Cholesky per matrix": {"cholesky_fp64": sum(i**3 / 3 for _, i in every)},
        "targets (two triangular solves)": {"trsm_fp64": sum(2.0 * o * i * i for o, i in every)},
        "GPTQ compensation": {"gemm_fp32": sum(2.0 * o * i * i for o, i in every)},
        "fp32 target pass": {"gemm_fp32": tokens * layers * per_token},
        "quantized stream (two partial passes and one whole)": {"gemm_bf16": 2 * tokens * layers * per_token},
        "first pass: forward and input gradients": {"gemm_bf16": 2 * tokens * (layers * per_token + 2.0 * vocab * h)},
    }


def floor(windows: int) -> dict:
    tokens = windows * CTX
    rates, flops = machine_rates(tokens), floor_flops(tokens)
    stages = {stage: sum(n / rates[kind] for kind, n in kinds.items()) for stage, kinds in flops.items()}
    total = sum(stages.values())
    print(
        f"floor at 410M, {windows} windows: {total:.0f} s of dense arithmetic at this machine's rates "
        + str({k: f"{v / 1e9:.0f} GFLOP/s" for k, v in rates.items()})
    )
    return {"windows": windows, "rates_gflops": {k: v / 1e9 for k, v in rates.items()}, "stages_s": stages, "floor_s": total}


def phase_spans(eta_rows: list[dict]) -> dict[str, tuple[float, float]]:
    """Each bar's start and end, in seconds from the run's start, from its first logged step: the
    ETA there is (steps left) × (seconds since the bar started) / (steps done)."""
    spans = {}
    for e in eta_rows:
        if e["bar"] in spans:
            continue
        left = e["total"] - e["done"]
        since = e["eta_s"] * e["done"] / left if left and e["eta_s"] else 0.0
        spans[e["bar"]] = (e["at_s"] - since, e["at_s"] + e["left_s"])
    return spans


def at_32_layers(r: dict) -> float | None:
    """Seconds for all 32 layers: the streamed first pass (every window goes through every layer)
    scaled by 32 / layers, the rounding bar by its steps (4 matmuls a layer, and the head), and the
    rest (the embedding's rounding, loading, writing) as it was."""
    from neoxq.convert.calibrate import LAYER_MODULES

    spans = phase_spans(r.get("eta", []))
    first, rounding = spans.get("calibration (streamed)"), spans.get("rounding (sequential)")
    if not first or not rounding:
        return None
    per_layer = len(LAYER_MODULES)
    f, q = first[1] - first[0], rounding[1] - rounding[0]
    n = r["layers"]
    return r["wall_s"] - f - q + f * BIG[1] / n + q * (BIG[1] * per_layer + 1) / (n * per_layer + 1)


ROUNDING = "rounding (sequential)"


def step_times(eta_log: Path, started: float, label: str = ROUNDING) -> tuple[list[float], list[float | None]]:
    """When each step of a bar ended, in seconds from the run's start, and the ETA the bar showed
    then (its progress log)."""
    mine = [s for s in map(json.loads, eta_log.read_text().splitlines()) if s["label"] == label]
    return [s["t"] - started for s in mine], [s["eta_s"] for s in mine]


def eta_errors(r: dict) -> dict[str, float] | None:
    """The rounding bar's mean |ETA / time really left − 1| over its steps after the first layer
    (not the last): as shown in the run, and cycle-aware (replayed)."""
    steps, shown = r.get("rounding_steps_s"), r.get("rounding_eta_shown_s")
    if not steps or not shown:
        return None
    start = phase_spans(r["eta"]).get(ROUNDING, (0.0, 0.0))[0]
    from neoxq.convert.calibrate import LAYER_MODULES

    total, cycle = len(steps), len(LAYER_MODULES)
    errs: dict[str, list[float]] = {"shown": [], "cycle-aware": []}
    for k in range(cycle + 1, total):
        left = steps[-1] - steps[k - 1]
        errs["shown"].append(abs(shown[k - 1] / left - 1))
        errs["cycle-aware"].append(abs(cycled_eta({"bar": ROUNDING, "done": k, "total": total, "eta_s": shown[k - 1]}, steps, start) / left - 1))
    return {name: sum(v) / len(v) for name, v in errs.items() if v}


def cycled_eta(e: dict, steps: list[float], start: float) -> float | None:
    """What the rounding bar's ETA is with its cycle of a layer's matmuls (neoxq.core.progress),
    replayed on a run's step times (`start`: the bar's): after a whole layer, each step left at the
    mean time its place in the layer took over the later half of the layers seen; before, the
    average rate the run showed."""
    from neoxq.convert.calibrate import LAYER_MODULES
    from neoxq.core.progress import eta_seconds

    cycle = len(LAYER_MODULES)
    if e["bar"] != ROUNDING or e["done"] <= cycle:
        return e["eta_s"]
    return eta_seconds(start, steps[: e["done"]], e["done"], e["total"], cycle)


def _eta_table(rows: list[dict], run: str, steps: list[float] | None = None) -> list[str]:
    if not rows:
        return []
    extra = " cycle-aware ETA s (replayed) |" if steps else ""
    start = phase_spans(rows).get(ROUNDING, (0.0, 0.0))[0]
    out = [
        f"\n| progress bar ({run}) | at s | steps done | ETA shown s | really left s |{extra}",
        "|---|---:|---:|---:|---:|" + ("---:|" if steps else ""),
    ]
    for e in rows:
        eta = "—" if e["eta_s"] is None else f"{e['eta_s']:.0f}"
        cell = "" if not steps else (f" {cycled_eta(e, steps, start):.0f} |" if e["bar"] == ROUNDING else " |")
        out.append(f"| {e['bar']} | {e['at_s']:.0f} | {e['done']} / {e['total']} | {eta} | {e['left_s']:.0f} |{cell}")
    return out


def markdown(data: dict) -> str:
    """A table per part the run measured."""
    out = []
    for r in data["rows"]:
        if r["part"] == "410m":
            out += [
                "\n| shape | windows | type | plain report s | `--optimize` s | ratio | peak RSS `--optimize` / report MiB |",
                "|---|---:|---|---:|---:|---:|---:|",
                f"| 410M | {r['windows']} | {r['type']} | {r['report_s']:.0f} | {r['optimize_s']:.0f} | {r['ratio']:.2f}× | "
                f"{r['optimize_peak_rss_MiB']:.0f} / {r['report_peak_rss_MiB']:.0f} |",
            ]
            out += _library_table(r)
        elif r["part"] == "big":
            out += [
                "\n| shape | layers | windows | type | budget | peak RSS MiB (estimate) | s | s per layer | at 32 layers |",
                "|---|---:|---:|---|---|---:|---:|---:|---:|",
                f"| 6.9B widths | {r['layers']} | {r.get('windows_used', r['windows'])} | {r['type']} | {r['budget']} | {r['peak_rss_MiB']:.0f} ({r['estimate_MiB']:.0f}) | "
                f"{r['wall_s']:.0f} | {r['per_layer_s']:.0f} | ~{r['extrapolated_32_layers_h']:.1f} h |",
            ]
            t32 = at_32_layers(r)
            if t32:
                spans = ", ".join(f"{bar} {b - a:.0f} s" for bar, (a, b) in phase_spans(r["eta"]).items())
                out.append(
                    f"\nPhases of the run (from its progress log): {spans}. Scaled to 32 layers (the first pass by "
                    f"32 / {r['layers']}, the rounding by its matmuls, the rest as it was): **{t32 / 3600:.2f} h**."
                )
            out += _eta_table(r.get("eta", []), "the uninterrupted run", r.get("rounding_steps_s"))
            errs = eta_errors(r)
            if errs:
                out.append(
                    f"\nThe rounding bar's ETA over its steps after the first layer, mean |ETA / time really left − 1|: as shown "
                    f"{100 * errs['shown']:.1f} %, cycle-aware (replayed on the same step times) {100 * errs['cycle-aware']:.1f} %."
                )
            k = r.get("resume")
            if k:
                out.append(
                    f"\nSIGKILL inside layer {k['killed_in_layer']} of a second run; the rerun resumed from layer "
                    f"{k['resumed_from_layer']} and took {k['resumed_wall_s']:.0f} s (peak {k['resumed_peak_rss_MiB']:.0f} MiB); "
                    f"its file is {'byte-identical to' if k['byte_identical'] else 'DIFFERENT from'} the uninterrupted run's."
                )
                out += _eta_table(k["eta"], "the resumed run")
        elif r["part"] == "resume":
            k = r["resume"]
            out += [
                "\n| shape | layers | windows | type | budget | SIGKILL inside layer | killed after s | resumed from layer | rerun s (peak MiB) | file |",
                "|---|---:|---:|---|---|---:|---:|---:|---:|---|",
                f"| 6.9B widths | {r['layers']} | {r['windows']} | {r['type']} | {r['budget']} | {k['killed_in_layer']} | {k['killed_after_s']:.0f} | "
                f"{k['resumed_from_layer']} | {k['resumed_wall_s']:.0f} ({k['resumed_peak_rss_MiB']:.0f}) | "
                f"{'byte-identical to' if k['byte_identical'] else 'DIFFERENT from'} the uninterrupted run's `{r['against']}` (sha256 {r['against_sha256'][:16]}…) |",
            ]
            out += _eta_table(k["eta"], "the resumed run")
        elif r["part"] == "12b":
            out += [
                "\n| shape | layers | windows | type | step | budget | peak RSS MiB (plan) | s | at 36 layers |",
                "|---|---:|---:|---|---|---|---:|---:|---:|",
                f"| 12B widths | {r['layers']} | {r['windows']} | {r['type']} | report (its conversion included), reference {r['report_mode']} | "
                f"{r['report_budget']} | {r['report_peak_rss_MiB']:.0f} "
                f"({r['report_estimate_MiB']:.0f}; 36 layers under 20GB: {r['report_36_layers_estimate_MiB']:.0f}) | "
                f"{r['report_s']:.0f} | ~{r['report_extrapolated_36_layers_h']:.1f} h |",
                f"| | | | | `--optimize`, first pass streamed | 20GB | {r['optimize_peak_rss_MiB']:.0f} ({r['optimize_estimate_MiB']:.0f}) | "
                f"{r['optimize_s']:.0f} | ~{r['optimize_extrapolated_36_layers_h']:.1f} h |",
            ]
        elif r["part"] == "floor":
            report = next((x["report_s"] for x in data["rows"] if x["part"] == "410m"), None)
            out += ["\n| arithmetic at the 410M shape | seconds at this machine's rates |", "|---|---:|"]
            out += [f"| {stage} | {secs:.1f} |" for stage, secs in r["stages_s"].items()]
            vs = f" ({r['floor_s'] / report:.2f}× the plain report above)" if report else ""
            out.append(f"| **the floor: all of it**{vs} | **{r['floor_s']:.0f}** |")
            rates = ", ".join(f"{k} {v:.0f}" for k, v in r["rates_gflops"].items())
            out.append(f"\nRates measured in the run (GFLOP/s): {rates}.")
        else:
            out.append("\n" + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
    return "\n".join(out).strip()


def _library_table(r: dict) -> list[str]:
    """Where the 410M row's `--optimize` spent its time inside large library calls (scripts/stage_times.py)."""
    spent = r.get("library_s")
    if not spent:
        return []
    total, report = sum(spent.values()), r["report_s"]
    out = ["\n| inside that `--optimize` run: time in large library calls | s | × the plain report |", "|---|---:|---:|"]
    out += [f"| {kind} | {s:.1f} | {s / report:.2f}× |" for kind, s in spent.items()]
    out.append(f"| **all of them** | **{total:.0f}** | **{total / report:.2f}×** |")
    rest = r["optimize_s"] - total
    out.append(f"| the rest: the rounding's per-column work, block codec and numpy products, copies, Python | {rest:.0f} | {rest / report:.2f}× |")
    return out


def add_step_times(record: Path, eta_log: Path) -> None:
    """The rounding bar's step times, from the run's own progress log, added to a record made before
    the record kept them (the run's start: its first logged rounding step, less its time in the record)."""
    data = json.loads(record.read_text())
    row = next(r for r in data["rows"] if r["part"] == "big")
    first = next(e for e in row["eta"] if e["bar"] == ROUNDING)
    t_first = next(s["t"] for s in map(json.loads, eta_log.read_text().splitlines()) if s["label"] == ROUNDING and s["done"] == first["done"])
    row["rounding_steps_s"], row["rounding_eta_shown_s"] = step_times(eta_log, t_first - first["at_s"])
    benchlib.write_record(record, data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="big,410m")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--type", default="Q4_K_M")
    ap.add_argument("--budget", default="8GB")
    ap.add_argument("--kill", action="store_true", help="big: also SIGKILL a second run inside a random layer and resume it")
    ap.add_argument("--against", type=Path, help="resume: the file an uninterrupted run of the big part's inputs wrote")
    ap.add_argument("--steps-from", type=Path, help="add the rounding bar's step times from this progress log to the big row of --json's record")
    benchlib.add_record_args(ap)
    a = ap.parse_args()
    if benchlib.printed_earlier(a, markdown):
        return
    if "resume" in a.parts.split(",") and not (a.against and a.against.is_file()):
        ap.error("--parts resume needs --against FILE: the file an uninterrupted run of the big part's inputs wrote")
    if a.steps_from:
        add_step_times(a.json, a.steps_from)
        return
    work = benchlib.cache_dir() / "optimize-scale"
    work.mkdir(exist_ok=True)
    data = benchlib.run_record(sys.argv)
    parts = {"big": lambda: big(work, a.layers, a.windows, a.type, a.budget, a.kill), "probe": lambda: probe_cost(work, a.layers, a.windows)}
    parts["410m"] = lambda: shape_410m(work, a.windows, a.type)
    parts["floor"] = lambda: floor(a.windows)
    parts["resume"] = lambda: resume_against(work, a.layers, a.windows, a.type, a.budget, a.against)
    parts["12b"] = lambda: twelve_b(work, a.layers, a.windows, a.type)
    for name, run in parts.items():
        if name in a.parts.split(","):
            data["rows"].append({"part": name, **run()})
    if a.json:
        benchlib.write_record(a.json, data)
    print(markdown(data))


if __name__ == "__main__":
    main()
