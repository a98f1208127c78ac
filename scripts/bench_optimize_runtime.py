#!/usr/bin/env python3
"""`--optimize` files in unmodified llama.cpp: llama.cpp's own `llama-perplexity`
(built by scripts/build_llama_tools.sh) loads each stock and -opt file that scripts/bench_optimize.py
left in its work folder and prints its perplexity on the same held-out windows as neoxq's
`perplexity` (which both should agree with to ~1e-4: other kernels); and generation speed of -opt
against stock (same kernels, so the ratio should be 1 within noise), timed alternately in one
process, median of rounds, with the spread. Files: stock, stock + imatrix where the benchmark made
one (`<T>-im.gguf`), and opt.

    .venv/bin/python scripts/bench_optimize_runtime.py [--models 31m,demo,70m] [--types Q4_K_M,Q2_K_S] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_optimize  # noqa: E402
import benchlib  # noqa: E402

CTX = bench_optimize.CTX
CHARS = 40_000  # of the held-out text: ~20 windows of 512
ROUNDS = 5


def llama_ppl(tools: Path, model: Path, text: Path) -> float:
    threads = str(len(os.sched_getaffinity(0)))
    r = benchlib.run_child([tools / "llama-perplexity", "-m", model, "-f", text, "-c", CTX, "-b", CTX, "-t", threads])
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", r["stdout"] + r["stderr"])
    if not m:
        raise SystemExit(f"llama-perplexity printed no estimate for {model}")
    return float(m.group(1))


def neoxq_ppl(model: Path, text: str) -> float:
    from neoxq.runtime.model import NeoxModel, RuntimeOptions
    from neoxq.runtime.score import perplexity

    with NeoxModel(model, RuntimeOptions(n_ctx=CTX, n_batch=CTX)) as m:
        return perplexity(m, text, CTX).ppl


def speeds(paths: dict[str, Path], text: str) -> dict[str, dict]:
    """Generation and prompt tokens/s per file, rounds alternating between the files."""
    from neoxq.runtime.model import NeoxModel, RuntimeOptions
    from neoxq.runtime.speed import measure

    models = {k: NeoxModel(p, RuntimeOptions(n_ctx=CTX, n_batch=CTX)) for k, p in paths.items()}
    try:
        ids = next(iter(models.values())).tokenize(text)
        runs = {k: [] for k in models}
        for _ in range(ROUNDS):
            for k, m in models.items():
                runs[k].append(measure(m, ids, runs=1))
    finally:
        for m in models.values():
            m.close()
    return {
        k: {
            "tg_tps": statistics.median(s.tg_tps for s in r),
            "pp_tps": statistics.median(s.pp_tps for s in r),
            "tg_spread": (max(s.tg_tps for s in r) - min(s.tg_tps for s in r)) / statistics.median(s.tg_tps for s in r),
        }
        for k, r in runs.items()
    }


def markdown(data: dict) -> str:
    out = [
        "| model | type | file | llama-perplexity PPL | neoxq PPL | neoxq / llama.cpp − 1 | generation tok/s | vs stock |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in data["rows"]:
        rel = r["neoxq_ppl"] / r["llama_perplexity_ppl"] - 1
        out.append(
            f"| {r['model']} | {r['type']} | {r['file']} | {r['llama_perplexity_ppl']:.4f} | {r['neoxq_ppl']:.4f} | {rel:+.1e} | "
            f"{r['tg_tps']:.0f} | {r['tg_vs_stock']:.3f}× |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="31m,demo,70m")
    ap.add_argument("--types", default="Q4_K_M,Q2_K_S")
    benchlib.add_record_args(ap)
    a = ap.parse_args()
    if benchlib.printed_earlier(a, markdown):
        return
    tools = benchlib.build_llama_tools()
    data = benchlib.run_record(sys.argv)
    rows = data["rows"]
    for name in a.models.split(","):
        work = benchlib.cache_dir() / "optimize-work" / name
        heldout = benchlib.eval_text().read_text(encoding="utf-8") if name != "demo" else bench_optimize.models(["demo"])["demo"][1]
        text = heldout[bench_optimize.CALIB_CHARS + 20_000 :][:CHARS]
        if len(text) < CHARS // 2:
            print(f"{name}: its held-out text leaves only {len(text)} characters after the calibration part; skipped")
            continue
        (work / "runtime-text.txt").write_text(text, encoding="utf-8")
        for qtype in a.types.split(","):
            paths = {"stock": work / f"{qtype}.gguf", "stock+im": work / f"{qtype}-im.gguf", "opt": work / f"{qtype}-opt.gguf"}
            if not paths["stock+im"].is_file():
                del paths["stock+im"]
            if not all(p.is_file() for p in paths.values()):
                print(f"{name} {qtype}: run scripts/bench_optimize.py first")
                continue
            sp = speeds(paths, text)
            for k, p in paths.items():
                row = {
                    "model": name,
                    "type": qtype,
                    "file": k,
                    "llama_perplexity_ppl": llama_ppl(tools, p, work / "runtime-text.txt"),
                    "neoxq_ppl": neoxq_ppl(p, text),
                    **sp[k],
                    "tg_vs_stock": sp[k]["tg_tps"] / sp["stock"]["tg_tps"],
                }
                rows.append(row)
                print(
                    f"{name} {qtype} {k:5s} llama-perplexity PPL {row['llama_perplexity_ppl']:.4f}  neoxq PPL {row['neoxq_ppl']:.4f}  "
                    f"generation {row['tg_tps']:.1f} tok/s (spread {100 * row['tg_spread']:.0f} %)  vs stock {row['tg_vs_stock']:.3f}×",
                    flush=True,
                )
    if a.json:
        benchlib.write_record(a.json, data)
    print(markdown(data))


if __name__ == "__main__":
    from neoxq.core.machine import init_process

    init_process()  # as the CLI does: before llama.cpp loads
    main()
