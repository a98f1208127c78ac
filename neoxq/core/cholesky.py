"""Cholesky factorisation in place, for matrices of any size.

LAPACK's dpotrf is used as it is up to LAPACK_MAX_BYTES. Above that, the factor is made block by
block: LAPACK's dpotrf on one small diagonal block at a time, BLAS's triangular solve on the rows
below it, and a matrix product for the trailing update. Each call then sees at most a few hundred
MiB.

Why: scipy's bundled OpenBLAS crashes in its threaded dpotrf on matrices the size of a 6.9B model's
MLP-down Hessian, and works on smaller ones, where it is also faster than the blocked path
(docs/method.md, "The blocked Cholesky", has the sizes and timings).
"""

from __future__ import annotations

import numpy as np

# Well below the first size that crashed, a margin for the threshold's dependence on the thread
# count (docs/method.md, "The blocked Cholesky").
LAPACK_MAX_BYTES = 1 << 30
# Diagonal blocks 2048 wide: 8 steps at 16384, each trailing update is one pass over the rest.
BLOCK = 2048
# Rows per product in the trailing update: the temporary is ROWS × n float64. The time hardly
# depends on it, so it is chosen to bound the temporary.
ROWS = 512


def lower_in_place(h: np.ndarray) -> None:
    """Overwrite h's lower triangle with L, where h = L Lᵀ. h must be C-contiguous float64,
    symmetric positive definite. The strict upper triangle is scratch afterwards: LAPACK's dpotrf
    (clean=0, on h's Fortran view with uplo U) leaves it as it was, the blocked path writes over a
    strip of it next to the diagonal."""
    if h.nbytes <= LAPACK_MAX_BYTES:
        _lapack(h)
        return
    for k0 in range(0, len(h), BLOCK):
        _step(h, k0, min(k0 + BLOCK, len(h)))


def _lapack(h: np.ndarray, offset: int = 0) -> None:
    """LAPACK's dpotrf in place (h's lower triangle is its Fortran view's upper); a failure names
    the column as LAPACK would for the whole matrix, h being the diagonal block at `offset`."""
    from scipy.linalg import lapack

    out, info = lapack.dpotrf(h.T, lower=0, overwrite_a=1, clean=0)
    if info != 0 or not np.shares_memory(out, h):
        raise np.linalg.LinAlgError(f"dpotrf failed (info {offset + info if info > 0 else info})")


def _step(h: np.ndarray, k0: int, k1: int) -> None:
    """One block column of the right-looking factorisation: factor the diagonal block
    h[k0:k1, k0:k1], solve the rows below it, and subtract their outer product from the lower
    triangle of the trailing matrix."""
    from scipy.linalg import blas

    n = len(h)
    diag = h[k0:k1, k0:k1]
    low = np.array(diag)  # a contiguous copy, factored by the one LAPACK call; dtrsm reads its lower triangle
    _lapack(low, k0)
    diag[...] = low  # its upper triangle is diag's own: dpotrf leaves that half as it was
    for r0 in range(k1, n, BLOCK):  # below the block, square tiles: rows ← rows · L⁻ᵀ
        r1 = min(r0 + BLOCK, n)
        h[r0:r1, k0:k1] = blas.dtrsm(1.0, low, np.array(h[r0:r1, k0:k1], order="F"), side=1, lower=1, trans_a=1, overwrite_b=1)
    buf = np.empty((ROWS, max(n - k1, 0)))  # one product's result, reused (fresh ones page-fault)
    for r0 in range(k1, n, ROWS):  # trailing update, lower triangle and the diagonal strip only
        r1 = min(r0 + ROWS, n)
        prod = np.matmul(h[r0:r1, k0:k1], h[k1:r1, k0:k1].T, out=buf[: r1 - r0, : r1 - k1])
        h[r0:r1, k1:r1] -= prod
