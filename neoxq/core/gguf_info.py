"""Read a GGUF's metadata and tensor table (never its tensor data) and check it is a complete
GPT-NeoX file.

A direct parser over a memory map rather than gguf-py's GGUFReader: the reader builds numpy views
of every array, which for a 50k-token vocabulary plus its merges takes seconds per call; here the
tokenizer arrays are skipped (strings are walked by their length prefixes, numbers jumped over) so a
Pythia-sized file reads in milliseconds. Counts are checked against the file size before they are
trusted, so a corrupt header cannot make us loop or allocate without bound.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CorruptFileError, SourceError, UnsupportedModelError
from .ggml_types import GGML_TYPES
from .qtypes import QuantType

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# Arrays read only by what needs them (the tokenizer); the table keeps their lengths.
SKIPPED_ARRAYS = ("tokenizer.ggml.",)

# GGUF value types: (struct format, size) for scalars; 8 = string, 9 = array.
_SCALARS = {
    0: ("<B", 1),
    1: ("<b", 1),
    2: ("<H", 2),
    3: ("<h", 2),
    4: ("<I", 4),
    5: ("<i", 4),
    6: ("<f", 4),
    7: ("<?", 1),
    10: ("<Q", 8),
    11: ("<q", 8),
    12: ("<d", 8),
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: str  # ggml type name: F32, F16, Q4_K, …
    shape: tuple[int, ...]  # numpy order (rows, cols)
    n_bytes: int
    offset: int  # from the start of the data section

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


# The weights a file was converted from (convert.checkpoint.Checkpoint.fingerprint), recorded in
# converted GGUFs and in the imatrix files neoxq makes: what "made from the same model" compares.
FINGERPRINT_KEY = "neoxq.source.fingerprint"
SOURCE_PATH_KEY = "neoxq.source.path"  # the local folder a file was converted from (absolute)


@dataclass
class GGUFInfo:
    path: Path
    arch: str
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    array_lengths: dict[str, int]  # skipped arrays (tokenizer.ggml.*) → element count
    data_offset: int = 0
    header_bytes: int = 0  # where the tensor infos end (data_offset is that, padded to the alignment)

    @property
    def quant_type(self) -> QuantType | None:
        name = self.metadata.get("neoxq.quant_type")
        if name:
            try:
                return QuantType(name)
            except ValueError:
                pass  # a mix or a future type: fall back to llama.cpp's own id
        ft = self.metadata.get("general.file_type")
        return QuantType.from_ftype(int(ft)) if isinstance(ft, int) else None

    @property
    def source_fingerprint(self) -> str | None:
        return self.metadata.get(FINGERPRINT_KEY) or None

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def bpw(self) -> float:
        """Bits per weight over all tensors, as llama.cpp prints it."""
        return 8 * sum(t.n_bytes for t in self.tensors) / max(self.n_params, 1)

    @property
    def context_length(self) -> int:
        return int(self.metadata.get(f"{self.arch}.context_length", 0))

    @property
    def n_vocab(self) -> int:
        return self.array_lengths.get("tokenizer.ggml.tokens", 0)

    def tensor(self, name: str) -> TensorInfo:
        return next(t for t in self.tensors if t.name == name)


class _Cursor:
    """Sequential reads over a buffer; any overrun raises struct.error, turned into CorruptFileError."""

    def __init__(self, buf, size: int):
        self.buf, self.size, self.off = buf, size, 0

    def scalar(self, vtype: int):
        fmt, n = _SCALARS[vtype]
        (v,) = struct.unpack_from(fmt, self.buf, self.off)
        self.off += n
        return v

    def u32(self) -> int:
        return self.scalar(4)

    def u64(self) -> int:
        return self.scalar(10)

    def count(self, min_item: int = 1) -> int:
        n = self.u64()
        if n * min_item > self.size - self.off:
            raise struct.error(f"count {n} exceeds the file")
        return n

    def string(self) -> str:
        n = self.count()
        s = bytes(self.buf[self.off : self.off + n]).decode("utf-8")
        self.off += n
        return s

    def skip_string(self) -> None:
        n = self.count()  # read first: `self.off += self.count()` would add to the old offset
        self.off += n

    def _skip_strings(self, n: int) -> None:
        """The hot loop of a 50k-token vocabulary: lengths only, no decoding, no calls per item."""
        off, buf, unpack = self.off, self.buf, struct.Struct("<Q").unpack_from
        for _ in range(n):
            off += 8 + unpack(buf, off)[0]
            if off > self.size:
                raise struct.error("string array runs past the end of the file")
        self.off = off

    def value(self, vtype: int, keep: bool = True):
        if vtype == _STRING:
            return self.string() if keep else self.skip_string()
        if vtype == _ARRAY:
            etype = self.u32()
            n = self.count()
            if not keep and etype in _SCALARS:
                self.off += n * _SCALARS[etype][1]
                return n
            if not keep and etype == _STRING:
                self._skip_strings(n)
                return n
            out = [self.value(etype, keep) for _ in range(n)]
            return out if keep else n
        if vtype not in _SCALARS:
            raise struct.error(f"unknown value type {vtype}")
        return self.scalar(vtype)


def _parse(buf, size: int) -> tuple[dict[str, Any], dict[str, int], list[TensorInfo], int]:
    c = _Cursor(buf, size)
    c.off = 4
    version = c.u32()
    if version not in (2, 3):
        raise struct.error(f"GGUF version {version}")
    n_tensors, n_kv = c.count(24), c.count(12)
    meta: dict[str, Any] = {}
    lengths: dict[str, int] = {}
    for _ in range(n_kv):
        key = c.string()
        vtype = c.u32()
        if vtype == _ARRAY and key.startswith(SKIPPED_ARRAYS):
            lengths[key] = c.value(vtype, keep=False)
        else:
            meta[key] = c.value(vtype)
    tensors = []
    for _ in range(n_tensors):
        name = c.string()
        n_dims = c.u32()
        if n_dims > 8:
            raise struct.error(f"{n_dims} dimensions")
        dims = [c.u64() for _ in range(n_dims)]
        ttype, offset = c.u32(), c.u64()
        if ttype not in GGML_TYPES:
            raise struct.error(f"unknown tensor type {ttype}")
        type_name, block, type_size = GGML_TYPES[ttype]
        tensors.append(TensorInfo(name, type_name, tuple(reversed(dims)), math.prod(dims) // block * type_size, offset))
    align = int(meta.get("general.alignment", DEFAULT_ALIGNMENT)) or DEFAULT_ALIGNMENT
    return meta, lengths, tensors, c.off, -(-c.off // align) * align


def read_info(path: Path | str, require_arch: str | None = "gptneox") -> GGUFInfo:
    path = Path(path)
    if path.is_dir():
        raise SourceError(f"{path} is a folder; pass the path of a .gguf file in it")
    if not path.is_file():
        raise SourceError(f"{path}: no such file; pass the path of a .gguf file")
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise CorruptFileError(f"{path} is not a GGUF file (bad magic); pass a .gguf made by neoxq or llama.cpp")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return info_from_buffer(buf, path, require_arch)


def info_from_buffer(buf, path: Path, require_arch: str | None = "gptneox") -> GGUFInfo:
    """The metadata of the GGUF whose bytes are `buf` (a memory map, or bytes: what the fuzzer feeds
    it); anything wrong is one CorruptFileError naming `path`."""
    size = len(buf)
    if buf[:4] != GGUF_MAGIC:
        raise CorruptFileError(f"{path} is not a GGUF file (bad magic); pass a .gguf made by neoxq or llama.cpp")
    try:
        meta, lengths, tensors, header_bytes, data_offset = _parse(buf, size)
    except (struct.error, ValueError, KeyError, UnicodeDecodeError, OverflowError, MemoryError) as exc:
        raise CorruptFileError(f"{path} is truncated or corrupt ({type(exc).__name__}); re-create or re-download it") from exc
    end = max((data_offset + t.offset + t.n_bytes for t in tensors), default=0)
    if end > size:
        raise CorruptFileError(f"{path} is truncated ({size} of {end} bytes); re-create or re-download it")
    arch = str(meta.get("general.architecture", ""))
    if require_arch and arch != require_arch:
        raise UnsupportedModelError(
            f"{path} is a {arch or 'non-model'} GGUF; neoxq runs GPT-NeoX (gptneox) models — convert one with `neoxq convert`"
        )
    return GGUFInfo(path, arch, meta, tensors, lengths, data_offset, header_bytes)


FLOAT_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}  # the float tensor types, as stored


def float_rows(info: GGUFInfo, t: TensorInfo, rows=slice(None)):
    """Rows (a slice or an index array) of an F32/F16/BF16 tensor as float32 [rows, cols], read
    through a memory map: a large tensor is never read whole to get a part of it."""
    raw = np.memmap(info.path, dtype=FLOAT_DTYPES[t.type], mode="r", offset=info.data_offset + t.offset, shape=t.shape)[rows]
    if t.type == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return np.asarray(raw, dtype=np.float32)
