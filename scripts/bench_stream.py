#!/usr/bin/env python3
"""Single-stream generation speed: `neoxq run`'s path against raw llama-cpp-python, in one run.

On the same GGUF file, prompt, sampler settings and seed, each path generates up to --tokens tokens
and its rate is tokens after the first divided by the time after the first (the prompt's decode
excluded), the median of --repeats runs taken in turn:
  raw        llama-cpp-python's own `Llama.create_completion(stream=True)`
  neoxq      neoxq.runtime.generate.generate(), what `neoxq run` prints from
Each runs in a child process of its own with the same threads; ratios are neoxq / raw.

    .venv/bin/python scripts/bench_stream.py [--model 31m] [--type Q4_K_M] [--tokens 256] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

PY = sys.executable
PROMPT = "The history of the city begins"
SAMPLER = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repeat_penalty": 1.1}

RAW = r"""
import json, os, sys, time, llama_cpp
path, prompt, n, seed, sampler = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5])
threads = len(os.sched_getaffinity(0))
llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_threads=threads, n_threads_batch=threads, seed=seed, verbose=False)
toks, t1 = 0, None
for chunk in llm.create_completion(prompt, max_tokens=n, stream=True, seed=seed, **sampler):
    toks += 1
    if t1 is None: t1 = time.perf_counter()
print(json.dumps({"tokens": toks, "tps": (toks - 1) / (time.perf_counter() - t1)}))
"""

NEOXQ = r"""
import json, sys, time
from neoxq.core.machine import init_process
init_process()
from neoxq.runtime.model import NeoxModel, RuntimeOptions
from neoxq.runtime.generate import GenerationStats, SamplingOptions, generate
path, prompt, n, seed, sampler = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5])
opts = SamplingOptions(max_tokens=n, seed=seed, **sampler)
with NeoxModel(path, RuntimeOptions(n_ctx=512)) as m:
    s = GenerationStats()
    for _ in generate(m, prompt, opts, s):
        pass
print(json.dumps({"tokens": s.generated_tokens, "tps": s.generation_tps}))
"""


def measure(code: str, path: Path, tokens: int, seed: int) -> dict:
    r = benchlib.run_child([PY, "-c", code, path, PROMPT, tokens, seed, json.dumps(SAMPLER)])
    return json.loads(r["stdout"].strip().splitlines()[-1])


def markdown(data: dict) -> str:
    rows = data["rows"]
    out = ["| path | tokens | tok/s (median) | runs | vs raw |", "|---|---:|---:|---|---:|"]
    raw = next(r for r in rows if r["path"] == "raw")["tps"]
    for r in rows:
        runs = ", ".join(f"{x:.0f}" for x in r["runs"])
        out.append(f"| {r['path']} | {r['tokens']} | {r['tps']:.0f} | {runs} | {r['tps'] / raw:.3f}× |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    benchlib.add_model_args(ap)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    benchlib.add_record_args(ap)
    a = ap.parse_args()
    if benchlib.printed_earlier(a, markdown):
        return
    _, path = benchlib.trained_quantized("stream-work", a.model, a.type)
    runs: dict[str, list[dict]] = {"raw": [], "neoxq": []}
    t0 = time.time()
    for i in range(a.repeats):  # in turn, so a slow spell of the machine touches both
        for name, code in (("raw", RAW), ("neoxq", NEOXQ)):
            runs[name].append(measure(code, path, a.tokens, seed=i + 1))
            print(f"{name:6} run {i + 1}: {runs[name][-1]['tokens']} tokens, {runs[name][-1]['tps']:.0f} tok/s", flush=True)
    data = benchlib.run_record(sys.argv)
    data["setup"] = {"model": a.model, "type": a.type, "prompt": PROMPT, "sampler": SAMPLER, "max_tokens": a.tokens}
    for name, rs in runs.items():
        data["rows"].append({"path": name, "tokens": rs[0]["tokens"], "tps": statistics.median(r["tps"] for r in rs), "runs": [r["tps"] for r in rs]})
    if a.json:
        benchlib.write_record(a.json, data)
    print(markdown(data))
    print(f"\n{time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
