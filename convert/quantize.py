"""Quantize a GGUF with llama.cpp's own quantizer (llama_model_quantize through llama-cpp-python),
on all cores, optionally with an importance matrix. The type and the imatrix's provenance go into
the output's metadata through the quantizer's key/value overrides."""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

from neoxq.atomic import atomic_output
from neoxq.errors import CorruptFileError, UsageError
from neoxq.gguf_info import GGUFInfo, read_info
from neoxq.machine import default_threads, llama_log_captured
from neoxq.progress import info as say
from neoxq.qtypes import QUANTIZED, QuantType

from .imatrix_io import IMatrix, check_fits, file_sha256, read_imatrix

@dataclass
class QuantResult:
    path: Path
    qtype: QuantType
    tensors: list[dict]  # name, type, shape, bytes, fallback
    size_bytes: int
    bpw: float
    seconds: float

    def table(self) -> str:
        rows = [f"{'tensor':<28} {'type':<8} {'shape':<14} {'bytes':>10}  note"]
        for t in self.tensors:
            shape = "x".join(map(str, t["shape"]))
            rows.append(f"{t['name']:<28} {t['type']:<8} {shape:<14} {t['bytes']:>10}  {t['note']}")
        rows.append(f"{self.qtype.value}: {self.size_bytes / 1e6:.2f} MB, {self.bpw:.2f} bits/weight, {self.seconds:.1f} s")
        return "\n".join(rows)

    def as_json(self) -> dict:
        return {"path": str(self.path), "type": self.qtype.value, "size_bytes": self.size_bytes,
                "bpw": round(self.bpw, 4), "seconds": round(self.seconds, 3), "tensors": self.tensors}


def default_output(src: GGUFInfo, qtype: QuantType, out_dir: Path | None = None) -> Path:
    """<basename>[-<revision>]-<TYPE>.gguf, from the source's metadata (never its file name)."""
    base = src.metadata.get("general.basename") or "model"
    rev = src.metadata.get("neoxq.source.revision") or ""
    rev = f"-{rev}" if rev and rev != "main" else ""
    return (out_dir or src.path.parent) / f"{base}{rev}-{qtype.value}.gguf"


def quantize(
    inp: Path | str,
    qtype: QuantType | str,
    output: Path | str | None = None,
    imatrix: Path | str | None = None,
    force: bool = False,
    quiet: bool = False,
    nthread: int | None = None,
    out_dir: Path | None = None,
) -> QuantResult:
    import time

    qtype = QuantType.parse(qtype) if isinstance(qtype, str) else qtype
    if qtype not in QUANTIZED:
        raise UsageError(f"{qtype.value} is not a quantized type; use `neoxq convert --outtype {qtype.value.lower()}`; quantized types: {', '.join(t.value for t in QUANTIZED)}")
    src = read_info(inp)
    src_type = src.quant_type
    if src_type is not None and not src_type.is_float:
        raise UsageError(f"{src.path.name} is already quantized ({src_type.value}); quantize from the F32/F16/BF16 file instead")
    im = im_path = None
    if imatrix:
        im_path = Path(imatrix)
        im = read_imatrix(im_path)
        check_fits(im, src.tensors, im_path)
    elif qtype.needs_imatrix:
        raise UsageError(f"{qtype.value} needs an importance matrix; make one with `neoxq imatrix CHECKPOINT --text calibration.txt -o model.imatrix` and pass --imatrix model.imatrix")
    out = Path(output) if output else default_output(src, qtype, out_dir)
    t0 = time.perf_counter()
    with atomic_output(out, force) as tmp:
        _run_quantizer(src.path, tmp, qtype, im, im_path, nthread, quiet)
    seconds = time.perf_counter() - t0
    result = summarize(out, qtype, seconds)
    say(f"wrote {out} ({result.size_bytes / 1e6:.1f} MB, {result.bpw:.2f} bpw)", quiet)
    return result


def _overrides(qtype: QuantType, im: IMatrix | None, im_path: Path | None):
    import llama_cpp

    kv = {"neoxq.quant_type": qtype.value}
    if im is not None and im_path is not None:
        kv |= {"quantize.imatrix.file": im_path.name[:127], "neoxq.imatrix.sha256": file_sha256(im_path),
               "quantize.imatrix.dataset": (im.datasets[0] if im.datasets else "unknown")[:127]}
    arr = (llama_cpp.llama_model_kv_override * (len(kv) + 1))()
    for i, (k, v) in enumerate(kv.items()):
        arr[i].key = k.encode()
        arr[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
        arr[i].value.val_str = v.encode()[:127]
    arr[len(kv)].key = b""  # an empty key ends the list
    return arr


def _imatrix_array(im: IMatrix):
    """llama_model_imatrix_data[] ending with a null name; the float buffers kept alive alongside."""
    import llama_cpp
    import numpy as np

    names = sorted(im.sums)
    keep = []
    arr = (llama_cpp.llama_model_imatrix_data * (len(names) + 1))()
    for i, name in enumerate(names):
        vals = np.ascontiguousarray(im.values(name), dtype=np.float32)
        keep.append((name.encode(), vals))
        arr[i].name = keep[-1][0]
        arr[i].data = vals.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = vals.size
    arr[len(names)].name = None
    return arr, keep


def _run_quantizer(inp: Path, out: Path, qtype: QuantType, im, im_path, nthread, quiet) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = nthread or default_threads()
    params.ftype = qtype.ftype
    overrides = _overrides(qtype, im, im_path)
    params.kv_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_kv_override))
    if im is not None:
        im_arr, _keep = _imatrix_array(im)
        params.imatrix = ctypes.cast(im_arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    say(f"quantizing {inp.name} to {qtype.value} on {params.nthread} threads ...", quiet)
    with llama_log_captured() as errors:
        rc = llama_cpp.llama_model_quantize(str(inp).encode(), str(out).encode(), ctypes.byref(params))
    if rc != 0:
        detail = " ".join(e.strip() for e in errors if e.strip())[-300:] or f"code {rc}"
        raise CorruptFileError(f"llama.cpp could not quantize {inp.name} to {qtype.value} ({detail}); check the input with `neoxq convert` again")


def summarize(path: Path, qtype: QuantType, seconds: float = 0.0) -> QuantResult:
    """Which tensor got which type, with llama.cpp's fallbacks for rows not a multiple of 256."""
    info = read_info(path)
    rows = []
    for name, ttype, shape, nbytes in info.tensors:
        note = ""
        if len(shape) == 2 and shape[-1] % 256 and _main_type_needs_superblock(qtype):
            note = f"fallback: row {shape[-1]} not a multiple of 256"
        rows.append({"name": name, "type": ttype, "shape": list(shape), "bytes": nbytes, "note": note})
    return QuantResult(path, qtype, rows, path.stat().st_size, info.bpw, seconds)


def _main_type_needs_superblock(qtype: QuantType) -> bool:
    """k-quants and i-quants (but IQ4_NL) pack rows in super-blocks of 256; other widths fall back."""
    return qtype.value.startswith("IQ") and qtype != QuantType.IQ4_NL or "_K" in qtype.value


def convert_and_quantize(
    src: str,
    types: list[QuantType],
    revision: str | None = None,
    out_dir: Path | str | None = None,
    imatrix: Path | str | None = None,
    base_type: QuantType | None = None,
    force: bool = False,
    quiet: bool = False,
) -> list[Path]:
    """Convert once (F16 unless told), then write every listed type from that one file."""
    from .converter import convert

    out_dir = Path(out_dir) if out_dir else Path(".")
    base_type = base_type or QuantType.F16
    base = convert(src, base_type, revision=revision, out_dir=out_dir, force=force, quiet=quiet)
    paths = [base] if base_type in types else []
    for t in types:
        if t == base_type:
            continue
        if t.is_float or t == QuantType.Q8_0 and not imatrix:
            paths.append(convert(src, t, revision=revision, out_dir=out_dir, force=force, quiet=quiet))
        else:
            paths.append(quantize(base, t, imatrix=imatrix, force=force, quiet=quiet, out_dir=out_dir).path)
    return paths
