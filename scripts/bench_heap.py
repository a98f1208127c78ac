#!/usr/bin/env python3
"""The C heap's rules under `neoxq quantize --optimize --max-memory` (neoxq.core.heap): neoxq's (a
stated budget fixes glibc's mmap threshold) against glibc's own rising threshold:

  memory  a checkpoint of Pythia-6.9B's widths cut to --layers layers, `--optimize --max-memory
          --budget` with the first pass streamed (as at 32 layers), once under each rule, side by
          side (their memory is compared; their time only as two runs sharing the cores). Each
          samples its own RSS (/proc/self/status) and glibc's heap (mallinfo2: bytes free inside
          the heaps) every second: the peak of each phase and of each layer against the
          preflight's plan.
  time    the same library call on Pythia-410M's shape (the checkpoint of bench_optimize_scale.py's
          410m part; its first pass in memory, as the CLI runs it), under each rule in turn,
          --rounds rounds in the order A B B A ...: their wall times.

    .venv/bin/python scripts/bench_heap.py [--parts memory,time] [--layers 8] [--windows 8] [--rounds 2]
                                           [--rules neoxq,glibc] [--stop-after 0] [--json out.json]
    .venv/bin/python scripts/bench_heap.py --markdown out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
from neoxq.convert.calibrate import STAGES  # noqa: E402
from bench_optimize_scale import BIG, CTX, estimate, texts  # noqa: E402

PY = sys.executable
ROUNDING = "rounding (sequential)"
# the progress bars' phases, as the tables name them (samples before a bar's first step are its)
PHASES = {
    "calibration (streamed)": "first pass",
    "optimising": "equalised copy, llama.cpp's quantizer, embedding",
    ROUNDING: "layer by layer",
}
RULES = {
    "neoxq": "neoxq's under a stated budget: a fixed 1 MiB mmap threshold (mallopt)",
    "glibc": "glibc's own (a rising mmap threshold)",
}
# rules of earlier records, rendered as they were run: the environment's fixed threshold, and an
# earlier neoxq's malloc_trim after each phase and layer
RECORDED = RULES | {
    "fixed": "a fixed 1 MiB mmap threshold (MALLOC_MMAP_THRESHOLD_)",
    "trim": "glibc's, its free pages given back after each phase and layer (malloc_trim)",
}

# the library call `neoxq quantize --optimize --max-memory` makes, the process set up as the CLI
# sets it up (init_process), its heap rule one of RULES; with a log path, a thread
# samples the process's memory every second with the progress bar it is in; a positive `stop`
# ends the process once the rounding has done that many steps
CHILD = r"""
import ctypes, json, sys, threading, time
import neoxq.core.machine as machine
rule, f16, qtype, calib, ref, budget, ctx, out, log_path, first_pass, stop = sys.argv[1:12]
machine.init_process()
if rule == "glibc":  # neoxq's own rule under a budget, taken out
    import neoxq.optimize
    neoxq.optimize.keep_temporaries_out_of_heaps = lambda: None
from neoxq.core import progress
from neoxq.core.sizes import parse_size
from neoxq.core.textfile import read_text
from neoxq.optimize import OptimizeOptions, quantize_optimized

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

def sample(log, bar):
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    while True:
        status = dict(line.split(":", 1) for line in open("/proc/self/status"))
        heap = libc.mallinfo2()
        log.write(json.dumps({"t": time.time(), "bar": bar["label"], "steps": bar.get("total"), "done": bar.get("done"), "rss_MiB": int(status["VmRSS"].split()[0]) / 1024,
                              "heap_free_MiB": heap.fordblks / 2**20, "heap_MiB": heap.arena / 2**20}) + "\n")
        log.flush()
        time.sleep(1)

if log_path != "-":
    bar, step = {"label": ""}, progress.Progress.update
    def logged(self, n=1, nbytes=0, note=""):
        step(self, n, nbytes, note)
        bar["label"], bar["total"], bar["done"] = self.label, self.total, self.done
        if self.label == "rounding (sequential)" and self.done >= int(stop) > 0:
            import os
            os._exit(0)  # the layers asked for are rounded: the peak so far is the launcher's
    progress.Progress.update = logged
    threading.Thread(target=sample, args=(open(log_path, "w"), bar), daemon=True).start()
opts = OptimizeOptions(read_text(calib), reference=ref, ctx=int(ctx), max_memory=parse_size(budget, "budget"), first_pass=first_pass)
print(json.dumps(quantize_optimized(f16, qtype, opts, output=out, force=True).as_json()))
"""


def launch(
    rule: str, f16: Path, calib: Path, ref: Path, budget: str, out: Path, log: Path | None, cache: Path, first_pass: str, stop: int = 0
) -> subprocess.Popen:
    """One --optimize child under `rule`, from an empty cache, through benchlib's launcher (its peak RSS);
    first_pass: streamed, or auto (what the budget allows, as the CLI decides); stop: end it after
    that many rounding steps (0: run to the end)."""
    shutil.rmtree(cache, ignore_errors=True)
    cmd = [PY, "-c", benchlib.LAUNCHER, PY, "-c", CHILD, rule, f16, "Q4_K_M", calib, ref, budget, CTX, out, log or "-", first_pass, stop]
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")} | {"NEOXQ_CACHE": str(cache)}
    return subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finished(proc: subprocess.Popen) -> dict:
    stdout, stderr = proc.communicate()
    *lines, last = stderr.rstrip("\n").split("\n")
    res = json.loads(last)
    if res["rc"]:
        raise SystemExit("--optimize failed:\n" + "\n".join(lines)[-3000:])
    return res


MATMULS_PER_LAYER = sum(len(stage) for stage in STAGES)


def phases(log: Path) -> list[dict]:
    """Each progress bar's peak RSS and the heap's free bytes at that moment (samples before a
    bar's first step belong to it), and the most the heap held free at any time in it."""
    samples = [json.loads(line) for line in log.read_text().splitlines()]
    out: dict[str, dict] = {}
    for i, s in enumerate(samples):
        bar = s["bar"] or next((x["bar"] for x in samples[i:] if x["bar"]), "the end")
        p = out.setdefault(bar, {"bar": bar, "steps": None, "peak_rss_MiB": 0.0, "heap_free_at_peak_MiB": 0.0, "max_heap_free_MiB": 0.0})
        if s["bar"]:
            p["steps"] = s["steps"]
        if s["rss_MiB"] > p["peak_rss_MiB"]:
            p["peak_rss_MiB"], p["heap_free_at_peak_MiB"] = s["rss_MiB"], s["heap_free_MiB"]
        p["max_heap_free_MiB"] = max(p["max_heap_free_MiB"], s["heap_free_MiB"])
        if bar == ROUNDING:  # and each layer's own peak: the bar steps once per matmul
            layer = (s["done"] or 0) // MATMULS_PER_LAYER if s["bar"] else 0
            peaks = p.setdefault("layer_peaks_MiB", [])
            peaks += [0.0] * (layer + 1 - len(peaks))
            peaks[layer] = max(peaks[layer], s["rss_MiB"])
    return list(out.values())


def memory(work: Path, layers: int, windows: int, budget: str, rules: list[str], stop_after: int = 0) -> list[dict]:
    """Each rule's run (side by side when there are two); stop_after: end each run once it has
    rounded that many layers (0: the whole job)."""
    from neoxq.core.sizes import parse_size

    folder = benchlib.random_checkpoint((BIG[0], layers, BIG[2]))
    f16 = benchlib.convert_f16(folder, work)
    calib, _ = texts(work, windows)
    procs = {
        rule: launch(
            rule,
            f16,
            calib,
            folder,
            budget,
            work / f"heap-{rule}.gguf",
            work / f"heap-{rule}.jsonl",
            work / f"cache-heap-{rule}",
            "streamed",
            stop_after * MATMULS_PER_LAYER,
        )
        for rule in rules
    }
    rows = []
    for rule, proc in procs.items():
        res, per = finished(proc), phases(work / f"heap-{rule}.jsonl")
        used = next(p["steps"] for p in per if p["bar"].startswith("calibration"))  # the windows the text gave
        plan = estimate(folder, used, parse_size(budget, "--budget"), "streamed")
        row = {"layers": layers, "windows": used, "budget": budget, "rule": rule, "peak_rss_MiB": res["peak_rss_MiB"], "plan_MiB": plan.peak / 2**20}
        rows.append({**row, "wall_s": res["wall_s"], "stopped_after_layers": stop_after or None, "phases": per})
        print(
            f"{rule}: peak {res['peak_rss_MiB']:.0f} MiB (plan {plan.peak / 2**20:.0f}); "
            + ", ".join(f"{p['bar']} {p['peak_rss_MiB']:.0f}" for p in per)
        )
    return rows


def timing(work: Path, windows: int, rounds: int, rules: list[str]) -> dict:
    """--optimize at the 410M shape under each rule in turn (A B B A ...): its wall times."""
    folder = benchlib.random_checkpoint("410m")
    f16 = benchlib.convert_f16(folder, work)
    calib, _ = texts(work, windows)
    walls: dict[str, list[float]] = {r: [] for r in rules}
    order = [r for i in range(rounds) for r in (rules if i % 2 == 0 else rules[::-1])]
    for rule in order:
        res = finished(launch(rule, f16, calib, folder, "64GB", work / "heap-410m.gguf", None, work / "cache-heap-410m", "auto"))
        walls[rule].append(res["wall_s"])
        print(f"410M, {rule}: {res['wall_s']:.0f} s")
    return {"shape": "410m", "windows": windows, "wall_s": walls}


def markdown(data: dict) -> str:
    out = []
    mem = [r for r in data["rows"] if r["part"] == "memory"]
    if mem:
        bars = list(dict.fromkeys(p["bar"] for r in mem for p in r["phases"]))
        out += [
            "| heap rule | 6.9B widths, layers | peak RSS MiB (plan) | "
            + " | ".join(f"{PHASES.get(b, b)}: peak MiB (free in the heap)" for b in bars)
            + " |",
            "|---|---:|---:|" + "---:|" * len(bars),
        ]
        for r in mem:
            per = {p["bar"]: p for p in r["phases"]}
            cells = [f"{per[b]['peak_rss_MiB']:.0f} ({per[b]['heap_free_at_peak_MiB']:.0f})" if b in per else "–" for b in bars]
            layers = f"{r['layers']}" + (f", stopped after {r['stopped_after_layers']} rounded" if r.get("stopped_after_layers") else "")
            out.append(f"| {RECORDED[r['rule']]} | {layers} | {r['peak_rss_MiB']:.0f} ({r['plan_MiB']:.0f}) | " + " | ".join(cells) + " |")
    for r in mem:
        peaks = next((p.get("layer_peaks_MiB") for p in r["phases"] if p["bar"] == ROUNDING), None)
        if peaks:
            out.append(
                f"\nLayer by layer, {RECORDED[r['rule']]}: each layer's peak MiB"
                + ("" if r.get("stopped_after_layers") else " (the last: the output matrix)")
                + ": "
                + ", ".join(f"{x:.0f}" for x in peaks)
                + "."
            )
    for r in (r for r in data["rows"] if r["part"] == "time"):
        w = r["wall_s"]
        out.append(f"\nTime at Pythia-410M's shape ({r['windows']} windows), wall seconds of each run, in the order run:")
        for rule, walls in w.items():
            vs = "" if rule == "glibc" or "glibc" not in w else f": {statistics.mean(walls) / statistics.mean(w['glibc']):.2f}× glibc's mean"
            out.append(f"- {RECORDED[rule]}: {', '.join(f'{x:.0f}' for x in walls)}{vs}")
    return "\n".join(out).strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="memory,time")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--budget", default="8GB")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rules", default="neoxq,glibc", help="the heap rules to compare (" + ", ".join(RULES) + ")")
    ap.add_argument("--stop-after", type=int, default=0, help="memory: end each run after rounding this many layers (0: the whole job)")
    benchlib.add_record_args(ap)
    a = ap.parse_args()
    if benchlib.printed_earlier(a, markdown):
        return
    rules = a.rules.split(",")
    if not set(rules) <= set(RULES):
        ap.error(f"--rules: {a.rules} is not among {', '.join(RULES)}")
    work = benchlib.cache_dir() / "optimize-scale"
    work.mkdir(exist_ok=True)
    data = benchlib.run_record(sys.argv)
    if "memory" in a.parts.split(","):
        data["rows"] += [{"part": "memory", **r} for r in memory(work, a.layers, a.windows, a.budget, rules, a.stop_after)]
    if "time" in a.parts.split(","):
        data["rows"].append({"part": "time", **timing(work, a.windows, a.rounds, rules)})
    if a.json:
        benchlib.write_record(a.json, data)
    print(markdown(data))


if __name__ == "__main__":
    main()
