"""`neoxq report`: checkpoint → every quant type → evaluated against the HF fp32 reference.

Resumable: each artifact (F16 file, imatrix, quantized files, per-type results, reference
log-probs) is reused when present and valid, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import NeoxqError, UsageError
from .gguf_info import read_info
from .progress import Progress
from .qtypes import QuantType
from .textfile import read_text, text_sha256

DEFAULT_TYPES = "F16,Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q3_K_M,Q2_K"
CALIBRATION_SHARE = 0.25  # --imatrix auto: this leading share of the text calibrates, the rest is scored


@dataclass
class ReportOptions:
    types: str = DEFAULT_TYPES
    imatrix: str | None = "auto"  # "auto" | a file | None
    ctx: int = 512
    revision: str | None = None
    speed_prompt: int = 128
    speed_tokens: int = 32
    quiet: bool = False


def split_for_calibration(text: str) -> tuple[str, str]:
    """(calibration, evaluation): the first quarter, cut at a line break, and the rest."""
    cut = int(len(text) * CALIBRATION_SHARE)
    nl = text.find("\n", cut)
    cut = nl + 1 if 0 < nl < len(text) - 1 else cut
    return text[:cut], text[cut:]


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("neoxq", "llama-cpp-python", "gguf", "transformers", "torch", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _valid_gguf(path: Path, qtype: QuantType, imatrix_sha: str | None) -> bool:
    if not path.is_file():
        return False
    try:
        meta = read_info(path).metadata
    except NeoxqError:
        return False
    if meta.get("neoxq.quant_type") != qtype.value:
        return False
    if qtype.is_float:
        return True  # float files never take an imatrix
    # A quantized file is valid only if made with the same imatrix (or none, both sides).
    return meta.get("neoxq.imatrix.sha256") == imatrix_sha


def _speed(model, text: str, opts: ReportOptions) -> tuple[float, float]:
    from runtime.generate import GenerationStats, SamplingOptions, generate

    ids = model.tokenize(text)[: opts.speed_prompt]
    t0 = time.perf_counter()
    model.eval_logits(ids, [len(ids) - 1])
    pp = len(ids) / (time.perf_counter() - t0)
    stats = GenerationStats()
    for _ in generate(model, model.detokenize(ids[:16]), SamplingOptions(max_tokens=opts.speed_tokens, temperature=0.0, repeat_penalty=1.0), stats):
        pass
    return pp, stats.generation_tps


def run_report(src: str, text_file: Path | str, out_dir: Path | str | None = None, opts: ReportOptions | None = None) -> Path:
    """Run (or resume) the whole pipeline; return the path of report.json."""
    from convert.checkpoint import open_checkpoint
    from convert.converter import convert
    from convert.imatrix import compute_imatrix
    from convert.imatrix_io import file_sha256, read_imatrix, write_imatrix
    from convert.quantize import quantize
    from runtime.model import NeoxModel, RuntimeOptions
    from runtime.report import render
    from runtime.score import Windows, kld

    from . import machine

    opts = opts or ReportOptions()
    types = QuantType.parse_list(opts.types)
    text = read_text(text_file)
    ckpt = open_checkpoint(src, opts.revision)
    out = Path(out_dir) if out_dir else Path(f"report-{ckpt.name}" + (f"-{ckpt.revision}" if ckpt.revision else ""))
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"cannot write to report folder {out} ({exc.strerror}); pass -o with a writable folder") from exc

    calib, eval_text = split_for_calibration(text) if opts.imatrix == "auto" else ("", text)
    steps = 2 + (opts.imatrix == "auto") + 2 * len(types)
    bar = Progress("report", steps, "steps", quiet=opts.quiet)
    q = dict(quiet=True)

    base_type = QuantType.F16
    base = out / f"{ckpt.name}-F16.gguf"
    t0 = time.perf_counter()
    if not _valid_gguf(base, base_type, None):
        convert(src, base_type, output=base, revision=opts.revision, force=True, **q)
    convert_s = time.perf_counter() - t0
    bar.update(1, note="converted")

    im_path, im_sha, im_info = None, None, None
    if opts.imatrix == "auto":
        im_path = out / "imatrix.gguf"
        calib_sha = text_sha256(calib)
        try:
            ok = im_path.is_file() and calib_sha[:16] in " ".join(read_imatrix(im_path).datasets)
        except NeoxqError:
            ok = False
        if not ok:
            with NeoxModel(base, RuntimeOptions(n_ctx=opts.ctx)) as m:
                Windows(m.tokenize(eval_text), opts.ctx)  # fail early when the scored part is too short
            im = compute_imatrix(src, calib, ctx=opts.ctx, revision=opts.revision, quiet=True,
                                 dataset_name=f"{Path(text_file).name}[calibration part] sha256:{calib_sha[:16]}")
            write_imatrix(im_path, im, force=True)
        im_info = {"file": im_path.name, "calibration": f"first {int(CALIBRATION_SHARE * 100)}% of {Path(text_file).name} "
                   f"({len(calib)} chars, sha256 {calib_sha[:16]}…), not scored"}
        bar.update(1, note="imatrix")
    elif opts.imatrix:
        im_path = Path(opts.imatrix)
        im_info = {"file": im_path.name, "calibration": ", ".join(read_imatrix(im_path).datasets) or "unknown"}
    if im_path:
        im_sha = file_sha256(im_path)
        im_info["sha256"] = im_sha

    files: dict[QuantType, tuple[Path, float]] = {}
    for t in types:
        path = base if t == base_type else out / f"{ckpt.name}-{t.value}.gguf"
        use_im = None if t.is_float else im_sha
        t1 = time.perf_counter()
        if not _valid_gguf(path, t, use_im):
            if t.is_float:
                convert(src, t, output=path, revision=opts.revision, force=True, **q)
            else:
                quantize(base, t, output=path, imatrix=im_path, force=True, **q)
        elif t.needs_imatrix and not im_path:
            raise UsageError(f"{t.value} needs an importance matrix; use --imatrix auto or --imatrix FILE")
        files[t] = (path, convert_s if t == base_type else time.perf_counter() - t1)
        bar.update(1, note=f"{t.value} ready")

    cache = out / "cache"
    results_dir = out / "results"
    results_dir.mkdir(exist_ok=True)
    rows, ref_info, eval_meta = [], None, None
    for i, t in enumerate(types):
        path, secs = files[t]
        stamp = f"{path.stat().st_size}:{path.stat().st_mtime_ns}:{text_sha256(eval_text)}:{opts.ctx}"
        res_file = results_dir / f"{t.value}.json"
        row = None
        if res_file.is_file():
            try:
                cached = json.loads(res_file.read_text())
                row = cached if cached.get("_stamp") == stamp else None
            except json.JSONDecodeError:
                row = None
        if row is None:
            with NeoxModel(path, RuntimeOptions(n_ctx=opts.ctx, n_batch=opts.ctx)) as m:
                k = kld(m, str(ckpt.folder), eval_text, opts.ctx, cache_dir=cache, quiet=True)
                pp, tg = _speed(m, eval_text, opts)
                gi = read_info(path)
            row = {"type": t.value, "file": path.name, "size_bytes": path.stat().st_size, "bpw": round(gi.bpw, 4),
                   "ppl": k.ppl, "ppl_se": k.ppl_se, "dppl_pct": k.dppl_pct, "kld_mean": k.kld_mean,
                   "kld_mean_se": k.kld_mean_se, "kld_median": k.kld_median, "kld_p99": k.kld_p99, "kld_max": k.kld_max,
                   "top1": k.top1, "rms_dp": k.rms_dp, "pp_tps": pp, "tg_tps": tg,
                   ("convert_s" if t.is_float else "quantize_s"): round(secs, 3),
                   "imatrix": bool(im_sha) and not t.is_float,
                   "_ref": {"ppl": k.ppl_ref, "ppl_se": k.ppl_ref_se}, "_tokens": k.tokens_scored, "_stamp": stamp}
            tmp = res_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(row, indent=1))
            tmp.replace(res_file)
        ref_info = row["_ref"]
        eval_meta = row["_tokens"]
        rows.append({k: v for k, v in row.items() if not k.startswith("_")})
        bar.update(1, note=f"{t.value} scored")

    report = {
        "source": {"name": ckpt.name, "path": str(ckpt.folder), "repo": ckpt.repo_id, "revision": ckpt.revision,
                   "commit": ckpt.commit, "format": ckpt.format},
        "text": {"file": Path(text_file).name, "sha256": text_sha256(text), "scored_sha256": text_sha256(eval_text),
                 "ctx": opts.ctx, "tokens_scored": eval_meta, "calibration_excluded": opts.imatrix == "auto"},
        "reference": {"kind": "transformers GPTNeoXForCausalLM, fp32", **ref_info},
        "imatrix": im_info,
        "machine": machine.describe(),
        "versions": _versions(),
        "results": rows,
    }
    rj = out / "report.json"
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(rj)
    render(rj)
    bar.update(1, note="rendered")
    bar.close()
    return rj
