#!/usr/bin/env python3
"""Developer helper: a `py-spy record -f raw` profile of `neoxq quantize --optimize` counted by
stage, as the tables of docs/benchmarks.md ("Where `--optimize`'s time goes at 410M") are. Each
sample is counted once, in the first stage (in STAGES' order) whose functions its stack holds.

    .venv/bin/py-spy record -r 20 -f raw -o prof.txt -- .venv/bin/python -m neoxq quantize … --optimize …
    .venv/bin/python scripts/profile_stages.py prof.txt [--rate 20] [--before old.txt]
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

REST = "loading, checks, writing, imports"
# (stage, frames that put a sample in it): a frame matches when its text holds one of them
STAGES = (
    ("llama.cpp's quantizer (the stock file, with the imatrix)", ("quantize (runtime/capi.py",)),
    ("first pass: fp32 forward and backward (imatrix, the Fisher's sampled-token gradients)", ("optimize_statistics",)),
    ("rounding: the targets (`asymmetric_target`)", ("asymmetric_target",)),
    ("rounding: GPTQ's Cholesky and compensation", ("moments_factor", "compensation (")),
    ("rounding: sweeps and coupled QKV", ("gptq_levels", "coupled_levels", "codebook_round")),
    (
        "rounding: block grids, errors and the block codec",
        ("round_rows", "rounded_chunks", "asymmetric_error", "dequantized_rows", "corrected_bias", "RowCoupling", "_LayerRounding.requantize"),
    ),
    ("layer by layer: the layers' passes and the moments' sums", ("_moments (", "_run (convert", "_head_moments")),
    ("layer by layer: the rest", ("sequential_calibration", "rewrite_sequential")),
    ("the equalised copy, the embedding, the rest of the job", ("_run_job",)),
)


def stage_samples(path: Path) -> collections.Counter:
    """Samples per stage of a raw py-spy profile (lines `frame;frame;… count`)."""
    counts: collections.Counter = collections.Counter()
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        stack, n = line.rsplit(" ", 1)
        stage = next((name for name, frames in STAGES if any(f in stack for f in frames)), REST)
        counts[stage] += int(n)
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("profile", type=Path)
    ap.add_argument("--rate", type=float, default=20.0, help="py-spy's samples per second (-r)")
    ap.add_argument("--before", type=Path, help="another profile, counted the same way, for a before column")
    a = ap.parse_args()
    after = stage_samples(a.profile)
    before = stage_samples(a.before) if a.before else None
    total = sum(after.values())
    print(f"{total / a.rate:.0f} s in {a.profile.name}" + (f", {sum(before.values()) / a.rate:.0f} s in {a.before.name}" if before else ""))
    print("| stage |" + (" before, s |" if before else "") + " s | share |")
    print("|---|" + ("---:|" if before else "") + "---:|---:|")
    for name in [s for s, _ in STAGES] + [REST]:
        was = f" {before[name] / a.rate:.0f} |" if before else ""
        print(f"| {name} |{was} {after[name] / a.rate:.0f} | {100 * after[name] / total:.1f} % |")


if __name__ == "__main__":
    main()
