"""report, demo: the quality report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from neoxq.core.choices import imatrix_choice, reference_choice
from neoxq.tables import sweep_table

from .options import Ctx, IncludePath, MaxMemory, Output, Quiet, ReferenceOpt, Revision, Source, Tasks
from .say import result_line


def report(
    src: Source,
    text: Annotated[
        Optional[Path],
        typer.Option("--text", help="Evaluation text (UTF-8), e.g. wikitext-2's wiki.test.raw; default: the checkpoint's own seeded sample."),
    ] = None,
    qtypes: Annotated[Optional[str], typer.Option("--types", help="Comma-separated types (default F16,Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q3_K_M,Q2_K).")] = None,
    imatrix: Annotated[
        Optional[str], typer.Option("--imatrix", help="'auto' (from the text's first quarter, which is then not scored), 'none', or a file.")
    ] = None,
    ctx: Ctx = None,
    output: Output = None,
    revision: Revision = None,
    reference: ReferenceOpt = None,
    max_memory: MaxMemory = None,
    mix: Annotated[
        bool, typer.Option("--mix", help="Also <TYPE>-mix per quantized type: no larger, per-tensor types from probed sensitivity.")
    ] = False,
    optimize: Annotated[
        bool, typer.Option("--optimize", help="Also <TYPE>-opt per quantized type: stock types and size, levels chosen against each layer's output.")
    ] = False,
    tasks: Tasks = None,
    include_path: IncludePath = None,
    add: Annotated[
        Optional[list[Path]],
        typer.Option("--add", help="A GGUF of this checkpoint made elsewhere (AutoRound's, another run's), scored beside the others (repeatable)."),
    ] = None,
    ray: Annotated[
        bool, typer.Option("--ray", help="With --optimize: the types after the first as Ray tasks on a local Ray (or --ray-address's cluster).")
    ] = False,
    ray_address: Annotated[Optional[str], typer.Option("--ray-address", help="A Ray cluster's address (HOST:PORT, or auto); implies --ray.")] = None,
    quiet: Quiet = False,
):
    """Convert, quantize to each type, and score each against the HF fp32 reference (resumable).

    -o is the report folder (default report-<name>[-<revision>])."""
    from neoxq.report import ReportOptions, run_report

    kw = {
        k: v
        for k, v in dict(
            types=qtypes,
            ctx=ctx,
            revision=revision,
            reference=reference,
            max_memory=max_memory,
            mix=mix or None,
            optimize=optimize or None,
            tasks=tasks,
            include_path=str(include_path) if include_path else None,
            add=tuple(str(p) for p in add) if add else None,
            ray=ray_address or ("local" if ray else None),
        ).items()
        if v is not None
    }
    if imatrix is not None:
        kw["imatrix"] = imatrix_choice(imatrix)
    if reference is not None:
        kw["reference"] = reference_choice(reference)
    _print_report(run_report(src, text, output, ReportOptions(**kw)), quiet)


def _print_report(rj: Path, quiet: bool) -> None:
    from neoxq.render import table

    if not quiet:
        print(table(json.loads(rj.read_text())))
        print(f"\nreport: {rj} (+ report.md, report.png)")


def demo(
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the demo's model and report.")] = Path("demo-out"),
    sweep: Annotated[bool, typer.Option("--sweep", help="Save checkpoints while training (a local hub cache) and sweep them.")] = False,
    quiet: Quiet = False,
):
    """Offline demo: build and briefly train a small GPT-NeoX, then run the full quality report on it
    (or, with --sweep, the quality across its training checkpoints)."""
    if sweep:
        from neoxq.demo import run_demo_sweep

        path = run_demo_sweep(output)
        if not quiet:
            print(sweep_table(json.loads(path.read_text())))
            print(f"\nsweep: {path} (+ sweep.md, sweep.png)")
        return
    from neoxq.demo import run_demo
    from neoxq.render import variant_gain

    report = run_demo(output)
    _print_report(report, quiet)
    gain = variant_gain(json.loads(report.read_text()))
    if gain and not quiet:
        print(gain)


def sweep(
    repo: Annotated[str, typer.Argument(help="Hub repo id, e.g. EleutherAI/pythia-160m (offline: HF_HUB_OFFLINE=1 uses the cache).")],
    revisions: Annotated[str, typer.Option("--revisions", help="Comma list of revisions and ranges stepA..stepB, thinned with /K.")],
    text: Annotated[Path, typer.Option("--text", help="Evaluation text (UTF-8).")],
    qtypes: Annotated[str, typer.Option("--types", help="Comma-separated quant types.")] = "Q8_0,Q4_K_M,Q2_K",
    ctx: Annotated[int, typer.Option("--ctx", "-c", min=4)] = 512,
    imatrix: Annotated[str, typer.Option("--imatrix", help="auto (first quarter of the text, never scored) or none.")] = "auto",
    mix: Annotated[bool, typer.Option("--mix", help="Also <TYPE>-mix per quantized type.")] = False,
    optimize: Annotated[
        bool,
        typer.Option(
            "--optimize", help="Also <TYPE>-opt per quantized type (with --mix, <TYPE>-opt-mix); a revision's types share one calibration pass."
        ),
    ] = False,
    output: Output = None,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Revisions at once in local processes (cores shared).")] = 1,
    ray: Annotated[bool, typer.Option("--ray", help="Run each revision as a Ray task on a local Ray (or the cluster of --ray-address).")] = False,
    ray_address: Annotated[Optional[str], typer.Option("--ray-address", help="A Ray cluster's address (HOST:PORT, or auto); implies --ray.")] = None,
    keep_files: Annotated[bool, typer.Option("--keep-files", help="Keep each revision's GGUF files.")] = False,
    evict: Annotated[bool, typer.Option("--evict", help="Remove each revision's checkpoint from the HF cache after use.")] = False,
    max_memory: MaxMemory = None,
    reference: Annotated[
        str, typer.Option("--reference", help="auto/hf: each revision's own fp32 transformers model; f16: its own F16 GGUF.")
    ] = "auto",
    tasks: Tasks = None,
    include_path: IncludePath = None,
    quiet: Quiet = False,
):
    """Quantization quality across training checkpoints (resumable); sweep.json/.md/.png in -o."""
    from neoxq.sweep import SweepOptions, run_sweep

    opts = SweepOptions(
        types=qtypes,
        ctx=ctx,
        imatrix=imatrix_choice(imatrix, files=False),
        mix=mix,
        optimize=optimize,
        workers=workers,
        ray=ray_address or ("local" if ray else None),
        keep_files=keep_files,
        evict=evict,
        max_memory=max_memory,
        tasks=tasks,
        reference=reference_choice(reference, paths=False),
        include_path=str(include_path) if include_path else None,
    )
    path = run_sweep(repo, revisions, text, output, opts)
    if not quiet:
        print(sweep_table(json.loads(path.read_text())))
        print(f"\nsweep: {path} (+ sweep.md, sweep.png)")


def evaluate(
    models: Annotated[list[Path], typer.Argument(help="GGUF file(s).")],
    tasks: Annotated[str, typer.Option("--tasks", help="Comma-separated lm-eval tasks.")],
    include_path: IncludePath = None,
    num_fewshot: Annotated[Optional[int], typer.Option("--num-fewshot", min=0)] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="At most this many documents per task.")] = None,
    output: Output = None,
    batched: Annotated[
        bool, typer.Option("--batched/--unbatched", help="Score the choices after one context in one batch (default), or each request alone.")
    ] = True,
    quiet: Quiet = False,
):
    """lm-evaluation-harness tasks on GGUF files through neoxq's runtime (lm-eval's JSON in -o)."""
    from neoxq.evaluate import parse_tasks, run_eval
    from neoxq.tables import evaluation_table

    combined = run_eval(models, parse_tasks(tasks), include_path, num_fewshot, limit, output, batched=batched)
    if not quiet:
        print(evaluation_table(combined))


def publish(
    folder: Annotated[Path, typer.Argument(help="A folder `neoxq report` (or `neoxq sweep`) wrote.")],
    repo_id: Annotated[str, typer.Argument(help="The hub repository, OWNER/NAME.")],
    private: Annotated[bool, typer.Option("--private", help="Create the repository private.")] = False,
    revision: Annotated[Optional[str], typer.Option("--revision", "-r", help="The branch (default main; a sweep makes one per revision).")] = None,
    dry_run: Annotated[
        Optional[Path], typer.Option("--dry-run", help="Write exactly what would be uploaded into this folder; upload nothing.")
    ] = None,
    ollama: Annotated[bool, typer.Option("--ollama", help="Add an Ollama Modelfile per GGUF.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Publish into a repository that exists (or over a --dry-run folder).")] = False,
    quiet: Quiet = False,
):
    """Upload a report's GGUF files, plots and a model card carrying the measurements to the hub."""
    from neoxq.publish import PublishOptions
    from neoxq.publish import publish as run_publish

    branches = run_publish(folder, PublishOptions(repo_id, private, revision, dry_run, ollama, force))
    where = f"wrote {dry_run}" if dry_run is not None else f"published https://huggingface.co/{repo_id}"
    result_line(f"{where}: " + "; ".join(f"{b}: {len(c)} files" for b, c in branches.items()))
