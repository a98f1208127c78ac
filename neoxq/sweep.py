"""`neoxq sweep`: quantization quality across a hub repo's training checkpoints.

Per revision: its commit and weights hash (neoxq.convert.hub); a revision whose weights equal an
earlier one's is not recomputed but marked `duplicate_of`; the others run the whole report (convert
once, quantize each type, score against that revision's own fp32 reference on the same windows).
Revisions run one after another, in local worker processes (--workers N, each pinned to its share
of the cores) or as Ray tasks (--ray, --ray-address ADDRESS); only this driver writes results: sweep.json
(atomically, after every revision, so an interruption loses at most the revisions in flight), then
sweep.md and sweep.png rendered from it.
"""

from __future__ import annotations

import json
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from neoxq.cluster import ray_session, set_up_worker
from neoxq.convert.checkpoint import open_checkpoint
from neoxq.convert.hub import identify, list_refs, parse_spec, spec_parts, step_of
from neoxq.core.atomic import atomic_output, remove_stale_partials
from neoxq.core.cache_key import changed
from neoxq.core.machine import default_threads, describe, versions
from neoxq.core.progress import Progress, is_quiet, set_quiet
from neoxq.core.qtypes import QuantType
from neoxq.core.textfile import read_text, text_sha256
from neoxq.core.report_row import rows_of
from neoxq.render import render_sweep
from neoxq.runtime.capi import supports_gpu_offload
from neoxq.report import ReportOptions, report_inputs, run_report


@dataclass
class SweepOptions(ReportOptions):
    """A report's options (each revision runs one) and how the sweep runs them."""

    types: str = "Q8_0,Q4_K_M,Q2_K"
    workers: int = 1
    ray: str | None = None  # None: no Ray; "local": a local Ray for the run; else a cluster address
    keep_files: bool = False
    evict: bool = False

    def report(self, revision: str | None = None) -> ReportOptions:
        """The options each revision's report runs with."""
        return ReportOptions(**{**{f.name: getattr(self, f.name) for f in fields(ReportOptions)}, "revision": revision, "ray": None})


def _task(repo: str, revision: str, text_file: str, folder: str, opts: dict, threads: int, quiet: bool = False) -> dict:
    """One revision's report (in a worker, a Ray task, or this process); returns its report.json.
    `quiet` is the driver's --quiet: a spawned worker or Ray task starts with the module default."""
    set_quiet(quiet)
    set_up_worker(threads)

    o = SweepOptions(**opts)
    ckpt = open_checkpoint(repo, revision)
    rj = run_report(ckpt, text_file, folder, o.report(revision))
    report = json.loads(Path(rj).read_text())
    if not o.keep_files:
        for p in Path(folder).glob("*.gguf"):
            p.unlink()
    if o.evict:
        _evict(ckpt.commit)
    return report


def _evict(commit: str | None) -> None:
    """Remove a revision's snapshot (and the blobs only it uses) from the Hugging Face cache."""
    if not commit:
        return
    from huggingface_hub import scan_cache_dir

    scan_cache_dir().delete_revisions(commit).execute()


def _reusable(folder: Path, text_sha: str, opts: SweepOptions, commit: str) -> dict | None:
    """A finished revision's report.json, when every input of its report is the same now
    (neoxq.core.cache_key); else the revision's report reruns and reuses what its parts can."""
    try:
        report = json.loads((folder / "report.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return None if changed(report.get("inputs"), report_inputs(commit, text_sha, opts.report())) else report


def _entry(rid, step, dup: str | None, report: dict | None) -> dict:
    rows = [r.sweep_json() for r in rows_of(report or {})]
    ref = (report or {}).get("reference", {})
    return {
        "revision": rid.revision,
        "step": step,
        "commit": rid.commit,
        "weights_sha256": rid.weights_sha256,
        "duplicate_of": dup,
        "reference": {"ppl": ref.get("ppl"), "ppl_se": ref.get("ppl_se")} if report else None,
        "results": rows,
    }


def _step(repo: str, revision: str, dup: str | None) -> int | None:
    """The revision's step (neoxq.convert.hub.step_of); a duplicate takes its original's when it
    names none itself (`main` = the last step branch)."""
    for name in (revision, dup):
        if name and step_of(name) is not None:
            return step_of(name)
    return step_of(revision, repo)


def _write(out: Path, repo: str, opts: SweepOptions, text_sha: str, plan, results: dict) -> Path:
    """sweep.json from what is finished so far (duplicates carry their original's results)."""
    entries, tokens = [], None
    for rid, dup in plan:
        report = results.get(dup or rid.revision)
        if report is None:
            continue
        tokens = report["text"]["tokens_scored"]
        entries.append(_entry(rid, _step(repo, rid.revision, dup), dup, report))
    data = {
        "repo": repo,
        "types": [t.value for t in QuantType.parse_list(opts.types)] + (["mix"] if opts.mix else []) + (["opt"] if opts.optimize else []),
        "text": {"sha256": text_sha, "ctx": opts.ctx, "tokens_scored": tokens},
        "versions": versions(),
        "machine": describe(),
        "revisions": entries,
    }
    path = out / "sweep.json"
    with atomic_output(path, force=True) as tmp:
        tmp.write_text(json.dumps(data, indent=1))
    return path


def run_sweep(repo: str, spec: str, text_file, out_dir=None, opts: SweepOptions | None = None) -> Path:
    """Run (or resume) the sweep; return sweep.json's path (sweep.md/.png rendered beside it)."""
    opts = opts or SweepOptions()
    QuantType.parse_list(opts.types)
    spec_parts(spec)
    text_sha = text_sha256(read_text(text_file))
    revisions = parse_spec(spec, list_refs(repo), repo)
    out = Path(out_dir or f"sweep-{repo.split('/')[-1]}")
    out.mkdir(parents=True, exist_ok=True)
    plan, first = [], {}
    for rid in (identify(repo, r) for r in revisions):
        orig = first.setdefault(rid.weights_sha256, rid.revision)
        plan.append((rid, None if orig == rid.revision else orig))
    results, todo = {}, []
    for rid, dup in plan:
        if dup is None:
            remove_stale_partials(out / rid.revision)  # a killed run's temporary files and locks, even where nothing is redone
            done = _reusable(out / rid.revision, text_sha, opts, rid.commit)
            results.update({rid.revision: done} if done else {})
            todo += [] if done else [rid]
    args = (repo, str(Path(text_file).resolve()), out, opts)
    with Progress("sweep", len(todo), "revisions") as bar:

        def finished(rid, report):
            results[rid.revision] = report
            _write(out, repo, opts, text_sha, plan, results)
            bar.update(1, note=rid.revision)

        runner = _run_ray if opts.ray else _run_local
        runner(todo, args, finished)
    path = _write(out, repo, opts, text_sha, plan, results)
    render_sweep(path)
    return path


def _cores() -> int:
    return default_threads()


def _run_local(todo, args, finished) -> None:
    repo, text, out, opts = args
    if opts.workers <= 1 or len(todo) <= 1:
        for rid in todo:
            finished(rid, _task(repo, rid.revision, text, str(out / rid.revision), asdict(opts), _cores(), is_quiet()))
        return

    threads = max(1, _cores() // opts.workers)
    with ProcessPoolExecutor(opts.workers, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(_task, repo, rid.revision, text, str(out / rid.revision), asdict(opts), threads, is_quiet()): rid for rid in todo}
        for f in as_completed(futures):
            finished(futures[f], f.result())


def _run_ray(todo, args, finished) -> None:
    """Each revision one Ray task (num_cpus, num_gpus when llama.cpp offloads, memory from the
    checkpoint); results come back to this driver, which alone writes them."""
    repo, text, out, opts = args
    with ray_session(opts.ray) as (ray, nodes):
        # a task runs on one node: its share of the largest node's cores and memory (the cluster's
        # totals would ask for more than any node has once there are several)
        threads = max(1, nodes.cpus // max(1, opts.workers))
        node_memory = nodes.memory
        pending = {}
        for rid in todo:
            # the streamed reference and the llama.cpp side hold about twice the checkpoint, plus libraries
            need = min(2 * rid.weights_bytes + (1 << 30), int(0.8 * node_memory)) if node_memory else None
            # a task whose node dies is rerun elsewhere (Ray's retries); only this driver writes sweep.json
            task = ray.remote(num_cpus=threads, num_gpus=1 if supports_gpu_offload() else 0, max_retries=3, **({"memory": need} if need else {}))(
                _task
            )
            pending[task.remote(repo, rid.revision, text, str(out / rid.revision), asdict(opts), threads, is_quiet())] = rid
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            rid = pending.pop(done[0])
            finished(rid, ray.get(done[0]))
