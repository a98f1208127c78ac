#!/usr/bin/env python3
"""neoxq's KLD statistics against llama-perplexity --kl-divergence on the same files, text and
context, all measured in one run.

For each quantized type: llama-perplexity writes the F16 file's log-probs (--kl-divergence-base),
then scores the quantized file against them; neoxq scores the same file against the same F16 on the
same windows with full-vocabulary reference tables. llama-perplexity departs from the exact KLD in
two ways, measured and printed here: it stores the base as uint16 steps with every logit more than
16 below the row's max clipped (so a rare target's log-prob is capped), and it leaves out of the
KLD every vocabulary term whose base log-prob is ≤ −16. Those two are put back on neoxq's exact
per-token values, and then every figure llama-perplexity prints is compared: values within 1e-3
relative (or below the printed digit; order statistics within llama's storage step), standard errors
within 5 %. The exact figures neoxq reports, the per-window errors it adds and the bias of its
default top-1024 reference tables are printed beside. The quantized file is loaded as
llama-perplexity loads it (with llama.cpp's weight repacking: other kernels, other roundings).

llama.cpp's tools come from scripts/build_llama_tools.sh (built here when missing).

    .venv/bin/python scripts/bench_stats.py [--types Q4_K_M,Q2_K,Q8_0] [--windows 40] [--json out.json]
    .venv/bin/python scripts/bench_stats.py --markdown out.json   # the tables of an earlier run
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

CTX = 512
REPACK = None  # as llama-perplexity loads (llama.cpp's default weight repacking)
VALUE_TOL, SE_TOL = 1e-3, 0.05  # the bounds
# llama-perplexity stores the base's log-probs as uint16 steps of at most 16/65535 (log_softmax()
# in perplexity.cpp: logits clipped 16 below the max), so each token's KLD and Δp carry its rounding:
# up to half a step (1.2e-4) — which is how it prints KLDs below 0. A percentile, minimum or maximum
# of those per-token values can differ from the exact one by that much; a mean averages it away.
LLAMA_STORAGE = 0.5 * 16 / 65535
# llama-perplexity's printed line → (our summary key, sub-key, scale of the printed number)
FIGURES = {
    r"Mean PPL\(Q\)": ("ppl", "value", 1),
    r"Mean PPL\(base\)": ("ppl_base", "value", 1),
    r"Cor\(ln\(PPL\(Q\)\), ln\(PPL\(base\)\)\)": ("cor_ln_ppl", None, 100),
    r"Mean ln\(PPL\(Q\)/PPL\(base\)\)": ("ln_ppl_ratio", "value", 1),
    r"Mean PPL\(Q\)/PPL\(base\)": ("ppl_ratio", "value", 1),
    r"Mean PPL\(Q\)-PPL\(base\)": ("ppl_diff", "value", 1),
    r"Mean    KLD": ("kld", "value", 1),
    r"Maximum KLD": ("kld", "max", 1),
    r"99\.9%   KLD": ("kld", "p99.9", 1),
    r"99\.0%   KLD": ("kld", "p99", 1),
    r"95\.0%   KLD": ("kld", "p95", 1),
    r"90\.0%   KLD": ("kld", "p90", 1),
    r"Median  KLD": ("kld", "median", 1),
    r"10\.0%   KLD": ("kld", "p10", 1),
    r" 5\.0%   KLD": ("kld", "p5", 1),
    r" 1\.0%   KLD": ("kld", "p1", 1),
    r" 0\.1%   KLD": ("kld", "p0.1", 1),
    r"Minimum KLD": ("kld", "min", 1),
    r"Mean    Δp": ("dp", "value", 100),
    r"Maximum Δp": ("dp", "max", 100),
    r"99\.9%   Δp": ("dp", "p99.9", 100),
    r"99\.0%   Δp": ("dp", "p99", 100),
    r"95\.0%   Δp": ("dp", "p95", 100),
    r"90\.0%   Δp": ("dp", "p90", 100),
    r"75\.0%   Δp": ("dp", "p75", 100),
    r"Median  Δp": ("dp", "median", 100),
    r"25\.0%   Δp": ("dp", "p25", 100),
    r"10\.0%   Δp": ("dp", "p10", 100),
    r" 5\.0%   Δp": ("dp", "p5", 100),
    r" 1\.0%   Δp": ("dp", "p1", 100),
    r" 0\.1%   Δp": ("dp", "p0.1", 100),
    r"Minimum Δp": ("dp", "min", 100),
    r"RMS Δp    ": ("rms_dp", "value", 100),
    r"Same top p": ("same_top", "value", 100),
}
BASE_PPL = r"Mean PPL\(base\)"
NUM = r"\s*:\s*(-?[0-9.]+)\s*(?:%\s*)?(?:±\s*(-?[0-9.]+))?"


def parse_llama(out: str) -> dict:
    """{pattern: (value, se or None, decimals printed)} from llama-perplexity's closing statistics."""
    got = {}
    for pat in FIGURES:
        m = re.search(r"^" + pat + NUM, out, re.M)
        if m:
            got[pat] = (float(m.group(1)), float(m.group(2)) if m.group(2) else None, len(m.group(1).split(".")[-1]))
    return got


def llama_kld(tools: Path, f16: Path, q: Path, text: Path, base: Path) -> dict:
    threads = str(len(os.sched_getaffinity(0)))
    if not base.is_file():
        benchlib.run_child([tools / "llama-perplexity", "-m", f16, "-f", text, "-c", CTX, "-b", CTX, "-t", threads, "--kl-divergence-base", base])
    r = benchlib.run_child(
        [tools / "llama-perplexity", "-m", q, "-c", CTX, "-b", CTX, "-t", threads, "--kl-divergence-base", base, "--kl-divergence"]
    )
    return parse_llama(r["stdout"] + r["stderr"])


def neoxq_scores(f16: Path, q: Path, text: Path, work: Path, k: int):
    """neoxq's per-token scores of q against the F16, with reference tables of the top k tokens
    (k = the vocabulary: exact); also the tables and windows."""
    from neoxq.runtime.model import NeoxModel, RuntimeOptions
    from neoxq.runtime.reference_cache import reference_tables
    from neoxq.runtime.score import GGUFReference, Windows, kld_scores

    with NeoxModel(q, RuntimeOptions(n_ctx=CTX, n_batch=CTX, repack=REPACK)) as m:
        w = Windows(m.tokenize(text.read_text(encoding="utf-8")), CTX)
        tables = reference_tables(GGUFReference(f16), w, m.n_vocab, work / f"refcache-{k}", k=k)
        return kld_scores(m, tables, w), tables, w


def llama_base(lp: np.ndarray) -> np.ndarray:
    """Reference log-probs [rows, V] as llama-perplexity stores and reads them back (log_softmax()
    with a uint16 out-parameter in perplexity.cpp): logits clipped 16 below the row's max, then
    rounded to 65535 steps between that floor and the max."""
    top = lp.max(-1, keepdims=True)
    floor = np.maximum(lp.min(-1, keepdims=True), top - 16.0)
    scale = ((top - floor) / 65535.0).astype(np.float32).astype(np.float64)
    steps = np.where(lp > floor, np.rint((lp - floor) / np.where(scale > 0, scale, 1)), 0)
    return floor + scale * steps


def llama_emulated(q: Path, tables, w, s):
    """neoxq's scores with llama-perplexity's two departures from the exact KLD put back, from full
    rows: the base stored as above, and every vocabulary term whose base log-prob is ≤ −16 left out
    of the KLD sum (`if (p_log_base > -16.f)`). Returns those scores and, per token, the exact KLD
    minus llama's (what the departures cost)."""
    from neoxq.core.stats import TokenScores
    from neoxq.runtime.model import NeoxModel, RuntimeOptions
    from neoxq.runtime.score import log_softmax

    kl, lp_t, ref_top = np.empty(s.n), np.empty(s.n), np.empty(s.n, dtype=np.int64)
    with NeoxModel(q, RuntimeOptions(n_ctx=CTX, n_batch=CTX, repack=REPACK)) as m:
        for c in range(w.n_chunks):
            sl = slice(c * w.per_window, (c + 1) * w.per_window)
            lq = log_softmax(m.eval_logits(w.chunk(c), w.scored_positions))
            lp = np.empty_like(lq)
            np.put_along_axis(lp, np.asarray(tables.top_idx[sl]), np.asarray(tables.top_lp[sl], dtype=np.float64), 1)
            b = llama_base(lp)
            kl[sl] = np.where(b > -16.0, np.exp(b) * (b - lq), 0.0).sum(-1)
            lp_t[sl] = b[np.arange(len(b)), w.targets(c)]
            ref_top[sl] = b.argmax(-1)
    emulated = TokenScores(**{**s.__dict__, "kld": kl, "lp": lp_t, "same_top": s.model_top == ref_top})
    return emulated, s.kld - kl


def compare_one(qtype: str, llama: dict, ours: dict) -> dict:
    rows, fails = [], []
    for pat, (key, sub, scale) in FIGURES.items():
        if pat not in llama:
            fails.append(f"{pat}: not printed by llama-perplexity")
            continue
        lv, lse, decimals = llama[pat]
        fig = ours[key] if sub is None else ours[key][sub]
        ov = scale * fig
        resolution = 0.5 * 10**-decimals  # the last printed digit
        if sub not in (None, "value"):  # a per-token order statistic: llama's storage rounding
            resolution = max(resolution, scale * LLAMA_STORAGE)
        ok_v = abs(ov - lv) <= max(VALUE_TOL * abs(lv), resolution)
        row = {"figure": pat.replace("\\", ""), "llama": lv, "neoxq": ov, "value_ok": ok_v}
        if lse is not None:
            ose, osw = scale * ours[key]["se"], scale * ours[key]["se_window"]
            ok_s = abs(ose - lse) <= max(SE_TOL * lse, 0.5 * 10**-decimals)
            row |= {"llama_se": lse, "neoxq_se": ose, "neoxq_se_window": osw, "se_ok": ok_s}
            if not ok_s:
                fails.append(f"{row['figure']}: se {ose:.6g} vs {lse:.6g}")
        if not ok_v:
            fails.append(f"{row['figure']}: {ov:.6g} vs {lv:.6g}")
        rows.append(row)
    print(f"\n{qtype}: {len(rows)} figures, {len(fails)} outside the bounds (values 1e-3 rel. or the printed digit, se 5 %)")
    print(f"  {'figure':<32} {'llama-perplexity':>22} {'neoxq':>22} {'se per window':>14}")
    for r in rows:
        se_l = f" ± {r['llama_se']:.6g}" if "llama_se" in r else ""
        se_o = f" ± {r['neoxq_se']:.6g}" if "neoxq_se" in r else ""
        win = f"{r['neoxq_se_window']:.6g} ({r['neoxq_se_window'] / r['neoxq_se']:.2f}×)" if r.get("neoxq_se") else ""
        mark = "" if r["value_ok"] and r.get("se_ok", True) else "  ✗"
        theirs, ours = f"{r['llama']:.6g}{se_l}", f"{r['neoxq']:.6g}{se_o}"
        print(f"  {r['figure']:<32} {theirs:>22} {ours:>22} {win:>14}{mark}")
    for f in fails:
        print(f"  ✗ {f}")
    return {"type": qtype, "figures": rows, "failures": fails}


def _figure(row: dict, name: str) -> dict:
    return next(f for f in row["figures"] if f["figure"] == name)


def markdown(data: dict) -> str:
    """Two tables: how many of llama-perplexity's figures neoxq reproduces, and what the exact
    figures neoxq reports differ by (llama-perplexity's definition, the top-k reference tables)."""
    rows, k = data["rows"], data["setup"]["top_k"]
    out = [
        f"Trained {data['setup']['model']} model, {data['setup']['windows']} windows of {CTX}; values within {VALUE_TOL:g} relative "
        f"(or the printed digit), standard errors within {SE_TOL:.0%}.",
        "",
        "| type | figures within the bounds | mean KLD: llama-perplexity / neoxq, llama's definition | se per window / per token (mean KLD) |",
        "|---|---:|---|---:|",
    ]
    for r in rows:
        ok = sum(f["value_ok"] and f.get("se_ok", True) for f in r["figures"])
        kld = _figure(r, "Mean    KLD")
        out.append(
            f"| {r['type']} | {ok} of {len(r['figures'])} | {kld['llama']:.6g} / {kld['neoxq']:.6g} | "
            f"{kld['neoxq_se_window'] / kld['neoxq_se']:.2f}× |"
        )
    out += [
        "",
        f"| type | exact mean KLD (neoxq) | llama-perplexity's definition vs exact | top-{k} tables vs exact | reference mass outside the top {k} | PPL(base): llama-perplexity / exact |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        base = _figure(r, "Mean PPL(base)")["llama"]
        out.append(
            f"| {r['type']} | {r['exact']['kld']:.6g} | {100 * r['llama_kld_bias']:+.2f} % | {100 * r['top_k_kld_bias']:+.2f} % | "
            f"{100 * r['top_k_rest_mass']:.2f} % | {base:.4f} / {r['exact']['ppl_base']:.4f} |"
        )
    return "\n".join(out)


def main() -> None:
    from neoxq.core.stats import summarize

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="Q8_0,Q4_K_M,Q2_K")
    ap.add_argument("--windows", type=int, default=16, help="full-vocabulary tables: 100 KB… per token, ~0.4 GB a window")
    benchlib.add_record_args(ap)
    a = ap.parse_args()
    if benchlib.printed_earlier(a, markdown):
        return
    from neoxq.runtime.reference_cache import top_k

    TOP_K = top_k()

    tools = benchlib.build_llama_tools()
    work = benchlib.cache_dir() / "stats-work"
    work.mkdir(exist_ok=True)
    f16 = benchlib.convert_f16(benchlib.trained_50k(), work)
    _, text = benchlib.eval_windows(f16, benchlib.eval_text(), a.windows, work, CTX)
    base = work / f"base-{a.windows}.dat"
    from neoxq.core.gguf_info import read_info

    n_vocab = read_info(f16).n_vocab
    results = []
    for qtype in a.types.split(","):
        q = work / f"{qtype}.gguf"
        if not q.is_file():
            benchlib.run_child([sys.executable, "-m", "neoxq", "quantize", f16, "--type", qtype, "-o", q, "--quiet"])
        llama = llama_kld(tools, f16, q, text, base)
        exact, tables, w = neoxq_scores(f16, q, text, work, n_vocab)
        emulated, cost = llama_emulated(q, tables, w, exact)
        row = compare_one(qtype, llama, summarize(emulated))
        ex = summarize(exact)
        default, dtables, _ = neoxq_scores(f16, q, text, work, TOP_K)
        dk, rest = summarize(default), float(np.exp(np.asarray(dtables.rest_lp, dtype=np.float64)).mean())
        row |= {
            "exact": {"ppl_base": ex["ppl_base"]["value"], "kld": ex["kld"]["value"], "kld_p99.9": ex["kld"]["p99.9"]},
            f"top{TOP_K}_kld": dk["kld"]["value"],
            "top_k_rest_mass": rest,
            "top_k_kld_bias": dk["kld"]["value"] / ex["kld"]["value"] - 1,
            "llama_kld_bias": -float(cost.mean()) / ex["kld"]["value"],
        }
        print(
            "  (neoxq's exact per-token values with llama-perplexity's storage of the base — clipped 16 below the max, "
            "uint16 — and its dropping of KLD terms with base log-prob ≤ −16 put back)"
        )
        print(
            f"  exact, as neoxq reports: PPL(base) {ex['ppl_base']['value']:.4f}, mean KLD {ex['kld']['value']:.6g} "
            f"(llama-perplexity's definition reads {100 * row['llama_kld_bias']:+.2f} % of it more), "
            f"KLD 99.9 % {ex['kld']['p99.9']:.6g}"
        )
        print(
            f"  neoxq's default reference tables (top {TOP_K} tokens + the rest merged): mean KLD {dk['kld']['value']:.6g} "
            f"({100 * row['top_k_kld_bias']:+.2f} % against full rows); the reference left {100 * rest:.2f} % of its mass "
            f"outside its top {TOP_K} on average"
        )
        results.append(row)
    bad = sum(len(r["failures"]) for r in results)
    print(
        f"\n{'all figures within the bounds' if not bad else f'{bad} figures outside the bounds'} "
        f"({len(results)} types, {a.windows} windows of {CTX})"
    )
    data = benchlib.run_record(sys.argv)
    data["setup"] = {"model": "31M (4 × 256, 50k vocabulary)", "windows": a.windows, "top_k": TOP_K}
    data["rows"] = results
    if a.json:
        benchlib.write_record(a.json, data)
    print(markdown(data))


if __name__ == "__main__":
    from neoxq.core.machine import init_process

    init_process()  # as the CLI does: before llama.cpp loads
    main()
