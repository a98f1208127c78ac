"""The F16 source with every LayerNorm → matmul pair's channels equalised (neoxq.core.equalize: the
norm's weight and bias divided by s, the matmul's input columns multiplied by s; the same model in
exact arithmetic), written as a copy and streamed a row chunk at a time."""

from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import numpy as np

from neoxq.convert.writer import encode
from neoxq.core import gptq
from neoxq.core.equalize import norm_pairs, scales
from neoxq.core.errors import OutputError
from neoxq.core.gguf_info import GGUFInfo, TensorInfo, read_info
from neoxq.core.tensor_file import TensorFile
from neoxq.levels import read_weights, source_weights


def equalized_source(src: GGUFInfo, absmax: dict[str, np.ndarray], dest: Path) -> tuple[GGUFInfo, dict[str, np.ndarray]]:
    """A copy of the F16 source at `dest`, equalised with the calibration inputs' channel maxima
    `absmax` (per matmul). Returns it and s per matmul."""
    size, free = src.path.stat().st_size, shutil.disk_usage(dest.parent).free
    if free < size:
        raise OutputError(
            f"--optimize needs {size / 1e6:.0f} MB in {dest.parent} for its equalised copy of {src.path.name}, {free / 1e6:.0f} MB free;"
            " free space or point NEOXQ_CACHE at another disk"
        )
    shutil.copyfile(src.path, dest)
    done = {}
    n_layers = sum(1 for t in src.tensors if t.name.endswith(".attn_qkv.weight"))
    with TensorFile(dest, src) as f:

        def put(t: TensorInfo, row0: int, values: np.ndarray):
            f.write(t, encode(values, int(gguf.GGMLQuantizationType[t.type])), row0)

        for pair in norm_pairs(n_layers):
            if pair.matmul not in f.by_name:  # a tied output matrix is the embedding, which is not a norm's reader
                continue
            w, t = source_weights(src, pair.matmul), src.tensor(pair.matmul)
            step = gptq.row_chunk(w.shape[1])
            colmax = np.zeros(w.shape[1], np.float32)
            for r0 in range(0, len(w), step):
                np.maximum(colmax, np.abs(w[r0 : r0 + step]).max(0), out=colmax)
            s = scales(absmax[pair.matmul], colmax)
            for r0 in range(0, len(w), step):
                put(t, r0, w[r0 : r0 + step] * s[None].astype(np.float32))
            for part in (".weight", ".bias"):
                tn = src.tensor(pair.norm + part)
                put(tn, 0, (read_weights(src, tn).reshape(-1) / s).astype(np.float32))
            done[pair.matmul] = s
    return read_info(dest), done
