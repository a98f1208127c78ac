"""GPTQ for codebook grids (the IQ3/IQ2/IQ1 types): each group of weights takes one row of a grid
(with a sign per weight where the type has them), chosen jointly in the layer-output metric, with
GPTQ's error compensation across groups, as GPTVQ (van Baalen et al., 2024) and QuIP#'s LDLQ do.

Columns are rounded a unit of 8 at a time (one scale a, offset o and sign byte per unit, per row),
in GPTQ's order (neoxq.core.gptq.compensation with whole units, act order by unit). With U the
upper Cholesky factor of H⁻¹ in that order, the loss of a unit's error Δ (its later columns free to
compensate) is ‖Δ U_gg⁻¹‖², and the compensation that attains it is w_R −= (Δ U_gg⁻¹) U_gR (the
block form of GPTQ's column update). In the unit's own coordinates t = w / a − o the loss is
a² (t − c) M (t − c)ᵀ with M = U_gg⁻¹ U_gg⁻ᵀ, so every grid row is scored at once by two products:
−2 (t M)·c + cᵀ M c. Signs are taken from t (the grids' values are magnitudes), which makes the
quadratic term M ⊙ s sᵀ per row; the pairs (j ≤ k) of a row's grid products g_j g_k are precomputed,
so that term is one [rows, pairs] × [pairs, grid] product. A type whose units keep an even number
of negatives (parity) flips, where the count is odd, the sign whose flip costs least. IQ3's grid
rows cover 4 weights: its two per unit are chosen in turn, the second compensated for the first.
"""

from __future__ import annotations

import numpy as np

from .gptq import SWEEP_DTYPE, on_host, row_chunk, steps_inverse

UNIT = 8
BLOCK = 128  # columns compensated inside before the rest of the row is updated at once (lazy batch)


class Grid:
    """A codebook's rows in the forms the search uses."""

    def __init__(self, grid: np.ndarray, signed: bool, parity: bool, dtype=SWEEP_DTYPE):
        g = np.asarray(grid, np.float64)
        self.width, self.signed, self.parity = g.shape[1], signed, parity
        self.rows = g.astype(dtype)  # [n, width]
        j, k = np.triu_indices(self.width)
        self.pairs = (j, k)
        self.pair_products = (g[:, j] * g[:, k] * np.where(j == k, 1.0, 2.0)).T.astype(dtype)  # [pairs, n]


def codebook_round(w: np.ndarray, a: np.ndarray, o: np.ndarray, factor, grid: Grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(components c float32 [rows, cols], grid index int32 [rows, cols / width], negative bool [rows,
    cols]) for weights w on per-weight scales a and offsets o (value = a · (c + o)), minimising
    Σ_rows (w − q)ᵀ H (w − q) with factor = compensation(H, …, group=UNIT); its sweep runs on the
    host."""
    perm, u = on_host(factor)
    back = np.argsort(perm)
    c_out = np.empty(w.shape, np.float32)
    neg_out = np.empty(w.shape, bool)
    idx_out = np.empty((w.shape[0], w.shape[1] // grid.width), np.int32)
    step = row_chunk(w.shape[1])
    for r0 in range(0, w.shape[0], step):
        rows = slice(r0, r0 + step)
        cols = (np.take(np.asarray(x[rows]), perm, axis=1).astype(SWEEP_DTYPE) for x in (w, a, o))
        c, idx, neg = _rows(*cols, u, grid)
        c_out[rows], neg_out[rows] = np.take(c, back, axis=1), np.take(neg, back, axis=1)
        # a group's index sits at its first column: groups never straddle a unit, units stay whole
        idx_out[rows] = np.take(idx, back, axis=1)[:, :: grid.width]
    return c_out, idx_out, neg_out


def _rows(x: np.ndarray, a: np.ndarray, o: np.ndarray, u: np.ndarray, grid: Grid):
    """The sweep over columns in GPTQ's order: x [rows, cols] (compensated in place), a, o alike."""
    cols, dt = x.shape[1], x.dtype
    c_all, idx_all, neg_all = np.empty(x.shape, dt), np.zeros(x.shape, np.int32), np.zeros(x.shape, bool)
    for c0 in range(0, cols, BLOCK):
        c1 = min(c0 + BLOCK, cols)
        ub = u[c0:c1, c0:].astype(dt)
        err = np.empty((x.shape[0], c1 - c0), dt)
        for j in range(c0, c1, UNIT):
            s = slice(j, j + UNIT)
            ug = u[s, s]
            lu = np.linalg.inv(ug)  # upper too: its diagonal blocks are the inverses of ug's
            t0 = x[:, s] * steps_inverse(a[:, j : j + 1]) - o[:, s]
            c, idx, neg = _unit(t0, ug, lu, grid)
            e = (a[:, s] * (t0 - c)) @ lu.astype(dt)  # the unit's error, as GPTQ scales it
            err[:, j - c0 : j - c0 + UNIT] = e
            x[:, j + UNIT : c1] -= e @ ub[j - c0 : j - c0 + UNIT, j + UNIT - c0 : c1 - c0]
            c_all[:, s], idx_all[:, s], neg_all[:, s] = c, idx, neg
        if c1 < cols:
            x[:, c1:] -= err @ ub[:, c1 - c0 :]
    return c_all, idx_all, neg_all


def _unit(t0: np.ndarray, ug: np.ndarray, lu: np.ndarray, grid: Grid):
    """One unit's components [rows, 8] for targets t0 in the unit's coordinates, ug its block of U
    and lu = ug⁻¹: (c, index per column (at each group's first column), negative)."""
    dt = t0.dtype
    t = t0.copy()
    c = np.empty_like(t)
    idx = np.zeros(t.shape, np.int32)
    for g0 in range(0, UNIT, grid.width):
        s = slice(g0, g0 + grid.width)
        lg = lu[s, s]  # = ug[s, s]⁻¹, ug being upper triangular
        m = (lg @ lg.T).astype(dt)
        best = _best(t[:, s], m, grid)
        c[:, s] = grid.rows[best] * np.where(grid.signed & (t[:, s] < 0), -1, 1).astype(dt)
        idx[:, g0] = best
        if g0 + grid.width < UNIT:  # the next group compensates this one's error
            t[:, g0 + grid.width :] -= ((t[:, s] - c[:, s]) @ lg.astype(dt)) @ ug[s, g0 + grid.width :].astype(dt)
    if grid.signed and grid.parity:
        _fix_parity(t0, c, lu)
    return c, idx, (c < 0) if grid.signed else np.zeros(c.shape, bool)


def _best(t: np.ndarray, m: np.ndarray, grid: Grid) -> np.ndarray:
    """The grid row minimising (t − c) M (t − c)ᵀ per row of t [rows, width] (c signed as t)."""
    if not grid.signed:
        scores = -2 * (t @ m) @ grid.rows.T + np.einsum("nj,jk,nk->n", grid.rows, m, grid.rows)
        return np.argmin(scores, axis=1)
    s = np.where(t < 0, -1, 1).astype(t.dtype)
    j, k = grid.pairs
    quad = m[j, k] * s[:, j] * s[:, k]  # M ⊙ s sᵀ, its upper triangle per row
    scores = quad @ grid.pair_products - 2 * ((t @ m) * s) @ grid.rows.T
    return np.argmin(scores, axis=1)


def _fix_parity(t0: np.ndarray, c: np.ndarray, lu: np.ndarray) -> None:
    """Where a unit has an odd number of negatives, flip the sign (in c, in place) whose flip adds
    the least to the unit's loss (t0 − c) M (t0 − c)ᵀ: 4 c_j (d M)_j + 4 c_j² M_jj, d = t0 − c."""
    odd = (c < 0).sum(1) % 2 == 1
    if not odd.any():
        return
    m = (lu @ lu.T).astype(c.dtype)
    d = t0[odd] - c[odd]
    cost = 4 * c[odd] * (d @ m) + 4 * c[odd] ** 2 * np.diag(m)
    rows = np.flatnonzero(odd)
    j = np.argmin(cost, axis=1)
    c[rows, j] = -c[rows, j]
