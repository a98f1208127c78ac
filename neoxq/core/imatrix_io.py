"""Importance-matrix files: llama.cpp's GGUF imatrix format (`<tensor>.in_sum2`, `<tensor>.counts`,
general.type = imatrix) and llama-imatrix's legacy `.dat`. Reads both, writes GGUF. No torch."""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from .atomic import atomic_output
from .errors import CorruptFileError, SourceError, UsageError
from .gguf_info import FINGERPRINT_KEY, read_info

SUM_SUFFIX, COUNT_SUFFIX = ".in_sum2", ".counts"


@dataclass
class IMatrix:
    sums: dict[str, np.ndarray]  # tensor name → sum of squared activations per input column
    counts: dict[str, float]  # tensor name → tokens accumulated
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    # the checkpoint it was computed on (Checkpoint.fingerprint, the key converted GGUFs record as
    # neoxq.source.fingerprint); None for llama-imatrix's files and older ones
    source_fingerprint: str | None = None

    def values(self, name: str) -> np.ndarray:
        """Mean squared activation per column: what llama.cpp's quantizer takes."""
        c = self.counts[name]
        return (self.sums[name] / c).astype(np.float32) if c > 0 else np.ones_like(self.sums[name], dtype=np.float32)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_imatrix(path: Path | str, option: str = "imatrix", choices: str | None = None) -> IMatrix:
    path = Path(path)
    if not path.is_file():
        alt = f"pass {choices}, or " if choices else ""
        raise SourceError(f"{option} {path}: no such file; {alt}make one with `neoxq imatrix SRC --text FILE -o {path.name}`")
    with open(path, "rb") as f:
        magic = f.read(4)
    return _read_gguf(path) if magic == b"GGUF" else _read_legacy(path)


def _read_gguf(path: Path) -> IMatrix:
    """Through neoxq's own bounds-checked GGUF parser (gguf-py's reader loops for hours over a
    damaged array count: found by scripts/fuzz.py), then the F32 tensors by memory map."""
    try:
        info = read_info(path, require_arch=None)
    except CorruptFileError as exc:
        raise CorruptFileError(f"imatrix {path} is truncated or corrupt; re-create it with `neoxq imatrix`") from exc
    bad = f"{path} is not an importance matrix (needs matching non-empty F32 .in_sum2/.counts tensors); pass a file from `neoxq imatrix` or llama-imatrix"
    sums, counts = {}, {}
    for t in info.tensors:
        if not t.name.endswith((SUM_SUFFIX, COUNT_SUFFIX)):
            continue
        if t.type != "F32" or t.n_elements == 0:
            raise CorruptFileError(bad)
        arr = np.fromfile(path, dtype="<f4", count=t.n_elements, offset=info.data_offset + t.offset)
        if t.name.endswith(SUM_SUFFIX):
            sums[t.name[: -len(SUM_SUFFIX)]] = arr
        else:
            counts[t.name[: -len(COUNT_SUFFIX)]] = float(arr[0])
    if not sums or set(sums) != set(counts):
        raise CorruptFileError(bad)
    meta = info.metadata
    datasets, fingerprint = meta.get("imatrix.datasets", []), meta.get(FINGERPRINT_KEY)
    try:
        if not isinstance(datasets, list) or not all(isinstance(d, str) for d in datasets) or not isinstance(fingerprint, (str, type(None))):
            raise TypeError("metadata of the wrong type")
        return IMatrix(sums, counts, datasets, int(meta.get("imatrix.chunk_count", 0)), int(meta.get("imatrix.chunk_size", 0)), fingerprint)
    except (TypeError, ValueError, OverflowError) as exc:
        raise CorruptFileError(f"{path}: its imatrix metadata is damaged ({exc}); re-create it with `neoxq imatrix`") from exc


def _read_legacy(path: Path) -> IMatrix:
    """llama-imatrix's .dat: entries of (name, ncall, values averaged per call × ncall)."""
    data = path.read_bytes()
    try:
        off = 0

        def take(fmt):
            nonlocal off
            vals = struct.unpack_from(fmt, data, off)
            off += struct.calcsize(fmt)
            return vals

        (n,) = take("<i")
        if not 1 <= n <= len(data) // 12:  # an entry is at least 12 bytes
            raise ValueError(f"{n} entries in {len(data)} bytes")
        sums, counts = {}, {}
        for _ in range(n):
            (ln,) = take("<i")
            if not 0 <= ln <= len(data) - off:  # a negative length would walk the reader backwards (found by scripts/fuzz.py)
                raise ValueError(f"a name of {ln} bytes")
            name = data[off : off + ln].decode("utf-8")
            off += ln
            ncall, nval = take("<ii")
            if nval < 0 or 4 * nval > len(data) - off:
                raise ValueError(f"{nval} values")
            arr = np.frombuffer(data, dtype="<f4", count=nval, offset=off).astype(np.float32)
            off += 4 * nval
            sums[name], counts[name] = arr, float(ncall)
        chunks, datasets = 0, []
        if off < len(data):
            (chunks,) = take("<i")
            if off < len(data):
                (ln,) = take("<i")
                datasets = [data[off : off + ln].decode("utf-8", errors="replace")]
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"{path} is neither a GGUF imatrix nor a valid legacy .dat ({exc}); re-create it with `neoxq imatrix`") from exc
    return IMatrix(sums, counts, datasets, chunks, 0)


def write_imatrix(path: Path | str, im: IMatrix, force: bool = False) -> Path:
    """llama.cpp's GGUF imatrix layout, so llama-quantize reads our files and we read its."""
    path = Path(path)
    with atomic_output(path, force) as tmp:
        w = gguf.GGUFWriter(tmp, arch="")
        w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # an imatrix has no architecture
        w.add_type("imatrix")
        w.add_array("imatrix.datasets", im.datasets or ["unknown"])
        w.add_uint32("imatrix.chunk_count", im.chunk_count)
        w.add_uint32("imatrix.chunk_size", im.chunk_size)
        if im.source_fingerprint:
            w.add_string(FINGERPRINT_KEY, im.source_fingerprint)
        for name in sorted(im.sums):
            w.add_tensor(name + SUM_SUFFIX, im.sums[name].astype(np.float32).reshape(1, -1))
            w.add_tensor(name + COUNT_SUFFIX, np.array([[im.counts[name]]], dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def check_fits(im: IMatrix, tensors: list, source: Path, fingerprint: str | None = None) -> None:
    """Refuse an imatrix made for another model: every entry must name a tensor of this width, and
    where both record the checkpoint they come from (`fingerprint`: the model's), it must be one."""
    if im.source_fingerprint and fingerprint and im.source_fingerprint != fingerprint:
        raise UsageError(
            f"imatrix {source.name} was made for another model: it was computed on other weights than this file "
            "was converted from (their source fingerprints differ); compute one for this model with `neoxq imatrix`"
        )
    cols = {t.name: t.shape[-1] for t in tensors if len(t.shape) == 2}
    for name, arr in im.sums.items():
        if name not in cols:
            raise UsageError(
                f"imatrix {source.name} has an entry for {name}, which this model lacks: it was made for another model; compute one for this model with `neoxq imatrix`"
            )
        if arr.size != cols[name]:
            raise UsageError(
                f"imatrix {source.name} has {arr.size} values for {name}, the model's rows have {cols[name]}: it was made for another model; compute one for this model with `neoxq imatrix`"
            )
