#!/usr/bin/env python3
"""Serving throughput: `neoxq serve --parallel N` against llama-server and raw llama-cpp-python, in one run.

On the same GGUF file, prompt and sampler (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05, repeat
penalty 1.1, end-of-text barred by logit_bias so every request runs to --tokens), each row sends
`clients` requests at once and measures the aggregate rate: completion tokens of all requests over
the wall time from the first send to the last answer (prompt decode included), median of --repeats
rounds, the servers taken in turn within each round:
  raw            llama-cpp-python's `Llama.create_completion` in a child process (one stream: the
                 single-client reference)
  neoxq serve    `neoxq serve --parallel N --ctx C`
  llama-server   llama.cpp's own server, `-np N -cb -c N*C`, built by scripts/build_llama_tools.sh
  bare decode    the ceiling batching can reach: `llama_decode` alone, one token of each of 1 or N
                 sequences per step (no sampling, no server), at the positions a request passes
                 through, through neoxq's decoder on a context like the server's
Both servers get the same threads; ratios are against raw, and each server's 8-client rate against
its own one-client rate.

    .venv/bin/python scripts/bench_serve.py [--model 31m] [--type Q4_K_M] [--parallel 8] [--clients 1,8] [--tokens 256] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

PY = sys.executable
PROMPT = "The history of the city begins"
SAMPLER = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repeat_penalty": 1.1}
CTX = 512

RAW = r"""
import json, os, sys, time, llama_cpp
path, prompt, n, seed, sampler, eos_bias = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5]), json.loads(sys.argv[6])
threads = len(os.sched_getaffinity(0))
llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_threads=threads, n_threads_batch=threads, seed=seed, verbose=False)
bias = {int(k): v for k, v in eos_bias.items()}
llm.create_completion(prompt, max_tokens=8, seed=seed, logit_bias=bias, **sampler)  # warm-up
t0 = time.perf_counter()
r = llm.create_completion(prompt, max_tokens=n, seed=seed, logit_bias=bias, **sampler)
print(json.dumps({"tokens": r["usage"]["completion_tokens"], "seconds": time.perf_counter() - t0}))
"""


BARE = r"""
import json, sys, time
import numpy as np
from neoxq.core.machine import init_process
init_process()
from neoxq.runtime.model import NeoxModel, RuntimeOptions
path, n_seq, clients, tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
with NeoxModel(path, RuntimeOptions(n_ctx=512, n_seq=n_seq, repack=False)) as m:
    d = m.decoder
    for s in range(clients):
        d.decode(np.arange(100, 108, dtype=np.int32), 0, np.eye(8, dtype=np.int8)[-1], s)
    seqs = np.arange(clients, dtype=np.int32)
    t0 = time.perf_counter()
    for k in range(tokens):
        d.decode_steps(np.full(clients, 200 + k, dtype=np.int32), np.full(clients, 8 + k, dtype=np.int32), seqs)
print(json.dumps({"tokens": clients * tokens, "seconds": time.perf_counter() - t0}))
"""


def eos_bias(f16: Path) -> dict:
    from neoxq.runtime.model import NeoxModel, RuntimeOptions

    with NeoxModel(f16, RuntimeOptions(vocab_only=True)) as m:
        return {str(m.llm.token_eos()): -100.0}


def round_of(base: str, clients: int, tokens: int, bias: dict) -> dict:
    """`clients` requests at once: completion tokens and the wall time of the whole round."""
    import httpx

    counts, errors = [0] * clients, []

    def ask(i: int) -> None:
        body = {"prompt": PROMPT, "max_tokens": tokens, "seed": i + 1, "logit_bias": bias, **SAMPLER}
        try:
            r = httpx.post(f"{base}/v1/completions", json=body, timeout=600)
            r.raise_for_status()
            counts[i] = r.json()["usage"]["completion_tokens"]
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"{base}: {errors[0]}")
    return {"tokens": sum(counts), "seconds": time.perf_counter() - t0}


def servers(path: Path, parallel: int, threads: int, tools: Path) -> dict:
    port = benchlib.free_port()
    llama = [str(tools / "llama-server"), "-m", str(path), "--port", str(port), "--host", "127.0.0.1", "-np", str(parallel), "-cb"]
    llama += ["-c", str(parallel * CTX), "-t", str(threads), "-tb", str(threads), "--no-webui"]
    return {
        "neoxq serve": benchlib.start_server(path, CTX, ("--parallel", parallel, "--threads", threads)),
        "llama-server": benchlib.start_server(path, command=llama, port=port),
    }


def markdown(data: dict) -> str:
    rows = data["rows"]
    raw = next(r for r in rows if r["path"] == "raw")["tps"]
    one = {r["path"]: r["tps"] for r in rows if r["clients"] == 1}
    out = ["| path | clients | tokens | aggregate tok/s (median) | runs | vs raw | vs its 1 client |", "|---|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        runs = ", ".join(f"{x:.0f}" for x in r["runs"])
        own = f"{r['tps'] / one[r['path']]:.2f}×" if r["path"] in one and r["clients"] > 1 else ""
        out.append(f"| {r['path']} | {r['clients']} | {r['tokens']} | {r['tps']:.0f} | {runs} | {r['tps'] / raw:.2f}× | {own} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    benchlib.add_model_args(ap)
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--clients", default="1,8")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    benchlib.add_record_args(ap)
    a = ap.parse_args()
    if benchlib.printed_earlier(a, markdown):
        return
    tools = benchlib.build_llama_tools()
    f16, path = benchlib.trained_quantized("stream-work", a.model, a.type)
    bias, threads = eos_bias(f16), len(os.sched_getaffinity(0))
    clients = [int(c) for c in a.clients.split(",")]
    runs: dict[tuple[str, int], list[dict]] = {}
    procs = servers(path, a.parallel, threads, tools)
    t0 = time.time()
    try:
        for _, base in procs.values():
            round_of(base, 2, 8, bias)  # warm-up
        for i in range(a.repeats):
            r = benchlib.run_child([PY, "-c", RAW, path, PROMPT, a.tokens, i + 1, json.dumps(SAMPLER), json.dumps(bias)])
            runs.setdefault(("raw", 1), []).append(json.loads(r["stdout"].strip().splitlines()[-1]))
            for n in clients:
                r = benchlib.run_child([PY, "-c", BARE, path, a.parallel, n, a.tokens])
                runs.setdefault(("bare decode", n), []).append(json.loads(r["stdout"].strip().splitlines()[-1]))
                for name, (_, base) in procs.items():
                    runs.setdefault((name, n), []).append(round_of(base, n, a.tokens, bias))
                    x = runs[(name, n)][-1]
                    print(f"round {i + 1}: {name:12} {n} clients: {x['tokens']} tokens, {x['tokens'] / x['seconds']:.0f} tok/s", flush=True)
    finally:
        for proc, _ in procs.values():
            proc.terminate()
            proc.wait(timeout=30)
    data = benchlib.run_record(sys.argv)
    data["setup"] = {
        "model": a.model,
        "type": a.type,
        "prompt": PROMPT,
        "sampler": SAMPLER,
        "max_tokens": a.tokens,
        "parallel": a.parallel,
        "ctx": CTX,
    }
    for (name, n), rs in runs.items():
        rates = [r["tokens"] / r["seconds"] for r in rs]
        data["rows"].append({"path": name, "clients": n, "tokens": rs[0]["tokens"], "tps": statistics.median(rates), "runs": rates})
    if a.json:
        benchlib.write_record(a.json, data)
    print(markdown(data))
    print(f"\n{time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
