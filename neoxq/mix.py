"""`--mix`: a file no larger than stock (or a size asked for) whose per-tensor types are chosen from
sensitivity probed on the calibration text, written by llama.cpp's own quantizer through its tensor-type overrides.

The steps: llama.cpp's dry run gives stock's types and size (nothing written); the calibration
text's sensitivities are probed (neoxq.runtime.sensitivity, cached); the budget is allocated
(neoxq.core.mix_plan, pure); the plan and stock are scored once more on the calibration text and
stock's types (stepped down where the mix's header keys leave them over the budget, the bytes freed
past that spent on upgrades) are kept where the mix is not better there; llama.cpp writes the file
and the written types are checked against the plan.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from neoxq.calibration import calibration_imatrix
from neoxq.core.atomic import check_output, output_in
from neoxq.core.choices import imatrix_choice
from neoxq.core.errors import UsageError
from neoxq.core.gguf_info import GGUFInfo, read_info
from neoxq.core.imatrix_io import file_sha256
from neoxq.core.machine import default_threads
from neoxq.core.mix_plan import (
    MixOptions,
    MixPlan,
    allocate,
    check_budget,
    fitted_fallback,
    guarded,
    mix_kv,
    predicted_kld,
    quantizable,
    target_bytes,
    tensor_budget,
)
from neoxq.core.qtypes import QuantType
from neoxq.runtime import quantize as rq
from neoxq.runtime.reference_cache import default_cache_dir
from neoxq.runtime.sensitivity import KLDProbe, calibration_ids, sensitivities


def plan_mix(
    info: GGUFInfo, base: QuantType, opts: MixOptions, imatrix: Path | str | None, label: str | None = None, kv: dict[str, str] | None = None
) -> MixPlan:
    """Measure sensitivities on the calibration text and allocate the budget (default: the stock
    `base` file's size, from llama.cpp's dry run). `label` and `kv` are what the file will be
    written with (they count in its header)."""
    im = rq.load_imatrix(imatrix, info)
    ids, ctx = calibration_ids(info, opts.calib_text, opts.ctx, opts.max_windows)
    label = label or f"{base.value}-mix"
    stock = rq.plan_quantize(info, base, imatrix)
    target = target_bytes(info, opts, stock.size)
    calib_sha = hashlib.sha256(opts.calib_text.encode("utf-8")).hexdigest()
    call_kv = {**stock.call.kv, "neoxq.quant_type": label, **(kv or {})}  # the mix file's call differs from stock's only there
    budget = tensor_budget(info, target, call_kv, base.value, stock.size, calib_sha, opts.ctx)
    tensors = quantizable(info)
    cache = Path(opts.cache_dir) if opts.cache_dir else default_cache_dir().parent / "mix"
    sens, probes = sensitivities(info, ids, ctx, cache, im, file_sha256(Path(imatrix)) if imatrix else None, opts.threads)
    if opts.types:
        sens = {n: s.restricted(opts.types) for n, s in sens.items()}
    stock_types = {t.name: stock.types[t.name] for t in tensors}
    plan = allocate(tensors, sens, budget)
    check = None  # not scored with the guard off (--optimize: MixOptions.guard)
    if opts.guard:
        plan, check = _checked(info, ids, ctx, cache, im, opts, plan, fitted_fallback(tensors, sens, stock_types, budget), stock_types)
    predicted = predicted_kld(sens, plan)
    extra = {
        "base": base.value,
        "target_bytes": target,
        "stock_bytes": stock.size,
        "predicted_kld": predicted,
        "stock_predicted_kld": predicted_kld(sens, stock_types),
        "probes": probes + (check["probes"] if check else 0),
        "calibration_tokens": len(ids),
        "calibration_check": check,
        "types": plan,
    }
    return MixPlan(base, plan, mix_kv(base.value, target, stock.size, calib_sha, opts.ctx, predicted, plan), extra)


def _checked(info, ids, ctx, cache, im, opts, plan, fallback, stock_types):
    """neoxq.core.mix_plan.guarded with its measurements: the plan and stock's types (fitted to the
    budget) on the calibration text, so a mix is never worse than stock on that text."""
    probe = KLDProbe(info, ids, ctx, cache, im, opts.threads or default_threads())
    try:
        plan, check = guarded(plan, fallback, probe.kld)
    finally:
        probe.close()
    if fallback is not None:
        check["stock_types_changed"] = {n: [stock_types[n], t] for n, t in fallback.items() if t != stock_types[n]}
    return plan, check


def check_written(result, plan: MixPlan, out: Path) -> None:
    """llama.cpp must have written the planned types (else the file is removed)."""
    written = {t["name"]: t["type"] for t in result.tensors}
    wrong = {n: (t, written.get(n)) for n, t in plan.types.items() if written.get(n) != t}
    if wrong:
        out.unlink(missing_ok=True)
        raise UsageError(f"llama.cpp wrote other types than planned for {len(wrong)} tensor(s), e.g. {next(iter(wrong.items()))}")


def quantize_mix(inp, base, opts: MixOptions, output: Path | str | None = None, imatrix: Path | str | None = None, force: bool = False):
    """Write `<base>-mix`: no larger than the target (default: stock `base` from the same input),
    each tensor's type chosen from its probed sensitivity; return the read-back QuantResult."""
    base = QuantType.parse(base) if isinstance(base, str) else base
    info = inp if isinstance(inp, GGUFInfo) else read_info(inp)
    label = f"{base.value}-mix"
    rq.check_quantizable(info, base, bool(imatrix))
    check_budget(info, opts)
    out = output_in(output, rq.default_output(info, label))
    check_output(out, force, inputs=[info.path, *([imatrix] if imatrix else [])])
    plan = plan_mix(info, base, opts, imatrix, label)
    result = rq.quantize(info, base, output=out, imatrix=imatrix, force=force, tensor_types=plan.types, kv=plan.kv, label=label)
    check_written(result, plan, out)
    result.extra["mix"] = {**plan.extra, "size_bytes": result.size_bytes}
    return result


def mix_with_imatrix(src: GGUFInfo, qtype: QuantType, opts: MixOptions, output, imatrix, reference: str | None = None, force: bool = False):
    """`--mix`: the importance matrix is computed from the calibration text unless `imatrix` names a
    file or says none."""
    if imatrix is not None:
        return quantize_mix(src, qtype, opts, output=output, imatrix=imatrix_choice(imatrix), force=force)
    check_budget(src, opts)  # quantize_mix checks it too, but only after the imatrix below is computed
    output = output_in(output, rq.default_output(src, f"{qtype.value}-mix"))
    check_output(output, force, inputs=[src.path])
    with tempfile.TemporaryDirectory(prefix="neoxq-mix-") as scratch:
        im = calibration_imatrix(src, opts.calib_text, Path(scratch), reference, ctx=opts.ctx)
        return quantize_mix(src, qtype, opts, output=output, imatrix=im, force=force)
