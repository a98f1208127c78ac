"""Rounding chosen against a layer's output: GPTQ's column-by-column error compensation, on fixed
per-weight grids (value = a · L − m, L ∈ [lmin, lmax]) such as llama.cpp's own block scales.

For a linear layer y = W x with calibration inputs X, the output error of a rounded Q is
‖(W − Q) X‖² = Σ_rows (w − q)ᵀ H (w − q) with H = X Xᵀ. Rounding every weight to its nearest grid
point (what llama.cpp does, weighted only by H's diagonal through the imatrix) ignores how input
columns co-vary. GPTQ (Frantar et al., 2022) rounds one column at a time and moves that column's
error onto the columns not yet rounded, in the direction that cancels it in the output, using the
Cholesky factor of H⁻¹; rows are independent, so they are processed in chunks. Columns are taken
in order of decreasing H diagonal ("act order": the most active inputs first, while the most
freedom is left to compensate). The grid stays llama.cpp's: only levels change, so the result is
written into llama.cpp's blocks as they are (neoxq.core.blocks).
"""

from __future__ import annotations

import numpy as np

DAMP = 0.01  # × mean(diag H) added to H's diagonal: GPTQ's default, keeps the Cholesky stable
BLOCK = 128  # columns compensated inside a block before the rest is updated at once (lazy batches)
ROW_CHUNK = 2048  # rows at a time: bounds the float64 working copy


def inverse_cholesky(h: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """Upper Cholesky factor U of (H + damp·mean(diag)·I)⁻¹ (so H⁻¹ = Uᵀ U), with dead columns
    (no activation at all) given a unit diagonal."""
    h = np.array(h, dtype=np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += damp * float(np.mean(np.diag(h)))
    lower = np.linalg.cholesky(h)
    inv_l = np.linalg.solve(lower, np.eye(len(h)))
    return np.linalg.cholesky(inv_l.T @ inv_l).T


def nearest(w: np.ndarray, a: np.ndarray, m: np.ndarray, lmin: int, lmax: int) -> np.ndarray:
    """The nearest level on each weight's grid (a = 0: every level gives −m; level 0 or lmin)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        lv = np.rint((w + m) / a)
    lv = np.where(a != 0, lv, max(lmin, 0))
    return np.clip(lv, lmin, lmax)


def gptq_levels(w: np.ndarray, h: np.ndarray, a: np.ndarray, m: np.ndarray, lmin: int, lmax: int,
                act_order: bool = True, damp: float = DAMP, regrid=None, group: int = 0) -> np.ndarray:
    """Levels int16 [rows, cols] for weights w [rows, cols] on grids (a, m) [rows, cols], chosen to
    minimise Σ_rows (w − q)ᵀ H (w − q).

    regrid(rows, col, wcur) → (a, m) for columns col … col + group: with it, each group's grid is
    re-chosen when the sweep reaches the group, from the weights as error compensation has left
    them (GPTQ's own handling of group scales; llama.cpp's search does the choosing). Columns are
    then taken in their natural order, so that a group's columns are rounded together."""
    cols = w.shape[1]
    act_order = act_order and regrid is None
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(cols)
    u = inverse_cholesky(np.asarray(h)[np.ix_(perm, perm)], damp)
    block = max(BLOCK, group) if regrid else BLOCK
    out = np.empty(w.shape, np.int16)
    for r0 in range(0, w.shape[0], ROW_CHUNK):
        rows = slice(r0, r0 + ROW_CHUNK)
        grid_a, grid_m = np.asarray(a[rows], np.float64)[:, perm], np.asarray(m[rows], np.float64)[:, perm]
        step = None if regrid is None else (lambda c, wcur, rows=rows: regrid(rows, c, wcur))
        lv = _gptq_rows(np.asarray(w[rows], np.float64)[:, perm], u, grid_a, grid_m, lmin, lmax, block, step, group)
        out[rows, :] = _unpermute(lv, perm)
    return out


def _unpermute(x: np.ndarray, perm: np.ndarray) -> np.ndarray:
    out = np.empty_like(x)
    out[:, perm] = x
    return out


def _gptq_rows(w: np.ndarray, u: np.ndarray, a: np.ndarray, m: np.ndarray, lmin: int, lmax: int,
               block: int = BLOCK, regrid=None, group: int = 0) -> np.ndarray:
    cols = w.shape[1]
    lv = np.empty(w.shape, np.int16)
    for c0 in range(0, cols, block):
        c1 = min(c0 + block, cols)
        wb, err = w[:, c0:c1].copy(), np.empty((len(w), c1 - c0))
        ub = u[c0:c1, c0:c1]
        for i in range(c1 - c0):
            if regrid is not None and (c0 + i) % group == 0:
                ga, gm = regrid(c0 + i, wb[:, i:i + group])
                a[:, c0 + i:c0 + i + group], m[:, c0 + i:c0 + i + group] = ga, gm
            col = wb[:, i]
            li = nearest(col, a[:, c0 + i], m[:, c0 + i], lmin, lmax)
            q = a[:, c0 + i] * li - m[:, c0 + i]
            e = (col - q) / ub[i, i]
            wb[:, i:] -= np.outer(e, ub[i, i:])
            err[:, i] = e
            lv[:, c0 + i] = li
        w[:, c1:] -= err @ u[c0:c1, c1:]
    return lv


def output_error(w: np.ndarray, q: np.ndarray, h: np.ndarray) -> float:
    """Σ_rows (w − q)ᵀ H (w − q): the squared output error on the calibration inputs."""
    d = np.asarray(w, np.float64) - np.asarray(q, np.float64)
    return float(np.einsum("ij,jk,ik->", d, h, d))
