#!/usr/bin/env python3
"""Developer helper: KL divergence against F16 for every quant type, with and without an imatrix
(types that llama.cpp refuses without one use a uniform imatrix as the 'without' column).

    .venv/bin/python scripts/kld_table.py CHECKPOINT --text FILE [--ctx 128] [--work DIR]

The text is split like `neoxq report --imatrix auto`: the first quarter calibrates, the rest is scored.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--text", type=Path, required=True)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--work", type=Path)
    a = ap.parse_args()
    from neoxq.convert.converter import convert
    from neoxq.convert.imatrix import compute_imatrix
    from neoxq.core.imatrix_io import IMatrix, write_imatrix
    from neoxq.runtime.quantize import quantize
    from neoxq.core.qtypes import QUANTIZED
    from neoxq.report import split_for_calibration
    from neoxq.runtime.model import NeoxModel, RuntimeOptions
    from neoxq.runtime.score import GGUFReference, kld

    work = a.work or Path(tempfile.mkdtemp(prefix="neoxq-kld-"))
    work.mkdir(parents=True, exist_ok=True)
    calib, scored = split_for_calibration(a.text.read_text(encoding="utf-8"))
    f16 = convert(a.checkpoint, "f16", output=work / "F16.gguf", force=True)
    im = compute_imatrix(a.checkpoint, calib, ctx=a.ctx)
    real = write_imatrix(work / "real.imatrix", im, force=True)
    uniform = write_imatrix(
        work / "uniform.imatrix", IMatrix({k: np.ones_like(v) for k, v in im.sums.items()}, {k: 1.0 for k in im.counts}, ["uniform"]), force=True
    )

    def score(t, imatrix, tag):
        r = quantize(f16, t, output=work / f"{t.value}-{tag}.gguf", imatrix=imatrix, force=True)
        with NeoxModel(r.path, RuntimeOptions(n_ctx=a.ctx, n_batch=a.ctx)) as m:
            k = kld(m, GGUFReference(f16), scored, a.ctx, cache_dir=work / "cache")
        r.path.unlink()
        return r.bpw, k

    print(f"{'type':<8} {'bpw':>5}  {'KLD without':>14}  {'KLD with imatrix':>17}  {'change':>7}  tokens")
    for t in QUANTIZED:
        bpw, without = score(t, uniform if t.needs_imatrix else None, "none")
        _, with_im = score(t, real, "im")
        mark = "*" if t.needs_imatrix else " "
        print(
            f"{t.value:<8} {bpw:>5.2f}  {without.kld_mean:>13.5f}{mark}  {with_im.kld_mean:>17.5f}  "
            f"{100 * (with_im.kld_mean / without.kld_mean - 1):>+6.0f}%  {with_im.tokens_scored}"
        )
    print("* llama.cpp refuses this type without an imatrix: 'without' is a uniform imatrix")


if __name__ == "__main__":
    from neoxq.core.machine import init_process

    init_process()  # as the CLI does: before llama.cpp loads
    main()
