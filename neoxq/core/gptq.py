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

from . import cholesky
from .sizes import rows_per_chunk
from .transpose import transposed

DAMP = 0.01  # × mean(diag H) added to H's diagonal: GPTQ's default, keeps the Cholesky stable
# Lazy batches: columns compensated inside a block before the rest of the row is updated at once,
# and inside a block, nested batches (widest first) the same way: each batch's errors reach the rest
# of the batch around it in one product, so the block's columns are swept in memory a few times,
# not once per innermost batch. The levels do not depend on the sizes (the arithmetic is only
# regrouped); they are the fastest found (docs/benchmarks.md, "--optimize time and memory at scale").
BLOCK = 512
LAZY = (64, 16)
# coupled_levels' blocks: a wave sweeps a block's columns, so wider blocks mean more sweeps, narrower
# more waves; the fastest width found.
COUPLED_BLOCK = 64
# The sweep's arithmetic (weights as compensated, errors, U's rows as they are applied) in float32,
# as GPTQ's reference code: an error moved onto later columns is a fraction of a grid step, so
# float32's 1e-7 relative rounding of it changes no level but a rare tie. U itself is made and kept
# in float64 (its factorisation is where precision matters).
SWEEP_DTYPE = np.float32


def row_chunk(cols: int) -> int:
    """Rows at a time for a matrix `cols` wide: rows are independent in GPTQ and in the target, so
    this bounds the working copies without changing the result (2048 rows at 4096 columns)."""
    return rows_per_chunk(cols, 8)  # float64 copies; GPTQ holds about six (weights, grids, permuted copies)


def inverse_cholesky(h: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """Upper Cholesky factor U of (H + damp·mean(diag)·I)⁻¹ (so H⁻¹ = Uᵀ U), with dead columns
    (no activation at all) given a unit diagonal."""
    u = np.array(h[::-1, ::-1], dtype=np.float64, order="C")
    _damp(u, damp)
    _reversed_inverse_cholesky(u)
    return u


def _damp(h: np.ndarray, damp: float, ridge: float | None = None) -> None:
    """damped_diagonal on h's diagonal, in place."""
    diag = np.einsum("ii->i", h)  # a writable view
    diag[:] = damped_diagonal(diag, damp, ridge)


def damped_diagonal(diag: np.ndarray, damp: float, ridge: float | None = None) -> np.ndarray:
    """A Hessian's diagonal plus ridge; without one, plus damp·mean(diag) after dead columns (no
    activation at all) are given a unit diagonal. A new array."""
    out = np.array(diag, np.float64)
    if ridge is None:
        out[out <= 0] = 1.0
        ridge = damp * float(np.mean(out))
    return out + ridge


def _reversed_inverse_cholesky(h: np.ndarray) -> None:
    """Given J M J in h (J: the reversal; C-contiguous float64, symmetric positive definite), the
    upper Cholesky factor U of M⁻¹ in its place, without an [in, in] copy. With J M J = L Lᵀ,
    M⁻¹ = (J L⁻¹ J)ᵀ (J L⁻¹ J) and J L⁻¹ J is upper: one Cholesky and one triangular inverse
    (LAPACK potrf, trtri on h's Fortran view, whose upper triangle is h's lower), then both axes
    reversed — half the arithmetic of inverting M and factoring the inverse (potrf, potri, potrf).
    The Cholesky is neoxq.core.cholesky's, blocked for large matrices (OpenBLAS's threaded dpotrf
    crashes from about 15800²)."""
    from scipy.linalg import lapack

    cholesky.lower_in_place(h)
    out, info = lapack.dtrtri(h.T, lower=0, overwrite_c=1)
    if info != 0 or not np.shares_memory(out, h):
        raise np.linalg.LinAlgError(f"dtrtri failed (info {info})")
    _reverse(h)
    _zero_strict_lower(h)


def _reverse(a: np.ndarray, chunk: int = 1 << 20) -> None:
    """Reverse both axes of a C-contiguous square array in place: its flat memory, reversed, a
    chunk of each end swapped at a time."""
    flat = a.reshape(-1)
    n = len(flat)
    for k0 in range(0, n // 2, chunk):
        k1 = min(k0 + chunk, n // 2)
        head = flat[k0:k1].copy()
        flat[k0:k1] = flat[n - k1 : n - k0][::-1]
        flat[n - k1 : n - k0] = head[::-1]


def _zero_strict_lower(a: np.ndarray, rows: int = 1024) -> None:
    for r0 in range(0, len(a), rows):
        blk = a[r0 : r0 + rows, : r0 + rows]
        blk[np.tril(np.ones(blk.shape, bool), k=r0 - 1)] = 0.0


def nearest(w: np.ndarray, a: np.ndarray, m: np.ndarray, lmin: int, lmax: int, points: np.ndarray | None = None) -> np.ndarray:
    """The nearest level on each weight's grid (a = 0: every level gives −m; level 0 or lmin).
    points: the only levels there are, sorted (a codebook grid), instead of every integer."""
    w, a, m = np.broadcast_arrays(*(np.asarray(z, np.float64) for z in (w, a, m)))
    return _nearest_into(w, m, steps_inverse(a), float(lmin), float(lmax), np.empty(w.shape), _codebook(points, np.float64))


def _codebook(points: np.ndarray | None, dtype) -> tuple[np.ndarray, np.ndarray] | None:
    """(the midpoints between adjacent levels, the levels) in `dtype`, for _nearest_into."""
    if points is None:
        return None
    p = np.asarray(points, np.float64)
    return ((p[:-1] + p[1:]) / 2).astype(dtype), p.astype(dtype)


def steps_inverse(a: np.ndarray) -> np.ndarray:
    """1 / a, and 0 where a = 0 (so that such a weight's level is clamped 0: max(lmin, 0))."""
    with np.errstate(divide="ignore"):
        return np.where(a != 0, 1 / a, 0).astype(a.dtype, copy=False)


def _nearest_into(w, m, inv, lo: float, hi: float, out: np.ndarray, codebook=None) -> np.ndarray:
    """The one rounding rule (nearest and GPTQ's sweep): rint((w + m) / a) clamped to [lo, hi], in
    `out`; on a codebook grid (_codebook), the level whose interval between midpoints holds
    (w + m) / a (the nearest in value too: |w + m − a·L| = |a|·|(w + m)/a − L|). Multiplied by 1 / a
    and clamped by minimum/maximum: np.clip costs several times a ufunc call, and at 16 rows a
    problem (one per attention head) the sweep's cost is its calls."""
    np.add(w, m, out=out)
    out *= inv
    if codebook is not None:
        mids, pts = codebook
        return np.take(pts, np.searchsorted(mids, out), out=out)
    np.rint(out, out=out)
    np.maximum(out, lo, out=out)
    return np.minimum(out, hi, out=out)


def compensation(
    h: np.ndarray, act_order: bool = True, damp: float = DAMP, ridge: float | None = None, group: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """(perm, U): the column order GPTQ rounds in and the inverse Cholesky factor of H (damped, or
    plus `ridge` on the diagonal) in that order, built in one [in, in] float64 buffer (H itself is
    left as it is; its scale does not matter to GPTQ; solve() uses U for H⁻¹ too). group: columns
    that stay together and in order (a codebook's units, neoxq.core.gptvq); act order sorts them
    by their summed diagonal. A factor whose U is not a numpy array (neoxq.convert.gptq_torch's, on
    a device) is taken by solve, gptq_levels and on_host through its own methods."""
    perm = _order(np.diag(h), act_order, group)
    rev = perm[::-1]  # the buffer holds J H J in GPTQ's order (_reversed_inverse_cholesky)
    u = np.empty((len(h), len(h)))
    u.fill(0.0)  # its pages faulted in by one sequential pass: faster than under the row gathers below
    for i, r in enumerate(rev):  # permuted copy a row at a time: no [in, in] temporary
        h[r].take(rev, out=u[i])
    _damp(u, damp, ridge)
    _reversed_inverse_cholesky(u)
    return perm, u


def on_host(factor):
    """A compensation factor with U in host memory (numpy), for the paths that only run there (the
    coupled rows, the codebook grids); as it is when it already is."""
    perm, u = factor
    return factor if isinstance(u, np.ndarray) else (perm, u.host())


def _order(diag: np.ndarray, act_order: bool, group: int) -> np.ndarray:
    """GPTQ's column order: decreasing H diagonal, by whole groups of `group` columns."""
    if not act_order:
        return np.arange(len(diag))
    if group == 1:
        return np.argsort(-diag, kind="stable")
    units = np.argsort(-diag.reshape(-1, group).sum(1), kind="stable")
    return (units[:, None] * group + np.arange(group)).reshape(-1)


def solve(factor, rhs: np.ndarray) -> np.ndarray:
    """H⁻¹ rhs (rhs [in, k]) from compensation's factor (H⁻¹ = Pᵀ Uᵀ U P): two triangular
    products, as many operations as a Cholesky solve, with no factorisation of its own."""
    from scipy.linalg import blas

    perm, u = factor
    if not isinstance(u, np.ndarray):
        return u.solve(perm, rhs)
    f = u.T  # U's Fortran view is Uᵀ, lower: no copy of U
    # rows permuted through the transpose: np.take along a row is a fast gather, and its result's
    # transpose is the Fortran-ordered [in, k] that dtrmm works on in place (so is the answer's)
    y = np.take(np.asarray(rhs, np.float64).T, perm, axis=1).T
    y = blas.dtrmm(1.0, f, y, lower=1, trans_a=1, overwrite_b=1)  # U y
    y = blas.dtrmm(1.0, f, y, lower=1, trans_a=0, overwrite_b=1)  # Uᵀ U y
    return np.take(y.T, np.argsort(perm), axis=1).T


def gptq_levels(
    w: np.ndarray,
    h: np.ndarray,
    a: np.ndarray,
    m: np.ndarray,
    lmin: int,
    lmax: int,
    act_order: bool = True,
    damp: float = DAMP,
    factor=None,
    points: np.ndarray | None = None,
) -> np.ndarray:
    """Levels int16 [rows, cols] for weights w [rows, cols] on grids (a, m) [rows, cols], chosen to
    minimise Σ_rows (w − q)ᵀ H (w − q). factor: compensation(h, …) when the caller already has it
    (rows of one matrix rounded in chunks); points: a codebook grid's levels (nearest())."""
    perm, u = factor if factor is not None else compensation(h, act_order, damp)
    if not isinstance(u, np.ndarray):
        return u.levels(perm, w, a, m, lmin, lmax, points, BLOCK, LAZY[-1])
    out = np.empty(w.shape, np.int16)
    step_rows = row_chunk(w.shape[1])
    for r0 in range(0, w.shape[0], step_rows):
        rows = slice(r0, r0 + step_rows)
        grid_a, grid_m = _columns(a[rows], perm, SWEEP_DTYPE), _columns(m[rows], perm, SWEEP_DTYPE)
        lv = _gptq_rows(_columns(w[rows], perm, SWEEP_DTYPE), u, grid_a, grid_m, lmin, lmax, points=points)
        out[rows, :] = np.take(lv, np.argsort(perm), axis=1)
    return out


def _columns(x, idx: np.ndarray, dtype=np.float64) -> np.ndarray:
    """x[:, idx] as a new array, through np.take (faster than fancy indexing)."""
    return np.asarray(np.take(np.asarray(x), idx, axis=1), dtype)


def _gptq_rows(w: np.ndarray, u: np.ndarray, a: np.ndarray, m: np.ndarray, lmin: int, lmax: int, block: int = BLOCK, points=None) -> np.ndarray:
    """GPTQ's lazy-batch sweep. Each block of columns is worked on transposed ([columns, rows]), so
    that the column being rounded and its grid are contiguous (a column of a [rows, cols] array is
    read with a stride of a whole row)."""
    cols, dt = w.shape[1], w.dtype
    lv = np.empty(w.shape, np.int16)
    dinv = (1.0 / np.diag(u)).astype(dt)
    for c0 in range(0, cols, block):
        c1 = min(c0 + block, cols)
        wb, ab, mb = (transposed(x[:, c0:c1])[:, None] for x in (w, a, m))  # [columns, 1 problem, rows]
        lvb, err = np.empty(wb.shape, dt), np.empty(wb.shape, dt)
        ur = u[c0:c1, c0:].astype(dt)  # the block's rows of U, cast once: no [in, in] copy
        _sweep(wb, ab, mb, ur[None, :, : c1 - c0], dinv[None, c0:c1], lmin, lmax, 0, c1 - c0, lvb, err, points)
        lv[:, c0:c1] = lvb[:, 0].T
        w[:, c1:] -= err[:, 0].T @ ur[:, c1 - c0 :]
    return lv


def _sweep(x, a, m, ub, dinv, lmin: int, lmax: int, i0: int, i1: int, lv, err, points=None) -> None:
    """GPTQ inside one block of columns, columns i0 … i1 − 1, for P independent problems at once:
    x, a, m [columns, P, rows] (weights as compensated so far, updated in place; grids), ub [P,
    columns, columns] each problem's block of U, dinv [P, columns] 1 / its diagonal; levels and
    scaled errors into lv, err [columns, P, rows]. Lazy batches again inside the block (LAZY): a
    column's error goes at once only onto the rest of its innermost batch, and each batch's errors
    onto the rest of the batch around it in one product (the rank-one updates, elementwise over the
    block's whole rest, cost more than the block's products; see BLOCK). points: a codebook grid's
    levels."""
    inv = steps_inverse(a[i0:i1])
    rule = (inv, i0, float(lmin), float(lmax), _codebook(points, x.dtype))
    _batches(x, a, m, ub, dinv, i0, i1, lv, err, rule, LAZY)


def _batches(x, a, m, ub, dinv, i0: int, i1: int, lv, err, rule, widths: tuple[int, ...]) -> None:
    """_sweep's columns i0 … i1 − 1 in batches of widths[0], each batch's errors moved onto the
    columns after it up to i1 in one product; inside a batch, the next width; one at a time last."""
    if not widths:
        _one_by_one(x, a, m, ub, dinv, i0, i1, lv, err, rule)
        return
    for s0 in range(i0, i1, widths[0]):
        s1 = min(s0 + widths[0], i1)
        _batches(x, a, m, ub, dinv, s0, s1, lv, err, rule, widths[1:])
        if s1 < i1:  # x[j, p] −= Σ_i ub[p, i, j] err[i, p] over the batch's columns i, for j in s1 … i1 − 1
            x[s1:i1] -= np.matmul(ub[:, s0:s1, s1:i1].transpose(0, 2, 1), err[s0:s1].transpose(1, 0, 2)).transpose(1, 0, 2)


def _one_by_one(x, a, m, ub, dinv, s0: int, s1: int, lv, err, rule) -> None:
    """The innermost batch: each column rounded (_nearest_into), its scaled error kept and moved at
    once onto the batch's later columns."""
    inv, i0, lo, hi, codebook = rule
    for i in range(s0, s1):
        li = _nearest_into(x[i], m[i], inv[i - i0], lo, hi, lv[i], codebook)
        e = np.multiply(a[i], li, out=err[i])
        e -= m[i]
        np.subtract(x[i], e, out=e)
        e *= dinv[:, i, None]
        if i + 1 < s1:
            x[i + 1 : s1] -= ub[:, i, i + 1 : s1].T[:, :, None] * e


# Rows coupled through the output's Fisher -------------------------------------------------------
# GPTQ's loss Σ_rows (w − q)ᵀ H (w − q) weighs every output alike. Where the model's output feels
# some output directions far more than others, and together (an attention head's queries, keys and
# values meet in its softmax), the KL divergence is, to second order, tr(E H Eᵀ G) with E = W − Q
# and G the Fisher information in the matmul's output space (K-FAC's factorisation, G per head).
# GPTQ on that Kronecker metric, rows in order: each row rounded with GPTQ's column compensation
# (H), then its whole error r moved onto the rows not yet rounded through G⁻¹'s Cholesky factor, as
# GPTQ moves a column's. Heads are independent, so row t of every head is rounded at once.


@dataclass
class RowCoupling:
    """order [steps, groups]: the rows rounded at each step, one per group (head); u [groups, steps,
    steps]: each group's upper Cholesky factor of G⁻¹ in that order."""

    order: np.ndarray
    u: np.ndarray

    @classmethod
    def of(cls, g: np.ndarray, rows: np.ndarray, damp: float = DAMP) -> "RowCoupling":
        """g [groups, k, k]: each group's output Fisher; rows [groups, k]: the matrix rows they are
        (act order inside each group: the largest Fisher diagonal first)."""
        perm = np.argsort(-np.einsum("gii->gi", g), axis=1, kind="stable")
        u = np.stack([inverse_cholesky(gi[p][:, p], damp) for gi, p in zip(g, perm)])
        return cls(np.take_along_axis(rows, perm, axis=1).T.copy(), u)


def coupled_levels(
    w: np.ndarray,
    a: np.ndarray,
    m: np.ndarray,
    lmin: int,
    lmax: int,
    factor,
    coupling: RowCoupling,
    block: int = COUPLED_BLOCK,
    points: np.ndarray | None = None,
) -> np.ndarray:
    """gptq_levels for the rows of w that `coupling` names, minimising tr(E H Eᵀ G) (factor: H's
    compensation); other rows are left to the caller (levels 0).

    In order of rows: each row step t (one row per group) is GPTQ'd over the columns, then its
    residual moved onto the later rows through G. Written so, that is T sweeps of a few rows each
    (T = 3 · head_dim steps), mostly Python overhead. But column
    block b of step t needs only blocks ≤ b of the steps before it, so the (step, block) pairs are
    taken in waves of equal t + b, every pair of a wave in one sweep: T + blocks − 1 sweeps, each
    as wide as up to `blocks` steps. The same arithmetic, in another order (tested against the
    step-by-step loop)."""
    perm, u = on_host(factor)
    dt = SWEEP_DTYPE
    order, cf = coupling.order, (coupling.u / np.einsum("gtt->gt", coupling.u)[:, :, None]).astype(dt)  # cf[g, s, t]: row s's residual → row t
    steps, groups = order.shape
    cols = w.shape[1]
    nb = -(-cols // block)
    width = nb * block
    u = np.pad(u.astype(dt), (0, width - cols))  # padded with columns that round to themselves: level 0 of a zero grid, U's identity
    np.einsum("ii->i", u)[cols:] = 1.0

    def rows(x):  # [steps, groups, width], columns in GPTQ's order (np.take: 2-D fancy indexing took a third of the time)
        out = np.zeros((steps, groups, width), dt)
        out[:, :, :cols] = np.take(np.take(np.asarray(x), order.reshape(-1), axis=0), perm, axis=1).reshape(steps, groups, cols)
        return out

    base, own = rows(w), np.zeros((steps, groups, width), dt)  # base: target, then each block's residual
    ga, gm = rows(a), rows(m)
    lv = np.empty((steps, groups, width), np.int16)
    dinv = 1 / np.diag(u)
    for k in range(steps + nb - 1):
        pairs = [(t, k - t) for t in range(max(0, k - nb + 1), min(k, steps - 1) + 1)]
        blk = [slice(b * block, (b + 1) * block) for _, b in pairs]
        start = np.stack([base[t, :, c] - np.matmul(cf[:, None, :t, t], base[:t, :, c].transpose(1, 0, 2))[:, 0] for (t, _), c in zip(pairs, blk)])
        x = np.ascontiguousarray((start - np.stack([own[t, :, c] for (t, _), c in zip(pairs, blk)])).transpose(2, 0, 1))
        sa, sm = (np.ascontiguousarray(np.stack([g[t, :, c] for (t, _), c in zip(pairs, blk)]).transpose(2, 0, 1)) for g in (ga, gm))
        lvb, err = np.empty(x.shape, dt), np.empty(x.shape, dt)
        _sweep(x, sa, sm, np.stack([u[c, c] for c in blk]), np.stack([dinv[c] for c in blk]), lmin, lmax, 0, block, lvb, err, points)
        for p, ((t, b), c) in enumerate(zip(pairs, blk)):
            lv[t, :, c] = lvb[:, p].T
            base[t, :, c] = start[p] - (sa[:, p] * lvb[:, p] - sm[:, p]).T
            own[t, :, c.stop :] += err[:, p].T @ u[c, c.stop :]
    out = np.zeros(w.shape, np.int16)
    out[order.reshape(-1)] = np.take(lv[:, :, :cols].reshape(-1, cols), np.argsort(perm), axis=1)
    return out


def output_error(w: np.ndarray, q: np.ndarray, h: np.ndarray) -> float:
    """Σ_rows (w − q)ᵀ H (w − q): the squared output error on the calibration inputs."""
    d = np.asarray(w, np.float64) - np.asarray(q, np.float64)
    return float(np.einsum("ij,ij->", d @ h, d))


# Sequential, asymmetric calibration ---------------------------------------------------------------
# Layers are rounded in order, each on the inputs the already-rounded layers before it produce
# (x_q), against the output the fp32 model gives on its own inputs (x_f): minimise
#     Σ_tokens ‖W x_f + b − (Q x_q + b′)‖²
# so a layer also cancels what the rounding upstream (the token embedding above all) did to its
# inputs; plain sequential GPTQ (target W x_q) instead makes each layer exact on wrong inputs
# (docs/method.md, "Why this and not the alternatives"). With the constant input 1 appended, the bias b′ (an F32 tensor in the file) is solved too.


@dataclass
class Moments:
    """One matmul's calibration statistics: the quantized model's inputs x_q (with a constant 1
    appended, x̃_q) against the fp32 layer's outputs y_f = W x_f + b. Everything the target, the
    bias and the error need, and no [in, in] matrix beyond H_q: at a 6.9B model's MLP down
    (in = 16384) each such float64 matrix is 2.1 GB."""

    hq: np.ndarray  # Σ x_q x_qᵀ [in, in]
    yx: np.ndarray  # Σ y_f x_qᵀ [out, in]
    sum_y: np.ndarray  # Σ y_f [out]
    yy: np.ndarray  # Σ y_f² per output [out]
    sum_q: np.ndarray  # Σ x_q [in]
    n: int

    @classmethod
    def of(cls, y_f: np.ndarray, x_q: np.ndarray) -> "Moments":
        """From token rows: y_f [tokens, out], x_q [tokens, in]."""
        y, x = np.asarray(y_f, np.float64), np.asarray(x_q, np.float64)
        return cls(x.T @ x, y.T @ x, y.sum(0), (y * y).sum(0), x.sum(0), len(x))

    @classmethod
    def through(cls, inputs: "Moments", ff: np.ndarray, w) -> "Moments":
        """The moments of y_f = W x_f from the inputs': `inputs` holds x_f where y_f goes (Σ x_f x_qᵀ
        as yx, Σ x_f as sum_y), ff = Σ x_f x_fᵀ [in, in]; W [out, in] (an array or RowChunks), no
        bias. Cheaper than summing y_f's when out > in and there are more tokens than inputs
        (the output matrix: see neoxq.convert.calibrate._head_moments). The products W·(Σ …) in
        float32, a row chunk at a time, into float64."""
        out = len(w)
        yx, sum_y, yy = np.empty((out, len(inputs.hq))), np.empty(out), np.empty(out)
        fq, sf, ff32 = inputs.yx.astype(np.float32), inputs.sum_y.astype(np.float32), np.asarray(ff, np.float32)
        step = row_chunk(len(inputs.hq))
        for r0 in range(0, out, step):
            rows = slice(r0, min(r0 + step, out))
            wr = np.asarray(w[rows], np.float32)
            yx[rows] = wr @ fq
            sum_y[rows] = wr @ sf
            yy[rows] = np.einsum("ij,ij->i", wr @ ff32, wr, dtype=np.float64)
        return cls(inputs.hq, yx, sum_y, yy, inputs.sum_q, inputs.n)

    def rows(self, idx: np.ndarray) -> "Moments":
        """The statistics of some output rows (the inputs' are shared)."""
        return Moments(self.hq, self.yx[idx], self.sum_y[idx], self.yy[idx], self.sum_q, self.n)

    def scaled_target(self, w: np.ndarray, b: np.ndarray | None, rows: slice, lam: float) -> np.ndarray:
        """Rows of E[y_f x̃_qᵀ] + λ W̃ (the right-hand side of the ridge least squares)."""
        rhs = np.empty((len(self.yx[rows]), self.yx.shape[1] + 1))
        np.divide(self.yx[rows], self.n, out=rhs[:, :-1])
        rhs[:, :-1] += lam * np.asarray(w[rows], np.float64)
        rhs[:, -1] = self.sum_y[rows] / self.n + (0.0 if b is None else lam * np.asarray(b[rows], np.float64))
        return rhs


def _ridge(mom: Moments, damp: float, bias: bool) -> float:
    """GPTQ's damping, relative to the mean diagonal of (augmented, with bias) E[x̃_q x̃_qᵀ]."""
    tr = float(np.trace(mom.hq)) / mom.n
    return damp * ((tr + 1.0) / (len(mom.hq) + 1) if bias else tr / len(mom.hq))


def moments_factor(mom: Moments, act_order: bool = True, damp: float = DAMP, bias: bool = True, group: int = 1):
    """compensation() of H_q + n·λI, λ asymmetric_target's ridge: one factorisation serves the
    target's solve and GPTQ's sweep (at 6.9B's MLP down each [in, in] factorisation is a few
    hundred GFLOP)."""
    return compensation(mom.hq, act_order, ridge=mom.n * _ridge(mom, damp, bias), group=group)


def asymmetric_target(
    w: np.ndarray, b: np.ndarray | None, mom: Moments, damp: float = DAMP, chunk: int | None = None, factor=None
) -> tuple[np.ndarray, np.ndarray | None]:
    """The unquantized (W′, b′) that best reproduces the fp32 outputs from the quantized inputs,
    ridge-regularised toward (W, b) with GPTQ's damping: [W′ b′] (E[x̃_q x̃_qᵀ] + λI) = E[y_f x̃_qᵀ] + λ[W b].
    M = H_q/n + λI through moments_factor (given as `factor`, or made here); the bias's row and
    column by their Schur complement; the rows solved in chunks. W′ comes back float32 (it is
    rounded next), b′ float64."""
    bias = b is not None
    lam = _ridge(mom, damp, bias)
    factor = factor if factor is not None else moments_factor(mom, False, damp, bias)

    def m_solve(rhs: np.ndarray) -> np.ndarray:  # M⁻¹ rhs, rhs [in, k]; the factor is of n·M
        return mom.n * solve(factor, rhs)

    s = mom.sum_q / mom.n
    z = m_solve(s[:, None])[:, 0] if bias else None
    out_w = np.empty(w.shape, np.float32)
    out_b = np.empty(len(out_w)) if bias else None
    step = chunk or row_chunk(len(mom.hq))
    for r0 in range(0, len(out_w), step):
        rows = slice(r0, r0 + step)
        rhs = mom.scaled_target(w, b, rows, lam)
        wr = m_solve(rhs[:, :-1].T).T
        if bias:  # [W′ b′] [[M, s], [sᵀ, 1 + λ]] = [A a]  ⇒  b′ = (a − A z) / (1 + λ − sᵀz), W′ = A M⁻¹ − b′ zᵀ
            bt = (rhs[:, -1] - rhs[:, :-1] @ z) / (1.0 + lam - s @ z)
            wr -= np.outer(bt, z)
            out_b[rows] = bt
        out_w[rows] = wr
    return out_w, out_b


def corrected_bias(w_target: np.ndarray, b_target: np.ndarray, q: np.ndarray, mom: Moments) -> np.ndarray:
    """The bias that puts back the rounded weights' mean output error on the quantized inputs."""
    return b_target + (np.asarray(w_target, np.float64) - q) @ (mom.sum_q / mom.n)


def asymmetric_error(q: np.ndarray, bq: np.ndarray | None, mom: Moments, chunk: int | None = None) -> float:
    """Σ_tokens ‖y_f − (Q x_q + b_q)‖² / n, from the moments (rows in chunks)."""
    total = float(mom.yy.sum())
    step = chunk or row_chunk(len(mom.hq))
    for r0 in range(0, len(q), step):
        rows = slice(r0, r0 + step)
        qr = np.asarray(q[rows], np.float64)
        br = np.zeros(len(qr)) if bq is None else np.asarray(bq[rows], np.float64)
        total -= 2 * float(np.einsum("ij,ij->", qr, mom.yx[rows]) + br @ mom.sum_y[rows])
        total += float(np.einsum("ij,ij->", qr @ mom.hq, qr) + 2 * br @ (qr @ mom.sum_q) + mom.n * br @ br)
    return total / mom.n
