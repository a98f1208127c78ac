"""Checkpoint → one GGUF per type: convert once, quantize the rest, reuse what is still valid.

The one builder behind `neoxq convert --quant`, `neoxq report` and `neoxq sweep`. Rules:
- names: neoxq.core.naming (`<name>[-<revision>]-<TYPE>.gguf`);
- float types (F32/F16/BF16) come from the converter; every quantized type, Q8_0 included, from
  llama.cpp's quantizer applied to the base file (F16 unless told otherwise);
- an existing file is reused only when its metadata names the same type, the same source (repo,
  revision, commit, weights fingerprint) and, for quantized types, the same imatrix (sha256).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from neoxq.calibration import checkpoint_calibration, read_calibration
from neoxq.convert.checkpoint import Checkpoint
from neoxq.convert.converter import convert, source_keys
from neoxq.core.cache_key import changed
from neoxq.core.errors import NeoxqError, OutputError, UsageError
from neoxq.core.gguf_info import read_info
from neoxq.core.imatrix_io import file_sha256
from neoxq.core.mix_plan import MixOptions
from neoxq.core.naming import gguf_name
from neoxq.core.qtypes import QuantType
from neoxq.mix import quantize_mix
from neoxq.optimize import OptimizeOptions, quantize_optimized
from neoxq.runtime import quantize as rq


@dataclass
class Built:
    qtype: QuantType
    path: Path
    seconds: float  # time to write it (0 when reused)
    reused: bool
    variant: str = ""  # "mix" | "opt": a file of the type's size made another way
    name: str = ""  # a file given with --add: its row's label (it was made elsewhere)

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        return f"{self.qtype.value}-{self.variant}" if self.variant else self.qtype.value


def expected_metadata(ckpt: Checkpoint, qtype: QuantType, imatrix_sha: str | None) -> dict[str, str]:
    want = {**source_keys(ckpt), "neoxq.quant_type": qtype.value}
    if not qtype.is_float:
        want["neoxq.imatrix.sha256"] = imatrix_sha  # None: made without one
    return want


def is_valid(path: Path, want: dict[str, str | None]) -> bool:
    """A built file records its inputs in its metadata: reused only when every one is `want`'s."""
    if not path.is_file():
        return False
    try:
        meta = read_info(path).metadata
    except NeoxqError:
        return False
    return not changed({k: meta.get(k) for k in want}, want)


def build_mixes(
    ckpt: Checkpoint,
    base: Built,
    types: list[QuantType],
    out_dir: Path,
    calib_text: str,
    imatrix: Path | None = None,
    ctx: int = 512,
    on_step: Callable[[Built], None] | None = None,
) -> dict[QuantType, Built]:
    """`<TYPE>-mix` for every quantized type: no larger than the stock file, per-tensor types from
    sensitivity probed on `calib_text` (neoxq.mix); reused while source, imatrix and
    calibration text are unchanged."""
    im_sha = file_sha256(imatrix) if imatrix else None
    calib_sha = hashlib.sha256(calib_text.encode("utf-8")).hexdigest()
    out: dict[QuantType, Built] = {}
    for t in (t for t in types if not t.is_float):
        path = Path(out_dir) / gguf_name(ckpt.name, ckpt.revision, f"{t.value}-mix")
        want = {
            **source_keys(ckpt),
            "neoxq.quant_type": f"{t.value}-mix",
            "neoxq.imatrix.sha256": im_sha,
            "neoxq.mix.calib_sha256": calib_sha,
            "neoxq.mix.ctx": str(ctx),
        }

        def make(t=t, path=path):
            return quantize_mix(base.path, t, MixOptions(calib_text, ctx=ctx), output=path, imatrix=imatrix, force=True)

        out[t] = _made_or_reused(t, path, want, make, variant="mix")
        if on_step:
            on_step(out[t])
    return out


def build_optimized(
    ckpt: Checkpoint,
    base: Built,
    types: list[QuantType],
    out_dir: Path,
    calib_text: str,
    imatrix: Path | None = None,
    ctx: int = 512,
    on_step: Callable[[Built], None] | None = None,
    mix: bool = False,
    max_memory: int | None = None,
    calib_source: str = "given",
) -> dict[QuantType, Built]:
    """`<TYPE>-opt` for every quantized type: the stock type map and size, levels chosen against each
    layer's output on `calib_text` (neoxq.optimize); with `mix`, `<TYPE>-opt-mix`: a --mix plan's
    types. Reused while source, method, imatrix and calibration text are unchanged. Without an
    imatrix file, the calibration pass makes one."""
    calib_sha = hashlib.sha256(calib_text.encode("utf-8")).hexdigest()
    out: dict[QuantType, Built] = {}
    for t in (t for t in types if not t.is_float):
        variant = "opt-mix" if mix else "opt"
        path = Path(out_dir) / gguf_name(ckpt.name, ckpt.revision, f"{t.value}-{variant}")
        opts = OptimizeOptions(
            calib_text,
            calib_source=calib_source,
            reference=str(ckpt.folder),
            imatrix=str(imatrix) if imatrix else "auto",
            ctx=ctx,
            mix=mix,
            max_memory=max_memory,
        ).resolved()
        want = {
            **source_keys(ckpt),
            "neoxq.quant_type": f"{t.value}-{variant}",
            "neoxq.optimize.method": opts.method,
            "neoxq.optimize.calibration.sha256": calib_sha,
            "neoxq.optimize.ctx": str(ctx),
            "neoxq.optimize.device": opts.device,
        }
        if imatrix:
            want["neoxq.imatrix.sha256"] = file_sha256(imatrix)
        make = lambda t=t, path=path, opts=opts: quantize_optimized(base.path, t, opts, output=path, force=True)  # noqa: E731
        out[t] = _made_or_reused(t, path, want, make, variant=variant)
        if on_step:
            on_step(out[t])
    return out


def _made_or_reused(t: QuantType, path: Path, want: dict, make: Callable[[], object], variant: str = "") -> Built:
    """Reuse `path` when its metadata matches `want`, else `make()` it; either way, how long it took."""
    t0 = time.perf_counter()
    reused = is_valid(path, want)
    if not reused:
        make()
    return Built(t, path, 0.0 if reused else time.perf_counter() - t0, reused, variant=variant)


def check_build_options(types: list[QuantType], base_type: QuantType, imatrix: Path | None) -> None:
    """Refuse, before any work, what build_types cannot make: a base the others are not quantized
    from (llama.cpp quantizes from float weights), an imatrix type without an imatrix."""
    if not base_type.is_float:
        floats = ", ".join(t.value.lower() for t in QuantType if t.is_float)
        raise UsageError(
            f"--outtype {base_type.value.lower()} cannot be the base of --quant (types are quantized from float weights); use --outtype {floats}, or add {base_type.value} to --quant"
        )
    for t in types:
        if t.needs_imatrix and imatrix is None:
            raise UsageError(
                f"{t.value} needs an importance matrix; pass --imatrix FILE (make one with "
                "`neoxq imatrix CHECKPOINT --text calib.txt -o model.imatrix`; `neoxq report` also takes --imatrix auto)"
            )


def check_convert_options(types: list[QuantType], base_type: QuantType, imatrix: Path | None, optimize: bool, calib: bool) -> None:
    """`neoxq convert`'s options against each other, before the checkpoint is read."""
    if (optimize or calib) and not types:
        raise UsageError("--optimize and --calib choose the levels of --quant's types; add --quant TYPE")
    if calib and not optimize:
        raise UsageError("--calib belongs to --optimize; add --optimize or drop --calib")
    if optimize:
        check_build_options([], base_type, None)
        if any(t.is_float for t in types):
            raise UsageError("--optimize re-chooses quantized levels; drop the float types from --quant")
    elif types:
        check_build_options(types, base_type, imatrix)


def build_types(
    ckpt: Checkpoint,
    types: list[QuantType],
    out_dir: Path,
    imatrix: Path | None = None,
    base_type: QuantType = QuantType.F16,
    replace_invalid: bool = True,
    on_step: Callable[[Built], None] | None = None,
) -> dict[QuantType, Built]:
    """Make (or reuse) one file per type in `out_dir`; return them by type, base first.

    `replace_invalid=False` refuses to overwrite an existing file that is not valid (the CLI
    without --force); the report owns its folder and replaces such files."""
    check_build_options(types, base_type, imatrix)
    im_sha = file_sha256(imatrix) if imatrix else None
    out: dict[QuantType, Built] = {}
    order = [base_type] + [t for t in types if t != base_type]
    for t in order:
        path = Path(out_dir) / gguf_name(ckpt.name, ckpt.revision, t.value)
        want = expected_metadata(ckpt, t, None if t.is_float else im_sha)

        def make(t=t, path=path):
            if path.exists() and not replace_invalid:
                raise OutputError(
                    f"{path} already exists and was made from another source or type; pass --force to overwrite it or -o to choose another folder"
                )
            if t.is_float:
                convert(ckpt, t, output=path, force=True)
            else:
                rq.quantize(out[base_type].path, t, output=path, imatrix=imatrix, force=True)

        out[t] = _made_or_reused(t, path, want, make)
        if on_step:
            on_step(out[t])
    return out


def build_optimized_types(
    ckpt: Checkpoint,
    types: list[QuantType],
    out_dir: Path,
    calib_files: list[Path] | None = None,
    imatrix: Path | None = None,
    base_type: QuantType = QuantType.F16,
    ctx: int = 512,
    replace_invalid: bool = True,
) -> dict[str, Built]:
    """`convert --quant T --optimize`: the base file, then `<T>-opt` for each type, calibrated on the
    --calib files or on the checkpoint's own sampled text; by label, base first."""
    check_build_options([], base_type, None)  # the calibration pass makes the imatrix every type needs
    base = build_types(ckpt, [], out_dir, base_type=base_type, replace_invalid=replace_invalid)[base_type]
    calib = read_calibration(calib_files) if calib_files else checkpoint_calibration(ckpt, ctx)
    made = build_optimized(ckpt, base, types, out_dir, calib.text, imatrix=imatrix, ctx=ctx, calib_source=calib.source)
    return {base.label: base, **{b.label: b for b in made.values()}}
