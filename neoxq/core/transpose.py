"""A 2-D array's transpose as a new C-contiguous array, copied in square tiles.

numpy's copy of a transposed view (np.ascontiguousarray(x.T)) walks one of the two arrays with a
stride of a whole row, a cache miss per element once rows are long; in square tiles each tile's
rows stay in the cache. GPTQ's sweep and the block codec transpose every matrix they touch."""

from __future__ import annotations

import numpy as np

TILE = 256


def transposed(x: np.ndarray) -> np.ndarray:
    """x.T, C-contiguous (a copy; x 2-D)."""
    rows, cols = x.shape
    out = np.empty((cols, rows), x.dtype)
    for r0 in range(0, rows, TILE):
        for c0 in range(0, cols, TILE):
            out[c0 : c0 + TILE, r0 : r0 + TILE] = x[r0 : r0 + TILE, c0 : c0 + TILE].T
    return out
