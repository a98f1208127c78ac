#!/usr/bin/env python3
"""Measured mixes against llama.cpp's stock mixes, on two trained models: the demo model
(4 x 256, its own 512-token vocabulary) and a 4 x 256 model with a 50k vocabulary (the embedding and
output then dominate the file, as in the small Pythias). Both with an importance matrix computed from
the calibration text. For Q2_K, Q3_K_M, Q4_K_M, Q5_K_M, Q6_K: stock size / KLD / top-1 against the
mix, on held-out text never used for calibration; the ratio mix/stock KLD (goal ≤ 0.7 at size ≤ stock).

Also: how well the sensitivity model predicts (Spearman rank correlation between predicted and
measured single-tensor KLDs on the demo model, predicted vs measured KLD of each final file), and,
with --cost410m, the wall time of a whole --mix run on a Pythia-410M-shaped model (random weights).

    .venv/bin/python scripts/bench_mix.py [--types Q2_K,Q4_K_M] [--cost410m] [--json out.json]
    .venv/bin/python scripts/bench_mix.py --markdown out.json   # the tables of an earlier run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

TYPES = "Q2_K,Q3_K_M,Q4_K_M,Q5_K_M,Q6_K"


def demo_model() -> Path:
    from neoxq.convert.tiny import build_trained, stdlib_text
    from neoxq.demo import demo_spec

    folder = benchlib.cache_dir() / "demo-model"
    if not (folder / "model.safetensors").is_file():
        build_trained(folder, demo_spec(), stdlib_text(400_000), steps=200)
    return folder


def texts(model: Path) -> tuple[str, str]:
    """(calibration, held-out): stdlib docstrings for the demo model, stdlib source for the 50k one."""
    from neoxq.convert.tiny import stdlib_text

    if model.name == "demo-model":
        t = stdlib_text(560_000)
        return t[400_000:440_000], t[440_000:560_000]
    t = benchlib.eval_text(400_000).read_text(encoding="utf-8")
    return t[:100_000], t[100_000:400_000]


def compare(model: Path, types: list[str], ctx: int, work: Path) -> list[dict]:
    from neoxq.convert.converter import convert
    from neoxq.convert.imatrix import compute_imatrix
    from neoxq.core.imatrix_io import write_imatrix
    from neoxq.core.mix_plan import MixOptions
    from neoxq.core.stats import compare as paired
    from neoxq.mix import quantize_mix
    from neoxq.runtime.model import NeoxModel, RuntimeOptions
    from neoxq.runtime.quantize import quantize
    from neoxq.runtime.score import GGUFReference, kld

    calib, held = texts(model)
    f16 = convert(str(model), "f16", output=work / f"{model.name}-F16.gguf", force=True)
    im = write_imatrix(work / f"{model.name}.imatrix", compute_imatrix(str(model), calib, ctx=ctx, dataset_name="calib"), force=True)

    def score(path):
        with NeoxModel(path, RuntimeOptions(n_ctx=ctx, n_batch=ctx)) as m:
            return kld(m, GGUFReference(f16), held, ctx, cache_dir=work / "cache")

    rows = []
    for t in types:
        stock = quantize(f16, t, output=work / f"{t}.gguf", imatrix=im, force=True)
        t0 = time.perf_counter()
        mix = quantize_mix(f16, t, MixOptions(calib, ctx=ctx, cache_dir=work / "mixcache"), output=work / f"{t}-mix.gguf", imatrix=im, force=True)
        secs = time.perf_counter() - t0
        a, b = score(stock.path), score(mix.path)
        row = {
            "model": model.name,
            "type": t,
            "stock_MB": stock.size_bytes / 1e6,
            "stock_kld": a.kld_mean,
            "stock_top1": a.top1,
            "mix_MB": mix.size_bytes / 1e6,
            "mix_kld": b.kld_mean,
            "mix_top1": b.top1,
            "kld_ratio": b.kld_mean / a.kld_mean,
            "vs_stock": paired(b.tokens, a.tokens)["kld"],
            "predicted_mix_kld": mix.extra["mix"]["predicted_kld"],
            "predicted_stock_kld": mix.extra["mix"]["stock_predicted_kld"],
            "probes": mix.extra["mix"]["probes"],
            "mix_seconds": secs,
        }
        rows.append(row)
        print(
            f"{model.name:<16} {t:<7} stock {row['stock_MB']:7.2f} MB KLD {a.kld_mean:.5f} top1 {100 * a.top1:5.2f}% | "
            f"mix {row['mix_MB']:7.2f} MB KLD {b.kld_mean:.5f} top1 {100 * b.top1:5.2f}% | ratio {row['kld_ratio']:.2f} | "
            f"predicted {row['predicted_mix_kld']:.5f} | {secs:.0f} s"
        )
    return rows


def proxy_quality(model: Path, ctx: int, work: Path) -> dict:
    """Every tensor alone at every k-quant, measured, against the sensitivity model's prediction."""
    import numpy as np

    from neoxq.core.gguf_info import read_info
    from neoxq.core.mix_plan import quantizable
    from neoxq.runtime.sensitivity import KLDProbe, sensitivities
    from neoxq.runtime.model import NeoxModel, RuntimeOptions

    calib, _ = texts(model)
    info = read_info(work / f"{model.name}-F16.gguf")
    with NeoxModel(info.path, RuntimeOptions(n_ctx=64, n_gpu_layers=0), info=info) as m:
        ids = m.tokenize(calib)[: 4 * ctx]
    sens, _ = sensitivities(info, ids, ctx, work / "mixcache-proxy")
    probe = KLDProbe(info, ids, ctx, work / "mixcache-proxy", None, 2)
    pred, meas = [], []
    try:
        for t in quantizable(info):
            for ty in ("Q3_K", "Q5_K", "Q6_K"):
                if ty in sens[t.name].kld:
                    pred.append(sens[t.name].kld[ty])
                    meas.append(probe.kld({t.name: ty}))
    finally:
        probe.close()
    rank = lambda x: np.argsort(np.argsort(x))  # noqa: E731
    rho = float(np.corrcoef(rank(pred), rank(meas))[0, 1])
    print(
        f"sensitivity model on {model.name}: Spearman rho {rho:.3f} over {len(pred)} unmeasured (tensor, type) pairs "
        f"(Q3_K, Q5_K, Q6_K: predicted from the Q2_K and Q4_K probes)"
    )
    return {"spearman": rho, "pairs": len(pred)}


def cost_410m(work: Path) -> dict:
    from neoxq.convert.converter import convert
    from neoxq.core.mix_plan import MixOptions
    from neoxq.mix import quantize_mix

    folder = benchlib.random_checkpoint("410m")
    f16 = work / "410m-F16.gguf"
    if not f16.is_file():
        convert(str(folder), "f16", output=f16)
    calib = benchlib.eval_text(400_000).read_text(encoding="utf-8")[:60_000]
    t0 = time.perf_counter()
    r = quantize_mix(f16, "Q4_K_M", MixOptions(calib, ctx=512, cache_dir=work / "mixcache-410m"), output=work / "410m-mix.gguf", force=True)
    secs = time.perf_counter() - t0
    print(f"--mix on a 410M-shaped model (24 layers, 50k vocab, 2 cores): {secs / 60:.1f} min, {r.extra['mix']['probes']} probes (goal ≤ 20 min)")
    return {"seconds": secs, "probes": r.extra["mix"]["probes"]}


def markdown(data: dict) -> str:
    names = {"demo-model": "demo (512 vocabulary)", "trained-50k-120": "31M (50k vocabulary)"}
    out = [
        "| model | type | stock MB / KLD / top-1 | mix MB / KLD / top-1 | mix vs stock KLD [95 %] | predicted KLD: mix / stock | mix s |",
        "|---|---|---|---|---|---|---:|",
    ]
    for r in data["rows"]:
        out.append(
            f"| {names.get(r['model'], r['model'])} | {r['type']} | {r['stock_MB']:.2f} / {r['stock_kld']:.5f} / {100 * r['stock_top1']:.2f} % | "
            f"{r['mix_MB']:.2f} / {r['mix_kld']:.5f} / {100 * r['mix_top1']:.2f} % | {benchlib.ratio_cell(r['vs_stock'])} {r['vs_stock']['verdict']} | "
            f"{r['predicted_mix_kld']:.5f} / {r['predicted_stock_kld']:.5f} | {r['mix_seconds']:.0f} |"
        )
    pq = data["proxy"]
    out += [
        "",
        f"Sensitivity model on the demo model: Spearman ρ {pq['spearman']:.3f} between predicted and measured KLD over {pq['pairs']} (tensor, type) pairs it did not probe.",
    ]
    if data.get("cost_410m"):
        c = data["cost_410m"]
        out.append(f"`--mix` on a 410M-shaped model (random weights): {c['seconds'] / 60:.1f} min, {c['probes']} probes.")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default=TYPES)
    ap.add_argument("--cost410m", action="store_true")
    benchlib.add_record_args(ap)
    a = ap.parse_args()
    if benchlib.printed_earlier(a, markdown):
        return
    work = benchlib.cache_dir() / "mix-work"
    work.mkdir(exist_ok=True)
    out = benchlib.run_record(sys.argv)
    for model, ctx in ((demo_model(), 128), (benchlib.trained_50k(), 512)):
        out["rows"] += compare(model, a.types.split(","), ctx, work)
    out["proxy"] = proxy_quality(demo_model(), 128, work)
    if a.cost410m:
        out["cost_410m"] = cost_410m(work)
    if a.json:
        benchlib.write_record(a.json, out)
    print(markdown(out))


if __name__ == "__main__":
    from neoxq.core.machine import init_process

    init_process()  # as the CLI does: before llama.cpp loads
    main()
