"""`neoxq quantize`: one float GGUF to one type — llama.cpp's stock file, a --mix file
(neoxq.mix) or optimised levels (neoxq.optimize) — with every option checked against the others
before any work starts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from neoxq import preflight
from neoxq.calibration import calibration_text
from neoxq import accelerator
from neoxq.core.choices import imatrix_choice
from neoxq.core.errors import UsageError
from neoxq.core.gguf_info import read_info
from neoxq.core.mix_plan import MixOptions, check_budget
from neoxq.core.qtypes import QuantType
from neoxq.core.sizes import parse_size
from neoxq.mix import mix_with_imatrix
from neoxq.optimize import MIX_TYPES, OptimizeOptions, quantize_optimized
from neoxq.runtime.quantize import quantize


@dataclass
class QuantizeRequest:
    imatrix: Path | str | None = None  # a file; with --mix/--optimize also `none` (unset: from the calibration text)
    mix: bool = False
    optimize: bool = False
    calib: list[Path] | None = None  # calibration texts for --mix and --optimize (never scored); none: the checkpoint's own
    target_size: str | None = None  # --mix budget as a size ("95MB")
    target_bpw: float | None = None  # --mix budget in bits per weight
    reference: str | None = None  # the fp32 checkpoint the file was converted from
    ctx: int = 512
    max_memory: int | None = None  # --optimize's memory budget
    float32: bool = False  # --optimize: every pass in float32
    output: Path | None = None
    force: bool = False
    device: str | None = None  # --optimize: where its passes and rounding run (neoxq.accelerator); unset: auto

    def check(self) -> None:
        """Refuse contradicting or missing options, each in one line naming the fix."""
        if self.target_size and self.target_bpw:
            raise UsageError("pass one budget: --target-size or --target-bpw")
        if self.optimize:
            if (self.target_size or self.target_bpw) and not self.mix:
                raise UsageError("--target-size and --target-bpw set --mix's budget; add --mix (--optimize alone keeps the stock type's size)")
            accelerator.resolve(self.device or accelerator.AUTO)  # a device that is not here: refused before any work
            return
        given = [f for f, v in (("--max-memory", self.max_memory is not None), ("--float32", self.float32), ("--device", self.device)) if v]
        if given:
            flag = given[0]
            raise UsageError(f"{flag} belongs to --optimize (its calibration passes); add --optimize or drop it")
        if self.reference and not self.mix:
            raise UsageError("--reference belongs to --optimize and --mix; add one of them")
        if not self.mix and (self.calib or self.target_size or self.target_bpw):
            raise UsageError("--calib, --target-size and --target-bpw belong to --mix; add --mix")


def quantize_gguf(inp: Path, qtype: QuantType | str, req: QuantizeRequest):
    """The file `req` asks for; returns runtime.quantize's QuantResult (with the mix's or the
    optimisation's record in `extra`)."""
    qt = QuantType.parse(qtype) if isinstance(qtype, str) else qtype
    req.check()
    info = read_info(inp)
    preflight.check(f"quantizing {info.path.name}", preflight.quantize_bytes(info), "free memory")
    budget = parse_size(req.target_size, "--target-size") if req.target_size else None
    if req.mix:
        check_budget(info, MixOptions("", budget, req.target_bpw, ctx=req.ctx, types=MIX_TYPES if req.optimize else None))
    if req.optimize or req.mix:
        calib = calibration_text(info, req.calib, req.reference, req.ctx, req.max_memory)
    if req.optimize:
        opts = OptimizeOptions(
            calib.text,
            calib_source=calib.source,
            reference=req.reference,
            imatrix=imatrix_choice(req.imatrix),
            ctx=req.ctx,
            mix=req.mix,
            target_bytes=budget,
            target_bpw=req.target_bpw,
            max_memory=req.max_memory,
            fisher_bf16=False if req.float32 else None,
            stream_bf16=False if req.float32 else None,
            device=req.device or accelerator.AUTO,
        )
        return quantize_optimized(info, qt, opts, output=req.output, force=req.force)
    if req.mix:
        opts = MixOptions(calib.text, target_bytes=budget, target_bpw=req.target_bpw, ctx=req.ctx)
        return mix_with_imatrix(info, qt, opts, req.output, req.imatrix, req.reference, req.force)
    return quantize(info, qt, output=req.output, imatrix=req.imatrix, force=req.force)
