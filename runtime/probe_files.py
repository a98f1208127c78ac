"""Probe files for --mix's sensitivity measurements (neoxq.runtime.sensitivity) that write only what they
change.

A probe is the F16 model with a few matrices quantized. Written whole by llama.cpp's quantizer,
every probe would be another copy of the model (tens of probes per mix). Here the
F16 model is written once as a set of GGUF splits, as llama.cpp's gguf-split lays them out and as
llama.cpp loads them (one model from `<prefix>-00001-of-000NN.gguf` …): the metadata and the small
tensors in the first split, then one matrix per split. A probe is a folder of links to those
splits in which the probed matrices' splits are rewritten in their quantized type, the blocks
made by ggml's own quantizer with the same importance weights llama.cpp's quantizer passes it
(the same bytes: quant_tests/test_mix.py compares a probe with llama.cpp's whole file).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import gguf
import numpy as np

from neoxq.core.gguf_info import GGUFInfo, TensorInfo, float_rows
from neoxq.core.imatrix_io import IMatrix
from neoxq.core.sizes import rows_per_chunk

from . import capi


def split_name(prefix: str, no: int, count: int) -> str:
    """llama.cpp's llama_split_path: the name it looks for, split `no` (0-based) of `count`."""
    return f"{prefix}-{no + 1:05d}-of-{count:05d}.gguf"


class SplitModel:
    """The F16 GGUF `info` as splits in `folder`: split 0 holds the metadata and every tensor not in
    `matrices`, split k the matrix matrices[k − 1]. probe() builds a probe folder from it."""

    PREFIX = "model"

    def __init__(self, info: GGUFInfo, matrices: list[str], folder: Path):
        self.info, self.folder = info, Path(folder)
        self.matrices = list(matrices)
        self.count = 1 + len(self.matrices)
        self.bytes_written = 0
        self.folder.mkdir(parents=True, exist_ok=True)
        by_name = {t.name: t for t in info.tensors}
        first = [t for t in info.tensors if t.name not in set(self.matrices)]
        self.bytes_written += self._write(self.folder, 0, [(t, self._raw(t)) for t in first], metadata=True)
        for k, name in enumerate(self.matrices, 1):
            t = by_name[name]
            self.bytes_written += self._write(self.folder, k, [(t, self._raw(t))])

    def first_split(self, folder: Path) -> Path:
        return Path(folder) / split_name(self.PREFIX, 0, self.count)

    def probe(self, types: dict[str, str], imatrix: IMatrix | None, folder: Path) -> Path:
        """A probe folder: the matrices named in `types` quantized to their type (ggml type names),
        every other split a link to the F16 one. Returns the path llama.cpp loads."""
        folder = Path(folder)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        by_name = {t.name: t for t in self.info.tensors}
        for k in range(self.count):
            name = self.matrices[k - 1] if k else None
            if name is not None and types.get(name, by_name[name].type) != by_name[name].type:
                t = by_name[name]
                raw = quantized(self.info, t, types[name], None if imatrix is None or name not in imatrix.sums else imatrix.values(name))
                self.bytes_written += self._write(folder, k, [(t, raw)], ggml_type=types[name])
            else:
                os.symlink(self.folder / split_name(self.PREFIX, k, self.count), folder / split_name(self.PREFIX, k, self.count))
        return self.first_split(folder)

    def _raw(self, t: TensorInfo) -> np.ndarray:
        data = np.memmap(self.info.path, np.uint8, "r", offset=self.info.data_offset + t.offset, shape=(t.n_bytes,))
        return data.reshape(*t.shape[:-1], -1)

    def _write(
        self, folder: Path, no: int, tensors: list[tuple[TensorInfo, np.ndarray]], metadata: bool = False, ggml_type: str | None = None
    ) -> int:
        path = folder / split_name(self.PREFIX, no, self.count)
        w = gguf.GGUFWriter(str(path), arch=self.info.arch, use_temp_file=False)
        w.add_uint16(gguf.Keys.Split.LLM_KV_SPLIT_NO, no)
        w.add_uint16(gguf.Keys.Split.LLM_KV_SPLIT_COUNT, self.count)
        w.add_int32(gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT, len(self.info.tensors))
        if metadata:
            _copy_metadata(self.info.path, w)
        for t, raw in tensors:
            w.add_tensor(t.name, raw, raw_dtype=gguf.GGMLQuantizationType[ggml_type or t.type])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path.stat().st_size


def _copy_metadata(src: Path, w) -> None:
    """Every key of the source file but the ones the writer and the split set own."""
    skip = {
        gguf.Keys.General.ARCHITECTURE,
        gguf.Keys.Split.LLM_KV_SPLIT_NO,
        gguf.Keys.Split.LLM_KV_SPLIT_COUNT,
        gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT,
    }
    for key, field in gguf.GGUFReader(str(src)).fields.items():
        if key.startswith("GGUF.") or key in skip:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), vtype, sub_type=sub)


def quantized(info: GGUFInfo, t: TensorInfo, type_name: str, importance: np.ndarray | None) -> np.ndarray:
    """The tensor (F16/F32/BF16 in `info`) quantized to `type_name` by ggml's quantizer, a row chunk
    at a time (rows are quantized independently): raw blocks, uint8 [rows, bytes per row]."""
    ggml_type = int(gguf.GGMLQuantizationType[type_name])
    rows, cols = t.shape
    step = rows_per_chunk(cols, 4)  # float32 rows quantized at a time
    return np.concatenate([capi.quantize_rows(float_rows(info, t, slice(r0, r0 + step)), ggml_type, importance) for r0 in range(0, rows, step)])
