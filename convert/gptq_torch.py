"""neoxq.core.gptq's dense algebra in torch, on a device (`--optimize --device cuda`): H's
compensation factor, the solves with it, and GPTQ's lazy-batch sweep. The same arithmetic in the
same order and precision as the numpy path (factorisation in float64, the sweep in float32), so
the levels agree up to float rounding: products summed in another order turn a rare tie (tested
against numpy on the CPU, where torch runs this very code).

A factor made here is (perm, DeviceFactor): U as a float64 tensor on the device, with the methods
gptq.solve, gptq_levels and gptq.on_host hand such a factor to (neoxq.core stays free of torch).
Everything else (the block codec, the coupled rows, the codebook grids) stays on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from neoxq.core.gptq import DAMP, Moments, _order, _ridge, damped_diagonal

# Rows of a matrix swept at a time on the device: its float32 weights, grids, levels and errors are
# a few copies of rows × cols, kept under DEVICE_CHUNK_BYTES each.
DEVICE_CHUNK_BYTES = 1 << 28


@dataclass
class DeviceFactor:
    """U on a torch device, and what neoxq.core.gptq asks of a factor that is not a numpy array."""

    u: object  # torch.Tensor, float64 [in, in]

    def solve(self, perm: np.ndarray, rhs: np.ndarray) -> np.ndarray:
        return solve((perm, self.u), rhs)

    def levels(self, perm: np.ndarray, w, a, m, lmin: int, lmax: int, points, block: int, sub: int) -> np.ndarray:
        return gptq_levels(w, a, m, lmin, lmax, (perm, self.u), points, block, sub)

    def host(self) -> np.ndarray:
        return self.u.cpu().numpy()


def moments_factor(mom: Moments, act_order: bool, damp: float, bias: bool, group: int, device: str):
    """gptq.moments_factor with U made and kept on `device`."""
    return compensation(mom.hq, act_order, damp, mom.n * _ridge(mom, damp, bias), group, device)


def compensation(h: np.ndarray, act_order: bool = True, damp: float = DAMP, ridge: float | None = None, group: int = 1, device: str = "cpu"):
    """gptq.compensation on `device`: (perm, DeviceFactor), U the upper Cholesky factor of (H
    damped)⁻¹ in GPTQ's column order, float64. H⁻¹'s factor through H's own: with H = L Lᵀ,
    H⁻¹ = L⁻ᵀ L⁻¹, and its upper factor U is Cholesky's of that (unique, so the same U as the numpy
    path's reversal)."""
    import torch

    perm = _order(np.diag(h), act_order, group)
    idx = torch.from_numpy(perm).to(device)
    hp = torch.from_numpy(np.asarray(h, np.float64)).to(device).index_select(0, idx).index_select(1, idx)
    hp.diagonal().copy_(torch.from_numpy(damped_diagonal(np.diag(h)[perm], damp, ridge)))
    low = torch.linalg.cholesky(hp)
    del hp
    inverse = torch.cholesky_inverse(low)
    del low
    return perm, DeviceFactor(torch.linalg.cholesky(inverse, upper=True))


def solve(factor, rhs: np.ndarray) -> np.ndarray:
    """gptq.solve on the factor's device: H⁻¹ rhs = Pᵀ Uᵀ U P rhs, rhs [in, k] on the host."""
    import torch

    perm, u = factor
    idx = torch.from_numpy(perm).to(u.device)
    y = torch.from_numpy(np.asarray(rhs, np.float64)).to(u.device).index_select(0, idx)
    y = u.T @ (u @ y)
    out = torch.empty_like(y)
    out[idx] = y
    return out.cpu().numpy()


def gptq_levels(w, a, m, lmin: int, lmax: int, factor, points: np.ndarray | None, block: int, sub: int) -> np.ndarray:
    """gptq.gptq_levels on the factor's device: levels int16 [rows, cols], rows in chunks; block and
    sub: the lazy batches' widths (gptq.BLOCK, the innermost of gptq.LAZY)."""
    import torch

    perm, u = factor
    dev, cols = u.device, w.shape[1]
    idx = torch.from_numpy(perm).to(dev)
    back = torch.from_numpy(np.argsort(perm)).to(dev)
    dinv = (1.0 / u.diagonal()).float()
    codebook = None if points is None else _codebook(points, dev)
    out = np.empty(w.shape, np.int16)
    step = max(1, DEVICE_CHUNK_BYTES // (4 * cols))
    for r0 in range(0, w.shape[0], step):
        rows = slice(r0, r0 + step)
        # [columns in GPTQ's order, rows]: the column being rounded is contiguous
        wt, at, mt = (torch.from_numpy(np.asarray(x[rows], np.float32)).to(dev).index_select(1, idx).T.contiguous() for x in (w, a, m))
        lv = _sweep(wt, at, mt, u, dinv, float(lmin), float(lmax), codebook, block, sub)
        out[rows] = lv.T.index_select(1, back).to(torch.int16).cpu().numpy()
    return out


def _codebook(points: np.ndarray, dev):
    import torch

    p = np.asarray(points, np.float64)
    return torch.from_numpy(((p[:-1] + p[1:]) / 2).astype(np.float32)).to(dev), torch.from_numpy(p.astype(np.float32)).to(dev)


def _sweep(x, a, m, u, dinv, lo: float, hi: float, codebook, block: int, sub: int):
    """GPTQ's lazy-batch sweep over x, a, m [columns, rows] (x, the weights as compensated so far,
    updated in place): each column rounded to its grid's nearest level (gptq._nearest_into's rule),
    its scaled error moved at once onto the rest of its `sub` columns, each `sub` columns' errors onto
    the block's later columns in one product, each block's onto every later column in one product.
    Returns the levels, float32 [columns, rows]."""
    import torch

    cols = x.shape[0]
    lv = torch.empty_like(x)
    inv = torch.where(a != 0, 1.0 / torch.where(a != 0, a, 1.0), 0.0)  # 1/a, and 0 where a = 0
    for c0 in range(0, cols, block):
        c1 = min(c0 + block, cols)
        ub = u[c0:c1, c0:].float()  # the block's rows of U, cast once
        err = torch.empty((c1 - c0, x.shape[1]), dtype=x.dtype, device=x.device)
        for s0 in range(c0, c1, sub):
            s1 = min(s0 + sub, c1)
            for i in range(s0, s1):
                li = _nearest((x[i] + m[i]) * inv[i], lo, hi, codebook)
                lv[i] = li
                e = err[i - c0]
                torch.mul(a[i], li, out=e)
                e.sub_(m[i]).neg_().add_(x[i]).mul_(dinv[i])  # (x − (a·L − m)) / U_ii
                if i + 1 < s1:
                    x[i + 1 : s1] -= ub[i - c0, i + 1 - c0 : s1 - c0, None] * e
            if s1 < c1:
                x[s1:c1] -= ub[s0 - c0 : s1 - c0, s1 - c0 : c1 - c0].T @ err[s0 - c0 : s1 - c0]
        if c1 < cols:
            x[c1:] -= ub[:, c1 - c0 :].T @ err
    return lv


def _nearest(v, lo: float, hi: float, codebook):
    """The level of scaled value v = (w + m) / a: rint clamped to [lo, hi], or on a codebook grid
    the level whose interval between midpoints holds v."""
    import torch

    if codebook is not None:
        mids, pts = codebook
        return pts[torch.searchsorted(mids, v)]
    return torch.round(v).clamp_(lo, hi)
