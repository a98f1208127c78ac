"""The IQ types' grids, read through ggml's own dequantize: a block of each type with every group
pointing at grid row k, all signs positive, decodes to a · (grid[k] + o), and the header gives a and
o (neoxq.core.iq_blocks). So the tables are exactly the library's, and none is copied here."""

from __future__ import annotations

import functools

import numpy as np

from neoxq.core import iq_blocks
from neoxq.runtime import capi


@functools.cache
def grid(name: str) -> np.ndarray:
    """The grid of IQ type `name`: int16 [grid_size, width], row k the values group index k gives
    before its sign."""
    fmt = iq_blocks.FORMATS[name]
    rng = np.random.default_rng(0)
    w = rng.standard_normal((1, iq_blocks.QK_K)).astype(np.float32)
    header = capi.quantize_rows(w, fmt.ggml_type, np.ones(iq_blocks.QK_K, np.float32)).reshape(1, fmt.size)
    k = np.arange(fmt.grid_size)
    raw = iq_blocks.with_codes(
        fmt, np.repeat(header, fmt.grid_size, axis=0), np.repeat(k[:, None], fmt.groups, axis=1), np.zeros((fmt.grid_size, iq_blocks.QK_K), bool)
    )
    a, o = iq_blocks.unit_grid(fmt, raw)
    at = int(np.argmax(np.abs(a[0]))) // fmt.width * fmt.width  # a group on the largest scale
    got = capi.dequantize(raw, fmt.ggml_type, raw.shape[0] * iq_blocks.QK_K).reshape(len(raw), -1)
    c = (got[:, at : at + fmt.width] / a[:, at : at + fmt.width]) - o[:, at : at + fmt.width]
    out = np.rint(c)
    if a[0, at] == 0 or np.abs(c - out).max() > 1e-3:
        raise RuntimeError(f"could not read {name}'s grid through ggml's dequantize")
    return out.astype(np.int16)
