#!/usr/bin/env python3
"""The best file at or under each stock type's size, neoxq's against AutoRound's, read from run
records that scripts/bench_optimize.py wrote for the same models (the K-quants with AutoRound, the
IQ types without: AutoRound writes no IQ type), whose files were all scored on the same held-out
tokens of each model.

For every stock type T of a model: the lowest-KLD file neoxq made (stock, stock + imatrix, mix, opt,
opt-mix, of any type) whose size is at most T's stock file's, and the lowest-KLD AutoRound file
(any mode, any type) at most that size, sizes compared with an allowance of SLACK bytes for the
metadata keys in which the files differ. Their KLD ratio has a 95 % interval from the two means'
standard errors over windows; it is unpaired, because the records keep no per-token values, and
so wider than the paired one. "none" where AutoRound made no file that small.

    .venv/bin/python scripts/bench_frontier.py RECORD.json... [--json out.json]   # the newest record first
    .venv/bin/python scripts/bench_frontier.py --markdown out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

from neoxq.core.stats import ratio_of_means  # noqa: E402

SLACK = 4096  # bytes: provenance and file-type keys (opt files carry a few hundred more than stock's)
NEOXQ_FILES = ("stock", "stock+im", "mix", "opt", "opt-mix")


def _best(files: list[dict], limit: int) -> dict | None:
    fitting = [f for f in files if f["size_bytes"] <= limit + SLACK and f.get("kld_se_window")]
    return min(fitting, key=lambda f: f["kld"], default=None)


def frontier(rows: list[dict]) -> list[dict]:
    """One row per model and stock type. A file (model, type, variant) in several records counts once,
    as the first record given holds it: give the newest first."""
    rows = list({(r["model"], r["type"], r["file"]): r for r in reversed(rows)}.values())[::-1]
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        files = [r for r in rows if r["model"] == model]
        ours = [f for f in files if f["file"] in NEOXQ_FILES]
        theirs = [f for f in files if f["file"].startswith("ar")]
        stock = sorted((f for f in files if f["file"] == "stock"), key=lambda f: -f["size_bytes"])
        for s in stock:
            best, ar = _best(ours, s["size_bytes"]), _best(theirs, s["size_bytes"])
            row = {"model": model, "type": s["type"], "size_bytes": s["size_bytes"], "ours": _name(best), "ours_kld": best["kld"]}
            vs = ratio_of_means(best["kld"], best["kld_se_window"], ar["kld"], ar["kld_se_window"]) if ar else None
            row |= {"ar": _name(ar), "ar_kld": ar["kld"] if ar else None, "vs_ar": vs}
            out.append(row)
    return out


def _name(f: dict | None) -> str | None:
    return f"{f['type']} {f['file']}" if f else None


def markdown(data: dict) -> str:
    out = [
        "| model | at or under the size of | MB | neoxq's best file | KLD | AutoRound's best file | KLD | neoxq vs AutoRound (unpaired 95 %) |",
        "|---|---|---:|---|---:|---|---:|---|",
    ]
    for r in data["rows"]:
        vs = r["vs_ar"]
        cell = f"{benchlib.ratio_cell(vs)} {vs['verdict']}" if vs else "no AutoRound file this small"
        ar = f"{r['ar']} | {r['ar_kld']:.3g}" if r["ar"] else "none | "
        out.append(f"| {r['model']} | {r['type']} | {r['size_bytes'] / 1e6:.2f} | {r['ours']} | {r['ours_kld']:.3g} | {ar} | {cell} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("records", nargs="*", type=Path, help="run records of scripts/bench_optimize.py")
    benchlib.add_record_args(ap)
    a = ap.parse_args()
    if benchlib.printed_earlier(a, markdown):
        return
    data = benchlib.run_record(sys.argv)
    rows = [r for p in a.records for r in json.loads(p.read_text(encoding="utf-8"))["rows"]]
    data["inputs"] = {str(p): json.loads(p.read_text(encoding="utf-8"))["commit"] for p in a.records}
    data["rows"] = frontier(rows)
    if a.json:
        benchlib.write_record(a.json, data)
    print(markdown(data))


if __name__ == "__main__":
    main()
