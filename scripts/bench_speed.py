#!/usr/bin/env python3
"""neoxq against the bare llama.cpp calls underneath, all measured in one run.

Each figure is printed as a ratio against a baseline measured in the same run:
  meta      metadata read of a 50k-vocabulary GGUF: neoxq.core.gguf_info vs gguf-py's GGUFReader
  ppl       perplexity tokens/s: neoxq vs a bare C-API loop (same windows, logits only at scored
            positions, no math), vs that loop computing the perplexity in numpy, and vs
            llama-perplexity; the perplexity itself vs llama-perplexity's
  kld       KLD scoring tokens/s vs the same bare loop; reference-table bytes per token vs full rows;
            the floor: that loop plus only one SIMD exp over every logit (what any exact KLD needs)
  quantize  `neoxq quantize` wall time vs one bare llama_model_quantize call and vs llama-quantize
  run       `neoxq run -n 1` wall time vs a bare load + prompt decode + one sampled token
  convert   `neoxq convert` wall time and peak RSS vs llama.cpp's convert_hf_to_gguf.py (70m, 410m,
            1.4b shapes); with --big, peak RSS converting a 6.9B-shaped checkpoint (13.8 GB)

llama.cpp's own tools come from scripts/build_llama_tools.sh (built from the pinned sdist into the
cache folder); without them those columns are skipped. Children are measured through a launcher
(benchlib.run_child), so peak RSS is each child's own.

    .venv/bin/python scripts/bench_speed.py [--only ppl,kld,...] [--windows 60] [--big] [--json out.json]
    .venv/bin/python scripts/bench_speed.py --markdown out.json   # the table of an earlier run
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from neoxq.core.machine import init_process  # noqa: E402

init_process()  # as the CLI does: before llama.cpp loads (imports below)
import benchlib  # noqa: E402

PY = sys.executable
CTX = 512

BARE_LOOP = r"""
import ctypes, json, os, sys, time
import llama_cpp, numpy as np
path, ids_file, ctx = sys.argv[1], sys.argv[2], int(sys.argv[3])
mode, nll = sys.argv[4] if len(sys.argv) > 4 else "", []
math = mode == "math"
ids = np.load(ids_file)
llama_cpp.llama_backend_init()
model = llama_cpp.llama_model_load_from_file(path.encode(), llama_cpp.llama_model_default_params())
cp = llama_cpp.llama_context_default_params()
cp.n_ctx = cp.n_batch = cp.n_ubatch = ctx
cp.n_threads = cp.n_threads_batch = len(os.sched_getaffinity(0))
lctx = llama_cpp.llama_init_from_model(model, cp)
n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
batch = llama_cpp.llama_batch_init(ctx, 0, 1)
first = ctx // 2
mem = llama_cpp.llama_get_memory(lctx)
n_chunks = len(ids) // ctx
if mode == "floor":  # one exp over every logit (ggml's SIMD exp-and-sum), rows split over all cores
    from concurrent.futures import ThreadPoolExecutor
    exp_sum = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-cpu.so")).ggml_vec_soft_max_f32
    exp_sum.restype, exp_sum.argtypes = ctypes.c_double, [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float]
    n_cores = len(os.sched_getaffinity(0))
    pool, scratch = ThreadPoolExecutor(n_cores), np.empty((n_cores, n_vocab), dtype=np.float32)
    def exp_rows(k, rows, logits, targets):
        for r in rows:
            exp_sum(n_vocab, scratch[k].ctypes.data, logits[r].ctypes.data, float(logits[r, targets[r]]))
t0 = time.perf_counter()
for c in range(n_chunks):
    llama_cpp.llama_memory_clear(mem, True)
    batch.n_tokens = ctx
    for i in range(ctx):
        batch.token[i] = int(ids[c * ctx + i]); batch.pos[i] = i; batch.n_seq_id[i] = 1; batch.seq_id[i][0] = 0
        batch.logits[i] = first <= i < ctx - 1
    assert llama_cpp.llama_decode(lctx, batch) == 0
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(lctx), shape=(ctx - 1 - first, n_vocab))
    if math:  # the perplexity as one would write it: float32 log-softmax at the targets
        m = logits.max(-1, keepdims=True)
        lse = np.log(np.exp(logits - m).sum(-1)) + m[:, 0]
        nll.append(lse - logits[np.arange(len(logits)), ids[c * ctx + first + 1:(c + 1) * ctx]])
    if mode == "floor":
        targets = ids[c * ctx + first + 1:(c + 1) * ctx]
        shares = np.array_split(np.arange(len(logits)), n_cores)
        list(pool.map(exp_rows, range(n_cores), shares, [logits] * n_cores, [targets] * n_cores))
secs = time.perf_counter() - t0
out = {"seconds": secs, "tokens": n_chunks * (ctx - 1 - first)}
if math:
    out["ppl"] = float(np.exp(np.concatenate(nll).astype(np.float64).mean()))
print(json.dumps(out))
"""

NEOXQ_LOOP = r"""
import json, sys, time
import numpy as np
from neoxq.runtime.model import NeoxModel, RuntimeOptions
from neoxq.runtime.score import GGUFReference, Windows, kld_scores, ppl_with_se, target_nll
from neoxq.runtime.reference_cache import reference_tables
path, ids_file, ctx, what = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
ids = np.load(ids_file).tolist()
with NeoxModel(path, RuntimeOptions(n_ctx=ctx, n_batch=ctx)) as m:
    w = Windows(ids, ctx)
    if what == "ppl":
        t0 = time.perf_counter(); nll = target_nll(m, w); secs = time.perf_counter() - t0
        print(json.dumps({"seconds": secs, "tokens": w.tokens_scored, "ppl": ppl_with_se(nll)[0]}))
    else:
        tables = reference_tables(GGUFReference(sys.argv[5]), w, m.n_vocab, sys.argv[6])  # built before timing
        t0 = time.perf_counter(); kl = kld_scores(m, tables, w).kld; secs = time.perf_counter() - t0
        print(json.dumps({"seconds": secs, "tokens": w.tokens_scored, "kld": float(kl.mean())}))
"""

BARE_QUANTIZE = r"""
import ctypes, os, sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.nthread = len(os.sched_getaffinity(0)); p.ftype = int(sys.argv[3])
assert llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)) == 0
"""

# where the build's CPU backend has AMX kernels, loaded as neoxq loads it (runtime.capi.amx_kernels:
# llama.cpp's AMX buffer type crashes the first decode there)
BARE_FIRST_TOKEN = r"""
import os, sys, llama_cpp
amx = "AMX_INT8 = 1" in llama_cpp.llama_print_system_info().decode("utf-8", errors="replace")
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=512, n_threads=len(os.sched_getaffinity(0)), verbose=False, **({"use_extra_bufts": False} if amx else {}))
for chunk in llm.create_completion(sys.argv[2], max_tokens=1, temperature=0.0, stream=True):
    sys.stdout.write(chunk["choices"][0]["text"])
"""


def _child_json(code: str, *args) -> dict:
    r = benchlib.run_child([PY, "-c", code, *args])
    return {**json.loads(r["stdout"].strip().splitlines()[-1]), "wall_s": r["wall_s"], "peak_rss_MiB": r["peak_rss_MiB"]}


_tools, _f16 = benchlib.llama_tools, benchlib.convert_f16


def _ids(f16: Path, text: Path, windows: int, work: Path) -> tuple[Path, Path]:
    return benchlib.eval_windows(f16, text, windows, work, CTX)


def bench_meta(f16: Path) -> dict:
    import gguf

    from neoxq.core.gguf_info import read_info

    def timed(fn, n):
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn(f16)
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    read_info(f16)  # page cache warm, imports done
    ours, theirs = timed(read_info, 20), timed(gguf.GGUFReader, 3)
    row = {"neoxq_ms": 1e3 * ours, "gguf_reader_ms": 1e3 * theirs, "ratio": ours / theirs, "goal_ms": 50}
    print(f"meta: read_info {row['neoxq_ms']:.1f} ms vs GGUFReader {row['gguf_reader_ms']:.0f} ms ({row['ratio']:.3f}x; goal ≤ 50 ms)")
    return row


def _llama_perplexity(f16: Path, text: Path, windows: int) -> dict | None:
    tools = _tools()
    if not tools:
        return None
    r = benchlib.run_child(
        [
            tools / "llama-perplexity",
            "-m",
            f16,
            "-f",
            text,
            "-c",
            CTX,
            "-b",
            CTX,
            "--chunks",
            windows,
            "-t",
            str(len(__import__("os").sched_getaffinity(0))),
        ]
    )
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", r["stdout"] + r["stderr"])
    return {"ppl": float(m.group(1)) if m else None, "wall_s": r["wall_s"]}


def _alternating(rounds: int, *runs) -> list[dict]:
    """Each run `rounds` times, interleaved (so drift hits all alike); per run the median tok/s, and
    for runs after the first the median of the per-round ratios to the first (paired: this VM's
    speed drifts by ±15% between minutes, far more than within one round)."""
    got = [[] for _ in runs]
    for _ in range(rounds):
        for i, run in enumerate(runs):
            got[i].append(run())
    out = []
    for results in got:
        med = sorted(results, key=lambda r: r["tokens"] / r["seconds"])[len(results) // 2]
        ratios = [(r["tokens"] / r["seconds"]) / (b["tokens"] / b["seconds"]) for r, b in zip(results, got[0])]
        out.append(
            {
                **med,
                "tok_s_all": [round(r["tokens"] / r["seconds"]) for r in results],
                "ratio_median": statistics.median(ratios),
                "ratios": [round(x, 3) for x in ratios],
            }
        )
    return out


def bench_ppl(f16: Path, ids: Path, text: Path, windows: int, rounds: int = 5) -> dict:
    bare, ours, math = _alternating(
        rounds,
        lambda: _child_json(BARE_LOOP, f16, ids, CTX),
        lambda: _child_json(NEOXQ_LOOP, f16, ids, CTX, "ppl"),
        lambda: _child_json(BARE_LOOP, f16, ids, CTX, "math"),
    )
    cli = benchlib.run_child([PY, "-m", "neoxq", "perplexity", f16, "--text", text, "--ctx", CTX, "--json"])
    lp = _llama_perplexity(f16, text, windows)
    row = {
        "bare_tok_s": bare["tokens"] / bare["seconds"],
        "neoxq_tok_s": ours["tokens"] / ours["seconds"],
        "neoxq_ppl": ours["ppl"],
        "tokens": ours["tokens"],
        "neoxq_cli_wall_s": cli["wall_s"],
    }
    row["ratio_vs_bare"], row["ratios"] = ours["ratio_median"], ours["ratios"]
    print(
        f"ppl: neoxq {row['neoxq_tok_s']:.0f} tok/s {ours['tok_s_all']} vs bare C-API loop {row['bare_tok_s']:.0f} tok/s "
        f"{bare['tok_s_all']}: {row['ratio_vs_bare']:.3f}x (median of paired rounds {ours['ratios']}; goal ≥ 0.95), {row['tokens']} tokens"
    )
    row |= {"bare_math_tok_s": math["tokens"] / math["seconds"], "ratio_vs_bare_math": ours["ratio_median"] / math["ratio_median"]}
    print(
        f"     the same bare loop computing the perplexity in numpy (float32 log-softmax, one thread): {row['bare_math_tok_s']:.0f} tok/s "
        f"(ppl {math['ppl']:.4f}); neoxq {row['ratio_vs_bare_math']:.2f}x its speed"
    )
    if lp:
        row |= {
            "llama_perplexity_ppl": lp["ppl"],
            "llama_perplexity_wall_s": lp["wall_s"],
            "ppl_rel_diff": abs(ours["ppl"] - lp["ppl"]) / lp["ppl"],
            "cli_wall_ratio": cli["wall_s"] / lp["wall_s"],
        }
        print(
            f"     perplexity {ours['ppl']:.4f} vs llama-perplexity {lp['ppl']:.4f} (rel. diff {row['ppl_rel_diff']:.1e}, "
            f"goal ≤ 1e-4); whole command {cli['wall_s']:.1f} s vs {lp['wall_s']:.1f} s ({row['cli_wall_ratio']:.2f}x)"
        )
    return row


def bench_kld(f16: Path, ids: Path, work: Path, label: str = "") -> dict:
    """KLD scoring of a Q4_K_M against reference tables from the F16 (built before timing)."""
    tag = f"-{label}" if label else ""
    q = work / f"q4{tag}.gguf"
    if not q.is_file():
        benchlib.run_child([PY, "-m", "neoxq", "quantize", f16, "--type", "Q4_K_M", "-o", q, "--quiet"])
    cache = work / f"refcache{tag}"
    _child_json(NEOXQ_LOOP, q, ids, CTX, "kld", f16, cache)  # builds the reference tables once
    bare, ours, floor = _alternating(
        5,
        lambda: _child_json(BARE_LOOP, q, ids, CTX),
        lambda: _child_json(NEOXQ_LOOP, q, ids, CTX, "kld", f16, cache),
        lambda: _child_json(BARE_LOOP, q, ids, CTX, "floor"),
    )
    entry = max(cache.glob("*.json"), key=lambda p: p.stat().st_mtime).stem  # the entry these windows use
    stored = sum(p.stat().st_size for p in cache.glob(f"{entry}.*.npy"))
    from neoxq.core.gguf_info import read_info

    full = ours["tokens"] * read_info(f16).n_vocab * 2  # the former float16 rows
    row = {
        "bare_tok_s": bare["tokens"] / bare["seconds"],
        "neoxq_tok_s": ours["tokens"] / ours["seconds"],
        "kld_mean": ours["kld"],
        "table_bytes_per_token": stored / ours["tokens"],
        "full_rows_bytes_per_token": full / ours["tokens"],
    }
    row["ratio_vs_bare"], row["ratios"] = ours["ratio_median"], ours["ratios"]
    print(
        f"kld{' ' + label if label else ''}: neoxq {row['neoxq_tok_s']:.0f} tok/s vs bare loop {row['bare_tok_s']:.0f} tok/s: "
        f"{row['ratio_vs_bare']:.3f}x (median of paired rounds {ours['ratios']}); "
        f"reference {row['table_bytes_per_token'] / 1e3:.1f} KB/token vs {row['full_rows_bytes_per_token'] / 1e3:.1f} KB/token "
        f"({row['full_rows_bytes_per_token'] / row['table_bytes_per_token']:.1f}x smaller)"
    )
    row |= {"floor_tok_s": floor["tokens"] / floor["seconds"], "floor_ratio_vs_bare": floor["ratio_median"], "floor_ratios": floor["ratios"]}
    print(
        f"     floor for any exact KLD: the bare loop plus only one exp over every logit (ggml's SIMD exp, all cores) "
        f"{row['floor_tok_s']:.0f} tok/s: {row['floor_ratio_vs_bare']:.3f}x (rounds {floor['ratios']})"
    )
    return row


def bench_kld_shapes(shapes: list[str], ids: Path, work: Path) -> list[dict]:
    """The same KLD timing on Pythia-shaped models (random fp16 weights, the same 50k vocabulary):
    the log-sum-exp over the vocabulary costs the same per token at every size, the decode grows."""
    rows = []
    for shape in shapes:
        f16 = _f16(benchlib.random_checkpoint(shape), work)
        rows.append({"shape": shape, **bench_kld(f16, ids, work, label=shape)})
    return rows


def bench_quantize(f16: Path, work: Path, rounds: int = 3) -> dict:
    ftype = "15"  # Q4_K_M
    runs = {
        "bare": lambda: benchlib.run_child([PY, "-c", BARE_QUANTIZE, f16, work / "bare.gguf", ftype]),
        "neoxq": lambda: benchlib.run_child([PY, "-m", "neoxq", "quantize", f16, "--type", "Q4_K_M", "-o", work / "nq.gguf", "--force", "--quiet"]),
    }
    if _tools():
        runs["llama-quantize"] = lambda: benchlib.run_child([_tools() / "llama-quantize", f16, work / "lq.gguf", "Q4_K_M"])
    times = {k: [] for k in runs}
    for _ in range(rounds):
        for k, run in runs.items():
            times[k].append(run()["wall_s"])
    rows = {k: statistics.median(v) for k, v in times.items()}
    same = _same_tensors(work / "bare.gguf", work / "nq.gguf")
    print(
        "quantize: "
        + ", ".join(f"{k} {v:.2f} s" for k, v in rows.items())
        + f" (medians of {rounds}); neoxq/bare {rows['neoxq'] / rows['bare']:.2f}x (goal ≤ 1.2); tensors identical: {same}"
    )
    return {**rows, "all": times, "ratio_vs_bare": rows["neoxq"] / rows["bare"], "identical_tensors": same}


def _same_tensors(a: Path, b: Path) -> bool:
    import gguf
    import numpy as np

    ra, rb = gguf.GGUFReader(a), gguf.GGUFReader(b)
    return all(x.name == y.name and np.array_equal(np.asarray(x.data), np.asarray(y.data)) for x, y in zip(ra.tensors, rb.tensors))


def bench_run(f16: Path) -> dict:
    prompt = "def parse(self, text):\n    "
    bare = statistics.median(benchlib.run_child([PY, "-c", BARE_FIRST_TOKEN, f16, prompt])["wall_s"] for _ in range(3))
    ours = statistics.median(
        benchlib.run_child([PY, "-m", "neoxq", "run", f16, "-p", prompt, "-n", "1", "--temp", "0", "--ctx", "512"])["wall_s"] for _ in range(3)
    )
    print(f"run: first token after {ours:.2f} s vs bare llama-cpp-python {bare:.2f} s (+{ours - bare:.2f} s; goal ≤ +0.1 s)")
    return {"neoxq_s": ours, "bare_s": bare, "extra_s": ours - bare}


# llama.cpp's converter does not know a tokenizer we trained ourselves (it identifies pre-tokenizers
# by hashing an encoding); ours is GPT-NeoX's byte-level BPE, which it calls "olmo", so say so.
LLAMA_CONVERT = r"""
import sys
src = sys.argv.pop(1)
sys.path.insert(0, src)
from conversion.base import TextModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: "olmo"
import convert_hf_to_gguf
convert_hf_to_gguf.main()
"""


def _llama_convert(folder: Path, out: Path) -> dict | None:
    cache = benchlib.cache_dir()
    venv_py = cache / "convert-venv" / "bin" / "python"
    src = cache / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
    if not venv_py.is_file():
        return None
    return benchlib.run_child([venv_py, "-c", LLAMA_CONVERT, src, str(folder), "--outfile", out, "--outtype", "f16"])


def _settle(folder: Path) -> None:
    import os

    os.sync()
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def _convert_once(shape: str, folder: Path, work: Path, who: str) -> dict | None:
    out = work / f"{shape}-{who}.gguf"
    _settle(folder)
    if who == "neoxq":
        r = benchlib.run_child([PY, "-m", "neoxq", "convert", folder, "-o", out, "--force", "--quiet"])
    else:
        r = _llama_convert(folder, out)
    out.unlink(missing_ok=True)
    return r


def bench_convert(shapes: list[str], work: Path, rounds: int = 3) -> list[dict]:
    """Interleaved rounds, each run starting with no dirty pages of an earlier one still being
    written back (this VM's disk then throttles whoever writes next; single runs of the 1.4B shape
    varied 2.1–5.8 s) and with the checkpoint in the page cache; medians and paired ratios."""
    rows = []
    for shape in shapes:
        folder = benchlib.random_checkpoint(shape)
        ours, theirs = [], []
        for _ in range(rounds):
            ours.append(_convert_once(shape, folder, work, "neoxq"))
            theirs.append(_convert_once(shape, folder, work, "llama"))
        row = {
            "shape": shape,
            "checkpoint_MB": benchlib.checkpoint_bytes(shape) / 1e6,
            "neoxq_s": statistics.median(r["wall_s"] for r in ours),
            "neoxq_all_s": [round(r["wall_s"], 2) for r in ours],
            "neoxq_rss_MiB": max(r["peak_rss_MiB"] for r in ours),
        }
        if theirs[0]:
            row |= {
                "llama_s": statistics.median(r["wall_s"] for r in theirs),
                "llama_all_s": [round(r["wall_s"], 2) for r in theirs],
                "llama_rss_MiB": max(r["peak_rss_MiB"] for r in theirs),
                "time_ratio": statistics.median(o["wall_s"] / t["wall_s"] for o, t in zip(ours, theirs)),
            }
        rows.append(row)
        print(
            f"convert {shape}: neoxq {row['neoxq_s']:.1f} s {row['neoxq_all_s']}, {row['neoxq_rss_MiB']:.0f} MiB peak"
            + (
                f" vs convert_hf_to_gguf.py {row['llama_s']:.1f} s {row['llama_all_s']}, {row['llama_rss_MiB']:.0f} MiB → "
                f"{row['time_ratio']:.2f}x time (median of paired rounds; goal ≤ 0.5)"
                if theirs[0]
                else " (llama.cpp's converter not built: scripts/build_llama_tools.sh)"
            )
        )
    return rows


def bench_big(work: Path) -> dict:
    need = benchlib.checkpoint_bytes("6.9b") * 2.05
    free = shutil.disk_usage(benchlib.cache_dir()).free + (
        benchlib.checkpoint_bytes("6.9b") if (benchlib.cache_dir() / "ckpt-6.9b-2shards").is_dir() else 0
    )
    if free < need:
        print(f"convert 6.9b: skipped, {free / 1e9:.0f} GB free but about {need / 1e9:.0f} GB needed (checkpoint + output)")
        return {"skipped": True, "free_GB": free / 1e9, "need_GB": need / 1e9}
    folder = benchlib.random_checkpoint("6.9b", shards=2)
    out = work / "6.9b.gguf"
    r = benchlib.run_child([PY, "-m", "neoxq", "convert", folder, "-o", out, "--force", "--quiet"])
    out.unlink()
    print(
        f"convert 6.9b ({benchlib.checkpoint_bytes('6.9b') / 1e9:.1f} GB fp16, 2 shards): {r['wall_s']:.0f} s, "
        f"peak RSS {r['peak_rss_MiB']:.0f} MiB (goal ≤ 1536 MiB)"
    )
    return {"wall_s": r["wall_s"], "peak_rss_MiB": r["peak_rss_MiB"]}


def _rounds(xs: list[float]) -> str:
    return f"rounds {min(xs):.2f}–{max(xs):.2f}"


def _md_scoring(data: dict) -> list[str]:
    out = []
    if "ppl" in data:
        p = data["ppl"]
        if "llama_perplexity_ppl" in p:
            out.append(
                f"| perplexity value ({data['setup']['windows']} windows of {CTX}) | {p['neoxq_ppl']:.4f} | llama-perplexity {p['llama_perplexity_ppl']:.4f} | {p['ppl_rel_diff']:.1e} rel. |"
            )
            out.append(
                f"| `perplexity` whole command | {p['neoxq_cli_wall_s']:.1f} s | llama-perplexity {p['llama_perplexity_wall_s']:.1f} s | {p['cli_wall_ratio']:.2f}× |"
            )
        out.append(
            f"| perplexity scoring, 31M model | {p['neoxq_tok_s']:.0f} tok/s | bare C-API decode loop, no math: {p['bare_tok_s']:.0f} tok/s | {p['ratio_vs_bare']:.2f}× ({_rounds(p['ratios'])}) |"
        )
        out.append(
            f"| | | the same loop computing the perplexity in numpy: {p['bare_math_tok_s']:.0f} tok/s | {p['ratio_vs_bare_math']:.2f}× its speed |"
        )
    for k in [data["kld"]] if "kld" in data else []:
        out.append(
            f"| KLD scoring of Q4_K_M, 31M model | {k['neoxq_tok_s']:.0f} tok/s | bare decode loop: {k['bare_tok_s']:.0f} tok/s | {k['ratio_vs_bare']:.2f}× ({_rounds(k['ratios'])}) |"
        )
        out.append(
            f"| | | floor: that loop plus one SIMD exp over every logit: {k['floor_tok_s']:.0f} tok/s | {k['floor_ratio_vs_bare']:.2f}× ({_rounds(k['floor_ratios'])}) |"
        )
        out.append(
            f"| KLD reference tables | {k['table_bytes_per_token'] / 1e3:.1f} KB/token | full float16 rows {k['full_rows_bytes_per_token'] / 1e3:.1f} KB/token | {k['full_rows_bytes_per_token'] / k['table_bytes_per_token']:.1f}× smaller |"
        )
    for k in data.get("kld_shapes", []):
        out.append(
            f"| KLD scoring of Q4_K_M, {k['shape']} shape | {k['neoxq_tok_s']:.0f} tok/s | bare decode loop: {k['bare_tok_s']:.0f} tok/s | {k['ratio_vs_bare']:.2f}× ({_rounds(k['ratios'])}) |"
        )
        out.append(f"| | | floor, as above: {k['floor_tok_s']:.0f} tok/s | {k['floor_ratio_vs_bare']:.2f}× |")
    return out


def _md_tools(data: dict) -> list[str]:
    out = []
    if "quantize" in data:
        q = data["quantize"]
        lq = f" (llama-quantize {q['llama-quantize']:.2f} s)" if "llama-quantize" in q else ""
        same = "identical tensors" if q["identical_tensors"] else "tensors differ"
        out.append(
            f"| `quantize` Q4_K_M | {q['neoxq']:.2f} s | one bare `llama_model_quantize` call {q['bare']:.2f} s{lq} | {q['ratio_vs_bare']:.2f}×, {same} |"
        )
    if "run" in data:
        r = data["run"]
        out.append(f"| `run` first token | {r['neoxq_s']:.2f} s | bare llama-cpp-python load + token {r['bare_s']:.2f} s | {r['extra_s']:+.2f} s |")
    for c in data.get("convert", []):
        theirs = f"convert_hf_to_gguf.py {c['llama_s']:.1f} s, {c['llama_rss_MiB']:.0f} MiB" if "llama_s" in c else "(not built)"
        ratio = f"{c['time_ratio']:.2f}× time" if "time_ratio" in c else ""
        out.append(
            f"| `convert` {c['shape']} shape ({c['checkpoint_MB']:.0f} MB) | {c['neoxq_s']:.1f} s, peak RSS {c['neoxq_rss_MiB']:.0f} MiB | {theirs} | {ratio} |"
        )
    big = data.get("convert_6.9b")
    if big and not big.get("skipped"):
        out.append(f"| `convert` 6.9B shape (2 shards) | {big['wall_s']:.0f} s, peak RSS {big['peak_rss_MiB']:.0f} MiB | (goal: ≤ 1.5 GiB) | |")
    return out


def markdown(data: dict) -> str:
    out = ["| what | neoxq | baseline | ratio |", "|---|---|---|---|"]
    if "meta" in data:
        m = data["meta"]
        out.append(
            f"| metadata of a 50k-vocabulary GGUF | {m['neoxq_ms']:.1f} ms | gguf-py GGUFReader {m['gguf_reader_ms']:.0f} ms | {m['ratio']:.3f}× |"
        )
    return "\n".join(out + _md_scoring(data) + _md_tools(data))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="meta,ppl,kld,quantize,run,convert")
    ap.add_argument("--windows", type=int, default=60)
    ap.add_argument("--convert-shapes", default="70m,410m,1.4b")
    ap.add_argument("--kld-shapes", default="70m,160m", help="Pythia shapes for the KLD timing beside the trained 31M model")
    ap.add_argument("--big", action="store_true", help="also convert a 6.9B-shaped checkpoint (needs ~30 GB of disk)")
    benchlib.add_record_args(ap)
    a = ap.parse_args()
    if benchlib.printed_earlier(a, markdown):
        return
    only = set(a.only.split(","))
    work = benchlib.cache_dir() / "speed-work"
    work.mkdir(exist_ok=True)
    import os

    print(f"machine: {len(os.sched_getaffinity(0))} cores; llama.cpp tools: {_tools() or 'not built'}")
    results = benchlib.run_record(sys.argv)
    del results["rows"]
    results["setup"] = {"windows": a.windows, "cores": len(os.sched_getaffinity(0))}
    if only & {"meta", "ppl", "kld", "quantize", "run"}:
        f16 = _f16(benchlib.trained_50k(), work)
        ids, text = _ids(f16, benchlib.eval_text(), a.windows, work)
        for name, fn in (
            ("meta", lambda: bench_meta(f16)),
            ("ppl", lambda: bench_ppl(f16, ids, text, a.windows)),
            ("kld", lambda: bench_kld(f16, ids, work)),
            ("quantize", lambda: bench_quantize(f16, work)),
            ("run", lambda: bench_run(f16)),
        ):
            if name in only:
                results[name] = fn()
        if "kld" in only and a.kld_shapes:
            results["kld_shapes"] = bench_kld_shapes(a.kld_shapes.split(","), ids, work)
    if "convert" in only:
        results["convert"] = bench_convert(a.convert_shapes.split(","), work)
    if a.big:
        results["convert_6.9b"] = bench_big(work)
    if a.json:
        benchlib.write_record(a.json, results)
    print(markdown(results))


if __name__ == "__main__":
    main()
