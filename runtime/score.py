"""Perplexity and KL divergence, computed the way llama.cpp's llama-perplexity does.

The text is tokenised once and cut into non-overlapping windows of `ctx` tokens; no BOS is added
(GPT-NeoX has none); in each window the second half is scored: the logits at position j (for
first = ctx/2 ≤ j < ctx-1) predict token j+1. Logits are requested only for those positions.

Only what each metric needs is computed, in float32: perplexity needs a log-sum-exp and the
target's logit per position; KLD also needs the reference's top tokens (see reference_cache.py).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np

from neoxq.core.errors import CorruptFileError, UsageError
from neoxq.core.gguf_info import read_info
from neoxq.core.machine import default_threads
from neoxq.core.progress import Progress
from neoxq.core.stats import TokenScores, summarize
from neoxq.core.textfile import text_sha256

from . import capi
from .model import NeoxModel, RuntimeOptions
from .reference_cache import reference_tables


@dataclass
class Windows:
    ids: list[int]
    ctx: int

    def __post_init__(self):
        if self.ctx < 4:
            raise UsageError(f"--ctx {self.ctx} is too small; use at least 4 (llama.cpp's default is 512)")
        self.n_chunks = len(self.ids) // self.ctx
        if self.n_chunks < 2:
            raise UsageError(f"the text has {len(self.ids)} tokens, fewer than two windows of {self.ctx}; pass a longer text or a smaller --ctx")
        self.first = self.ctx // 2

    @property
    def scored_positions(self) -> range:
        return range(self.first, self.ctx - 1)

    @property
    def per_window(self) -> int:
        return len(self.scored_positions)

    @property
    def tokens_scored(self) -> int:
        return self.n_chunks * self.per_window

    def chunk(self, c: int) -> list[int]:
        return self.ids[c * self.ctx : (c + 1) * self.ctx]

    def targets(self, c: int) -> np.ndarray:
        return np.asarray(self.chunk(c)[self.first + 1 : self.ctx], dtype=np.int64)


class RowReducer:
    """log-sum-exp of logits rows in float32, split over a few threads (ctypes and numpy release the
    GIL; llama.cpp is idle between decodes, so the cores are free).

    Each row costs one pass of ggml's fused exp-and-sum (`capi.exp_sums`, the SIMD code of
    llama.cpp's own soft_max) with a shift the caller already has instead of the row's max: the
    target's logit for perplexity, the reference's top token's for KLD (the sum is then ≥ 1, and a
    whole max pass is saved). A shift so far below a row's max that exp overflows is redone with
    the max. Rows go in blocks that fit a core's L2, so gathering logits at given tokens right after
    (and the argmax) is cache-hot. Without ggml's function numpy does the same in three passes per block. (A BLAS
    matrix-vector product sums faster in isolation, but OpenBLAS's spinning threads then slow the
    next llama_decode.)"""

    BLOCK = 4  # rows per step: 4 × 50k float32 = 800 KB

    def __init__(self, n_vocab: int, threads: int | None = None):
        self.threads = max(1, min(threads or default_threads(), 4))
        self.scratch = np.empty((self.threads, self.BLOCK, n_vocab), dtype=np.float32)
        self.pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None

    def _sums(self, k: int, xs: np.ndarray, shift: np.ndarray) -> np.ndarray:
        sums = np.empty(len(xs))
        with np.errstate(over="ignore", invalid="ignore"):
            if not capi.exp_sums(xs, shift, self.scratch[k, 0], sums):
                for a in range(0, len(xs), self.BLOCK):
                    buf = self.scratch[k, : len(xs[a : a + self.BLOCK])]
                    np.subtract(xs[a : a + self.BLOCK], shift[a : a + self.BLOCK, None], out=buf)
                    np.exp(buf, out=buf)
                    sums[a : a + self.BLOCK] = buf.sum(-1)
        return sums

    def _part(self, k: int, x: np.ndarray, lo: int, hi: int, job: dict) -> None:
        xs = x[lo:hi]
        shift = xs[np.arange(hi - lo), job["shift_at"][lo:hi]] if job["shift_at"] is not None else xs.max(-1)
        sums, gather, v = np.empty(hi - lo), job["gather"], x.shape[1]
        step = self.BLOCK if gather is not None or job["arg"] is not None else hi - lo  # blocks only when more follows
        for a in range(0, hi - lo, max(step, 1)):
            b = min(a + step, hi - lo)
            sums[a:b] = self._sums(k, xs[a:b], shift[a:b])
            if gather is not None:  # while these rows are in this core's cache
                idx = gather[lo + a : lo + b] + (np.arange(b - a) * v)[:, None]
                job["gathered"][lo + a : lo + b] = np.take(xs[a:b].reshape(-1), idx)
            if job["arg"] is not None:
                job["arg"][lo + a : lo + b] = xs[a:b].argmax(-1)
        redo = ~(np.isfinite(sums) & (sums >= 1.0 - 1e-6))  # exp overflowed (or NaN logits: stay NaN)
        if redo.any():
            shift = shift.astype(np.float32, copy=True)
            shift[redo] = xs[redo].max(-1)
            for r in np.flatnonzero(redo):
                sums[r] = self._sums(k, xs[r : r + 1], shift[r : r + 1])[0]
        job["lse"][lo:hi] = np.log(sums) + shift
        if job["after"] is not None:
            job["after"](lo, hi, shift, sums, None if gather is None else job["gathered"][lo:hi])

    def __call__(self, x: np.ndarray, shift_at: np.ndarray | None = None, gather: np.ndarray | None = None, argmax: bool = False, after=None):
        """(log-sum-exp as float64, gathered or None, argmax or None) for the rows of x (C-contiguous
        float32). `shift_at`: per row, a token whose logit is near the max (the target); `gather`:
        [rows, K] token ids whose logits to return; `after(lo, hi, shift, sums, gathered)`: more
        work on a share of the rows (log-sum-exp = shift + log sums), run in that share's thread."""
        n = len(x)
        job = {
            "shift_at": shift_at,
            "lse": np.empty(n),
            "after": after,
            "arg": np.empty(n, dtype=np.int64) if argmax else None,
            "gather": None if gather is None else np.asarray(gather, dtype=np.intp),
            "gathered": None if gather is None else np.empty(np.shape(gather), dtype=np.float32),
        }
        if self.pool is None or n < 2 * self.threads:
            self._part(0, x, 0, n, job)
        else:
            bounds = np.linspace(0, n, self.threads + 1).astype(int)
            jobs = [self.pool.submit(self._part, k, x, a, b, job) for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
            for f in jobs:
                f.result()
        return job["lse"], job["gathered"], job["arg"]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def logsumexp(x: np.ndarray) -> np.ndarray:
    """Row-wise log Σ exp in float32 with the max subtracted (one-off use; loops use RowReducer)."""
    reducer = RowReducer(x.shape[1], threads=1)
    return reducer(np.ascontiguousarray(x, dtype=np.float32))[0]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def ppl_with_se(nll: np.ndarray) -> tuple[float, float]:
    """exp(mean NLL) and its standard error, as llama-perplexity reports it (delta method)."""
    mean = float(nll.mean())
    se = float(nll.std(ddof=1) / math.sqrt(len(nll))) if len(nll) > 1 else 0.0
    ppl = math.exp(mean)
    return ppl, ppl * se


@dataclass
class PerplexityResult:
    ppl: float
    ppl_se: float
    tokens_scored: int
    ctx: int
    n_chunks: int
    text_sha256: str
    model: str

    def as_json(self) -> dict:
        return asdict(self)


def window_logits(model: NeoxModel, w: Windows, label: str = "scoring") -> Iterator[tuple[int, int, np.ndarray]]:
    """(window, first scored row, logits view) for every decoded batch of every window. A view is
    valid until the next item is asked for: reduce it first."""
    with Progress(label, w.tokens_scored, "tokens") as progress:
        for c in range(w.n_chunks):
            row = 0
            for view in model.iter_logits(w.chunk(c), w.scored_positions):
                yield c, row, view
                row += len(view)
            progress.update(w.per_window)


def check_finite(reduced: np.ndarray, model: NeoxModel, window: int) -> None:
    """A NaN or infinite log-sum-exp means the model's logits are: its weights hold NaN or inf (a
    damaged or badly made file). One line, instead of a "perplexity nan ± nan" that looks like a
    result. Checked on the reduced rows, so it costs nothing next to the logits."""
    if not np.isfinite(reduced).all():
        raise CorruptFileError(
            f"{model.info.path.name} gives non-finite logits (window {window + 1}): its weights hold NaN or "
            "infinity; re-create it with `neoxq convert`/`neoxq quantize` from a sound checkpoint"
        )


def target_nll(model: NeoxModel, w: Windows) -> np.ndarray:
    """−log p(target) at every scored position, float64 from float32 logits."""
    nll = np.empty(w.tokens_scored, dtype=np.float64)
    reducer = RowReducer(model.n_vocab)
    try:
        for c, row, view in window_logits(model, w):
            t = w.targets(c)[row : row + len(view)]
            at = c * w.per_window + row
            lse = reducer(view, shift_at=t)[0]
            check_finite(lse, model, c)
            nll[at : at + len(view)] = lse - view[np.arange(len(view)), t]
    finally:
        reducer.close()
    return nll


def perplexity(model: NeoxModel, text: str, ctx: int = 512) -> PerplexityResult:
    w = Windows(model.tokenize(text), ctx)
    nll = target_nll(model, w)
    ppl, se = ppl_with_se(nll)
    return PerplexityResult(ppl, se, len(nll), ctx, w.n_chunks, text_sha256(text), str(model.info.path))


# KL divergence against a reference ---------------------------------------------------------------


class Reference(Protocol):
    """What a KLD is taken against: an F16/F32 GGUF (here) or the transformers fp32 checkpoint
    (neoxq.convert.reference), both yielding full-vocabulary log-probs at the scored positions."""

    description: str  # for people and reports

    def identity(self) -> str:
        """Changes whenever the reference's weights do (cache key)."""

    def log_probs(self, w: Windows) -> Iterator[tuple[int, np.ndarray]]:
        """(window, [per_window, n_vocab] log-probs) for every window."""


class GGUFReference:
    """An F16/F32 (or any) GGUF scored by llama.cpp: llama.cpp's own way of measuring KLD."""

    def __init__(self, path, options=None):
        self.info = read_info(path)
        self.path = Path(path)
        self.options = options
        self.description = f"GGUF {self.path.name} ({self.info.metadata.get('neoxq.quant_type') or 'unknown type'}) under llama.cpp"

    def identity(self) -> str:
        st = self.path.stat()
        return f"gguf:{self.path.resolve()}:{st.st_size}:{st.st_mtime_ns}"

    def log_probs(self, w: Windows) -> Iterator[tuple[int, np.ndarray]]:
        opts = self.options or RuntimeOptions(n_ctx=w.ctx, n_batch=w.ctx)
        with NeoxModel(self.path, opts, info=self.info) as ref:
            rows: list[np.ndarray] = []
            for c, row, view in window_logits(ref, w, "reference"):
                rows.append(log_softmax(view).astype(np.float32))
                if row + len(view) == w.per_window:
                    yield c, np.concatenate(rows)
                    rows = []


@dataclass
class KLDResult:
    kld_mean: float
    kld_mean_se: float
    kld_median: float
    kld_p99: float
    kld_max: float
    top1: float
    top1_se: float
    rms_dp: float
    ppl: float
    ppl_se: float
    ppl_ref: float
    ppl_ref_se: float
    dppl: float
    dppl_pct: float
    tokens_scored: int
    ctx: int
    text_sha256: str
    model: str
    reference: str
    stats: dict  # everything llama-perplexity --kl-divergence prints, with per-window errors (core.stats)
    tokens: TokenScores | None = field(default=None, repr=False, compare=False)  # the per-token values

    def as_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "tokens"}


def kld(model: NeoxModel, reference: Reference, text: str, ctx: int = 512, cache_dir=None) -> KLDResult:
    """KL(reference ‖ model) per scored token and the statistics llama-perplexity prints."""
    w = Windows(model.tokenize(text), ctx)
    ref = reference_tables(reference, w, model.n_vocab, cache_dir)
    scores = kld_scores(model, ref, w)
    result = _kld_result(scores, w, text, model, reference)
    result.stats["reference_tables"] = tail_mass(ref)
    return result


def tail_mass(ref) -> dict:
    """How much of the reference's probability its tables keep outside their top tokens: the KLD
    merges that rest into one outcome, which reads it low when the rest is large (scripts/bench_stats.py
    measures by how much; docs/method.md)."""
    rest = np.exp(np.asarray(ref.rest_lp, dtype=np.float64))
    return {"top_k": int(ref.top_idx.shape[1]), "mass_outside_mean": float(rest.mean()), "mass_outside_max": float(rest.max())}


def kld_scores(model: NeoxModel, ref, w: Windows) -> TokenScores:
    """Per scored token: KL(reference ‖ model), top-1 agreement, the model's and the reference's
    target log-probs and both top tokens. The reference's top tokens are gathered in the reducer's
    threads and KL computed there too, each thread on its share of the rows."""
    n_all = w.tokens_scored
    kl, lq_t = np.empty(n_all), np.empty(n_all)
    model_top = np.empty(n_all, dtype=np.int32)
    reducer = RowReducer(model.n_vocab)
    try:
        for c, row, view in window_logits(model, w):
            at, n = c * w.per_window + row, len(view)
            top_idx = np.asarray(ref.top_idx[at : at + n])

            def after(lo, hi, shift, sums, top, at=at):
                kl[at + lo : at + hi] = ref.kl_rows(slice(at + lo, at + hi), top, shift, sums)

            lse, _, arg = reducer(view, shift_at=top_idx[:, 0], gather=top_idx, argmax=True, after=after)
            check_finite(lse, model, c)
            model_top[at : at + n] = arg
            lq_t[at : at + n] = view[np.arange(n), w.targets(c)[row : row + n]] - lse
    finally:
        reducer.close()
    ref_top = np.asarray(ref.top_idx[:, 0], dtype=np.int32)
    targets = np.concatenate([w.targets(c) for c in range(w.n_chunks)]).astype(np.int32)
    return TokenScores(
        kld=kl,
        lq=lq_t,
        lp=np.asarray(ref.target_lp, dtype=np.float64),
        same_top=model_top == ref_top,
        per_window=w.per_window,
        targets=targets,
        model_top=model_top,
        ref_top=ref_top,
    )


def _kld_result(s: TokenScores, w: Windows, text: str, model, reference) -> KLDResult:
    st = summarize(s)
    ppl, ref = st["ppl"], st["ppl_base"]
    return KLDResult(
        kld_mean=st["kld"]["value"],
        kld_mean_se=st["kld"]["se"],
        kld_median=st["kld"]["median"],
        kld_p99=st["kld"]["p99"],
        kld_max=st["kld"]["max"],
        top1=st["same_top"]["value"],
        top1_se=st["same_top"]["se"],
        rms_dp=st["rms_dp"]["value"],
        ppl=ppl["value"],
        ppl_se=ppl["se"],
        ppl_ref=ref["value"],
        ppl_ref_se=ref["se"],
        dppl=st["ppl_diff"]["value"],
        dppl_pct=100 * st["ppl_diff"]["value"] / ref["value"],
        tokens_scored=s.n,
        ctx=w.ctx,
        text_sha256=text_sha256(text),
        model=str(model.info.path),
        reference=reference.description,
        stats=st,
        tokens=s,
    )
