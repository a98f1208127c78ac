"""Statistics of per-token scores: the figures `llama-perplexity --kl-divergence` prints, standard
errors that respect the correlation of tokens within one window, and paired comparisons of two
files scored on the same tokens.

Every figure is a value plus its *influence*: the per-token quantity whose mean's fluctuation is
the figure's (to first order; the delta method). Its standard error then comes in two kinds:
- per token, as llama-perplexity computes it: every token taken as independent;
- per window: the same from the means of the scored windows (every window scores the same number
  of tokens). The tokens of one window share their context, so their errors are correlated and the
  per-token error is too small, by √(1 + (m − 1)ρ) for m tokens a window with intra-window
  correlation ρ. The window figure is the honest one; both are reported.

A difference or ratio of two quantities on the same tokens takes its error from the per-token
difference of the influences, which is what llama-perplexity's `sqrt(a² + b² − 2 cov)` is; two
identical inputs give an error of exactly 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from neoxq.core.errors import UsageError

# llama-perplexity's lists (tools/perplexity/perplexity.cpp, kl_divergence()); percent.
KLD_PERCENTILES = (99.9, 99.0, 95.0, 90.0, 10.0, 5.0, 1.0, 0.1)
DP_PERCENTILES = (99.9, 99.0, 95.0, 90.0, 75.0, 25.0, 10.0, 5.0, 1.0, 0.1)
Z95 = 1.959963984540054  # two-sided 95 % normal quantile


@dataclass
class TokenScores:
    """Per scored token of one file against one reference, in window order."""

    kld: np.ndarray  # KL(reference ‖ model)
    lq: np.ndarray  # log q(target): the model's
    lp: np.ndarray  # log p(target): the reference's
    same_top: np.ndarray  # bool: the model's most likely token is the reference's
    per_window: int  # scored tokens in every window
    targets: np.ndarray | None = None  # token ids (int32), to check that two scores are paired
    model_top: np.ndarray | None = None  # the model's most likely token
    ref_top: np.ndarray | None = None  # the reference's most likely token

    def __post_init__(self):
        n = len(self.kld)
        if not (len(self.lq) == len(self.lp) == len(self.same_top) == n) or self.per_window < 1 or n % self.per_window:
            raise ValueError("per-token arrays of unequal length or not whole windows")

    @property
    def n(self) -> int:
        return len(self.kld)

    @property
    def windows(self) -> int:
        return self.n // self.per_window


def standard_errors(influence: np.ndarray, per_window: int) -> tuple[float, float]:
    """(per token, per window) standard error of the mean of `influence`."""
    x = np.asarray(influence, dtype=np.float64)
    n = len(x)
    se_tok = float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    w = x.reshape(-1, per_window).mean(1)
    se_win = float(w.std(ddof=1) / math.sqrt(len(w))) if len(w) > 1 else 0.0
    return se_tok, se_win


def estimate(value: float, influence: np.ndarray, per_window: int) -> dict:
    se, se_w = standard_errors(influence, per_window)
    return {"value": float(value), "se": se, "se_window": se_w}


def _percentiles(x: np.ndarray, which) -> dict:
    """llama-perplexity's percentile: linear between the two nearest ranks (numpy's default)."""
    vals = np.percentile(x, which)
    return {f"p{q:g}": float(v) for q, v in zip(which, vals)}


def summarize(s: TokenScores) -> dict:
    """Everything llama-perplexity --kl-divergence prints, with per-window errors beside."""
    m = s.per_window
    nll_q, nll_b = -np.asarray(s.lq, np.float64), -np.asarray(s.lp, np.float64)
    mq, mb = nll_q.mean(), nll_b.mean()
    ppl_q, ppl_b = math.exp(mq), math.exp(mb)
    ratio_ln = mq - mb
    kl = np.asarray(s.kld, np.float64)
    dp = np.exp(-nll_q) - np.exp(-nll_b)
    mse = float((dp * dp).mean())
    rms = math.sqrt(mse)
    top = np.asarray(s.same_top, np.float64)
    wq, wb = nll_q.reshape(-1, m).mean(1), nll_b.reshape(-1, m).mean(1)
    return {
        "tokens": s.n,
        "windows": s.windows,
        "tokens_per_window": m,
        "ppl": estimate(ppl_q, ppl_q * nll_q, m),
        "ppl_base": estimate(ppl_b, ppl_b * nll_b, m),
        "cor_ln_ppl": _cor(nll_q, nll_b),
        "cor_ln_ppl_window": _cor(wq, wb),
        "ln_ppl_ratio": estimate(ratio_ln, nll_q - nll_b, m),
        "ppl_ratio": estimate(math.exp(ratio_ln), math.exp(ratio_ln) * (nll_q - nll_b), m),
        "ppl_diff": estimate(ppl_q - ppl_b, ppl_q * nll_q - ppl_b * nll_b, m),
        "kld": {
            **estimate(kl.mean(), kl, m),
            "max": float(kl.max()),
            **_percentiles(kl, KLD_PERCENTILES[:4]),
            "median": float(np.median(kl)),
            **_percentiles(kl, KLD_PERCENTILES[4:]),
            "min": float(kl.min()),
        },
        "dp": {
            **estimate(dp.mean(), dp, m),
            "max": float(dp.max()),
            **_percentiles(dp, DP_PERCENTILES[:5]),
            "median": float(np.median(dp)),
            **_percentiles(dp, DP_PERCENTILES[5:]),
            "min": float(dp.min()),
        },
        "rms_dp": estimate(rms, dp * dp / (2 * rms) if rms > 0 else np.zeros_like(dp), m),
        "same_top": estimate(top.mean(), top, m),
    }


def _cor(a: np.ndarray, b: np.ndarray) -> float:
    sa, sb = a.std(), b.std()
    return float(((a - a.mean()) * (b - b.mean())).mean() / (sa * sb)) if sa > 0 and sb > 0 else float("nan")


# Paired comparison of two files -----------------------------------------------------------------


def _verdict(lo: float, hi: float, lower_is_better: bool = True) -> str:
    if hi < 1.0:
        return "better" if lower_is_better else "worse"
    if lo > 1.0:
        return "worse" if lower_is_better else "better"
    return "not distinguishable"


def ratio_of_means(a: float, se_a: float, b: float, se_b: float) -> dict:
    """a / b for two means known only with their standard errors (no per-token values to pair):
    a 95 % interval from the log-ratio's error (delta method, the two errors independent, so wider
    than a paired interval where the files were scored on the same tokens) and its verdict."""
    se = math.hypot(se_a / a, se_b / b)
    r = a / b
    lo, hi = r * math.exp(-Z95 * se), r * math.exp(Z95 * se)
    return {"ratio": r, "ci95": [lo, hi], "se_ln": se, "verdict": _verdict(lo, hi)}


def _ratio(value_ln: float, influence: np.ndarray, per_window: int) -> dict:
    """A ratio from its log and the log's influence: 95 % interval from the per-window error."""
    se, se_w = standard_errors(influence, per_window)
    lo, hi = math.exp(value_ln - Z95 * se_w), math.exp(value_ln + Z95 * se_w)
    return {"ratio": math.exp(value_ln), "ci95": [lo, hi], "se_ln": se, "se_ln_window": se_w, "verdict": _verdict(lo, hi)}


def compare(a: TokenScores, b: TokenScores) -> dict:
    """A against B on the same tokens: the ratio of mean KLDs and of perplexities, each with a 95 %
    interval from per-window errors of the paired log-ratio, and a verdict for A ("better" = lower).
    ln(mean KLD_A / mean KLD_B) has the influence KLD_A/mean_A − KLD_B/mean_B per token."""
    if a.n != b.n or a.per_window != b.per_window:
        raise UsageError(f"the two scores cover different tokens ({a.n} vs {b.n}); score both on the same text and --ctx")
    if a.targets is not None and b.targets is not None and not np.array_equal(a.targets, b.targets):
        raise UsageError("the two scores are on different tokens (another text or tokenizer); score both on the same text")
    m = a.per_window
    ka, kb = np.asarray(a.kld, np.float64), np.asarray(b.kld, np.float64)
    ma, mb = ka.mean(), kb.mean()
    if ma <= 0 or mb <= 0:
        raise UsageError("a mean KLD of 0: that file is its reference, nothing to compare")
    d_nll = np.asarray(b.lq, np.float64) - np.asarray(a.lq, np.float64)  # nll_A − nll_B per token
    kld = _ratio(math.log(ma / mb), ka / ma - kb / mb, m)
    kld.update({"a": ma, "b": mb, "diff": estimate(ma - mb, ka - kb, m)})
    ppl = _ratio(float(d_nll.mean()), d_nll, m)
    top = np.asarray(a.same_top, np.float64) - np.asarray(b.same_top, np.float64)
    return {
        "tokens": a.n,
        "windows": a.windows,
        "kld": kld,
        "ppl": ppl,
        "same_top_diff": estimate(top.mean(), top, m),
        "share_of_tokens_a_lower": float((ka < kb).mean()),
    }
