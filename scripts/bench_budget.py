#!/usr/bin/env python3
"""An optimised mix at any size against one stock file: `quantize --optimize --mix` at the type's
own size and at each `--target-bpw` given, each file's KLD against the stock file's (paired on the
same held-out tokens, 95 % interval), with the bits per weight of its tensors. Uses the model, the
F16 file and the calibration text that scripts/bench_optimize.py keeps in its work folder (made here
when missing), so the numbers are on the same tokens as its tables, and neoxq's cache of its last run
(the calibration pass and the sensitivities are reused).

    .venv/bin/python scripts/bench_budget.py [--models 31m] [--type IQ2_S] [--bpw 3.2,3.6] [--against Q4_K_M] [--json out.json]
    .venv/bin/python scripts/bench_budget.py --markdown out.json   # the table of an earlier run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_optimize  # noqa: E402
import benchlib  # noqa: E402

CTX = bench_optimize.CTX


def _file_row(label: str, path: Path, made: dict, scores, against) -> dict:
    from neoxq.core.gguf_info import read_info
    from neoxq.core.stats import compare

    info = read_info(path)
    return {
        "file": label,
        "size_bytes": path.stat().st_size,
        "tensor_bpw": info.bpw,
        "kld": scores.kld_mean,
        "seconds": made.get("wall_s"),
        "vs_against": compare(scores.tokens, against.tokens)["kld"] if scores is not against else None,
    }


def bench_model(name: str, ckpt: Path, heldout: str, qtype: str, budgets: list[float], against: str) -> list[dict]:
    work = benchlib.cache_dir() / "optimize-work" / name
    work.mkdir(parents=True, exist_ok=True)
    calib, scored = heldout[: bench_optimize.CALIB_CHARS], heldout[bench_optimize.CALIB_CHARS + 20_000 :]
    (work / "calib.txt").write_text(calib, encoding="utf-8")
    f16 = benchlib.convert_f16(ckpt, work)
    base = work / f"{against}.gguf"
    made = {against: bench_optimize.make_stock(f16, against, base, None)}
    files = {against: base}
    for bpw in [None, *budgets]:
        label = f"{qtype}-opt-mix" + (f" --target-bpw {bpw:g}" if bpw else "")
        out = work / (f"{qtype}-opt-mix.gguf" if bpw is None else f"{qtype}-opt-mix-{bpw:g}bpw.gguf")
        extra = ["--target-bpw", str(bpw)] if bpw else []
        made[label] = bench_optimize.neoxq_quantize(
            f16, qtype, out, ckpt, work / "calib.txt", "--optimize", "--mix", *extra, cache=work / "neoxq-cache"
        )
        files[label] = out
    scores = {k: bench_optimize.score(p, f16, scored, work / "cache") for k, p in files.items()}
    rows = []
    for k, p in files.items():
        rows.append({"model": name, "type": qtype, "against": against, **_file_row(k, p, made[k], scores[k], scores[against])})
        r = rows[-1]
        print(
            f"{name} {k:<32} {r['size_bytes'] / 1e6:7.2f} MB  {r['tensor_bpw']:.2f} bpw  KLD {r['kld']:.3g}  vs {against} {benchlib.ratio_cell(r['vs_against'])}"
        )
    return rows


def markdown(data: dict) -> str:
    out = ["| model | file | MB | tensor bits per weight | KLD | KLD vs the stock file |", "|---|---|---:|---:|---:|---|"]
    for r in data["rows"]:
        vs = f"{benchlib.ratio_cell(r['vs_against'])} {r['vs_against']['verdict']}" if r["vs_against"] else "1 (the baseline)"
        out.append(f"| {r['model']} | {r['file']} | {r['size_bytes'] / 1e6:.2f} | {r['tensor_bpw']:.2f} | {r['kld']:.3g} | {vs} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="31m")
    ap.add_argument("--type", default="IQ2_S", help="the type whose optimised mix is planned")
    ap.add_argument("--bpw", default="3.2,3.6", help="--target-bpw values (bits per weight of the whole file)")
    ap.add_argument("--against", default="Q4_K_M", help="the stock file every optimised mix is compared with")
    benchlib.add_record_args(ap)
    a = ap.parse_args()
    if benchlib.printed_earlier(a, markdown):
        return
    t0 = time.time()
    data = benchlib.run_record(sys.argv)
    budgets = [float(x) for x in a.bpw.split(",") if x]
    for name, (ckpt, heldout) in bench_optimize.models(a.models.split(",")).items():
        data["rows"] += bench_model(name, ckpt, heldout, a.type, budgets, a.against)
        if a.json:
            benchlib.write_record(a.json, data)
    print(markdown(data))
    print(f"\n{time.time() - t0:.0f} s")


if __name__ == "__main__":
    from neoxq.core.machine import init_process

    init_process()  # as the CLI does: before llama.cpp loads
    main()
