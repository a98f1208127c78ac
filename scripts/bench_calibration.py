#!/usr/bin/env python3
"""Which calibration text `--optimize` should use by default: the checkpoint's own sample, a text of
the model's training domain, or a text of another domain, each scored on two domains in one run.

Per model and type, against the model's F16 file on held-out windows (KLD, ratios paired on the same
tokens with 95 % intervals):
  stock      llama.cpp's quantizer, no imatrix
  opt-self   `neoxq quantize --optimize` with no --calib: the checkpoint samples its own text
  opt-train  `--optimize --calib` on held-out text of the model's training domain
  opt-other  `--optimize --calib` on Python's reference manual (pydoc_data.topics), another domain
Scored on the training domain's held-out text and on a part of the manual no calibration text
overlaps. opt-self's own ratio to each given text says which default wins.

    .venv/bin/python scripts/bench_calibration.py [--models demo,31m] [--types Q4_K_M,Q2_K] [--json out.json]
    .venv/bin/python scripts/bench_calibration.py --markdown out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

PY = sys.executable
CTX = 512
CALIB_CHARS = 60_000
SCORED_CHARS = 120_000
FILES = ("stock", "opt-self", "opt-train", "opt-other")
DOMAINS = ("training domain", "reference manual")


def model_texts(name: str) -> tuple[Path, str]:
    """(checkpoint, held-out text of its training domain)."""
    if name == "demo":
        from neoxq.demo import build_demo_model

        return build_demo_model(benchlib.cache_dir() / "demo-model")
    return benchlib.trained_50k(shape=None if name == "31m" else name), benchlib.eval_text().read_text(encoding="utf-8")


def make(f16: Path, qtype: str, out: Path, calib: Path | None) -> dict:
    argv = [PY, "-m", "neoxq", "quantize", f16, "--type", qtype, "-o", out, "--force", "--quiet"]
    if calib is not None or out.name.endswith("-self.gguf"):
        argv += ["--optimize", "--ctx", CTX] + (["--calib", calib] if calib else [])
    return benchlib.run_child(argv)


def bench_model(name: str, types: list[str]) -> list[dict]:
    from neoxq.core.stats import compare

    ckpt, heldout = model_texts(name)
    manual = benchlib.manual_text()
    work = benchlib.cache_dir() / "calibration-work" / name
    work.mkdir(parents=True, exist_ok=True)
    calib = {"opt-train": work / "train.txt", "opt-other": work / "other.txt"}
    calib["opt-train"].write_text(heldout[:CALIB_CHARS], encoding="utf-8")
    calib["opt-other"].write_text(manual[:CALIB_CHARS], encoding="utf-8")
    scored = {DOMAINS[0]: heldout[CALIB_CHARS : CALIB_CHARS + SCORED_CHARS], DOMAINS[1]: manual[-SCORED_CHARS:]}
    f16 = benchlib.convert_f16(ckpt, work)
    rows = []
    for qtype in types:
        made = {}
        for kind in FILES:
            path = work / f"{qtype}-{kind}.gguf"
            made[kind] = (path, make(f16, qtype, path, calib.get(kind)))
        for domain, text in scored.items():
            scores = {k: _score(p, f16, text, work / "cache") for k, (p, _) in made.items()}
            for k, s in scores.items():
                row = {
                    "model": name,
                    "type": qtype,
                    "file": k,
                    "scored_on": domain,
                    "kld": s.kld_mean,
                    "seconds": made[k][1]["wall_s"],
                    "vs_stock": compare(s.tokens, scores["stock"].tokens)["kld"] if k != "stock" else None,
                    "self_vs": compare(scores["opt-self"].tokens, s.tokens)["kld"] if k in calib else None,
                }
                rows.append(row)
                print(json.dumps({x: row[x] for x in ("model", "type", "file", "scored_on", "kld")}), flush=True)
    return rows


def _score(path: Path, f16: Path, text: str, cache: Path):
    from neoxq.runtime.model import NeoxModel, RuntimeOptions
    from neoxq.runtime.score import GGUFReference, kld

    with NeoxModel(path, RuntimeOptions(n_ctx=CTX, n_batch=CTX)) as m:
        return kld(m, GGUFReference(f16), text, CTX, cache_dir=cache)


def markdown(data: dict) -> str:
    """One table per model: KLD of stock, each opt file's ratio to stock per scored domain, and the
    self-generated text's ratio to each given text."""

    ratio = benchlib.ratio_cell

    rows, out = data["rows"], []
    for model in dict.fromkeys(r["model"] for r in rows):
        out += [
            f"\n{model}:\n",
            "| type | scored on | stock KLD | opt-self | opt-train | opt-other | self vs train | self vs other |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for qtype in dict.fromkeys(r["type"] for r in rows if r["model"] == model):
            for domain in DOMAINS:
                by = {r["file"]: r for r in rows if (r["model"], r["type"], r["scored_on"]) == (model, qtype, domain)}
                cells = [ratio(by[k]["vs_stock"]) for k in FILES[1:]] + [ratio(by[k]["self_vs"]) for k in ("opt-train", "opt-other")]
                out.append(f"| {qtype} | {domain} | {by['stock']['kld']:.3g} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="demo,31m")
    ap.add_argument("--types", default="Q4_K_M,Q2_K")
    benchlib.add_record_args(ap)
    a = ap.parse_args()
    if benchlib.printed_earlier(a, markdown):
        return
    data = benchlib.run_record(sys.argv)
    for name in a.models.split(","):
        data["rows"] += bench_model(name, a.types.split(","))
        if a.json:
            benchlib.write_record(a.json, data)
    print(markdown(data))


if __name__ == "__main__":
    main()
