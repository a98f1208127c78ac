#!/usr/bin/env python3
"""Developer helper: a neoxq command's time inside the large library calls --optimize makes.

Measured per kind of call and written as JSON. Unlike a sampling profile it adds no measurable
time (a few thousand timed calls), so the command's own wall time stays comparable with a plain
run's in the same benchmark.

    .venv/bin/python scripts/stage_times.py OUT.json -- quantize F16.gguf --type Q4_K_M --optimize …

Each call is timed only where no other timed call encloses it (the first pass's layers count as
the first pass), so the kinds add up to at most the run's time. What is not timed — the rounding's
per-column work, the block codec, GPTQ's numpy products, copies, Python — is the run's time less
their sum.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import sys
import time
from pathlib import Path

# (kind, the module, the attribute looked up at each call): names as data, so a renamed function
# fails loudly here rather than going untimed
TIMED = (
    ("llama.cpp's quantizer (the stock file's grids)", "neoxq.optimize", "quantize"),
    ("torch: the first pass (forward and backward)", "neoxq.calibration", "second_moments"),
    ("torch: the layers' passes", "transformers.models.gpt_neox.modeling_gpt_neox", "GPTNeoXLayer.forward"),
    ("torch: the moments' products (Σ y xᵀ, Σ x xᵀ)", "neoxq.convert.calibrate", "_Accumulator.add"),
    ("torch: the moments' products (Σ y xᵀ, Σ x xᵀ)", "neoxq.convert.calibrate", "_Accumulator.add_inputs"),
    ("LAPACK: Cholesky factors (dpotrf)", "scipy.linalg.lapack", "dpotrf"),
    ("LAPACK: triangular inverses (dtrtri)", "scipy.linalg.lapack", "dtrtri"),
    ("BLAS: triangular products of the targets (dtrmm)", "scipy.linalg.blas", "dtrmm"),
)

_depth = [0]


def _timed(fn, kind: str, spent: dict[str, float], clock=time.perf_counter):
    @functools.wraps(fn)
    def call(*args, **kwargs):
        if _depth[0]:
            return fn(*args, **kwargs)
        _depth[0] += 1
        t0 = clock()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[kind] += clock() - t0
            _depth[0] -= 1

    return call


def target(module: str, attr: str) -> tuple[object, str]:
    """The object that holds a TIMED attribute (the module, or a class in it) and its name."""
    owner = importlib.import_module(module)
    *path, name = attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    if not callable(getattr(owner, name)):
        raise TypeError(f"{module}.{attr} is not callable")
    return owner, name


def install(spent: dict[str, float]) -> None:
    """Wrap every TIMED attribute in place (a class's method on the class), for the process."""
    for kind, module, attr in TIMED:
        owner, name = target(module, attr)
        spent.setdefault(kind, 0.0)
        setattr(owner, name, _timed(getattr(owner, name), kind, spent))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="the JSON written: the command's wall time and each kind's seconds")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="-- and the neoxq command's arguments")
    a = ap.parse_args()
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    if not args:
        ap.error("give the neoxq command after --")
    out = a.out
    from neoxq.core.machine import init_process

    app = importlib.import_module("neoxq.cli.app")  # the module (the package's `app` is the typer app)

    init_process()  # what the command's main does first, before the timed modules load torch and llama.cpp
    app._load_llama_first()
    spent: dict[str, float] = {}
    install(spent)
    t0 = time.perf_counter()
    sys.argv = ["neoxq", *args]
    code = 0
    try:
        app.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out.write_text(json.dumps({"wall_s": time.perf_counter() - t0, "timed_s": spent}, indent=1), encoding="utf-8")
    return code


if __name__ == "__main__":
    sys.exit(main())
