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


def row_chunk(cols: int) -> int:
    """Rows at a time for a matrix `cols` wide: rows are independent in GPTQ and in the target, so
    this bounds the working copies without changing the result (2048 rows at 4096 columns)."""
    from .sizes import rows_per_chunk

    return rows_per_chunk(cols, 8)  # float64 copies; GPTQ holds about six (weights, grids, permuted copies)


def inverse_cholesky(h: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """Upper Cholesky factor U of (H + damp·mean(diag)·I)⁻¹ (so H⁻¹ = Uᵀ U), with dead columns
    (no activation at all) given a unit diagonal."""
    u = np.array(h, dtype=np.float64, order="C")  # LAPACK works on its Fortran view in place
    _inverse_cholesky_inplace(u, damp)
    return u


def _inverse_cholesky_inplace(h: np.ndarray, damp: float) -> None:
    """inverse_cholesky in h's own memory (C-contiguous float64, symmetric): LAPACK's potrf, potri,
    potrf on the lower triangle of its Fortran view, which is U in C order; no [in, in] copy."""
    from scipy.linalg import lapack

    diag = np.einsum("ii->i", h)  # a writable view
    dead = diag <= 0
    diag[dead] = 1.0
    diag += damp * float(np.mean(diag))
    f = h.T
    for step, kw in (
        (lapack.dpotrf, {"overwrite_a": 1, "clean": 0}),
        (lapack.dpotri, {"overwrite_c": 1}),
        (lapack.dpotrf, {"overwrite_a": 1, "clean": 0}),
    ):
        out, info = step(f, lower=1, **kw)
        if info != 0 or not np.shares_memory(out, h):
            raise np.linalg.LinAlgError(f"{step.__name__} failed (info {info})")
    _zero_strict_lower(h)


def _zero_strict_lower(a: np.ndarray, rows: int = 1024) -> None:
    for r0 in range(0, len(a), rows):
        blk = a[r0 : r0 + rows, : r0 + rows]
        blk[np.tril(np.ones(blk.shape, bool), k=r0 - 1)] = 0.0


def nearest(w: np.ndarray, a: np.ndarray, m: np.ndarray, lmin: int, lmax: int) -> np.ndarray:
    """The nearest level on each weight's grid (a = 0: every level gives −m; level 0 or lmin)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        lv = np.rint((w + m) / a)
    lv = np.where(a != 0, lv, max(lmin, 0))
    return np.clip(lv, lmin, lmax)


def compensation(h: np.ndarray, act_order: bool = True, damp: float = DAMP) -> tuple[np.ndarray, np.ndarray]:
    """(perm, U): the column order GPTQ rounds in and the inverse Cholesky factor of H in that order,
    built in one [in, in] float64 buffer (H itself is left as it is; its scale does not matter)."""
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(len(h))
    u = np.empty((len(h), len(h)))
    for r0 in range(0, len(h), 1024):  # permuted copy in row blocks: no second full-size temporary
        u[r0 : r0 + 1024] = np.asarray(h[perm[r0 : r0 + 1024]], np.float64)[:, perm]
    _inverse_cholesky_inplace(u, damp)
    return perm, u


def gptq_levels(
    w: np.ndarray,
    h: np.ndarray,
    a: np.ndarray,
    m: np.ndarray,
    lmin: int,
    lmax: int,
    act_order: bool = True,
    damp: float = DAMP,
    regrid=None,
    group: int = 0,
    factor=None,
) -> np.ndarray:
    """Levels int16 [rows, cols] for weights w [rows, cols] on grids (a, m) [rows, cols], chosen to
    minimise Σ_rows (w − q)ᵀ H (w − q). factor: compensation(h, …) when the caller already has it
    (rows of one matrix rounded in chunks).

    regrid(rows, col, wcur) → (a, m) for columns col … col + group: with it, each group's grid is
    re-chosen when the sweep reaches the group, from the weights as error compensation has left
    them (GPTQ's own handling of group scales; llama.cpp's search does the choosing). Columns are
    then taken in their natural order, so that a group's columns are rounded together."""
    act_order = act_order and regrid is None
    perm, u = factor if factor is not None else compensation(h, act_order, damp)
    block = max(BLOCK, group) if regrid else BLOCK
    out = np.empty(w.shape, np.int16)
    step_rows = row_chunk(w.shape[1])
    for r0 in range(0, w.shape[0], step_rows):
        rows = slice(r0, r0 + step_rows)
        grid_a, grid_m = np.asarray(a[rows], np.float64)[:, perm], np.asarray(m[rows], np.float64)[:, perm]
        step = None if regrid is None else (lambda c, wcur, rows=rows: regrid(rows, c, wcur))
        lv = _gptq_rows(np.asarray(w[rows], np.float64)[:, perm], u, grid_a, grid_m, lmin, lmax, block, step, group)
        out[rows, :] = _unpermute(lv, perm)
    return out


def _unpermute(x: np.ndarray, perm: np.ndarray) -> np.ndarray:
    out = np.empty_like(x)
    out[:, perm] = x
    return out


def _gptq_rows(
    w: np.ndarray, u: np.ndarray, a: np.ndarray, m: np.ndarray, lmin: int, lmax: int, block: int = BLOCK, regrid=None, group: int = 0
) -> np.ndarray:
    """GPTQ's lazy-batch sweep. Each block of columns is worked on transposed ([columns, rows]), so
    that the column being rounded and its grid are contiguous: a column of a [rows, cols] array is
    read with a stride of a whole row, which on the 410M shape made this loop a fifth of --optimize."""
    cols = w.shape[1]
    lv = np.empty(w.shape, np.int16)
    for c0 in range(0, cols, block):
        c1 = min(c0 + block, cols)
        wb, ab, mb = (np.ascontiguousarray(x[:, c0:c1].T) for x in (w, a, m))
        err, lvb = np.empty(wb.shape), np.empty(wb.shape, np.int16)
        ub = u[c0:c1, c0:c1]
        for i in range(c1 - c0):
            if regrid is not None and (c0 + i) % group == 0:
                ga, gm = regrid(c0 + i, wb[i : i + group].T)
                ab[i : i + group], mb[i : i + group] = np.asarray(ga).T, np.asarray(gm).T
                a[:, c0 + i : c0 + i + group], m[:, c0 + i : c0 + i + group] = ga, gm
            li = nearest(wb[i], ab[i], mb[i], lmin, lmax)
            err[i] = e = (wb[i] - (ab[i] * li - mb[i])) / ub[i, i]
            wb[i + 1 :] -= ub[i, i + 1 :, None] * e
            lvb[i] = li
        lv[:, c0:c1] = lvb.T
        w[:, c1:] -= err.T @ u[c0:c1, c1:]
    return lv


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


def coupled_levels(w: np.ndarray, a: np.ndarray, m: np.ndarray, lmin: int, lmax: int, factor, coupling: RowCoupling) -> np.ndarray:
    """gptq_levels for the rows of w that `coupling` names, minimising tr(E H Eᵀ G) (factor: H's
    compensation); other rows are left to the caller (levels 0)."""
    w = np.array(w, np.float64)
    out = np.zeros(w.shape, np.int16)
    order, u = coupling.order, coupling.u
    for t, rows in enumerate(order):
        lv = gptq_levels(w[rows], None, a[rows], m[rows], lmin, lmax, factor=factor)
        out[rows] = lv
        if t + 1 < len(order):
            r = w[rows] - (np.asarray(a[rows], np.float64) * lv - np.asarray(m[rows], np.float64))  # [groups, cols]
            coef = u[:, t, t + 1 :] / u[:, t, t, None]  # [groups, later steps]
            w[order[t + 1 :]] -= coef.T[:, :, None] * r[None]
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
# inputs. Measured on the 31M benchmark model at Q2_K_S: 0.21× the KLD of GPTQ on fp32 inputs
# (0.24× AutoRound --iters 200); plain sequential GPTQ (target W x_q) measured 1.18× (worse).
# With the constant input 1 appended, the bias b′ (an F32 tensor in the file) is solved too.


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


def asymmetric_target(
    w: np.ndarray, b: np.ndarray | None, mom: Moments, damp: float = DAMP, chunk: int | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """The unquantized (W′, b′) that best reproduces the fp32 outputs from the quantized inputs,
    ridge-regularised toward (W, b) with GPTQ's damping: [W′ b′] (E[x̃_q x̃_qᵀ] + λI) = E[y_f x̃_qᵀ] + λ[W b].
    One Cholesky of H_q/n + λI (in one [in, in] buffer); the bias's row and column by their Schur
    complement; the rows solved in chunks. W′ comes back float32 (it is rounded next), b′ float64."""
    from scipy.linalg import lapack

    bias = b is not None
    lam = _ridge(mom, damp, bias)
    m = np.empty(mom.hq.shape)
    np.divide(mom.hq, mom.n, out=m)
    np.einsum("ii->i", m)[:] += lam
    if lapack.dpotrf(m.T, lower=1, overwrite_a=1, clean=0)[1] != 0:
        raise np.linalg.LinAlgError("the calibration inputs' second moments are not positive definite")

    def solve(rhs: np.ndarray) -> np.ndarray:  # M⁻¹ rhs, rhs [in, k]
        x, info = lapack.dpotrs(m.T, rhs, lower=1)
        return x

    s = mom.sum_q / mom.n
    z = solve(s[:, None])[:, 0] if bias else None
    out_w = np.empty(w.shape, np.float32)
    out_b = np.empty(len(out_w)) if bias else None
    step = chunk or row_chunk(len(mom.hq))
    for r0 in range(0, len(out_w), step):
        rows = slice(r0, r0 + step)
        rhs = mom.scaled_target(w, b, rows, lam)
        wr = solve(np.ascontiguousarray(rhs[:, :-1].T)).T
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
