"""Mixed precision from probed sensitivity, the probing half: each tensor's proxy errors through ggml's own
quantizer, and its KLD against the F16 file on calibration windows with only it quantized (probe
files that write only what they change, neoxq.runtime.probe_files). The planning these feed is pure
(neoxq.core.mix_plan); the orchestration is neoxq.mix. Sensitivities are cached per model,
calibration text and imatrix, and reused for every budget.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from neoxq.core.atomic import atomic_output
from neoxq.core.cache import mark_used, scratch_prefix, trim
from neoxq.core.cache_key import key
from neoxq.core.errors import UsageError
from neoxq.core.ggml_types import BY_NAME
from neoxq.core.gguf_info import GGUFInfo, TensorInfo, float_rows, read_info
from neoxq.core.imatrix_io import IMatrix
from neoxq.core.machine import default_threads
from neoxq.core.mix_plan import (
    CANDIDATE_TYPES,
    MIX_VERSION,
    Sensitivity,
    candidates,
    fitted,
    measure_types,
    probe_groups,
    quantizable,
    split_probed,
)
from neoxq.core.progress import Progress

from .capi import quantize_dequantize
from .model import NeoxModel, RuntimeOptions
from .probe_files import SplitModel
from .reference_cache import reference_tables
from .score import GGUFReference, Windows, kld_scores

SAMPLE_ROWS = 512  # rows per tensor used for the proxy error


def _rows(info: GGUFInfo, t: TensorInfo, sample: int = SAMPLE_ROWS) -> tuple[np.ndarray, float]:
    """Up to `sample` evenly spaced rows of a float tensor as float32, and the full/sample row ratio."""
    n = t.shape[0]
    idx = np.unique(np.linspace(0, n - 1, min(n, sample)).astype(np.int64))
    return float_rows(info, t, idx), n / len(idx)


def proxy_errors(info: GGUFInfo, tensors: list[TensorInfo], im: IMatrix | None) -> dict[str, dict[str, float]]:
    """Σ_cols w_col Σ_rows (W − Q(W))² per tensor and candidate type (w = imatrix, else 1)."""
    out = {}
    with Progress("mix: proxy errors", len(tensors), "tensors") as bar:
        for t in tensors:
            rows, scale = _rows(info, t)
            w = im.values(t.name) if im is not None and t.name in im.sums else None
            weights = w if w is not None else np.ones(t.shape[-1], dtype=np.float32)
            errs = {}
            for name in candidates(t, im is not None, imatrix_row=w is not None):
                q = rows.astype(np.float16).astype(np.float32) if name == "F16" else quantize_dequantize(rows, BY_NAME[name][0], w)
                errs[name] = float((((rows - q) ** 2) @ weights).sum() * scale)
            out[t.name] = errs
            bar.update(1)
    return out


class KLDProbe:
    """KLD against the F16 file, on the calibration windows, of the model with only some matrices
    quantized (every other one F16): a probe folder of GGUF splits (neoxq.runtime.probe_files) that
    writes only the probed matrices; the F16 splits are written once per measurement."""

    def __init__(self, info: GGUFInfo, calib_ids: list[int], ctx: int, cache: Path, im: IMatrix | None, threads: int):
        self.info, self.ctx, self.im, self.threads = info, ctx, im, threads
        self.windows = Windows(calib_ids, ctx)
        self.opts = RuntimeOptions(n_ctx=ctx, n_batch=ctx, n_threads=threads)
        with NeoxModel(info.path, self.opts, info=info) as m:
            self.tables = reference_tables(GGUFReference(info.path, self.opts), self.windows, m.n_vocab, cache)
        self.tmp = Path(tempfile.mkdtemp(prefix=scratch_prefix("mix"), dir=cache))
        try:
            self.splits = SplitModel(info, [t.name for t in quantizable(info)], self.tmp / "f16")
        except OSError as exc:
            self.close()
            raise UsageError(f"could not write the probe files ({exc.strerror or exc}); free disk space in {cache}") from exc

    @property
    def bytes_written(self) -> int:
        return self.splits.bytes_written

    def kld(self, types: dict[str, str]) -> float:
        try:
            path = self.splits.probe(types, self.im, self.tmp / "probe")
        except OSError as exc:
            raise UsageError(f"could not write a probe file ({exc.strerror or exc}); free disk space in {self.tmp.parent}") from exc
        try:
            with NeoxModel(path, self.opts, info=read_info(path)) as m:
                kl = kld_scores(m, self.tables, self.windows).kld
            return float(kl.mean())
        finally:
            shutil.rmtree(self.tmp / "probe", ignore_errors=True)

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def sensitivity_key(info: GGUFInfo, calib_ids: list[int], ctx: int, im_sha: str | None, two: bool) -> str:
    return key(
        "mix-sensitivity",
        {
            "version": MIX_VERSION,
            "model": info.source_fingerprint or f"{info.path.resolve()}:{info.path.stat().st_mtime_ns}",
            "commit": info.metadata.get("neoxq.source.commit"),
            "bytes": sum(t.n_bytes for t in info.tensors),
            "tokens_sha256": hashlib.sha256(np.asarray(calib_ids, dtype=np.int32).tobytes()).hexdigest(),
            "ctx": ctx,
            "imatrix_sha256": im_sha,
            "two_points": two,
            "candidates": CANDIDATE_TYPES,  # a type added later has no proxy error in an older entry
        },
    )


def sensitivities(
    info: GGUFInfo,
    calib_ids: list[int],
    ctx: int,
    cache: Path,
    im: IMatrix | None = None,
    im_sha: str | None = None,
    threads: int | None = None,
    max_evals: int = 64,
) -> tuple[dict[str, Sensitivity], int]:
    """Probed (and cached) KLD per tensor and type, and the number of probes it took: two probed
    types per tensor while that stays within `max_evals` probes, one while single tensors fit, else
    grouped probes."""
    tensors = quantizable(info)
    two = 2 * len(tensors) <= max_evals
    path = Path(cache) / f"sensitivity-{sensitivity_key(info, calib_ids, ctx, im_sha, two)}.json"
    cached = _load_sensitivities(path)
    if cached is not None:
        return cached
    errs = proxy_errors(info, tensors, im)
    groups = probe_groups(tensors, max_evals)
    plan = [(g, ty) for g in groups for ty in measure_types(g[0], im is not None, two)]
    probe = KLDProbe(info, calib_ids, ctx, Path(cache), im, threads or default_threads())
    probed: dict[str, dict[str, float]] = {t.name: {} for t in tensors}
    try:
        with Progress("mix: measuring", len(plan), "probes") as bar:
            for g, ty in plan:
                for name, k in split_probed(g, probe.kld({t.name: ty for t in g}), errs, ty).items():
                    probed[name][ty] = k
                bar.update(1)
    finally:
        written = probe.bytes_written
        probe.close()
    Path(cache).mkdir(parents=True, exist_ok=True)
    with atomic_output(path, force=True, lock=False) as tmp:
        tmp.write_text(
            json.dumps(
                {
                    "version": MIX_VERSION,
                    "probes": len(plan),
                    "probe_bytes_written": written,
                    "groups": [[t.name for t in g] for g in groups],
                    "tensors": {n: {"err": errs[n], "probed": probed[n]} for n in errs},
                },
                indent=1,
            )
        )
    trim(keep=(path,))
    return fitted(errs, probed), len(plan)


def _load_sensitivities(path: Path) -> tuple[dict[str, Sensitivity], int] | None:
    try:
        data = json.loads(path.read_text())
        errs = {n: dict(d["err"]) for n, d in data["tensors"].items()}
        probed = {n: dict(d["probed"]) for n, d in data["tensors"].items()}
        probes = int(data["probes"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        return None  # missing or damaged: probed again
    mark_used(path)
    return fitted(errs, probed), probes


def calibration_ids(info: GGUFInfo, text: str, ctx: int, max_windows: int) -> tuple[list[int], int]:
    """The calibration text's tokens, whole windows of the context (at most the model's), and that context."""
    ctx = min(ctx, info.context_length or ctx)
    with NeoxModel(info.path, RuntimeOptions(n_ctx=64, n_gpu_layers=0), info=info) as m:
        ids = m.tokenize(text)
    if len(ids) < 2 * ctx:
        raise UsageError(
            f"the calibration text has {len(ids)} tokens, fewer than two windows of {ctx}; pass a longer --calib text or a smaller --ctx"
        )
    return ids[: min(len(ids) // ctx, max_windows) * ctx], ctx
