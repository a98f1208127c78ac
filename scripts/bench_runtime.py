#!/usr/bin/env python3
"""Runtime benchmark, all measured in one run on the same weights: prompt and generation tokens/s
and peak RSS for (1) neoxq's runtime, (2) raw llama-cpp-python low-level calls (llama_decode +
greedy argmax), (3) transformers fp32. Printed as ratios against the raw llama-cpp-python figures.

    .venv/bin/python scripts/bench_runtime.py [--model 70m|410m] [--type F16] [--prompt 256] [--gen 64] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from neoxq.core.machine import init_process  # noqa: E402

init_process()  # as the CLI does: before llama.cpp loads (imports below)

NEOXQ = """
import json, resource, sys, time
from neoxq.runtime.model import NeoxModel, RuntimeOptions
from neoxq.runtime.generate import GenerationStats, SamplingOptions, generate
gguf, n_prompt, n_gen = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ids = [(i * 7919) % 500 + 3 for i in range(n_prompt)]
with NeoxModel(gguf, RuntimeOptions(n_ctx=n_prompt + n_gen + 16, n_batch=n_prompt)) as m:
    m.eval_logits(ids[:8], [7])  # warm-up
    t = time.perf_counter(); m.eval_logits(ids, [n_prompt - 1]); pp = n_prompt / (time.perf_counter() - t)
    m.llm.reset()
    s = GenerationStats()
    t = time.perf_counter()
    toks = 0
    for chunk in m.llm.create_completion(ids, max_tokens=n_gen, temperature=0.0, repeat_penalty=1.0, stream=True):
        toks += 1
        if toks == 1: t1 = time.perf_counter()
    tg = (toks - 1) / (time.perf_counter() - t1)
print(json.dumps({"pp": pp, "tg": tg, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

RAW = """
import ctypes, json, resource, sys, time
import numpy as np, llama_cpp
gguf, n_prompt, n_gen = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
import os
threads = len(os.sched_getaffinity(0))
llama_cpp.llama_backend_init()
mp = llama_cpp.llama_model_default_params()
model = llama_cpp.llama_model_load_from_file(gguf.encode(), mp)
cp = llama_cpp.llama_context_default_params()
cp.n_ctx = n_prompt + n_gen + 16; cp.n_batch = n_prompt; cp.n_ubatch = n_prompt
cp.n_threads = threads; cp.n_threads_batch = threads
ctx = llama_cpp.llama_init_from_model(model, cp)
n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
ids = [(i * 7919) % 500 + 3 for i in range(n_prompt)]
batch = llama_cpp.llama_batch_init(n_prompt, 0, 1)
def decode(toks, start):
    batch.n_tokens = len(toks)
    for i, t in enumerate(toks):
        batch.token[i] = t; batch.pos[i] = start + i; batch.n_seq_id[i] = 1; batch.seq_id[i][0] = 0; batch.logits[i] = i == len(toks) - 1
    assert llama_cpp.llama_decode(ctx, batch) == 0
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, len(toks) - 1), shape=(n_vocab,))
mem = llama_cpp.llama_get_memory(ctx)
decode(ids[:8], 0); llama_cpp.llama_memory_clear(mem, True)
t = time.perf_counter(); logits = decode(ids, 0); pp = n_prompt / (time.perf_counter() - t)
tok = int(logits.argmax()); pos = n_prompt
t = time.perf_counter()
for _ in range(n_gen - 1):
    tok = int(decode([tok], pos).argmax()); pos += 1
tg = (n_gen - 1) / (time.perf_counter() - t)
print(json.dumps({"pp": pp, "tg": tg, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

HF = """
import json, resource, sys, time, torch
from neoxq.convert.reference import load_reference
folder, n_prompt, n_gen = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(torch.get_num_threads())
model = load_reference(folder)
ids = torch.tensor([[(i * 7919) % 500 + 3 for i in range(n_prompt)]])
with torch.no_grad():
    model(ids[:, :8])
    t = time.perf_counter(); model(ids); pp = n_prompt / (time.perf_counter() - t)
    model.generate(ids, max_new_tokens=1, do_sample=False)
    t = time.perf_counter(); model.generate(ids, max_new_tokens=n_gen, min_new_tokens=n_gen, do_sample=False); total = time.perf_counter() - t
    t = time.perf_counter(); model.generate(ids, max_new_tokens=1, do_sample=False); first = time.perf_counter() - t
tg = (n_gen - 1) / max(total - first, 1e-9)
print(json.dumps({"pp": pp, "tg": tg, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def child(code: str, *args) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from benchlib import SHAPES, random_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=list(SHAPES), default="70m")
    ap.add_argument("--type", default="F16")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--keep", type=Path)
    a = ap.parse_args()
    from neoxq.convert.converter import convert
    from neoxq.runtime.quantize import quantize
    from neoxq.core.qtypes import QuantType

    root = a.keep or Path(tempfile.mkdtemp(prefix="neoxq-rt-"))
    folder = random_checkpoint(a.model)  # random fp16 weights of Pythia's shape, kept in the bench cache
    f16 = root / f"{a.model}-F16.gguf"
    if not f16.is_file():
        convert(str(folder), "f16", output=f16)
    gguf = f16 if a.type.upper() == "F16" else quantize(f16, QuantType.parse(a.type), output=root / f"{a.model}-{a.type}.gguf", force=True).path
    import llama_cpp

    print(f"model {a.model} ({a.type}), prompt {a.prompt} tokens, generate {a.gen}; GPU offload: {llama_cpp.llama_supports_gpu_offload()}")
    runs = {
        "raw llama-cpp-python": child(RAW, gguf, a.prompt, a.gen),
        "neoxq": child(NEOXQ, gguf, a.prompt, a.gen),
        "transformers fp32": child(HF, folder, a.prompt, a.gen),
    }
    base = runs["raw llama-cpp-python"]
    print(f"\n{'runtime':<22} {'pp tok/s':>9} {'tg tok/s':>9} {'peak RSS MiB':>13} {'pp ratio':>9} {'tg ratio':>9} {'RSS ratio':>10}")
    for name, r in runs.items():
        print(
            f"{name:<22} {r['pp']:>9.1f} {r['tg']:>9.1f} {r['rss'] / 2**20:>13.0f} {r['pp'] / base['pp']:>9.2f} "
            f"{r['tg'] / base['tg']:>9.2f} {r['rss'] / base['rss']:>10.2f}"
        )
    print("(ratios: against raw llama-cpp-python measured in this run)")


if __name__ == "__main__":
    main()
