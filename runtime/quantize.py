"""Quantize a GGUF with llama.cpp's own quantizer (`llama_model_quantize`), on all cores, optionally
with an importance matrix and per-tensor type overrides. The type and the imatrix's provenance go
into the output's metadata through the quantizer's key/value overrides."""

from __future__ import annotations

import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from neoxq.core.atomic import atomic_output, out_of_space, output_in
from neoxq.core.errors import CorruptFileError, UsageError
from neoxq.core.gguf_info import GGUFInfo, read_info
from neoxq.core.gguf_layout import quantized_size
from neoxq.core.imatrix_io import IMatrix, check_fits, file_sha256, read_imatrix
from neoxq.core.machine import default_threads
from neoxq.core.naming import gguf_name
from neoxq.core.progress import info as say
from neoxq.core.qtypes import QUANTIZED, QuantType

from . import capi


@dataclass
class QuantResult:
    path: Path
    qtype: QuantType
    tensors: list[dict]  # name, type, shape, bytes, note
    size_bytes: int
    bpw: float
    seconds: float
    extra: dict = field(default_factory=dict)  # e.g. the mix plan

    @property
    def label(self) -> str:
        return self.extra.get("label", self.qtype.value)

    def as_json(self) -> dict:
        return {
            "path": str(self.path),
            "type": self.label,
            "size_bytes": self.size_bytes,
            "bpw": round(self.bpw, 4),
            "seconds": round(self.seconds, 3),
            "tensors": self.tensors,
            **self.extra,
        }


def default_output(src: GGUFInfo, label: str, out_dir: Path | None = None) -> Path:
    """The naming rule applied to the source's metadata (never its file name)."""
    name = gguf_name(src.metadata.get("general.basename") or "model", src.metadata.get("neoxq.source.revision"), label)
    return (out_dir or src.path.parent) / name


def check_quantizable(src: GGUFInfo, qtype: QuantType, has_imatrix: bool) -> None:
    if qtype not in QUANTIZED:
        raise UsageError(
            f"{qtype.value} is not a quantized type; use `neoxq convert --outtype {qtype.value.lower()}`; quantized types: {', '.join(t.value for t in QUANTIZED)}"
        )
    src_type = src.quant_type
    if src.metadata.get("neoxq.mix") or (src_type is not None and not src_type.is_float):
        raise UsageError(
            f"{src.path.name} is already quantized ({src.metadata.get('neoxq.quant_type') or src_type.value}); quantize from the F32/F16/BF16 file instead"
        )
    if qtype.needs_imatrix and not has_imatrix:
        raise UsageError(
            f"{qtype.value} needs an importance matrix; make one with `neoxq imatrix CHECKPOINT --text calibration.txt -o model.imatrix` and pass --imatrix model.imatrix"
        )


def load_imatrix(imatrix: Path | str | None, src: GGUFInfo) -> IMatrix | None:
    if not imatrix:
        return None
    im = read_imatrix(imatrix)
    check_fits(im, src.tensors, Path(imatrix), src.source_fingerprint)
    return im


def quantize_call(
    src: GGUFInfo,
    qtype: QuantType | str,
    imatrix: Path | str | None = None,
    nthread: int | None = None,
    tensor_types: dict[str, str] | None = None,
    kv: dict[str, str] | None = None,
    label: str | None = None,
) -> capi.QuantizeCall:
    """The one llama.cpp quantize call for these inputs (checked), as written or as a dry run."""
    qtype = QuantType.parse(qtype) if isinstance(qtype, str) else qtype
    check_quantizable(src, qtype, bool(imatrix))
    im = load_imatrix(imatrix, src)
    call = capi.QuantizeCall(ftype=qtype.ftype, nthread=nthread or default_threads(), kv={"neoxq.quant_type": label or qtype.value, **(kv or {})})
    if im is not None:
        call.imatrix = {n: im.values(n) for n in im.sums}
        call.kv = {  # the caller's keys win: --optimize records the imatrix it was given, not its rescaled copy
            "quantize.imatrix.file": Path(imatrix).name,
            "neoxq.imatrix.sha256": file_sha256(Path(imatrix)),
            "quantize.imatrix.dataset": im.datasets[0] if im.datasets else "unknown",
            **call.kv,
        }
    if tensor_types:
        call.tensor_types = dict(tensor_types)
    return call


@dataclass
class PlannedFile:
    """What llama.cpp's quantizer would write, learned from its dry run: each tensor's type, and the
    file's size those give (neoxq.core.gguf_layout)."""

    types: dict[str, str]
    size: int
    call: capi.QuantizeCall


def plan_quantize(src: GGUFInfo, qtype: QuantType | str, imatrix: Path | str | None = None, **call_args) -> PlannedFile:
    """llama.cpp's own type choices for `qtype` (its dry run: nothing written, no disk needed)."""
    call = quantize_call(src, qtype, imatrix, **call_args)
    rc, errors, types = capi.quantize_dry_run(str(src.path), call)
    if rc != 0 or set(types) != {t.name for t in src.tensors}:
        detail = capi.error_text(errors) or (f"code {rc}" if rc else f"its dry run named {len(types)} of {len(src.tensors)} tensors")
        raise CorruptFileError(
            f"llama.cpp could not plan {src.path.name} as {call.kv['neoxq.quant_type']} ({detail}); check the input with `neoxq convert` again"
        )
    return PlannedFile(types, quantized_size(src, types, call.kv), call)


def quantize(
    inp: Path | str | GGUFInfo,
    qtype: QuantType | str,
    output: Path | str | None = None,
    imatrix: Path | str | None = None,
    force: bool = False,
    nthread: int | None = None,
    out_dir: Path | None = None,
    tensor_types: dict[str, str] | None = None,
    kv: dict[str, str] | None = None,
    label: str | None = None,
) -> QuantResult:
    """Quantize `inp` to `qtype` (optionally overriding single tensors' ggml types); return the
    per-tensor result read back from the written file."""
    qtype = QuantType.parse(qtype) if isinstance(qtype, str) else qtype
    src = inp if isinstance(inp, GGUFInfo) else read_info(inp)
    call = quantize_call(src, qtype, imatrix, nthread, tensor_types, kv, label)
    out = output_in(output, default_output(src, label or qtype.value, out_dir))
    t0 = time.perf_counter()
    with atomic_output(out, force, inputs=[src.path, *([imatrix] if imatrix else [])]) as tmp:
        say(f"quantizing {src.path.name} to {label or qtype.value} on {call.nthread} threads ...")
        rc, errors = capi.quantize(str(src.path), str(tmp), call)
        if rc != 0:
            raise _quantize_failure(src, out, qtype, capi.error_text(errors) or f"code {rc}")
    result = summarize(out, qtype, time.perf_counter() - t0)
    if label:
        result.extra["label"] = label
    say(f"wrote {out} ({result.size_bytes / 1e6:.1f} MB, {result.bpw:.2f} bpw)")
    return result


def _quantize_failure(src: GGUFInfo, out: Path, qtype: QuantType, detail: str) -> Exception:
    """llama.cpp reports a full disk (and a file over `ulimit -f`) as an iostream error: check the
    space and the limit before blaming the input."""
    need = int(src.n_params * qtype.nominal_bpw / 8 * 1.1) + src.data_offset
    free = shutil.disk_usage(out.parent if str(out.parent) else ".").free
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and limit < need:
        return out_of_space(out, need, too_large=True)
    if free < need or "iostream" in detail or "No space" in detail:
        return out_of_space(out, need)
    return CorruptFileError(f"llama.cpp could not quantize {src.path.name} to {qtype.value} ({detail}); check the input with `neoxq convert` again")


def summarize(path: Path, qtype: QuantType, seconds: float = 0.0) -> QuantResult:
    """Which tensor got which type, with llama.cpp's fallbacks for rows not a multiple of 256."""
    info = read_info(path)
    rows = []
    for t in info.tensors:
        note = ""
        if len(t.shape) == 2 and t.shape[-1] % 256 and _main_type_needs_superblock(qtype):
            note = f"fallback: row {t.shape[-1]} not a multiple of 256"
        rows.append({"name": t.name, "type": t.type, "shape": list(t.shape), "bytes": t.n_bytes, "note": note})
    return QuantResult(path, qtype, rows, path.stat().st_size, info.bpw, seconds)


def _main_type_needs_superblock(qtype: QuantType) -> bool:
    """k-quants and i-quants (but IQ4_NL) pack rows in super-blocks of 256; other widths fall back."""
    return qtype.value.startswith("IQ") and qtype != QuantType.IQ4_NL or "_K" in qtype.value
