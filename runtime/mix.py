"""Measured mixed precision: per-tensor types chosen from measured sensitivity, to minimise the KL
divergence from the F16 model within a byte budget, written by llama.cpp's own quantizer through
its tensor-type overrides.

1. Candidates: every quantizable matrix (the groups: one tensor each) × the llama.cpp types its row
   width allows (k-quants need rows of 256; IQ types only with an importance matrix; Q8_0; F16).
2. Proxy: for each tensor and type, the (imatrix-weighted) squared weight error of ggml's own
   quantize → dequantize, on a sample of rows: cheap, and proportional to the output noise.
3. Measurement: the KLD against F16 on the calibration text when only that tensor is quantized (to
   one or two reference types). Per tensor, KLD = α · err^β is fitted through the measured points,
   so every type gets a KLD from its proxy error. Evaluations: groups × len(measure types).
4. Allocation: a multiple-choice knapsack solved greedily on each tensor's lower convex hull of
   (bytes, KLD), upgrading where the KLD saved per byte is largest while the file stays within the
   budget (assuming the KLDs of separate tensors add, which holds for small perturbations).
Sensitivities are cached per model, calibration text and imatrix, and reused for every budget.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from neoxq.core.atomic import atomic_output
from neoxq.core.errors import UsageError
from neoxq.core.ggml_types import BY_NAME
from neoxq.core.gguf_info import GGUFInfo, TensorInfo
from neoxq.core.imatrix_io import IMatrix
from neoxq.core.progress import Progress
from neoxq.core.sizes import format_bytes

K_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
BLOCK32_TYPES = ["Q4_0", "Q5_0", "Q8_0"]
IQ_TYPES = ["IQ2_S", "IQ3_S", "IQ4_XS"]  # only with an importance matrix
SAMPLE_ROWS = 512  # rows per tensor used for the proxy error
ALIGN = 32  # GGUF tensor data alignment


def candidates(t: TensorInfo, has_imatrix: bool) -> list[str]:
    cols = t.shape[-1]
    out = ["F16"]
    if cols % 32 == 0:
        out += BLOCK32_TYPES
    if cols % 256 == 0:
        out += K_TYPES + (IQ_TYPES if has_imatrix else [])
    return out


def tensor_bytes(t: TensorInfo, type_name: str) -> int:
    _, block, size = BY_NAME[type_name]
    return -(-(t.n_elements // block * size) // ALIGN) * ALIGN


def quantizable(info: GGUFInfo) -> list[TensorInfo]:
    """The matrices llama.cpp's quantizer quantizes (norms and biases stay F32)."""
    return [t for t in info.tensors if len(t.shape) == 2 and t.name.endswith(".weight")]


@dataclass
class Sensitivity:
    """Per tensor: proxy error per type, measured KLD per measured type, and the fitted KLD."""

    err: dict[str, float]
    measured: dict[str, float]
    kld: dict[str, float] = field(default_factory=dict)

    def restricted(self, types) -> "Sensitivity":
        keep = set(types)
        return Sensitivity(*({t: v for t, v in d.items() if t in keep} for d in (self.err, self.measured, self.kld)))

    def fit(self) -> None:
        pts = [(self.err[t], k) for t, k in self.measured.items() if self.err.get(t, 0) > 0 and k > 0]
        if not pts:
            self.kld = {t: 0.0 for t in self.err}
            return
        if len(pts) >= 2 and pts[0][0] != pts[1][0]:
            (e1, k1), (e2, k2) = pts[:2]
            beta = min(max(math.log(k2 / k1) / math.log(e2 / e1), 0.5), 1.5)
        else:
            beta = 1.0
        alpha = float(np.exp(np.mean([math.log(k) - beta * math.log(e) for e, k in pts])))
        self.kld = {t: (alpha * e ** beta if e > 0 else 0.0) for t, e in self.err.items()}
        self.kld.update(self.measured)  # measured beats fitted


def _rows(info: GGUFInfo, t: TensorInfo, sample: int = SAMPLE_ROWS) -> tuple[np.ndarray, float]:
    """Up to `sample` evenly spaced rows of a float tensor as float32, and the full/sample row ratio."""
    from neoxq.core.gguf_info import float_rows

    n = t.shape[0]
    idx = np.unique(np.linspace(0, n - 1, min(n, sample)).astype(np.int64))
    return float_rows(info, t, idx), n / len(idx)


def proxy_errors(info: GGUFInfo, tensors: list[TensorInfo], im: IMatrix | None) -> dict[str, dict[str, float]]:
    """Σ_cols w_col Σ_rows (W − Q(W))² per tensor and candidate type (w = imatrix, else 1)."""
    from .capi import quantize_dequantize

    out = {}
    with Progress("mix: proxy errors", len(tensors), "tensors") as bar:
        for t in tensors:
            rows, scale = _rows(info, t)
            w = im.values(t.name) if im is not None and t.name in im.sums else None
            weights = w if w is not None else np.ones(t.shape[-1], dtype=np.float32)
            errs = {}
            for name in candidates(t, im is not None):
                if name == "F16":
                    errs[name] = float((((rows - rows.astype(np.float16).astype(np.float32)) ** 2) @ weights).sum() * scale)
                    continue
                q = quantize_dequantize(rows, BY_NAME[name][0], w)
                errs[name] = float((((rows - q) ** 2) @ weights).sum() * scale)
            out[t.name] = errs
            bar.update(1)
    return out


def _measure_types(t: TensorInfo, has_imatrix: bool, two: bool) -> list[str]:
    c = candidates(t, has_imatrix)
    pts = ["Q2_K", "Q4_K"] if "Q2_K" in c else ["Q4_0", "Q8_0"] if "Q4_0" in c else []
    return pts if two else pts[:1]


class KLDProbe:
    """KLD against the F16 file, on the calibration windows, of the model with only some matrices
    quantized (every other one F16): a probe folder of GGUF splits (neoxq.runtime.probe_files) that
    writes only the probed matrices; the F16 splits are written once per measurement."""

    def __init__(self, info: GGUFInfo, calib_ids: list[int], ctx: int, cache: Path, im: IMatrix | None, threads: int):
        from .model import NeoxModel, RuntimeOptions
        from .probe_files import SplitModel
        from .reference_cache import reference_tables
        from .score import GGUFReference, Windows

        self.info, self.ctx, self.im, self.threads = info, ctx, im, threads
        self.windows = Windows(calib_ids, ctx)
        self.opts = RuntimeOptions(n_ctx=ctx, n_batch=ctx, n_threads=threads)
        with NeoxModel(info.path, self.opts, info=info) as m:
            self.tables = reference_tables(GGUFReference(info.path, self.opts), self.windows, m.n_vocab, cache)
        self.tmp = Path(tempfile.mkdtemp(prefix="neoxq-mix-", dir=cache))
        try:
            self.splits = SplitModel(info, [t.name for t in quantizable(info)], self.tmp / "f16")
        except OSError as exc:
            self.close()
            raise UsageError(f"could not write the probe files ({exc.strerror or exc}); free disk space in {cache}") from exc

    @property
    def bytes_written(self) -> int:
        return self.splits.bytes_written

    def kld(self, types: dict[str, str]) -> float:
        import shutil

        from neoxq.core.gguf_info import read_info

        from .model import NeoxModel
        from .score import kld_scores

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
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)


MIX_VERSION = 1


def sensitivity_key(info: GGUFInfo, calib_ids: list[int], ctx: int, im_sha: str | None, two: bool) -> str:
    ident = info.source_fingerprint or f"{info.path.resolve()}:{info.path.stat().st_mtime_ns}"
    parts = [str(MIX_VERSION), ident, str(info.metadata.get("neoxq.source.commit") or ""), str(sum(t.n_bytes for t in info.tensors)),
             hashlib.sha256(np.asarray(calib_ids, dtype=np.int32).tobytes()).hexdigest(), str(ctx), im_sha or "", str(two)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def probe_groups(tensors: list[TensorInfo], max_evals: int) -> list[list[TensorInfo]]:
    """One tensor per probe when that fits `max_evals`; else tensors of the same kind in consecutive
    layers share a probe (a documented group), and split its KLD in proportion to their proxy errors."""
    if len(tensors) <= max_evals:
        return [[t] for t in tensors]
    import re

    kinds: dict[str, list[TensorInfo]] = {}
    for t in tensors:
        kinds.setdefault(re.sub(r"^blk\.\d+\.", "blk.*.", t.name), []).append(t)
    per_kind = max(1, (max_evals - sum(len(v) == 1 for v in kinds.values())) // max(1, sum(len(v) > 1 for v in kinds.values())))
    groups = []
    for members in kinds.values():
        for part in np.array_split(np.arange(len(members)), min(per_kind, len(members))):
            groups.append([members[i] for i in part])
    return groups


def sensitivities(info: GGUFInfo, calib_ids: list[int], ctx: int, cache: Path, im: IMatrix | None = None,
                  im_sha: str | None = None, threads: int | None = None, max_evals: int = 64) -> tuple[dict[str, Sensitivity], int]:
    """Measured (and cached) KLD per tensor and type, and the number of probes it took: two measured
    types per tensor while that stays within `max_evals` probes, one while single tensors fit, else
    grouped probes."""
    from neoxq.core.machine import default_threads

    tensors = quantizable(info)
    two = 2 * len(tensors) <= max_evals
    path = Path(cache) / f"sensitivity-{sensitivity_key(info, calib_ids, ctx, im_sha, two)}.json"
    cached = _load_sensitivities(path)
    if cached is not None:
        return cached
    errs = proxy_errors(info, tensors, im)
    groups = probe_groups(tensors, max_evals)
    probe = KLDProbe(info, calib_ids, ctx, Path(cache), im, threads or default_threads())
    measured: dict[str, dict[str, float]] = {t.name: {} for t in tensors}
    try:
        with Progress("mix: measuring", sum(len(_measure_types(g[0], im is not None, two)) for g in groups), "probes") as bar:
            for g in groups:
                for ty in _measure_types(g[0], im is not None, two):
                    k = probe.kld({t.name: ty for t in g})
                    total = sum(errs[t.name][ty] for t in g) or 1.0
                    for t in g:
                        measured[t.name][ty] = k * errs[t.name][ty] / total
                    bar.update(1)
    finally:
        written = probe.bytes_written
        probe.close()
    out = {n: Sensitivity(errs[n], measured[n]) for n in errs}
    for s in out.values():
        s.fit()
    probes = sum(len(_measure_types(g[0], im is not None, two)) for g in groups)
    Path(cache).mkdir(parents=True, exist_ok=True)
    with atomic_output(path, force=True, lock=False) as tmp:
        tmp.write_text(json.dumps({"version": MIX_VERSION, "probes": probes, "probe_bytes_written": written,
                                   "groups": [[t.name for t in g] for g in groups],
                                   "tensors": {n: {"err": s.err, "measured": s.measured} for n, s in out.items()}}, indent=1))
    return out, probes


def _load_sensitivities(path: Path) -> tuple[dict[str, Sensitivity], int] | None:
    try:
        data = json.loads(path.read_text())
        out = {n: Sensitivity(d["err"], d["measured"]) for n, d in data["tensors"].items()}
        probes = int(data["probes"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None  # missing or damaged: measured again
    for s in out.values():
        s.fit()
    return out, probes


def _hull(options: list[tuple[int, float, str]]) -> list[tuple[int, float, str]]:
    """Lower convex hull of (bytes, kld) points, cheapest first: the only types worth upgrading through."""
    pts = []
    for b, k, t in sorted(options):
        if pts and k >= pts[-1][1]:
            continue  # more bytes, no less KLD: dominated
        while len(pts) >= 2:
            (b1, k1, _), (b2, k2, _) = pts[-2], pts[-1]
            if (k1 - k2) * (b - b2) <= (k2 - k) * (b2 - b1):  # the middle point is not below the chord
                pts.pop()
            else:
                break
        pts.append((b, k, t))
    return pts


def allocate(tensors: list[TensorInfo], sens: dict[str, Sensitivity], budget: int) -> dict[str, str]:
    """Types minimising Σ KLD with Σ bytes ≤ budget (greedy on hulls, then a fill pass)."""
    import heapq

    opts = {t.name: [(tensor_bytes(t, ty), sens[t.name].kld[ty], ty) for ty in sens[t.name].kld] for t in tensors}
    hulls = {n: _hull(o) for n, o in opts.items()}
    pick = {n: 0 for n in hulls}
    used = sum(h[0][0] for h in hulls.values())
    if used > budget:
        raise UsageError(f"the budget leaves {format_bytes(budget)} for the quantized tensors but the smallest mix needs "
                         f"{format_bytes(used)}; pass a larger --target-size/--target-bpw")
    heap = []

    def push(n):
        h, i = hulls[n], pick[n]
        if i + 1 < len(h):
            (b0, k0, _), (b1, k1, _) = h[i], h[i + 1]
            heapq.heappush(heap, (-(k0 - k1) / max(b1 - b0, 1), n))

    for n in hulls:
        push(n)
    while heap:
        _, n = heapq.heappop(heap)
        h, i = hulls[n], pick[n]
        extra = h[i + 1][0] - h[i][0]
        if used + extra <= budget:
            pick[n], used = i + 1, used + extra
            push(n)
    types = {n: hulls[n][pick[n]][2] for n in hulls}
    return _fill(opts, types, budget - used)


def _fill(opts: dict, types: dict[str, str], left: int) -> dict[str, str]:
    """Spend what the greedy left over on the single changes that lower the KLD most."""
    while True:
        best = None
        for n, options in opts.items():
            cur = next(o for o in options if o[2] == types[n])
            for b, k, t in options:
                if k < cur[1] and b - cur[0] <= left and (best is None or cur[1] - k > best[0]):
                    best = (cur[1] - k, n, t, b - cur[0])
        if best is None:
            return types
        _, n, t, extra = best
        types[n], left = t, left - extra


def predicted_kld(sens: dict[str, Sensitivity], types: dict[str, str]) -> float:
    return float(sum(sens[n].kld[t] for n, t in types.items()))


@dataclass
class MixOptions:
    calib_text: str
    target_bytes: int | None = None  # default: the stock file's size
    target_bpw: float | None = None
    ctx: int = 512
    max_windows: int = 4
    cache_dir: Path | None = None
    threads: int | None = None
    # the types the plan may choose (None: every candidate); --optimize passes those whose levels it
    # can re-choose, since a tensor it cannot re-round keeps llama.cpp's rounding error
    types: tuple[str, ...] | None = None


def _calibration_ids(info: GGUFInfo, opts: MixOptions) -> tuple[list[int], int]:
    from .model import NeoxModel, RuntimeOptions

    ctx = min(opts.ctx, info.context_length or opts.ctx)
    with NeoxModel(info.path, RuntimeOptions(n_ctx=64, n_gpu_layers=0), info=info) as m:
        ids = m.tokenize(opts.calib_text)
    if len(ids) < 2 * ctx:
        raise UsageError(f"the calibration text has {len(ids)} tokens, fewer than two windows of {ctx}; "
                         "pass a longer --calib text or a smaller --ctx")
    return ids[: min(len(ids) // ctx, opts.max_windows) * ctx], ctx


def _stock(info: GGUFInfo, base, imatrix, folder: Path):
    """The stock file's size and types, from llama.cpp's own rules (written to a temp file, deleted)."""
    from . import quantize as rq

    tmp = folder / f".neoxq-stock-{os.getpid()}.gguf"
    try:
        r = rq.quantize(info, base, output=tmp, imatrix=imatrix, force=True)
        return r.size_bytes, {t["name"]: t["type"] for t in r.tensors}
    finally:
        tmp.unlink(missing_ok=True)


@dataclass
class MixPlan:
    """What a mix file is: its per-tensor types and the metadata that records them."""

    base: object  # QuantType
    types: dict[str, str]
    kv: dict[str, str]
    extra: dict  # for QuantResult.extra["mix"]


def plan_mix(info: GGUFInfo, base, opts: MixOptions, imatrix: Path | str | None, scratch: Path) -> MixPlan:
    """Measure sensitivities on the calibration text and allocate the budget (default: the stock
    `base` file's size); `scratch` holds the temporary stock file that gives that size."""
    from neoxq.core.imatrix_io import file_sha256

    from . import quantize as rq
    from .reference_cache import default_cache_dir

    im = rq.load_imatrix(imatrix, info)
    ids, ctx = _calibration_ids(info, opts)
    stock_bytes, stock_types = _stock(info, base, imatrix, scratch)
    target = opts.target_bytes or (int(opts.target_bpw * info.n_params / 8) if opts.target_bpw else stock_bytes)
    tensors = quantizable(info)
    fixed = stock_bytes - sum(tensor_bytes(t, stock_types[t.name]) for t in tensors) + 128 * (len(tensors) + 8)
    cache = Path(opts.cache_dir) if opts.cache_dir else default_cache_dir().parent / "mix"
    sens, probes = sensitivities(info, ids, ctx, cache, im, file_sha256(Path(imatrix)) if imatrix else None, opts.threads)
    if opts.types:
        sens = {n: s.restricted(opts.types) for n, s in sens.items()}
    plan = allocate(tensors, sens, target - fixed)
    plan, check = _checked(info, ids, ctx, cache, im, opts, plan, stock_types, target - fixed, tensors)
    kv = {"neoxq.mix.base": base.value, "neoxq.mix.target_bytes": str(target), "neoxq.mix.stock_bytes": str(stock_bytes),
          "neoxq.mix.calib_sha256": hashlib.sha256(opts.calib_text.encode("utf-8")).hexdigest(),
          "neoxq.mix.predicted_kld": f"{predicted_kld(sens, plan):.6g}", **{f"neoxq.mix.type.{n}": t for n, t in plan.items()}}
    extra = {"base": base.value, "target_bytes": target, "stock_bytes": stock_bytes, "predicted_kld": predicted_kld(sens, plan),
             "stock_predicted_kld": _stock_prediction(sens, stock_types), "probes": probes + 2, "calibration_tokens": len(ids),
             "calibration_check": check, "types": plan}
    return MixPlan(base, plan, kv, extra)


def check_budget(info: GGUFInfo, opts: MixOptions) -> None:
    """Before any work: a budget at or above every quantizable tensor in F16 has nothing to choose,
    and is refused instead of written as an F16 file labelled a mix."""
    target = opts.target_bytes or (int(opts.target_bpw * info.n_params / 8) if opts.target_bpw else None)
    quantized = quantizable(info)
    names = {t.name for t in quantized}
    largest = info.data_offset + sum(tensor_bytes(t, "F16") for t in quantized) + sum(t.n_bytes for t in info.tensors if t.name not in names)
    if target is not None and target >= largest:
        given = f"--target-size {format_bytes(target)}" if opts.target_bytes else f"--target-bpw {opts.target_bpw:g}"
        raise UsageError(f"{given} is at least the whole model in F16 ({format_bytes(largest)}), so there is nothing to choose; "
                         "pass a smaller budget, or convert with --outtype f16")


def check_written(result, plan: MixPlan, out: Path) -> None:
    """llama.cpp must have written the planned types (else the file is removed)."""
    written = {t["name"]: t["type"] for t in result.tensors}
    wrong = {n: (t, written.get(n)) for n, t in plan.types.items() if written.get(n) != t}
    if wrong:
        out.unlink(missing_ok=True)
        raise UsageError(f"llama.cpp wrote other types than planned for {len(wrong)} tensor(s), e.g. {next(iter(wrong.items()))}")


def quantize_mix(inp, base, opts: MixOptions, output: Path | str | None = None, imatrix: Path | str | None = None,
                 force: bool = False):
    """Write `<base>-mix`: no larger than the target (default: stock `base` from the same input),
    each tensor's type chosen from measured sensitivity; return the read-back QuantResult."""
    from neoxq.core.atomic import check_output, output_in
    from neoxq.core.gguf_info import read_info
    from neoxq.core.qtypes import QuantType

    from . import quantize as rq

    base = QuantType.parse(base) if isinstance(base, str) else base
    info = inp if isinstance(inp, GGUFInfo) else read_info(inp)
    rq.check_quantizable(info, base, bool(imatrix))
    check_budget(info, opts)
    out = output_in(output, rq.default_output(info, f"{base.value}-mix"))
    check_output(out, force, inputs=[info.path, *([imatrix] if imatrix else [])])
    plan = plan_mix(info, base, opts, imatrix, out.parent if str(out.parent) else Path("."))
    result = rq.quantize(info, base, output=out, imatrix=imatrix, force=force, tensor_types=plan.types, kv=plan.kv,
                         label=f"{base.value}-mix")
    check_written(result, plan, out)
    result.extra["mix"] = {**plan.extra, "size_bytes": result.size_bytes}
    return result


def _checked(info, ids, ctx, cache, im, opts, plan, stock_types, budget, tensors):
    """Measure the planned mix and the stock file on the calibration text (two probes); keep the
    stock types if the mix is not better there, so a mix is never worse than stock where measured."""
    from neoxq.core.machine import default_threads

    stock = {t.name: stock_types[t.name] for t in tensors}
    if sum(tensor_bytes(t, stock[t.name]) for t in tensors) > budget:
        stock = None  # a smaller budget than stock: nothing to fall back to
    probe = KLDProbe(info, ids, ctx, cache, im, opts.threads or default_threads())
    try:
        mix_kld = probe.kld(plan)
        stock_kld = probe.kld(stock) if stock else None
    finally:
        probe.close()
    check = {"mix_calibration_kld": mix_kld, "stock_calibration_kld": stock_kld, "kept": "mix"}
    if stock_kld is not None and mix_kld >= stock_kld:
        check["kept"] = "stock types (the mix measured no better on the calibration text)"
        return stock, check
    return plan, check


def _stock_prediction(sens: dict[str, Sensitivity], stock_types: dict[str, str]) -> float | None:
    try:
        return predicted_kld(sens, {n: stock_types[n] for n in sens})
    except KeyError:
        return None  # a stock type outside the candidates (e.g. IQ types without imatrix)
