#!/usr/bin/env python3
"""The fp32 reference in memory against streamed layer by layer, on 410M- and 1.4B-shaped
checkpoints (random fp16 weights, 50k vocabulary): peak RSS, tokens/s, and the KLD of a Q8_0 file
against each (which must be equal); the preflight's estimate against each measured peak. With --big,
`neoxq report --types Q4_K_M --imatrix none` on a 6.9B-shaped checkpoint (13.8 GB of fp16 in two
shards), 4 windows of 512: does it finish under 6 GiB, and how long does it take?

    .venv/bin/python scripts/bench_reference.py [--shapes 410m,1.4b] [--windows 4] [--big] [--json out.json]
    .venv/bin/python scripts/bench_reference.py --markdown out.json   # the table of an earlier run
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from neoxq.core.machine import init_process  # noqa: E402

init_process()  # as the CLI does: before llama.cpp loads (imports below)
import benchlib  # noqa: E402

PY = sys.executable
CTX = 512
STREAMED_BUDGET = 3 << 30

CHILD = r"""
import json, sys, time
from neoxq.convert.checkpoint import open_checkpoint
from neoxq.convert.reference import HFReference
from neoxq.runtime.model import NeoxModel, RuntimeOptions
from neoxq.runtime.score import kld
folder, q8, text, mode, budget, cache = sys.argv[1:7]
ck = open_checkpoint(folder)
ref = HFReference(ck, max_memory=int(budget) if budget != "-" else None, mode=mode)
body = open(text, encoding="utf-8").read()
with NeoxModel(q8, RuntimeOptions(n_ctx=512, n_batch=512)) as m:
    from neoxq.runtime.score import Windows
    w = Windows(m.tokenize(body), 512)
    plan = ref.prepare(512, w.n_chunks)
    t0 = time.perf_counter()
    r = kld(m, ref, body, 512, cache_dir=cache)
    secs = time.perf_counter() - t0
print(json.dumps({"kld": r.kld_mean, "tokens": r.tokens_scored, "seconds": secs, "plan_peak": plan.peak_bytes, "mode": plan.mode,
                  "group": plan.group}))
"""


def text_windows(windows: int) -> Path:
    path = benchlib.cache_dir() / f"ref-text-{windows}.txt"
    if not path.is_file():
        body = benchlib.eval_text(400_000).read_text(encoding="utf-8")
        path.write_text(body[: windows * CTX * 4 + 4000], encoding="utf-8")  # ~4 chars per token, a few windows
    return path


def one(shape: str, windows: int, work: Path) -> list[dict]:
    folder = benchlib.random_checkpoint(shape)
    f16, q8 = work / f"{shape}-F16.gguf", work / f"{shape}-Q8_0.gguf"
    if not q8.is_file():
        benchlib.run_child([PY, "-m", "neoxq", "convert", folder, "-o", f16, "--force", "--quiet"])
        benchlib.run_child([PY, "-m", "neoxq", "quantize", f16, "--type", "Q8_0", "-o", q8, "--force", "--quiet"])
        f16.unlink()
    text = text_windows(windows)
    rows = []
    for mode, budget in (("memory", "-"), ("streamed", str(STREAMED_BUDGET))):
        cache = work / f"cache-{shape}-{mode}"
        for p in cache.glob("*"):
            p.unlink()
        r = benchlib.run_child([PY, "-c", CHILD, folder, q8, text, mode, budget, cache])
        d = json.loads(r["stdout"].strip().splitlines()[-1])
        row = {
            "shape": shape,
            "mode": mode,
            "peak_rss_MiB": r["peak_rss_MiB"],
            "tok_s": d["tokens"] / d["seconds"],
            "kld_q8": d["kld"],
            "group": d["group"],
            "estimate_MiB": (d["plan_peak"] + q8.stat().st_size) / 2**20,
        }
        row["estimate_vs_measured"] = row["estimate_MiB"] / row["peak_rss_MiB"]
        rows.append(row)
        print(
            f"{shape} {mode:<8} peak {row['peak_rss_MiB']:7.0f} MiB (estimate {row['estimate_MiB']:6.0f}, {row['estimate_vs_measured']:.2f}x), "
            f"{row['tok_s']:6.1f} tok/s, KLD(Q8_0) {row['kld_q8']:.6f}"
        )
    return rows


def big(work: Path) -> dict:
    folder = benchlib.random_checkpoint("6.9b", shards=2)
    text = text_windows(4)
    out = work / "report-6.9b"
    r = benchlib.run_child(
        [PY, "-m", "neoxq", "report", folder, "--text", text, "--types", "Q4_K_M", "--imatrix", "none", "--ctx", CTX, "-o", out, "--quiet"]
    )
    rep = json.loads((out / "report.json").read_text())
    print(
        f"6.9b report (Q4_K_M, {rep['text']['tokens_scored']} tokens): {r['wall_s'] / 60:.1f} min, peak RSS {r['peak_rss_MiB']:.0f} MiB "
        f"(goal ≤ 6144); reference: {rep['reference']['kind']}"
    )
    return {"minutes": r["wall_s"] / 60, "peak_rss_MiB": r["peak_rss_MiB"], "reference": rep["reference"]}


def markdown(data: dict) -> str:
    by = {(r["shape"], r["mode"]): r for r in data["rows"]}
    out = [
        f"Random fp16 weights, 50k vocabulary, {data['setup']['windows']} windows of {CTX}; the streamed mode under a "
        f"{data['setup']['streamed_budget_GiB']} GiB budget.",
        "",
        "| shape | in memory: peak RSS MiB / tok/s | streamed: peak RSS MiB / tok/s | KLD of Q8_0: in memory / streamed | preflight estimate / measured peak: in memory / streamed |",
        "|---|---|---|---|---|",
    ]
    for shape in dict.fromkeys(r["shape"] for r in data["rows"]):
        m, s = by[(shape, "memory")], by[(shape, "streamed")]
        out.append(
            f"| {shape} | {m['peak_rss_MiB']:.0f} / {m['tok_s']:.1f} | {s['peak_rss_MiB']:.0f} / {s['tok_s']:.1f} | "
            f"{m['kld_q8']:.6f} / {s['kld_q8']:.6f} | {m['estimate_vs_measured']:.2f}× / {s['estimate_vs_measured']:.2f}× |"
        )
    if data.get("big"):
        b = data["big"]
        out += ["", f"6.9B-shaped `neoxq report --types Q4_K_M --imatrix none`: {b['minutes']:.1f} min, peak RSS {b['peak_rss_MiB']:.0f} MiB."]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="410m,1.4b")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--big", action="store_true")
    benchlib.add_record_args(ap)
    a = ap.parse_args()
    if benchlib.printed_earlier(a, markdown):
        return
    work = benchlib.cache_dir() / "reference-work"
    work.mkdir(exist_ok=True)
    data = benchlib.run_record(sys.argv)
    data["setup"] = {"windows": a.windows, "streamed_budget_GiB": STREAMED_BUDGET >> 30}
    data["rows"] = [row for s in a.shapes.split(",") if s for row in one(s, a.windows, work)]
    if a.big:
        data["big"] = big(work)
    if a.json:
        benchlib.write_record(a.json, data)
    print(markdown(data))


if __name__ == "__main__":
    main()
