"""report, demo: the quality report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from .options import Ctx, MaxMemory, Output, Quiet, ReferenceOpt, Revision, Source


def report(
    src: Source,
    text: Annotated[Path, typer.Option("--text", help="Evaluation text (UTF-8), e.g. wikitext-2's wiki.test.raw.")],
    qtypes: Annotated[Optional[str], typer.Option("--types", help="Comma-separated types (default F16,Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q3_K_M,Q2_K).")] = None,
    imatrix: Annotated[Optional[str], typer.Option("--imatrix", help="'auto' (from the text's first quarter, which is then not scored), 'none', or a file.")] = None,
    ctx: Ctx = None,
    output: Output = None,
    revision: Revision = None,
    reference: ReferenceOpt = None,
    max_memory: MaxMemory = None,
    mix: Annotated[bool, typer.Option("--mix", help="Also <TYPE>-mix per quantized type: no larger, per-tensor types from measured sensitivity.")] = False,
    quiet: Quiet = False,
):
    """Convert, quantize to each type, and score each against the HF fp32 reference (resumable).

    -o is the report folder (default report-<name>[-<revision>])."""
    from neoxq.report import ReportOptions, run_report

    kw = {k: v for k, v in dict(types=qtypes, ctx=ctx, revision=revision, reference=reference, max_memory=max_memory, mix=mix or None).items()
          if v is not None}
    if imatrix is not None:
        kw["imatrix"] = None if imatrix.lower() == "none" else imatrix
    _print_report(run_report(src, text, output, ReportOptions(**kw)), quiet)


def _print_report(rj: Path, quiet: bool) -> None:
    from neoxq.render import table

    if not quiet:
        print(table(json.loads(rj.read_text())))
        print(f"\nreport: {rj} (+ report.md, report.png)")


def demo(
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the demo's model and report.")] = Path("demo-out"),
    quiet: Quiet = False,
):
    """Offline demo: build and briefly train a small GPT-NeoX, then run the full quality report on it."""
    from neoxq.demo import run_demo

    _print_report(run_demo(output), quiet)
