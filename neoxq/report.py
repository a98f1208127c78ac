"""`neoxq report`: checkpoint → every quant type → scored against the transformers fp32 reference.

Resumable: each artifact (F16 file, imatrix, quantized files, per-type results, reference tables)
is reused when present and valid, so an interrupted run continues where it stopped. report.json is
the source of truth; report.md and report.png are rendered from it (neoxq.render).
"""

from __future__ import annotations

import json
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from neoxq import __version__, preflight
from neoxq.build import Built, build_mixes, build_optimized, build_types
from neoxq.cluster import optimize_on_ray
from neoxq.compare import compare_rows, most_hurt
from neoxq.convert.checkpoint import Checkpoint, open_checkpoint
from neoxq.convert.imatrix import compute_imatrix
from neoxq.convert.neox import GPTNeoXArgs
from neoxq.core.atomic import atomic_output
from neoxq.core.cache_key import changed
from neoxq.core.choices import AUTO, F16, HF, is_transformers
from neoxq.core.errors import NeoxqError, UsageError
from neoxq.core.gguf_info import read_info
from neoxq.core.imatrix_io import file_sha256, read_imatrix, write_imatrix
from neoxq.core.machine import available_memory, describe, versions
from neoxq.core.naming import gguf_name
from neoxq.core.progress import Progress, is_quiet, set_quiet
from neoxq.core.qtypes import QuantType
from neoxq.core.report_row import REPORT_SCHEMA, ReportRow
from neoxq.core.scores_io import load_scores, save_scores
from neoxq.core.textfile import read_text, text_sha256
from neoxq.evaluate import check_tasks, evaluate_file, metrics, parse_tasks, task_manager
from neoxq.reference import hf_reference
from neoxq.render import render_report
from neoxq.runtime.model import NeoxModel, RuntimeOptions
from neoxq.runtime.reference_cache import cached_reference_tables, reference_tables
from neoxq.runtime.score import GGUFReference, Windows, kld
from neoxq.runtime.speed import measure
from neoxq.self_calibration import self_calibration, windows_needed

DEFAULT_TYPES = "F16,Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q3_K_M,Q2_K"
TOKENS_DIR = "tokens"  # per-token scores, one .npz per row (neoxq.core.scores_io)
CALIBRATION_SHARE = 0.25  # --imatrix auto: this leading share of the text calibrates, the rest is scored
EVALUATION_SEED = 1  # the sample a report scores without --text; self-calibration's default seed is 0


@dataclass
class ReportOptions:
    types: str = DEFAULT_TYPES
    imatrix: str | None = "auto"  # "auto" | a file | None
    ctx: int = 512
    revision: str | None = None
    reference: str = "auto"  # auto (= hf) | hf | f16 | a GGUF or checkpoint path
    mix: bool = False  # also <TYPE>-mix for every quantized type, no larger than the stock file
    optimize: bool = False  # also <TYPE>-opt: the stock file with levels chosen against each layer's output
    tasks: str | None = None  # lm-eval tasks scored on every file (comma-separated)
    include_path: str | None = None  # folder with the user's own task YAMLs
    max_memory: int | None = None  # bytes the fp32 reference may hold; None: what is available
    speed_prompt: int = 128
    speed_tokens: int = 32
    add: tuple[str, ...] = ()  # GGUF files made elsewhere (AutoRound's, another run's), scored beside the others
    ray: str | None = None  # --optimize's types as Ray tasks: "local" (a local Ray) or a cluster's address; None: here


def evaluation_sample(ckpt, ctx: int, max_memory: int | None = None) -> tuple[str, str]:
    """(text, its description) when no text is given: the checkpoint's own sample
    (neoxq.self_calibration) with a seed of its own, so never `--optimize`'s default calibration
    text, four times the windows calibration needs: the first quarter can calibrate and the rest,
    which it does not overlap, is scored."""
    args = GPTNeoXArgs.from_config(ckpt.config)
    sample = self_calibration(
        ckpt, ctx, EVALUATION_SEED, round(windows_needed(args, ctx) / CALIBRATION_SHARE), max_memory, instead="--text FILE with a text to score on"
    )
    return sample.text, f"the checkpoint's own sample ({sample.describe()})"


def split_for_calibration(text: str) -> tuple[str, str]:
    """(calibration, evaluation): the first quarter, cut at a line break, and the rest."""
    cut = int(len(text) * CALIBRATION_SHARE)
    nl = text.find("\n", cut)
    cut = nl + 1 if 0 < nl < len(text) - 1 else cut
    return text[:cut], text[cut:]


@dataclass
class _Run:
    """What every step of one report shares."""

    ckpt: object
    out: Path
    text_name: str  # the evaluation text's file name, or what sampled it
    text: str
    calib: str
    scored: str
    opts: ReportOptions
    types: list[QuantType]
    reference: object = None  # the HF reference, planned by the preflight


def _report_folder(out_dir, ckpt) -> Path:
    """The report's folder, named but not yet made: a mistake found before any work leaves nothing."""
    out = Path(out_dir) if out_dir else Path("report-" + gguf_name(ckpt.name, ckpt.revision, "x")[: -len("-x.gguf")])
    if out.exists() and not out.is_dir():
        raise UsageError(f"report folder {out} is a file; pass -o with a folder")
    return out


def _make_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"cannot write to report folder {out} ({exc.strerror}); pass -o with a writable folder") from exc


def _imatrix(run: _Run) -> tuple[Path | None, dict | None]:
    """--imatrix auto: computed from the calibration part (reused when that part is unchanged)."""
    if run.opts.imatrix != AUTO:
        if not run.opts.imatrix:
            return None, None
        path = Path(run.opts.imatrix)
        return path, {"file": path.name, "calibration": ", ".join(read_imatrix(path).datasets) or "unknown"}

    path, record = run.out / "imatrix.gguf", run.out / "imatrix.inputs.json"
    calib_sha = text_sha256(run.calib)
    inputs = {"source": run.ckpt.commit or run.ckpt.fingerprint(), "calibration_sha256": calib_sha, "ctx": run.opts.ctx}
    try:
        ok = path.is_file() and not changed(json.loads(record.read_text()), inputs) and bool(read_imatrix(path).sums)
    except (NeoxqError, OSError, ValueError):
        ok = False
    if not ok:
        im = compute_imatrix(run.ckpt, run.calib, ctx=run.opts.ctx, dataset_name=f"{run.text_name}[calibration part] sha256:{calib_sha[:16]}")
        write_imatrix(path, im, force=True)
        with atomic_output(record, force=True) as tmp:
            tmp.write_text(json.dumps(inputs))
    return path, {
        "file": path.name,
        "calibration": f"first {int(CALIBRATION_SHARE * 100)}% of {run.text_name} ({len(run.calib)} chars, sha256 {calib_sha[:16]}…), not scored",
    }


@dataclass
class _Scored:
    """A row and what the report records once for all rows: the reference's own perplexity and the
    number of tokens scored (the same for every row)."""

    row: ReportRow
    reference_ppl: dict
    tokens_scored: int

    def as_json(self, inputs: dict) -> dict:
        return {"row": self.row.as_json(), "reference_ppl": self.reference_ppl, "tokens_scored": self.tokens_scored, "inputs": inputs}


def _score(run: _Run, built, reference, cache: Path) -> _Scored:
    """One type's row: reused from results/<TYPE>.json when file, text, ctx and reference match and
    its per-token file (tokens/<TYPE>.npz) is the one it names."""
    sha = file_sha256(built.path)
    inputs = {
        "file_sha256": sha,
        "scored_sha256": text_sha256(run.scored),
        "ctx": run.opts.ctx,
        "reference": reference.identity(),
        "tasks": run.opts.tasks,
        "include_path": run.opts.include_path,
        "speed": [run.opts.speed_prompt, run.opts.speed_tokens],
    }
    res_file = run.out / "results" / f"{built.label}.json"
    cached = _cached_row(run, res_file, inputs)
    if cached:
        cached.row.sha256, cached.row.reused, cached.row.file_reused = sha, True, built.reused
        return cached
    scored = _measure(run, built, reference, cache, sha)
    res_file.parent.mkdir(exist_ok=True)
    with atomic_output(res_file, force=True) as tmp:
        tmp.write_text(json.dumps(scored.as_json(inputs), indent=1))
    scored.row.reused, scored.row.file_reused = False, built.reused
    return scored


def _measure(run: _Run, built, reference, cache: Path, sha: str) -> _Scored:
    """Score the file against the reference, measure its speed and save its per-token values."""
    info = read_info(built.path)
    with NeoxModel(built.path, RuntimeOptions(n_ctx=run.opts.ctx, n_batch=run.opts.ctx), info=info) as m:
        k = kld(m, reference, run.scored, run.opts.ctx, cache_dir=cache)
        speed = measure(m, m.tokenize(run.scored[:20000]), run.opts.speed_prompt, run.opts.speed_tokens)
    tokens = save_scores(run.out / TOKENS_DIR / f"{built.label}.npz", k.tokens)
    s = k.stats
    row = ReportRow(
        type=built.label,
        file=built.path.name,
        size_bytes=built.path.stat().st_size,
        sha256=sha,
        bpw=round(info.bpw, 4),
        ppl=k.ppl,
        ppl_se=k.ppl_se,
        dppl_pct=k.dppl_pct,
        dppl_pct_se=100 * s["ppl_ratio"]["se"],
        dppl_pct_se_window=100 * s["ppl_ratio"]["se_window"],
        kld_mean=k.kld_mean,
        kld_mean_se=k.kld_mean_se,
        kld_mean_se_window=s["kld"]["se_window"],
        kld_median=k.kld_median,
        kld_p99=k.kld_p99,
        kld_max=k.kld_max,
        top1=k.top1,
        top1_se=k.top1_se,
        rms_dp=k.rms_dp,
        stats=s,
        tokens={**tokens, "file": f"{TOKENS_DIR}/{tokens['file']}"},
        pp_tps=speed.pp_tps,
        tg_tps=speed.tg_tps,
        speed=speed.as_json(),
        imatrix=bool(info.metadata.get("neoxq.imatrix.sha256")),
        mix=_mix_json(info),
        optimize=_opt_json(info),
        tasks=_tasks_json(run, built.path),
    )
    if built.name:
        row.added, row.file = True, str(built.path)
    else:
        setattr(row, "convert_s" if built.qtype.is_float else "quantize_s", round(built.seconds, 3))
    return _Scored(row, {"ppl": k.ppl_ref, "ppl_se": k.ppl_ref_se}, k.tokens_scored)


def _cached_row(run: _Run, res_file: Path, inputs: dict) -> _Scored | None:
    """The row scored before, when every input that made it is the same and its per-token file is intact."""
    try:
        cached = json.loads(res_file.read_text())
        row = ReportRow.from_json(cached["row"])
        ok = not changed(cached.get("inputs"), inputs) and file_sha256(run.out / row.tokens["file"]) == row.tokens["sha256"]
        scored = _Scored(row, cached["reference_ppl"], cached["tokens_scored"])
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        return None
    return scored if ok else None


def _tasks_json(run: _Run, path: Path) -> dict | None:
    """--tasks: lm-eval's metrics for this file (neoxq's lm-eval class, the same as `neoxq eval`)."""
    if not run.opts.tasks:
        return None

    # the names were checked when the run started (run_report)
    tasks = parse_tasks(run.opts.tasks)
    return metrics(evaluate_file(path, tasks, task_manager(run.opts.include_path, tasks)))


def _mix_json(info) -> dict | None:
    """For a -mix file: its budget and the stock file it must not exceed, from its metadata."""
    meta = info.metadata
    if "neoxq.mix.base" not in meta:
        return None
    return {
        "base": meta["neoxq.mix.base"],
        "target_bytes": int(meta["neoxq.mix.target_bytes"]),
        "stock_bytes": int(meta["neoxq.mix.stock_bytes"]),
        "predicted_kld": float(meta["neoxq.mix.predicted_kld"]),
    }


def _opt_json(info) -> dict | None:
    """For a -opt file: how its levels were chosen, from its metadata."""
    meta = info.metadata
    if "neoxq.optimize.method" not in meta:
        return None
    return {
        "method": meta["neoxq.optimize.method"],
        "calibration_sha256": meta["neoxq.optimize.calibration.sha256"],
        "calibration_tokens": int(meta["neoxq.optimize.calibration.tokens"]),
    }


def source_identity(ckpt) -> str:
    """What names a checkpoint's weights: its commit on the hub, else their fingerprint."""
    return ckpt.commit or ckpt.fingerprint()


def report_inputs(source: str, text_sha: str, opts: ReportOptions) -> dict:
    """Everything that decides a report: a finished report.json is reused whole (by the sweep) only
    when all of it is the same; otherwise the report reruns, and its own parts (built files, rows,
    reference tables, imatrix) are reused where their own inputs are."""
    ref = opts.reference
    if ref not in (AUTO, HF, F16) and Path(ref).exists():
        ref = f"{Path(ref).resolve()}:{Path(ref).stat().st_mtime_ns}"
    return {
        "source": source,
        "text_sha256": text_sha,
        "types": [t.value for t in QuantType.parse_list(opts.types)],
        "ctx": opts.ctx,
        "imatrix": opts.imatrix if opts.imatrix in (None, AUTO) else file_sha256(Path(opts.imatrix)),
        "reference": ref,
        "mix": opts.mix,
        "optimize": opts.optimize,
        "tasks": opts.tasks,
        "include_path": opts.include_path,
        "max_memory": opts.max_memory,
        "speed": [opts.speed_prompt, opts.speed_tokens],
        "add": [file_sha256(Path(a)) for a in opts.add],
        "neoxq": __version__,
    }


def _assemble(run: _Run, scored: list[_Scored], im_info: dict | None, reference) -> dict:
    ck, rows = run.ckpt, [s.row for s in scored]
    return {
        "schema": REPORT_SCHEMA,
        "inputs": report_inputs(source_identity(ck), text_sha256(run.text), run.opts),
        "reuse": {
            "files_reused": sum(r.file_reused for r in rows),
            "files_made": sum(not r.file_reused for r in rows),
            "rows_reused": sum(r.reused for r in rows),
            "rows_scored": sum(not r.reused for r in rows),
        },
        "source": {"name": ck.name, "path": str(ck.folder), "repo": ck.repo_id, "revision": ck.revision, "commit": ck.commit, "format": ck.format},
        "text": {
            "file": run.text_name,
            "sha256": text_sha256(run.text),
            "scored_sha256": text_sha256(run.scored),
            "ctx": run.opts.ctx,
            "tokens_scored": scored[0].tokens_scored,
            "calibration_excluded": _calibrates(run.opts),
            "calibration": (
                f"first {int(CALIBRATION_SHARE * 100)}% ({len(run.calib)} chars), for the imatrix, mixes and optimised rounding; never scored"
            )
            if _calibrates(run.opts)
            else None,
        },
        "reference": {"kind": reference.description, "choice": run.opts.reference, **_plan_json(reference), **scored[0].reference_ppl},
        "imatrix": im_info,
        "machine": describe(),
        "versions": versions(),
        "results": [r.as_json() for r in rows],
    }


def _plan_json(reference) -> dict:
    plan = getattr(reference, "plan", None)
    if plan is None:
        return {"why": "llama.cpp's way: an F16 GGUF scored by llama.cpp (not the fp32 reference)"}
    return {"mode": plan.mode, "why": plan.why, "peak_estimate_bytes": plan.peak_bytes}


def run_report(src, text_file: Path | str | None, out_dir: Path | str | None = None, opts: ReportOptions | None = None) -> Path:
    """Run (or resume) the whole pipeline; return the path of report.json. Without a text file, the
    checkpoint's own sample (evaluation_sample) is the text."""
    opts = opts or ReportOptions()
    types = QuantType.parse_list(opts.types)
    if opts.ray and not opts.optimize:
        raise UsageError("--ray spreads the --optimize types over Ray; add --optimize, or drop --ray")
    if opts.imatrix not in (None, AUTO):
        read_imatrix(opts.imatrix, option="--imatrix", choices="auto, none, or an imatrix file")  # before any work
    text = read_text(text_file) if text_file is not None else None
    ckpt = src if isinstance(src, Checkpoint) else open_checkpoint(src, opts.revision)
    out = _report_folder(out_dir, ckpt)
    name = Path(text_file).name if text_file is not None else None
    if text is None:
        text, name = evaluation_sample(ckpt, opts.ctx, opts.max_memory)
    calib, scored = split_for_calibration(text) if _calibrates(opts) else ("", text)
    run = _Run(ckpt, out, name, text, calib, scored, opts, types)
    n_windows = _check_scored_length(run)
    if opts.tasks:
        tasks = parse_tasks(opts.tasks)
        check_tasks(tasks, task_manager(opts.include_path, tasks))
    _check_added(run)
    _preflight(run, n_windows)
    _make_folder(out)
    n_extra = sum(not t.is_float for t in types) * (opts.mix + opts.optimize * (1 + opts.mix))
    with Progress("report", 2 + (opts.imatrix == AUTO) + 2 * len(types) + 2 * n_extra + len(opts.add), "steps") as bar:
        files, im_info, base = _build(run, bar)
        reference = _reference(run, base.path)
        _reference_first(run, reference, base.path)
        scored = []
        for built in files:
            scored.append(_score(run, built, reference, out / "cache"))
            bar.update(1, note=f"{built.label} scored")
        rows = [s.row for s in scored]
        compare_rows(rows, out)
        report = _assemble(run, scored, im_info, reference)
        report["most_hurt"] = _most_hurt(run, rows, files, base.path)
        rj = out / "report.json"
        render_report(report, out)  # first: a report.json on disk always has its Markdown and plots
        with atomic_output(rj, force=True) as tmp:
            tmp.write_text(json.dumps(report, indent=1))
        bar.update(1, note="rendered")
    return rj


def _most_hurt(run: _Run, rows: list[ReportRow], files: list, base: Path, n: int = 20) -> dict | None:
    """The n tokens the worst quantized file (largest mean KLD) got most wrong, with their context
    in the scored text (decoded by the file's own vocabulary)."""
    quantized = [(r, f) for r, f in zip(rows, files) if not f.qtype.is_float and not f.name]
    if not quantized:
        return None
    worst = max(quantized, key=lambda rf: rf[0].kld_mean)[0]
    scores = load_scores(run.out / worst.tokens["file"])
    with NeoxModel(base, RuntimeOptions(n_ctx=run.opts.ctx, vocab_only=True)) as m:
        w = Windows(m.tokenize(run.scored), run.opts.ctx)
        return {"type": worst.type, "tokens": most_hurt(scores, w, m.detokenize, n)}


def _reference_first(run: _Run, reference, base: Path) -> None:
    """Compute the reference tables before any llama.cpp model is loaded (only its tokenizer), and
    a large transformers reference in a child process: torch's freed memory then goes back to the
    system with the child, so it never adds to what llama.cpp holds while scoring. A small one
    (HFReference.fits_in_caller) and a GGUF reference run here."""
    with NeoxModel(base, RuntimeOptions(n_ctx=run.opts.ctx, vocab_only=True)) as m:
        w, n_vocab = Windows(m.tokenize(run.scored), run.opts.ctx), m.n_vocab
    if cached_reference_tables(reference, w, run.out / "cache") is not None:
        return  # a rerun's tables: no child process, no torch
    if isinstance(reference, GGUFReference) or reference.fits_in_caller(available_memory()):
        reference_tables(reference, w, n_vocab, run.out / "cache")
        return

    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), initializer=set_quiet, initargs=(is_quiet(),)) as pool:
        pool.submit(_tables_in_child, reference, w, n_vocab, run.out / "cache").result()


def _tables_in_child(reference, w, n_vocab: int, cache: Path) -> None:
    reference_tables(reference, w, n_vocab, cache)


def _calibrates(opts: ReportOptions) -> bool:
    """The text's first quarter calibrates (and is then never scored) for --imatrix auto, --mix and
    --optimize."""
    return opts.imatrix == AUTO or opts.mix or opts.optimize


def _build(run: _Run, bar) -> tuple[list, dict | None, object]:
    """Every file the report scores, in order: the listed types, then their -mix twins."""
    base = build_types(run.ckpt, [QuantType.F16], run.out)[QuantType.F16]
    bar.update(1, note="converted")
    im_path, im_info = _imatrix(run)
    if run.opts.imatrix == AUTO:
        bar.update(1, note="imatrix")
    if im_path:
        im_info["sha256"] = file_sha256(im_path)
    step = lambda b: bar.update(1, note=f"{b.label} ready")  # noqa: E731
    built = build_types(run.ckpt, run.types, run.out, imatrix=im_path, on_step=step)
    built[QuantType.F16].seconds = built[QuantType.F16].seconds or base.seconds
    files = [built[t] for t in run.types]
    if run.opts.mix:
        mixes = build_mixes(run.ckpt, base, run.types, run.out, run.calib, imatrix=im_path, ctx=run.opts.ctx, on_step=step)
        files += list(mixes.values())
    if run.opts.optimize:
        mixes = (False, True) if run.opts.mix else (False,)
        kw = {"imatrix": im_path, "ctx": run.opts.ctx, "on_step": step, "max_memory": run.opts.max_memory}
        if run.opts.ray:
            files += optimize_on_ray(run.ckpt, base, run.types, run.out, run.calib, run.opts.ray, mixes=mixes, **kw)
        else:
            for mix in mixes:
                files += list(build_optimized(run.ckpt, base, run.types, run.out, run.calib, mix=mix, **kw).values())
    return files + _added(run, base.path, {f.label for f in files}), im_info, base


def _check_added(run: _Run) -> None:
    """Before any work: every --add file is a GGUF of this checkpoint's model (architecture,
    layers, width), and no two share a name."""
    a = GPTNeoXArgs.from_config(run.ckpt.config)
    names = set()
    for path in run.opts.add:
        info = read_info(path)  # a missing or corrupt file: one line
        shape = (info.metadata.get(f"{info.arch}.block_count"), info.metadata.get(f"{info.arch}.embedding_length"))
        if info.arch != "gptneox" or shape != (a.num_hidden_layers, a.hidden_size):
            raise UsageError(
                f"--add {path}: its model ({info.arch}, {shape[0]} layers of width {shape[1]}) is not this checkpoint's "
                f"(gptneox, {a.num_hidden_layers} layers of width {a.hidden_size}); pass a file made from {run.ckpt.name}"
            )
        if Path(path).stem in names:
            raise UsageError(f"--add {path}: another added file has the name {Path(path).stem!r}; rename one")
        names.add(Path(path).stem)


def _added(run: _Run, base: Path, labels: set[str]) -> list[Built]:
    """The --add files, labelled by their names (which no other row may have), each with the base
    file's vocabulary."""
    vocab = read_info(base).n_vocab
    out = []
    for path in run.opts.add:
        info, name = read_info(path), Path(path).stem
        if info.n_vocab != vocab:
            raise UsageError(
                f"--add {path}: its vocabulary has {info.n_vocab} tokens, this checkpoint's {vocab}; pass a file made from {run.ckpt.name}"
            )
        if name in labels:
            raise UsageError(f"--add {path}: the report already has a row named {name!r}; rename the file")
        out.append(Built(info.quant_type or QuantType.F16, info.path, 0.0, True, name=name))
    return out


def _check_scored_length(run: _Run) -> int:
    """Fail before any work when the scored part cannot fill two windows (the tokenizer is HF's);
    return the number of windows."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(run.ckpt.folder / "tokenizer.json"))
    return Windows(tok.encode(run.scored).ids, run.opts.ctx).n_chunks


def _llama_f16_bytes(run: _Run) -> int:
    """What the largest file scored (F16) holds under llama.cpp, estimated from the config."""
    a = GPTNeoXArgs.from_config(run.ckpt.config)
    return preflight.llama_estimate(a.param_count() * 2, a.num_hidden_layers, a.hidden_size, a.vocab_size, run.opts.ctx, run.opts.ctx)


def _hf_choice(run: _Run) -> bool:
    ref = run.opts.reference
    return is_transformers(ref) or (ref != F16 and not Path(ref).is_file())


def _preflight(run: _Run, n_windows: int) -> None:
    """Before any work: the reference's plan (in memory or streamed) plus the llama.cpp side must fit."""
    llama = _llama_f16_bytes(run)
    if not _hf_choice(run):
        preflight.check("scoring the F16 file", 2 * llama, "pass a smaller --ctx")
        return
    run.reference = _hf_for(run, llama)
    plan = run.reference.prepare(run.opts.ctx, n_windows)
    preflight.check(
        f"the report ({plan.mode} fp32 reference + llama.cpp)",
        plan.peak_bytes + llama,
        "pass --max-memory SIZE so the reference streams layer by layer, or --reference f16",
    )


def _hf_for(run: _Run, reserved: int):
    ref = run.opts.reference
    ckpt = run.ckpt if is_transformers(ref) else open_checkpoint(ref)
    return hf_reference(ckpt, run.opts.max_memory, reserved)


def _reference(run: _Run, f16: Path):
    """The reference chosen by --reference (what was used, and why, goes into report.json)."""
    if run.opts.reference == F16:
        return GGUFReference(f16)
    if not _hf_choice(run):
        return GGUFReference(Path(run.opts.reference))
    return run.reference
