"""Mixed precision from probed sensitivity, the pure half: which types each tensor may take, the sensitivity fit, the
byte budget and the allocation. Nothing here runs llama.cpp; the measurements come from
neoxq.runtime.sensitivity and the orchestration is neoxq.mix.

1. Candidates: every quantizable matrix × the llama.cpp types its row width allows (k-quants need
   rows of 256; IQ types only with an importance matrix; Q8_0; F16).
2. Proxy: for each tensor and type, the (imatrix-weighted) squared weight error of ggml's own
   quantize → dequantize: cheap, and proportional to the output noise.
3. Measurement: the KLD against F16 on the calibration text when only that tensor (or a group of
   alike tensors) is quantized, to one or two reference types. Per tensor, KLD = α · err^β is
   fitted through the probed points, so every type gets a KLD from its proxy error.
4. Allocation: a multiple-choice knapsack solved greedily on each tensor's lower convex hull of
   (bytes, KLD), upgrading where the KLD saved per byte is largest while the file stays within the
   budget (assuming the KLDs of separate tensors add, which holds for small perturbations).
"""

from __future__ import annotations

import heapq
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import UsageError
from .gguf_info import GGUFInfo, TensorInfo
from .gguf_layout import header_size
from .gguf_layout import tensor_bytes as _padded_bytes
from .sizes import format_bytes

K_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
BLOCK32_TYPES = ["Q4_0", "Q5_0", "Q8_0"]
IQ_TYPES = ["IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS"]  # only with an importance matrix
IQ_ROW_TYPES = ["IQ2_XXS", "IQ2_XS"]  # … and only for a tensor the imatrix has a row for (ggml aborts without one)
CANDIDATE_TYPES = ["F16", *BLOCK32_TYPES, *K_TYPES, *IQ_TYPES]  # every type candidates() may offer
MIX_VERSION = 1  # of the measurements' meaning: a change invalidates cached sensitivities


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
    # measure the plan against stock's types on the calibration text and keep stock's where the plan is
    # not better; off for --optimize, whose rounding is not llama.cpp's, so judging the plan by
    # llama.cpp's rounding of it would put back stock's types where the optimised plan is better
    # (docs/method.md, "Why the guard exists")
    guard: bool = True


@dataclass
class MixPlan:
    """What a mix file is: its per-tensor types and the metadata that records them."""

    base: object  # QuantType
    types: dict[str, str]
    kv: dict[str, str]
    extra: dict  # for QuantResult.extra["mix"]


def candidates(t: TensorInfo, has_imatrix: bool, imatrix_row: bool = True) -> list[str]:
    """The types a mix may give tensor t: by its row width, whether an imatrix is given, and
    whether it holds t's row (imatrix_row)."""
    cols = t.shape[-1]
    out = ["F16"]
    if cols % 32 == 0:
        out += BLOCK32_TYPES
    if cols % 256 == 0:
        out += K_TYPES + ([ty for ty in IQ_TYPES if imatrix_row or ty not in IQ_ROW_TYPES] if has_imatrix else [])
    return out


def tensor_bytes(t: TensorInfo, type_name: str) -> int:
    return _padded_bytes(t.n_elements, type_name)


def quantizable(info: GGUFInfo) -> list[TensorInfo]:
    """The matrices llama.cpp's quantizer quantizes (norms and biases stay F32)."""
    return [t for t in info.tensors if len(t.shape) == 2 and t.name.endswith(".weight")]


@dataclass
class Sensitivity:
    """Per tensor: proxy error per type, probed KLD per probed type, and the fitted KLD."""

    err: dict[str, float]
    probed: dict[str, float]
    kld: dict[str, float] = field(default_factory=dict)

    def restricted(self, types) -> "Sensitivity":
        keep = set(types)
        return Sensitivity(*({t: v for t, v in d.items() if t in keep} for d in (self.err, self.probed, self.kld)))

    def fit(self) -> None:
        pts = [(self.err[t], k) for t, k in self.probed.items() if self.err.get(t, 0) > 0 and k > 0]
        if not pts:
            self.kld = {t: 0.0 for t in self.err}
            return
        if len(pts) >= 2 and pts[0][0] != pts[1][0]:
            (e1, k1), (e2, k2) = pts[:2]
            beta = min(max(math.log(k2 / k1) / math.log(e2 / e1), 0.5), 1.5)
        else:
            beta = 1.0
        alpha = float(np.exp(np.mean([math.log(k) - beta * math.log(e) for e, k in pts])))
        self.kld = {t: (alpha * e**beta if e > 0 else 0.0) for t, e in self.err.items()}
        self.kld.update(self.probed)  # a probe beats the fit


def measure_types(t: TensorInfo, has_imatrix: bool, two: bool) -> list[str]:
    """The reference types a tensor's KLD is probed at: a low and a middle one (or only the low)."""
    c = candidates(t, has_imatrix)
    pts = ["Q2_K", "Q4_K"] if "Q2_K" in c else ["Q4_0", "Q8_0"] if "Q4_0" in c else []
    return pts if two else pts[:1]


def probe_groups(tensors: list[TensorInfo], max_evals: int) -> list[list[TensorInfo]]:
    """One tensor per probe when that fits `max_evals`; else tensors of the same kind in consecutive
    layers share a probe, and split its KLD in proportion to their proxy errors."""
    if len(tensors) <= max_evals:
        return [[t] for t in tensors]
    kinds: dict[str, list[TensorInfo]] = {}
    for t in tensors:
        kinds.setdefault(re.sub(r"^blk\.\d+\.", "blk.*.", t.name), []).append(t)
    per_kind = max(1, (max_evals - sum(len(v) == 1 for v in kinds.values())) // max(1, sum(len(v) > 1 for v in kinds.values())))
    groups = []
    for members in kinds.values():
        for part in np.array_split(np.arange(len(members)), min(per_kind, len(members))):
            groups.append([members[i] for i in part])
    return groups


def split_probed(group: list[TensorInfo], kld: float, errs: dict[str, dict[str, float]], ty: str) -> dict[str, float]:
    """A group probe's KLD shared among its tensors in proportion to their proxy errors."""
    total = sum(errs[t.name][ty] for t in group) or 1.0
    return {t.name: kld * errs[t.name][ty] / total for t in group}


def fitted(errs: dict[str, dict[str, float]], probed: dict[str, dict[str, float]]) -> dict[str, Sensitivity]:
    out = {n: Sensitivity(errs[n], probed.get(n, {})) for n in errs}
    for s in out.values():
        s.fit()
    return out


def hull(options: list[tuple[int, float, str]]) -> list[tuple[int, float, str]]:
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
    opts = _options(tensors, sens)
    hulls = {n: hull(o) for n, o in opts.items()}
    pick = {n: 0 for n in hulls}
    used = sum(h[0][0] for h in hulls.values())
    if used > budget:
        raise UsageError(
            f"the budget leaves {format_bytes(budget)} for the quantized tensors but the smallest mix needs "
            f"{format_bytes(used)}; pass a larger --target-size/--target-bpw"
        )
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


def _options(tensors: list[TensorInfo], sens: dict[str, Sensitivity]) -> dict[str, list[tuple[int, float, str]]]:
    """Per tensor, (bytes, predicted KLD, type) for every type it has a KLD for."""
    return {t.name: [(tensor_bytes(t, ty), k, ty) for ty, k in sens[t.name].kld.items()] for t in tensors}


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


def fitted_fallback(tensors: list[TensorInfo], sens: dict[str, Sensitivity], types: dict[str, str], budget: int) -> dict[str, str] | None:
    """`types` (stock's) made to fit `budget`: stepped down where that costs the least predicted KLD
    per byte of the overshoot covered (one step, when the cheapest frees it all), repeated; then the
    bytes a step freed past the overshoot (a whole tensor's worth, for a few hundred over) spent by
    `_fill` on the upgrades that lower the KLD most. Stock's types exceed a mix's budget by the mix's
    own header keys, so the guard that measures them against the plan needs a version of them that
    can be written. None when no step down is left."""
    types = dict(types)
    opts = {n: o for n, o in _options(tensors, sens).items() if types[n] in sens[n].kld}  # a type outside the candidates has no cost to step from
    over = sum(tensor_bytes(t, types[t.name]) for t in tensors) - budget
    while over > 0:
        steps = [
            ((k - cur[1]) / min(cur[0] - b, over), n, ty, cur[0] - b)  # bytes freed past the overshoot are worth nothing here
            for n, options in opts.items()
            for cur in [next(o for o in options if o[2] == types[n])]
            for b, k, ty in options
            if b < cur[0]
        ]
        if not steps:
            return None
        _, name, ty, freed = min(steps)
        types[name], over = ty, over - freed
    return _fill(opts, types, -over)


def guarded(plan: dict[str, str], fallback: dict[str, str] | None, measure) -> tuple[dict[str, str], dict]:
    """The plan, unless the fallback (stock's types, fitted) measures no worse: `measure(types)` is the
    KLD on the calibration text with every tensor at its type. The plan's KLD is predicted by adding
    per-tensor fits, which can miss by far where degraded layers compound (docs/method.md, "Why the
    guard exists"), so both are scored whole."""
    mix_kld = measure(plan)
    other = fallback is not None and fallback != plan
    stock_kld = measure(fallback) if other else (None if fallback is None else mix_kld)
    check = {"mix_calibration_kld": mix_kld, "stock_calibration_kld": stock_kld, "kept": "mix", "probes": 1 + other}
    if other and stock_kld <= mix_kld:
        check["kept"] = "stock types (the mix scored no better on the calibration text)"
        return fallback, check
    return plan, check


def predicted_kld(sens: dict[str, Sensitivity], types: dict[str, str]) -> float | None:
    """Σ KLD of the chosen types; None where a type is outside the candidates (an IQ type llama.cpp
    chose without an imatrix, say)."""
    try:
        return float(sum(sens[n].kld[t] for n, t in types.items()))
    except KeyError:
        return None


def target_bytes(info: GGUFInfo, opts: MixOptions, stock_bytes: int | None = None) -> int | None:
    """The file size asked for: --target-size, else --target-bpw over the parameters, else stock's."""
    if opts.target_bytes:
        return opts.target_bytes
    if opts.target_bpw:
        return int(opts.target_bpw * info.n_params / 8)
    return stock_bytes


def check_budget(info: GGUFInfo, opts: MixOptions) -> None:
    """Before any work: a budget at or above every quantizable tensor in F16 has nothing to choose
    (refused instead of written as an F16 file labelled a mix), and one below every tensor at its
    smallest allowed type cannot be met."""
    target = target_bytes(info, opts)
    if target is None:
        return
    quantized = quantizable(info)
    names = {t.name for t in quantized}
    fixed = info.data_offset + sum(t.n_bytes for t in info.tensors if t.name not in names)
    given = f"--target-size {format_bytes(target)}" if opts.target_bytes else f"--target-bpw {opts.target_bpw:g}"
    largest = fixed + sum(tensor_bytes(t, "F16") for t in quantized)
    if target >= largest:
        raise UsageError(
            f"{given} is at least the whole model in F16 ({format_bytes(largest)}), so there is nothing to choose; "
            "pass a smaller budget, or convert with --outtype f16"
        )
    allowed = [[c for c in candidates(t, has_imatrix=True) if opts.types is None or c in opts.types] or ["F16"] for t in quantized]
    smallest = fixed + sum(min(tensor_bytes(t, c) for c in cs) for t, cs in zip(quantized, allowed))
    if target < smallest:
        bpw = 8 * smallest / max(info.n_params, 1)
        raise UsageError(
            f"{given} is below the smallest mix ({format_bytes(smallest)}, {bpw:.2f} bits per weight: every tensor at its smallest type); "
            f"pass --target-bpw {bpw:.2f} or more"
        )


def mix_kv(base_name: str, target: int, stock_bytes: int, calib_sha: str, ctx: int, predicted: float | None, types: dict[str, str]) -> dict[str, str]:
    """The metadata a mix file records (every value a string: llama.cpp's overrides); the
    calibration text and its windows are among the inputs a rebuild compares."""
    return {
        "neoxq.mix.base": base_name,
        "neoxq.mix.target_bytes": str(target),
        "neoxq.mix.stock_bytes": str(stock_bytes),
        "neoxq.mix.calib_sha256": calib_sha,
        "neoxq.mix.ctx": str(ctx),
        "neoxq.mix.predicted_kld": f"{predicted or 0.0:.6g}",
        **{f"neoxq.mix.type.{n}": t for n, t in types.items()},
    }


# The widest values mix_kv can write before they are known: a type name and a `.6g` float.
_WIDEST_TYPE = max(CANDIDATE_TYPES, key=len)
_WIDEST_FLOAT = -1.23457e-300


def tensor_budget(info: GGUFInfo, target: int, kv: dict[str, str], base_name: str, stock_bytes: int, calib_sha: str, ctx: int) -> int:
    """Bytes left for the quantizable tensors in a file of `target` bytes: the header (with `kv`, what
    the quantize call adds, and the mix's own keys at their widest) and the tensors that stay as they
    are come first."""
    tensors = quantizable(info)
    names = {t.name for t in tensors}
    widest = mix_kv(base_name, target, stock_bytes, calib_sha, ctx, _WIDEST_FLOAT, {t.name: _WIDEST_TYPE for t in tensors})
    kept = sum(_padded_bytes(t.n_elements, t.type) for t in info.tensors if t.name not in names)
    return target - header_size(info, {**kv, **widest}) - kept
