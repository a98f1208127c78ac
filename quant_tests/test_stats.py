"""neoxq.core.stats against a direct computation: llama-perplexity's kl_divergence() transcribed
(running sums, its mean_and_uncertainty and covariance lambdas, its percentile), full-vocabulary
softmaxes in float64; window errors and paired comparisons with negative controls."""

from __future__ import annotations

import math

import numpy as np
import pytest

from neoxq.core.errors import CorruptFileError, UsageError
from neoxq.core.scores_io import load_scores, save_scores
from neoxq.core.stats import TokenScores, compare, summarize


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _scores(rng, windows=12, per=40, vocab=60, noise=0.3, window_effect=0.0):
    base = rng.normal(0, 2, (windows * per, vocab))
    base += np.repeat(rng.normal(0, window_effect, (windows, 1, vocab)), per, axis=0).reshape(-1, vocab) if window_effect else 0
    lp = _log_softmax(base)
    lq = _log_softmax(base + rng.normal(0, noise, base.shape))
    targets = np.array([rng.choice(vocab, p=np.exp(r)) for r in lp])
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    rows = np.arange(len(lp))
    s = TokenScores(
        kld=kl,
        lq=lq[rows, targets],
        lp=lp[rows, targets],
        same_top=lq.argmax(-1) == lp.argmax(-1),
        per_window=per,
        targets=targets.astype(np.int32),
        model_top=lq.argmax(-1).astype(np.int32),
        ref_top=lp.argmax(-1).astype(np.int32),
    )
    return s, lp, lq, targets


def _llama(lp, lq, targets):
    """tools/perplexity/perplexity.cpp, kl_divergence(): the same sums and formulas, written out."""
    n = len(lp)
    acc = dict.fromkeys(["nll", "nll2", "nllb", "nllb2", "nllnllb", "kld", "kld2", "dp", "dp2", "dp4"], 0.0)
    same, klds, dps = 0, [], []
    for i in range(n):
        nll, nllb = -lq[i, targets[i]], -lp[i, targets[i]]
        acc["nll"] += nll
        acc["nll2"] += nll * nll
        acc["nllb"] += nllb
        acc["nllb2"] += nllb * nllb
        acc["nllnllb"] += nll * nllb
        k = float(np.sum(np.exp(lp[i]) * (lp[i] - lq[i])))
        acc["kld"] += k
        acc["kld2"] += k * k
        klds.append(k)
        same += int(np.argmax(lq[i]) == np.argmax(lp[i]))
        d = math.exp(-nll) - math.exp(-nllb)
        acc["dp"] += d
        acc["dp2"] += d * d
        acc["dp4"] += d**4
        dps.append(d)

    def mu(s, s2):
        f = s / n
        df = s2 / n - f * f
        return f, (math.sqrt(df / (n - 1)) if df > 0 and n > 10 else 0.0)

    def pct(values, fraction):
        values = sorted(values)
        p = fraction * (len(values) - 1)
        ip = int(p)
        p -= ip
        return (1 - p) * values[ip] + p * values[min(ip + 1, len(values) - 1)]

    lq_m, lq_s = mu(acc["nll"], acc["nll2"])
    lb_m, lb_s = mu(acc["nllb"], acc["nllb2"])
    cov = (acc["nllnllb"] / n - lq_m * lb_m) / (n - 1)
    ppl, pplb = math.exp(lq_m), math.exp(lb_m)
    ratio_unc = math.sqrt(lq_s**2 + lb_s**2 - 2 * cov)
    kl_m, kl_s = mu(acc["kld"], acc["kld2"])
    mse, mse_s = mu(acc["dp2"], acc["dp4"])
    top = same / n
    return {
        "ppl": (ppl, ppl * lq_s),
        "ppl_base": (pplb, pplb * lb_s),
        "cor": cov / (lq_s * lb_s),
        "ln_ratio": (lq_m - lb_m, ratio_unc),
        "ratio": (math.exp(lq_m - lb_m), math.exp(lq_m - lb_m) * ratio_unc),
        "diff": (ppl - pplb, math.sqrt((ppl * lq_s) ** 2 + (pplb * lb_s) ** 2 - 2 * ppl * pplb * cov)),
        "kld": (kl_m, kl_s),
        "kld_p99": pct(klds, 0.99),
        "kld_p0.1": pct(klds, 0.001),
        "kld_median": pct(klds, 0.5),
        "kld_max": max(klds),
        "dp": mu(acc["dp"], acc["dp2"]),
        "dp_p75": pct(dps, 0.75),
        "rms": (math.sqrt(mse), 0.5 / math.sqrt(mse) * mse_s),
        "top": (top, math.sqrt(top * (1 - top) / (n - 1))),
    }


def test_summary_equals_llama_perplexity_formulas():
    s, lp, lq, targets = _scores(np.random.default_rng(0))
    got, ref = summarize(s), _llama(lp, lq, targets)
    pairs = {
        "ppl": "ppl",
        "ppl_base": "ppl_base",
        "ln_ppl_ratio": "ln_ratio",
        "ppl_ratio": "ratio",
        "ppl_diff": "diff",
        "kld": "kld",
        "dp": "dp",
        "rms_dp": "rms",
        "same_top": "top",
    }
    for ours, theirs in pairs.items():
        assert got[ours]["value"] == pytest.approx(ref[theirs][0], rel=1e-9, abs=1e-12), ours
        assert got[ours]["se"] == pytest.approx(ref[theirs][1], rel=1e-6), ours
    assert got["cor_ln_ppl"] == pytest.approx(ref["cor"], rel=1e-9)
    for key in ("p99", "p0.1", "median", "max"):
        assert got["kld"][key] == pytest.approx(ref[f"kld_{key}"], rel=1e-12)
    assert got["dp"]["p75"] == pytest.approx(ref["dp_p75"], rel=1e-12)
    assert got["kld"]["min"] <= got["kld"]["p0.1"] <= got["kld"]["median"] <= got["kld"]["p99.9"] <= got["kld"]["max"]


def test_window_errors_see_correlation_within_windows():
    # Independent tokens: per-window and per-token errors agree (negative control) ...
    iid = summarize(_scores(np.random.default_rng(1), windows=60, per=20)[0])
    assert 0.6 < iid["kld"]["se_window"] / iid["kld"]["se"] < 1.5
    # ... tokens sharing a per-window shift: the window error is much larger, the per-token one blind to it.
    s, *_ = _scores(np.random.default_rng(1), windows=60, per=20)
    shift = np.repeat(np.random.default_rng(2).normal(0, 0.05, 60), 20)
    corr = TokenScores(kld=s.kld + shift + 0.2, lq=s.lq, lp=s.lp, same_top=s.same_top, per_window=20)
    st = summarize(corr)
    assert st["kld"]["se_window"] > 2.5 * st["kld"]["se"]


def test_compare_identical_is_exactly_indistinguishable():
    s, *_ = _scores(np.random.default_rng(3))
    c = compare(s, s)
    for key in ("kld", "ppl"):
        assert c[key]["ratio"] == 1.0 and c[key]["ci95"] == [1.0, 1.0] and c[key]["verdict"] == "not distinguishable"


def test_compare_finds_a_real_difference_and_not_a_noise_one():
    rng = np.random.default_rng(4)
    s, lp, lq, targets = _scores(rng, noise=0.3)
    better, *_ = _scores(np.random.default_rng(4), noise=0.15)  # same reference and targets, half the noise
    c = compare(better, s)
    assert c["kld"]["verdict"] == "better" and c["kld"]["ci95"][1] < 1 and compare(s, better)["kld"]["verdict"] == "worse"
    # a copy with tiny independent jitter: not distinguishable
    jitter = TokenScores(kld=s.kld * (1 + rng.normal(0, 1e-3, s.n)), lq=s.lq, lp=s.lp, same_top=s.same_top, per_window=s.per_window)
    assert compare(jitter, s)["kld"]["verdict"] == "not distinguishable"


def test_compare_refuses_unpaired_scores():
    a, *_ = _scores(np.random.default_rng(5))
    b = TokenScores(**{**a.__dict__, "targets": a.targets[::-1].copy()})
    with pytest.raises(UsageError, match="different tokens"):
        compare(a, b)
    with pytest.raises(UsageError, match="different tokens"):
        compare(a, _scores(np.random.default_rng(5), windows=6)[0])


def test_scores_file_round_trip_and_bad_files(tmp_path):
    s, *_ = _scores(np.random.default_rng(6))
    info = save_scores(tmp_path / "Q4_K_M.npz", s)
    back = load_scores(tmp_path / "Q4_K_M.npz")
    assert info["tokens"] == s.n and len(info["sha256"]) == 64
    np.testing.assert_array_equal(back.targets, s.targets)
    np.testing.assert_allclose(back.kld, s.kld, rtol=1e-6)
    assert back.per_window == s.per_window and compare(back, back)["kld"]["ci95"] == [1.0, 1.0]
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(CorruptFileError, match="not a per-token score file"):
        load_scores(tmp_path / "junk.npz")
    np.savez(tmp_path / "pickled.npz", kld=np.array([object()], dtype=object), per_window=np.int64(1))
    with pytest.raises(CorruptFileError):  # object arrays would need unpickling: refused
        load_scores(tmp_path / "pickled.npz")


def test_report_rows_compared_with_their_stock_row(tmp_path):
    from neoxq.compare import compare_rows, stock_of
    from neoxq.core.report_row import ReportRow

    assert [stock_of(t) for t in ("Q4_K_M-mix", "Q4_K_M-opt", "Q4_K_M-opt-mix", "Q4_K_M", "F16")] == ["Q4_K_M"] * 3 + [None, None]
    stock, *_ = _scores(np.random.default_rng(7), noise=0.3)
    mix, *_ = _scores(np.random.default_rng(7), noise=0.1)
    rows = []
    for label, s in (("Q4_K_M", stock), ("Q4_K_M-mix", mix), ("Q2_K-mix", mix)):
        info = save_scores(tmp_path / "tokens" / f"{label}.npz", s)
        rows.append(ReportRow(label, tokens={**info, "file": f"tokens/{info['file']}"}))
    compare_rows(rows, tmp_path)
    assert rows[0].vs_stock is None and rows[2].vs_stock is None  # Q2_K has no stock row here
    assert rows[1].vs_stock["stock"] == "Q4_K_M" and rows[1].vs_stock["kld"]["verdict"] == "better"


def test_markdown_shows_uncertainty_and_the_vs_stock_column(tmp_path):
    from neoxq.core.stats import compare as paired
    from neoxq.render import kld_text, markdown, value_pm

    stock, *_ = _scores(np.random.default_rng(8), noise=0.3)
    mix, *_ = _scores(np.random.default_rng(8), noise=0.1)

    def row(t, s):
        return {
            "type": t,
            "size_bytes": 1e6,
            "bpw": 4.5,
            "ppl": 10.0,
            "dppl_pct": 1.234,
            "dppl_pct_se_window": 0.0567,
            "kld_mean": float(s.kld.mean()),
            "kld_mean_se": 1e-3,
            "kld_mean_se_window": 2e-3,
            "kld_p99": 0.1,
            "top1": 0.9,
            "pp_tps": 1.0,
            "tg_tps": 1.0,
            "stats": summarize(s),
        }

    rows = [row("Q4_K_M", stock), {**row("Q4_K_M-mix", mix), "vs_stock": paired(mix, stock)}]
    report = {
        "source": {"name": "m", "path": "p"},
        "text": {"file": "t", "sha256": "x", "tokens_scored": mix.n, "ctx": 80},
        "reference": {"kind": "k", "ppl": 1.0, "ppl_se": 0.1},
        "versions": {},
        "machine": {"processor": "p", "cores": 2, "platform": "l"},
        "results": rows,
    }
    md = markdown(report)
    v = rows[1]["vs_stock"]["kld"]
    assert f"{v['ratio']:.3f}× [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}] better" in md and "vs stock" in md
    assert value_pm(1.234, 0.0567, signed=True) == "+1.234 ± 0.057" and "+1.234 ± 0.057" in md
    assert "2.0× the per-token ones" in md  # the window/token error ratio stated
    assert "Mean    KLD" in kld_text(rows[0]["stats"]) and "per window" in kld_text(rows[0]["stats"])
