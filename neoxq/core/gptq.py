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

from dataclasses import dataclass

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


# Sequential, asymmetric calibration ---------------------------------------------------------------
# Layers are rounded in order, each on the inputs the already-rounded layers before it produce
# (x_q), against the output the fp32 model gives on its own inputs (x_f): minimise
#     Σ_tokens ‖W x_f + b − (Q x_q + b′)‖²
# so a layer also cancels what the rounding upstream (the token embedding above all) did to its
# inputs. Measured on the 31M benchmark model at Q2_K_S: 0.21× the KLD of GPTQ on fp32 inputs
# (0.24× AutoRound --iters 200); plain sequential GPTQ (target W x_q) measured 1.18× (worse).
# With the constant input 1 appended, the bias b′ (an F32 tensor in the file) is solved too.


@dataclass
class Moments:
    """One matmul's input statistics over the calibration tokens, the quantized model's inputs
    (x_q) beside the fp32 model's (x_f)."""

    hq: np.ndarray  # Σ x_q x_qᵀ
    hf: np.ndarray  # Σ x_f x_fᵀ
    cross: np.ndarray  # Σ x_f x_qᵀ
    sum_q: np.ndarray
    sum_f: np.ndarray
    n: int

    def augmented(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(H_q, C, H_f) of the inputs with a constant 1 appended, per token."""
        def aug(m, left, right):
            return np.block([[m, left[:, None]], [right[None, :], np.array([[float(self.n)]])]]) / self.n
        return aug(self.hq, self.sum_q, self.sum_q), aug(self.cross, self.sum_f, self.sum_q), aug(self.hf, self.sum_f, self.sum_f)


def asymmetric_target(w: np.ndarray, b: np.ndarray | None, mom: Moments, damp: float = DAMP) -> tuple[np.ndarray, np.ndarray | None]:
    """The unquantized (W′, b′) that best reproduces the fp32 outputs from the quantized inputs,
    ridge-regularised toward (W, b) with GPTQ's damping: (W̃ (C + λI)) (H_q + λI)⁻¹, W̃ = [W b]."""
    hq, c, _ = mom.augmented()
    wt = np.concatenate([np.asarray(w, np.float64), (np.zeros(len(w)) if b is None else np.asarray(b, np.float64))[:, None]], 1)
    if b is None:  # no bias to solve: drop the constant input
        hq, c, wt = hq[:-1, :-1], c[:-1, :-1], wt[:, :-1]
    lam = damp * float(np.mean(np.diag(hq)))
    eye = np.eye(len(hq))
    target = np.linalg.solve(hq + lam * eye, (wt @ (c + lam * eye)).T).T  # H_q symmetric
    return (target, None) if b is None else (target[:, :-1], target[:, -1])


def corrected_bias(w_target: np.ndarray, b_target: np.ndarray, q: np.ndarray, mom: Moments) -> np.ndarray:
    """The bias that puts back the rounded weights' mean output error on the quantized inputs."""
    return b_target + (np.asarray(w_target, np.float64) - q) @ (mom.sum_q / mom.n)


def asymmetric_error(w: np.ndarray, b: np.ndarray | None, q: np.ndarray, bq: np.ndarray | None, mom: Moments) -> float:
    """Σ_tokens ‖W x_f + b − (Q x_q + b_q)‖² / n, from the moments."""
    hq, c, hf = mom.augmented()
    zb = np.zeros(len(w))
    wt = np.concatenate([np.asarray(w, np.float64), (zb if b is None else b)[:, None]], 1)
    qt = np.concatenate([np.asarray(q, np.float64), (zb if bq is None else bq)[:, None]], 1)
    return float(np.einsum("ij,jk,ik->", wt, hf, wt) - 2 * np.einsum("ij,jk,ik->", wt, c, qt) + np.einsum("ij,jk,ik->", qt, hq, qt))
