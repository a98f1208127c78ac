"""`neoxq quantize --optimize`: llama.cpp's tensor types and block headers, levels chosen
by GPTQ on llama.cpp's grids against each layer's output; lower held-out KLD than stock with the same
imatrix (paired), loads and runs in llama.cpp; bad input in one line; GPTQ's arithmetic on arrays."""

from __future__ import annotations

import json

import numpy as np
import pytest

from neoxq.core import blocks, gptq
from neoxq.core.gguf_info import read_info

from .helpers import assert_one_line_error, correlated_layer, run_cli


def _correlated_problem(seed: int, tokens: int, cols: int, rows: int, mix: float, fmt=blocks.Q4_K):
    """Inputs with correlated columns (H), weights, and llama.cpp's grids for them (Q4_K's unless
    `fmt` names another)."""
    from neoxq.runtime import capi

    h, w = correlated_layer(seed, tokens, cols, rows, mix)
    raw = capi.quantize_rows(w, fmt.ggml_type, np.diag(h).astype(np.float32)).reshape(-1, fmt.size)
    a, m = (g.reshape(w.shape) for g in blocks.grid(fmt, raw))
    return h, w, fmt, raw, a, m


# a uniform grid, and a codebook grid (levels unevenly spaced)
GRID_FORMATS = [blocks.Q4_K, blocks.IQ4_XS]


@pytest.mark.parametrize("fmt", GRID_FORMATS, ids=lambda f: f.name)
def test_gptq_lowers_output_error_on_correlated_inputs_and_is_rtn_on_diagonal_ones(fmt):
    from neoxq.runtime import capi

    h, w, fmt, raw, a, m = _correlated_problem(0, 4096, 256, 64, 0.3, fmt)
    stock = blocks.values(fmt, raw).reshape(w.shape)
    lv = gptq.gptq_levels(w, h, a, m, fmt.lmin, fmt.lmax, points=fmt.points)
    ours = capi.dequantize(blocks.with_levels(fmt, raw, lv.reshape(-1, fmt.block)), fmt.ggml_type, w.size).reshape(w.shape)
    assert gptq.output_error(w, ours, h) < 0.7 * gptq.output_error(w, stock, h)
    # negative control: with uncorrelated inputs there is nothing to compensate — nearest rounding
    diag = np.diag(np.diag(h))
    rtn = gptq.nearest(w, a, m, fmt.lmin, fmt.lmax, fmt.points)
    assert np.array_equal(gptq.gptq_levels(w, diag, a, m, fmt.lmin, fmt.lmax, points=fmt.points), rtn)
    if fmt.points is not None:  # nearest on the codebook is llama.cpp's own choice on its grids
        assert (rtn == blocks.levels(fmt, raw).reshape(w.shape)).mean() > 0.99


def _moments(xf, xq, w, b):
    return gptq.Moments.of(xf @ w.T + (0 if b is None else b), xq)


def test_asymmetric_target_reproduces_fp32_outputs_from_perturbed_inputs():
    """The fp32 layer's outputs, recovered from inputs that upstream rounding changed by an
    invertible map and a shift: the target (weights and bias) makes the error ~0, where the fp32
    weights on the same inputs do not (the negative control); the error from moments equals the
    error computed token by token; unchanged inputs give back (W, b) itself; the chunked solve
    equals numpy's dense solve of the augmented system."""
    rng = np.random.default_rng(2)
    xf = rng.standard_normal((4000, 32)) + 0.5
    mix = np.eye(32) + 0.1 * rng.standard_normal((32, 32))
    xq = xf @ mix.T + 0.2
    w, b = rng.standard_normal((8, 32)), rng.standard_normal(8)
    mom = _moments(xf, xq, w, b)
    wt, bt = gptq.asymmetric_target(w, b, mom, damp=1e-9, chunk=3)

    def direct(q, bq):
        return float(np.sum((xf @ w.T + b - xq @ q.T - bq) ** 2)) / len(xf)

    assert np.isclose(gptq.asymmetric_error(wt, bt, mom, chunk=3), direct(wt, bt), rtol=1e-5, atol=1e-9)
    assert np.isclose(gptq.asymmetric_error(w, b, mom), direct(w, b), rtol=1e-9)
    assert direct(wt, bt) < 1e-8 * direct(w, b)
    xa, wa = np.c_[xq, np.ones(len(xq))], np.c_[w, b]
    ha, lam = xa.T @ xa / len(xa), 0.01 * np.mean(np.diag(xa.T @ xa / len(xa)))
    dense = np.linalg.solve(ha + lam * np.eye(33), ((xf @ w.T + b).T @ xa / len(xa) + lam * wa).T).T
    wt, bt = gptq.asymmetric_target(w, b, mom, chunk=5)
    assert np.allclose(wt, dense[:, :-1], atol=1e-5) and np.allclose(bt, dense[:, -1], atol=1e-9)
    same = _moments(xf, xf, w, b)
    wt, bt = gptq.asymmetric_target(w, b, same)
    assert np.allclose(wt, w, atol=1e-6) and np.allclose(bt, b)
    wt, none = gptq.asymmetric_target(w, None, _moments(xf, xf, w, None))
    assert none is None and np.allclose(wt, w, atol=1e-6)


def test_inverse_cholesky_in_place_matches_the_dense_inverse():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3000, 1100))
    x[:, 7] = 0  # a dead column
    h = x.T @ x
    u = gptq.inverse_cholesky(h, damp=0.01)
    hd = h.copy()
    hd[7, 7] = 1.0
    hd[np.diag_indices_from(hd)] += 0.01 * np.mean(np.diag(hd))
    assert np.allclose(np.triu(u), u) and np.allclose(u.T @ u, np.linalg.inv(hd), rtol=1e-6, atol=1e-12)
    # in act order with a given ridge: the factor of the permuted matrix, and solve() is H⁻¹ rhs
    perm, u = gptq.compensation(h, True, ridge=5.0)
    hr = h + 5.0 * np.eye(len(h))
    assert not np.array_equal(perm, np.arange(len(h))) and np.allclose(u.T @ u, np.linalg.inv(hr[perm][:, perm]), rtol=1e-6, atol=1e-12)
    rhs = rng.standard_normal((len(h), 3))
    assert np.allclose(gptq.solve((perm, u), rhs), np.linalg.solve(hr, rhs), rtol=1e-8, atol=1e-12)


def test_blocked_cholesky_equals_lapack_and_is_used_for_large_matrices(monkeypatch):
    """Above LAPACK_MAX_BYTES the factor is made block by block (scipy's threaded OpenBLAS dpotrf
    segfaults from about 15800²). Forced here on a small matrix, with blocks and row strips that do
    not divide it."""
    from neoxq.core import cholesky

    rng = np.random.default_rng(8)
    x = rng.standard_normal((1500, 700))
    h = x.T @ x
    monkeypatch.setattr(cholesky, "BLOCK", 128)
    monkeypatch.setattr(cholesky, "ROWS", 50)
    blocked, lapack = h.copy(), h.copy()
    cholesky.lower_in_place(lapack)
    monkeypatch.setattr(cholesky, "LAPACK_MAX_BYTES", 0)
    cholesky.lower_in_place(blocked)
    expected = np.linalg.cholesky(h)
    assert np.allclose(np.tril(blocked), expected, rtol=1e-10, atol=1e-10)
    assert np.allclose(np.tril(lapack), expected, rtol=1e-10, atol=1e-10)
    # through GPTQ's factor: the blocked path gives H⁻¹ = Uᵀ U as well
    u = gptq.inverse_cholesky(h, damp=0.01)
    hd = h + 0.01 * np.mean(np.diag(h)) * np.eye(700)
    assert np.allclose(np.triu(u), u) and np.allclose(u.T @ u, np.linalg.inv(hd), rtol=1e-6, atol=1e-12)
    # negative control: a matrix that is not positive definite past the first block is refused,
    # with the index of the failing column as LAPACK would give it
    bad = h.copy()
    bad[300, 300] = -1.0
    with pytest.raises(np.linalg.LinAlgError, match=r"info 301\b"):
        cholesky.lower_in_place(bad)


def test_corrected_bias_removes_the_mean_output_error():
    rng = np.random.default_rng(3)
    xq = rng.standard_normal((1000, 16)) + 1.0
    w, b = rng.standard_normal((4, 16)), rng.standard_normal(4)
    q = np.round(w * 2) / 2
    mom = _moments(xq, xq, w, b)
    bq = gptq.corrected_bias(w, b, q, mom)
    assert np.allclose((xq @ w.T + b - xq @ q.T - bq).mean(0), 0, atol=1e-12)
    assert gptq.asymmetric_error(q, bq, mom) < gptq.asymmetric_error(q, b, mom)


def test_interleave_qkv_undoes_the_deinterleave():
    from neoxq.convert.neox import GPTNeoXArgs, deinterleave_qkv, interleave_qkv

    args = GPTNeoXArgs(hidden_size=8, num_attention_heads=2, num_hidden_layers=1, intermediate_size=32, vocab_size=10)
    w = np.arange(24 * 8).reshape(24, 8)
    assert np.array_equal(interleave_qkv(deinterleave_qkv(w, args), args), w)
    assert np.array_equal(interleave_qkv(deinterleave_qkv(w[:, 0], args), args), w[:, 0])
    assert not np.array_equal(deinterleave_qkv(w, args), w)  # it does move rows


@pytest.fixture(scope="module")
def optimized(trained, trained_f16, texts, tmp_path_factory):
    from neoxq.convert.imatrix import compute_imatrix
    from neoxq.core.imatrix_io import write_imatrix
    from neoxq.runtime.quantize import quantize

    d = tmp_path_factory.mktemp("opt")
    (d / "calib.txt").write_text(texts["calib"])
    im = write_imatrix(d / "im.gguf", compute_imatrix(str(trained), texts["calib"], ctx=128, include_output=True))
    # the same imatrix for both files, so their grids (llama.cpp's search) must be identical
    proc = run_cli(
        "quantize",
        trained_f16,
        "--type",
        "Q4_K_M",
        "--optimize",
        "--calib",
        d / "calib.txt",
        "--reference",
        trained,
        "--imatrix",
        im,
        "--ctx",
        "128",
        "-o",
        d / "opt.gguf",
        "--json",
        "--quiet",
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["optimize"]["first_pass"] == "in memory"
    stock = quantize(trained_f16, "Q4_K_M", output=d / "stock-im.gguf", imatrix=im)
    return d, json.loads(proc.stdout), stock


def test_memory_plan_streams_a_6_9b_model_within_8gb_and_keeps_a_small_one_in_memory():
    """The plan's choice (pure): Pythia-6.9B's shape with 32 windows of 512 fits 8 GB only with the
    first pass streamed; the 70m shape keeps it in memory; a budget below the layer-by-layer pass
    is refused (negative control)."""
    from neoxq.convert.neox import GPTNeoXArgs
    from neoxq.preflight import optimize_plan

    big = GPTNeoXArgs(hidden_size=4096, num_attention_heads=32, num_hidden_layers=32, intermediate_size=16384, vocab_size=50432)
    plan = optimize_plan(big, 512, 32, 8 << 30)
    assert plan.streamed and plan.first_in_memory > 8 << 30 and plan.peak <= 8 << 30
    small = GPTNeoXArgs(hidden_size=512, num_attention_heads=8, num_hidden_layers=6, intermediate_size=2048, vocab_size=50304)
    assert not optimize_plan(small, 512, 32, 8 << 30).streamed
    assert optimize_plan(big, 512, 32, 4 << 30).peak > 4 << 30


def test_a_12b_model_is_planned_within_20gb_and_a_smaller_budget_refused():
    """Pythia-12B's shape (5120 × 36, 40 heads, vocabulary 50688), pure plans: its fp32 reference
    (56 GB in memory) streams within --max-memory 20GB, --optimize streams its first pass and peaks
    within 20 GB, and the Q4_K_M file's scoring fits too; 2 GB is refused for both (negative control)."""
    from types import SimpleNamespace

    from neoxq.convert.neox import GPTNeoXArgs
    from neoxq.convert.reference import plan_reference
    from neoxq.core.errors import UsageError
    from neoxq.preflight import llama_estimate, optimize_plan

    config = {"architectures": ["GPTNeoXForCausalLM"], "hidden_size": 5120, "num_attention_heads": 40, "num_hidden_layers": 36}
    config |= {"intermediate_size": 20480, "vocab_size": 50688, "max_position_embeddings": 2048}
    args = GPTNeoXArgs.from_config(config)
    ckpt = SimpleNamespace(config=config, bytes_per_param=2)
    budget = 20 * 10**9
    ref = plan_reference(ckpt, 512, 32, budget)
    assert ref.mode == "streamed" and ref.peak_bytes <= budget
    opt = optimize_plan(args, 512, 32, budget)
    assert opt.streamed and opt.first_in_memory > budget >= opt.peak
    q4_bytes = int(args.param_count() * 4.9 / 8)  # Q4_K_M's bits per weight
    assert llama_estimate(q4_bytes, 36, 5120, 50688, 512, 512) <= budget
    with pytest.raises(UsageError, match="--max-memory"):
        plan_reference(ckpt, 512, 32, 2 * 10**9)
    assert optimize_plan(args, 512, 32, 2 * 10**9).peak > 2 * 10**9


def test_optimized_file_is_llama_cpps_file_with_other_levels(optimized):
    """Stock's tensor names, types and sizes. The tensors --optimize does not touch keep llama.cpp's
    bytes; the matmuls that read no LayerNorm keep llama.cpp's grids (block headers) with new
    levels; each LayerNorm is stock's divided by one scale per channel (weight and bias alike:
    neoxq.core.equalize), and the matmuls reading it were quantized on the rescaled columns."""
    from neoxq.core.equalize import norm_pairs
    from neoxq.core.gguf_info import float_rows, read_info
    from neoxq.optimize import OptimizeOptions

    d, res, stock = optimized
    opt, ref = read_info(d / "opt.gguf"), read_info(stock.path)
    method = OptimizeOptions("").resolved().method
    layers = sum(t.name.endswith("attn_qkv.weight") for t in opt.tensors)
    pairs = norm_pairs(layers)
    norms, rescaled = {p.norm for p in pairs}, {p.matmul for p in pairs}
    assert res["type"] == "Q4_K_M-opt" and opt.metadata["neoxq.optimize.method"] == method
    assert [(t.name, t.type, t.n_bytes) for t in opt.tensors] == [(t.name, t.type, t.n_bytes) for t in ref.tensors]
    changed = biases = 0
    for t, s in zip(opt.tensors, ref.tensors):
        a = np.fromfile(opt.path, np.uint8, t.n_bytes, offset=opt.data_offset + t.offset)
        b = np.fromfile(ref.path, np.uint8, s.n_bytes, offset=ref.data_offset + s.offset)
        fmt = blocks.FORMATS.get(t.type)
        if t.name.rsplit(".", 1)[0] in norms:
            continue  # checked below
        if t.name.endswith(".bias") and t.name.startswith("blk."):
            biases += not np.array_equal(a, b)  # a matmul's bias: re-solved with its levels
            continue
        if fmt is None or len(t.shape) < 2:
            assert np.array_equal(a, b), t.name  # not optimised: llama.cpp's bytes
            continue
        if t.name not in rescaled:
            hdr = np.ones(fmt.size, bool)
            for f in fmt.fields:
                hdr[f.bytes] = False
            assert np.array_equal(a.reshape(-1, fmt.size)[:, hdr], b.reshape(-1, fmt.size)[:, hdr]), t.name  # the same grids
        changed += not np.array_equal(a, b)
    matmuls = 4 * layers  # qkv, attention output, MLP up and down in each layer
    assert changed >= matmuls + 2 and biases >= matmuls  # every matmul, the embedding and the output got new levels; every matmul a new bias
    for norm in norms:
        (w0, b0), (w1, b1) = [[float_rows(i, i.tensor(norm + x)).reshape(-1) for x in (".weight", ".bias")] for i in (ref, opt)]
        big = np.abs(b0) > 1e-3 * np.abs(b0).max()
        assert not np.allclose(w0, w1) and np.allclose((w0 / w1)[big], (b0 / b1)[big], rtol=1e-4), norm
    shown = run_cli("info", d / "opt.gguf")
    assert shown.returncode == 0 and f"{method} on" in shown.stdout and "calibration tokens" in shown.stdout
    assert all(x["output_error_ratio"] < 1 for x in res["optimize"]["tensors"])


def paired_kld(a, b, f16, text: str, cache) -> dict:
    """File `a`'s KLD against file `b`'s on the same tokens (F16 as the reference): ratio, interval, verdict."""
    from neoxq.core.stats import compare
    from neoxq.runtime.model import NeoxModel, RuntimeOptions
    from neoxq.runtime.score import GGUFReference, kld

    scores = []
    for path in (a, b):
        with NeoxModel(path, RuntimeOptions(n_ctx=128, n_batch=128)) as m:
            scores.append(kld(m, GGUFReference(f16), text, 128, cache_dir=cache))
    return compare(scores[0].tokens, scores[1].tokens)["kld"]


def test_optimized_beats_stock_with_the_same_imatrix_and_runs(optimized, trained_f16, texts):
    d, _, stock = optimized
    c = paired_kld(d / "opt.gguf", stock.path, trained_f16, texts["eval"], d / "cache")
    print(f"opt/stock+imatrix KLD {c['ratio']:.3f} {c['ci95']}")
    assert c["verdict"] == "better"
    gen = run_cli("run", d / "opt.gguf", "-p", "def ", "-n", "8", "--temp", "0", "--ctx", "128")
    assert gen.returncode == 0 and len(gen.stdout) > len("def ")


def test_optimize_default_imatrix_comes_from_the_calibration_pass(trained, trained_f16, texts, tmp_path, monkeypatch):
    import neoxq.optimize
    from neoxq.core.gguf_info import read_info
    from neoxq.core.textfile import text_sha256
    from neoxq.optimize import OptimizeOptions, quantize_optimized

    held = []  # a stated budget keeps freed temporaries out of the heap (its effect: test_units)
    monkeypatch.setattr(neoxq.optimize, "keep_temporaries_out_of_heaps", lambda: held.append(True))
    # the first pass layer by layer, as when the fp32 model does not fit --max-memory (its sums equal
    # the in-memory pass's: test_calibrate)
    opts = OptimizeOptions(texts["calib"], reference=str(trained), ctx=128, first_pass="streamed", max_memory=64 << 30)
    r = quantize_optimized(trained_f16, "Q3_K_M", opts, output=tmp_path / "o.gguf")
    assert held == [True]
    assert r.extra["optimize"]["first_pass"] == "streamed" and all(x["output_error_ratio"] < 1 for x in r.extra["optimize"]["tensors"])
    meta = read_info(r.path).metadata
    assert meta["neoxq.quant_type"] == "Q3_K_M-opt" and meta.get("neoxq.imatrix.sha256")
    assert text_sha256(texts["calib"])[:16] in meta["quantize.imatrix.dataset"]
    assert meta["neoxq.optimize.calibration.sha256"] == text_sha256(texts["calib"])


def test_optimize_bad_input(trained, trained_f16, checkpoints, texts, tmp_path):
    (tmp_path / "c.txt").write_text(texts["calib"])
    base = ("quantize", trained_f16, "--type", "Q4_K_M", "--optimize")
    other = next(iter(checkpoints.values()))
    assert_one_line_error(run_cli(*base, "--calib", tmp_path / "c.txt", "--reference", other, "-o", tmp_path / "c.gguf"), "not the checkpoint")
    assert_one_line_error(run_cli("quantize", trained_f16, "--type", "Q4_K_M", "--reference", trained, "-o", tmp_path / "d.gguf"), "--optimize")
    shim = tmp_path / "sim" / "sitecustomize.py"  # too little memory: refused before any work
    shim.parent.mkdir()
    shim.write_text("import neoxq.core.machine as m\nm.available_memory = lambda: 400 << 20\n")
    assert_one_line_error(
        run_cli(*base, "--calib", tmp_path / "c.txt", "--reference", trained, "-o", tmp_path / "e.gguf", env={"PYTHONPATH": str(shim.parent)}),
        "--optimize on",
        "calibration windows",
        "available",
    )
    assert_one_line_error(
        run_cli(*base, "--calib", tmp_path / "c.txt", "--reference", trained, "--max-memory", "200MB", "-o", tmp_path / "f.gguf"),
        "--optimize on",
        "--max-memory",
    )
    assert_one_line_error(run_cli("quantize", trained_f16, "--type", "Q4_K_M", "--max-memory", "8GB", "-o", tmp_path / "g.gguf"), "--optimize")
    assert_one_line_error(run_cli("quantize", trained_f16, "--type", "Q4_K_M", "--float32", "-o", tmp_path / "h.gguf"), "--float32", "--optimize")
    iq = ("quantize", trained_f16, "--type", "IQ2_XS", "--optimize", "--imatrix", "none", "-o", tmp_path / "i.gguf")
    assert_one_line_error(run_cli(*iq), "IQ2_XS needs an importance matrix")  # no imatrix source at all
    assert not list(tmp_path.glob("*.gguf"))


def test_optimize_needs_no_calibration_file_nor_reference(trained_f16, texts, tmp_path):
    """No --calib and no --reference: the folder the file was converted from is found, the model
    samples its own calibration text (recorded, cached), and the file beats stock on held-out text."""
    from neoxq.core.textfile import text_sha256
    from neoxq.runtime.quantize import quantize

    cache = tmp_path / "cache"
    r = run_cli(
        "quantize", trained_f16, "--type", "Q4_K_M", "--optimize", "--ctx", "128", "-o", tmp_path / "opt.gguf", env={"NEOXQ_CACHE": str(cache)}
    )
    assert r.returncode == 0, r.stderr
    meta = read_info(tmp_path / "opt.gguf").metadata
    assert meta["neoxq.optimize.calibration.source"].startswith("self-generated")
    (sample,) = (cache / "self-calibration").iterdir()
    assert text_sha256(sample.read_bytes().decode("utf-8")) == meta["neoxq.optimize.calibration.sha256"]
    stock = quantize(trained_f16, "Q4_K_M", output=tmp_path / "stock.gguf")
    c = paired_kld(tmp_path / "opt.gguf", stock.path, trained_f16, texts["eval"], tmp_path / "kld")
    print(f"self-calibrated opt / stock KLD {c['ratio']:.3f} {c['ci95']}")
    assert c["verdict"] == "better"


def test_float32_flag_runs_every_pass_in_float32(trained, trained_f16, texts, tmp_path):
    """`--optimize --float32`: the method the file records names no bfloat16 pass, on any machine
    (the suffixes exist: the bfloat16 options name them)."""
    from neoxq.optimize import OptimizeOptions

    (tmp_path / "c.txt").write_text(texts["calib"][:6000])
    argv = ("quantize", trained_f16, "--type", "Q4_K_M", "--optimize", "--calib", tmp_path / "c.txt", "--reference", trained, "--ctx", "128")
    r = run_cli(*argv, "--float32", "-o", tmp_path / "f.gguf", "--json", env={"NEOXQ_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    method = json.loads(r.stdout)["optimize"]["method"]
    assert "bf16" not in method and method == OptimizeOptions("", fisher_bf16=False, stream_bf16=False).method
    assert OptimizeOptions("", fisher_bf16=True, stream_bf16=True).method.endswith("+fisher-bf16+quantized-stream-bf16")


@pytest.fixture(scope="module")
def opt_report(trained, texts, tmp_path_factory):
    """`report --optimize` of two types run in this process: its text and report.json."""
    from neoxq.report import ReportOptions, run_report

    folder = tmp_path_factory.mktemp("opt-report")
    text = folder / "t.txt"
    text.write_text(texts["eval"][:24000])  # a quarter calibrates, the rest is scored
    return text, run_report(str(trained), text, folder / "r", ReportOptions(types="F16,Q4_K_M,Q2_K", ctx=128, optimize=True))


def test_report_optimize_rows_compared_with_stock(trained, opt_report):
    from neoxq.optimize import OptimizeOptions
    from neoxq.report import ReportOptions, run_report

    text, rj = opt_report
    rows = {r["type"]: r for r in json.loads(rj.read_text())["results"]}
    assert list(rows) == ["F16", "Q4_K_M", "Q2_K", "Q4_K_M-opt", "Q2_K-opt"]
    for t in ("Q4_K_M", "Q2_K"):
        opt = rows[f"{t}-opt"]
        assert opt["optimize"]["method"] == OptimizeOptions("").resolved().method and opt["size_bytes"] - rows[t]["size_bytes"] < 1024
        assert opt["vs_stock"]["stock"] == t and opt["vs_stock"]["kld"]["verdict"] == "better"
    md = (rj.parent / "report.md").read_text()
    assert "| Q4_K_M-opt |" in md and "better" in md
    # a rerun reuses the optimised files (same source, method, imatrix and calibration text)
    stamps = {t: (rj.parent / rows[t]["file"]).stat().st_mtime_ns for t in ("Q4_K_M-opt", "Q2_K-opt")}
    run_report(str(trained), text, rj.parent, ReportOptions(types="F16,Q4_K_M,Q2_K", ctx=128, optimize=True))
    assert {t: (rj.parent / rows[t]["file"]).stat().st_mtime_ns for t in stamps} == stamps


def test_report_optimize_types_as_ray_tasks_give_the_local_files(trained, opt_report, tmp_path):
    """`report --optimize --ray`: the types after the first optimised as Ray tasks, reading the first
    one's calibration pass from the cache (a cache of its own: nothing of the local run's), write
    the very files and rows of the local run; --ray without --optimize is refused in one line before
    any work (the contradiction)."""
    pytest.importorskip("ray")

    text, local = opt_report
    env = {"NEOXQ_CACHE": str(tmp_path / "cache")}
    base = ("report", trained, "--text", text, "--types", "F16,Q4_K_M,Q2_K", "--ctx", "128", "--optimize", "--quiet")
    ray = run_cli(*base, "--ray", "-o", tmp_path / "ray", env=env, timeout=900, separate=True)
    assert ray.returncode == 0, ray.stderr
    assert len(list((tmp_path / "cache" / "calibration").glob("*.npz"))) == 1  # one pass for both types
    rows = {r["type"]: r for r in json.loads(local.read_text())["results"]}
    ray_rows = {r["type"]: r for r in json.loads((tmp_path / "ray" / "report.json").read_text())["results"]}
    for t in ("Q4_K_M-opt", "Q2_K-opt"):
        assert (tmp_path / "ray" / rows[t]["file"]).read_bytes() == (local.parent / rows[t]["file"]).read_bytes(), t
        assert ray_rows[t]["kld_mean"] == rows[t]["kld_mean"]
    refused = run_cli("report", trained, "--text", text, "--types", "Q4_K_M", "--ray", "-o", tmp_path / "no")
    assert_one_line_error(refused, "add --optimize")
    assert not (tmp_path / "no").exists()


def test_optimized_mix_beats_the_mix_alone(trained, trained_f16, texts, tmp_path):
    """--optimize --mix: a measured mix among the types neoxq re-rounds (same sensitivities as --mix
    alone with the same imatrix), levels chosen against the model's output; lower held-out KLD than
    the mix alone, within the same budget."""
    from neoxq.convert.imatrix import compute_imatrix
    from neoxq.core.imatrix_io import write_imatrix
    from neoxq.core.stats import compare
    from neoxq.optimize import MIX_TYPES, OptimizeOptions, quantize_optimized
    from neoxq.core.mix_plan import MixOptions
    from neoxq.mix import quantize_mix
    from neoxq.runtime.model import NeoxModel, RuntimeOptions
    from neoxq.runtime.score import GGUFReference, kld

    im = write_imatrix(tmp_path / "im.gguf", compute_imatrix(str(trained), texts["calib"], ctx=128, include_output=True))
    mix = quantize_mix(
        trained_f16, "Q4_K_M", MixOptions(texts["calib"], ctx=128, cache_dir=tmp_path / "mc"), output=tmp_path / "mix.gguf", imatrix=im
    )
    om = quantize_optimized(
        trained_f16,
        "Q4_K_M",
        OptimizeOptions(texts["calib"], reference=str(trained), imatrix=str(im), ctx=128, mix=True),
        output=tmp_path / "om.gguf",
    )
    assert om.label == "Q4_K_M-opt-mix"
    # the plan may only choose types neoxq re-rounds (any other would keep llama.cpp's error)
    assert set(om.extra["mix"]["types"].values()) <= set(MIX_TYPES)
    # and is not judged by llama.cpp's rounding of its types, which this file does not have (--mix's guard)
    assert om.extra["mix"]["calibration_check"] is None and mix.extra["mix"]["calibration_check"]["probes"] == 2
    assert {t["name"]: t["type"] for t in om.tensors if t["name"] in om.extra["mix"]["types"]} == om.extra["mix"]["types"]
    assert om.size_bytes <= om.extra["mix"]["target_bytes"] + 1024  # within the mix's budget (provenance keys aside)
    scores = []
    for p in (om.path, mix.path):
        with NeoxModel(p, RuntimeOptions(n_ctx=128, n_batch=128)) as m:
            scores.append(kld(m, GGUFReference(trained_f16), texts["eval"], 128, cache_dir=tmp_path / "cache").tokens)
    c = compare(*scores)
    print(f"opt-mix / mix KLD {c['kld']['ratio']:.3f} {c['kld']['ci95']}")
    assert c["kld"]["verdict"] == "better"


def _kill_at_layer(folder, layer: int, sig: str):
    """A sitecustomize that sends `sig` to its own process once the sequential pass has finished
    `layer` layers (after that progress is saved)."""
    shim = folder / "sitecustomize.py"
    folder.mkdir()
    shim.write_text(
        "import os, signal\nimport neoxq.core.resume as r\n_save = r.ResumeState.save\n"
        "def save(self, progress):\n    _save(self, progress)\n"
        f"    if progress.get('layers_done') == {layer}:\n        os.kill(os.getpid(), signal.{sig})\n"
        "r.ResumeState.save = save\n"
    )
    return str(folder)


def _kill_inside_layer(folder, layer: int):
    """A sitecustomize that SIGKILLs its own process inside `layer`, once the first matmul of it
    has been rewritten in place (and flushed to the file, as a large write would be)."""
    from neoxq.convert.calibrate import STAGES

    calls = layer * sum(len(s) for s in STAGES) + 1
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(
        "import os, signal\nimport neoxq.rewrite as r\n_rq = r._LayerRounding.requantize\nn = [0]\n"
        "def requantize(self, name, mom):\n    out = _rq(self, name, mom)\n    n[0] += 1\n"
        f"    if n[0] == {calls}:\n        self.f.flush()\n        os.kill(os.getpid(), signal.SIGKILL)\n    return out\n"
        "r._LayerRounding.requantize = requantize\n"
    )
    return str(folder)


def test_killed_optimize_resumes_from_its_last_layer_and_ctrl_c_leaves_nothing(trained, trained_f16, texts, tmp_path):
    """SIGKILL inside layer 1, its first matmul already rewritten in place: no output, the work
    kept; the rerun says it resumes from layer 1, puts that matmul back as it was, and writes the
    very bytes an uninterrupted run writes, then removes the work. A run that reads the
    first pass's cached statistics writes those bytes too. Ctrl-C: exit 130, no
    output, no work left (negative control: the kill really stopped a run that would have finished)."""
    (tmp_path / "c.txt").write_text(texts["calib"][:6000])  # a few windows: four runs
    env = {"NEOXQ_CACHE": str(tmp_path / "cache")}
    base = ("quantize", trained_f16, "--type", "Q4_K_M", "--optimize", "--calib", tmp_path / "c.txt", "--reference", trained, "--ctx", "128")
    work = tmp_path / "cache" / "optimize"
    assert run_cli(*base, "-o", tmp_path / "full.gguf", "--quiet", env=env).returncode == 0
    assert not any(work.iterdir())
    # the first pass is kept for the next run of this checkpoint and text, and changes no byte
    assert len(list((tmp_path / "cache" / "calibration").glob("*.npz"))) == 1
    assert run_cli(*base, "-o", tmp_path / "again.gguf", "--quiet", env=env).returncode == 0
    assert (tmp_path / "again.gguf").read_bytes() == (tmp_path / "full.gguf").read_bytes()
    killed = run_cli(*base, "-o", tmp_path / "k.gguf", env={**env, "PYTHONPATH": _kill_inside_layer(tmp_path / "k", 1)})
    assert killed.returncode == -9 and not (tmp_path / "k.gguf").exists()
    assert [json.loads(p.read_text())["layers_done"] for p in work.glob("*/state.json")] == [1]
    assert [p.name for p in work.glob("*/originals/*.npz")] == ["blk.1.attn_qkv.weight.npz"]
    resumed = run_cli(*base, "-o", tmp_path / "k.gguf", "--json", env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["optimize"]["resumed_from_layer"] == 1
    assert (tmp_path / "k.gguf").read_bytes() == (tmp_path / "full.gguf").read_bytes()
    assert not any(work.iterdir())
    stopped = run_cli(*base, "-o", tmp_path / "c.gguf", env={**env, "PYTHONPATH": _kill_at_layer(tmp_path / "c", 1, "SIGINT")})
    assert stopped.returncode == 130 and not (tmp_path / "c.gguf").exists()
    assert not any(work.iterdir()) and not list(tmp_path.glob(".*.partial"))


@pytest.mark.parametrize("fmt", GRID_FORMATS, ids=lambda f: f.name)
def test_gptq_sweep_equals_the_textbook_column_loop(fmt):
    """The blocked, transposed sweep against GPTQ written plainly (one column at a time, the whole
    rest of the row updated each time): the same levels, up to rare ties of float rounding."""
    h, w, fmt, _, a, m = _correlated_problem(3, 2048, 512, 48, 0.2, fmt)
    perm, u = gptq.compensation(h, True)
    wp, ap, mp = (np.asarray(z, np.float64)[:, perm].copy() for z in (w, a, m))
    plain = np.empty(w.shape, np.int16)
    for j in range(w.shape[1]):
        li = gptq.nearest(wp[:, j], ap[:, j], mp[:, j], fmt.lmin, fmt.lmax, fmt.points)
        e = (wp[:, j] - (ap[:, j] * li - mp[:, j])) / u[j, j]
        wp[:, j + 1 :] -= np.outer(e, u[j, j + 1 :])
        plain[:, perm[j]] = li
    ours = gptq.gptq_levels(w, h, a, m, fmt.lmin, fmt.lmax, points=fmt.points)
    assert (ours == plain).mean() > 0.999 and not np.array_equal(ours, gptq.nearest(w, a, m, fmt.lmin, fmt.lmax, fmt.points))


def test_accumulated_moments_equal_the_direct_products():
    """The sequential pass's sums (float32 products per group, only the upper blocks of Σ x xᵀ
    computed and mirrored) against numpy's float64 products of the same rows."""
    import torch

    from neoxq.convert.calibrate import _Accumulator

    rng = np.random.default_rng(5)
    xs = [rng.standard_normal((3, 40, 100)).astype(np.float32) for _ in range(2)]
    ys = [rng.standard_normal((3, 40, 30)).astype(np.float32) for _ in range(2)]
    acc = _Accumulator()
    for x, y in zip(xs, ys):
        acc.add(torch.from_numpy(y), torch.from_numpy(x))
    mom = acc.moments()
    x, y = (np.concatenate([z.reshape(-1, z.shape[-1]) for z in zs]).astype(np.float64) for zs in (xs, ys))
    assert np.allclose(mom.hq, x.T @ x, rtol=1e-5, atol=1e-3) and np.allclose(mom.hq, mom.hq.T)
    assert np.allclose(mom.yx, y.T @ x, rtol=1e-5, atol=1e-3) and mom.n == len(x)


def test_sampled_tokens_follow_the_models_distribution():
    """The Fisher's labels are drawn from softmax(logits): frequencies over many draws match the
    probabilities (within 5 standard errors), and a uniform draw would not (negative control)."""
    import torch

    from neoxq.convert.calibrate import sampled_log_likelihood

    probs = torch.softmax(torch.linspace(-4, 3, 40), 0)
    logits = torch.log(probs).repeat(20000, 1).requires_grad_(True)
    (g,) = torch.autograd.grad(sampled_log_likelihood(logits, torch.Generator().manual_seed(0)), logits)
    counts = (g + torch.softmax(logits, -1)).detach().sum(0)  # ∂ log p_y / ∂ logits = onehot(y) − p
    se = torch.sqrt(20000 * probs * (1 - probs))
    assert torch.all((counts - 20000 * probs).abs() < 5 * se)
    assert not torch.all((20000 / 40 - 20000 * probs).abs() < 5 * se)


def test_moments_through_the_matrix_equal_the_outputs_moments():
    """The output matrix's moments from its inputs' (Σ x_f x_qᵀ, Σ x_f x_fᵀ, Σ x_f and W) against
    those summed from y_f = W x_f itself; and the pass picks that route only where it is cheaper."""
    import torch

    from neoxq.convert.calibrate import _Accumulator, _through_inputs_cheaper

    rng = np.random.default_rng(6)
    xf = rng.standard_normal((2, 300, 24)).astype(np.float32)
    xq = (xf + 0.1 * rng.standard_normal(xf.shape)).astype(np.float32)
    w = rng.standard_normal((70, 24)).astype(np.float32)
    acc, grams = _Accumulator(), _Accumulator()
    for f, q in zip(xf, xq):
        acc.add(torch.from_numpy(f), torch.from_numpy(q))
        grams.add_inputs(torch.from_numpy(f))
    ours = gptq.Moments.through(acc.moments(), grams.gram(), w)
    direct = gptq.Moments.of(xf.reshape(-1, 24).astype(np.float64) @ w.T, xq.reshape(-1, 24))
    for k in ("hq", "yx", "sum_y", "yy", "sum_q"):
        assert np.allclose(getattr(ours, k), getattr(direct, k), rtol=1e-4, atol=1e-2), k
    assert ours.n == direct.n == 600
    assert _through_inputs_cheaper(4096, 50304, 1024) and not _through_inputs_cheaper(512, 50304, 1024)


def test_row_coupling_lowers_the_output_fisher_loss_and_is_plain_gptq_for_a_diagonal_fisher():
    """gptq.coupled_levels minimises tr(E H Eᵀ G) with G per group of rows (an attention head's
    output Fisher): on an anisotropic G it is far below GPTQ's rows rounded alike; with a diagonal
    G there is nothing to move between rows and it gives GPTQ's very levels (negative control)."""
    h, w, fmt, _, a, m = _correlated_problem(7, 2048, 256, 96, 0.3)
    rng = np.random.default_rng(7)
    groups, k = 4, 24
    rows = np.arange(groups * k).reshape(groups, k)
    f = rng.standard_normal((groups, k, k)) * np.logspace(0, -2, k)
    g = np.einsum("gij,gkj->gik", f, f) + 1e-4 * np.eye(k)
    factor = gptq.compensation(h)

    def loss(lv, g):
        e = np.asarray(w, np.float64) - (a * lv - m)
        return sum(np.trace(e[r] @ h @ e[r].T @ gi) for r, gi in zip(rows, g))

    plain = gptq.gptq_levels(w, h, a, m, fmt.lmin, fmt.lmax, factor=factor)
    coupled = gptq.coupled_levels(w, a, m, fmt.lmin, fmt.lmax, factor, gptq.RowCoupling.of(g, rows))
    assert loss(coupled, g) < 0.6 * loss(plain, g)
    diag = np.stack([np.diag(np.diag(gi)) for gi in g])
    assert np.array_equal(gptq.coupled_levels(w, a, m, fmt.lmin, fmt.lmax, factor, gptq.RowCoupling.of(diag, rows)), plain)


@pytest.mark.parametrize("fmt", GRID_FORMATS, ids=lambda f: f.name)
def test_coupled_waves_equal_the_step_by_step_loop(fmt):
    """coupled_levels' waves of (row step, column block) pairs against the rows rounded one step at
    a time — GPTQ per step, its residual moved onto the later rows through G — as written plainly:
    the same levels, on a width that is not a multiple of the block (padded) and rows in any order;
    the plain loop itself differs from GPTQ without coupling (the check is not vacuous)."""
    h, w, fmt, _, a, m = _correlated_problem(11, 2048, 256, 36, 0.3, fmt)
    rng = np.random.default_rng(11)
    groups, k = 3, 12
    rows = rng.permutation(groups * k).reshape(groups, k)
    f = rng.standard_normal((groups, k, k)) * np.logspace(0, -2, k)
    coupling = gptq.RowCoupling.of(np.einsum("gij,gkj->gik", f, f) + 1e-4 * np.eye(k), rows)
    factor = gptq.compensation(h)
    target, plain = np.array(w, np.float64), np.zeros(w.shape, np.int16)
    u = coupling.u
    for t, step in enumerate(coupling.order):
        plain[step] = lv = gptq.gptq_levels(target[step], None, a[step], m[step], fmt.lmin, fmt.lmax, factor=factor, points=fmt.points)
        r = target[step] - (np.asarray(a[step], np.float64) * lv - m[step])
        for t2 in range(t + 1, k):
            target[coupling.order[t2]] -= (u[:, t, t2] / u[:, t, t])[:, None] * r
    ours = gptq.coupled_levels(w, a, m, fmt.lmin, fmt.lmax, factor, coupling, block=96, points=fmt.points)
    assert (ours == plain).mean() > 0.999
    assert not np.array_equal(plain, gptq.gptq_levels(w, None, a, m, fmt.lmin, fmt.lmax, factor=factor, points=fmt.points))


def test_equalisation_scales_flatten_the_inputs_and_keep_dead_channels():
    from neoxq.core.equalize import norm_pairs, scales

    x = np.array([1.0, 1.0, 40.0, 0.0, 2.0])
    w = np.array([1.0, 1.0, 1.0, 1.0, 0.0])
    s = scales(x, w)
    assert s[3] == 1.0 and s[4] == 1.0  # a channel that never fired, a dead column
    live = s[:3]
    flat = x[:3] / live  # α = 1/2: the inputs' spread becomes its square root (40× → √40×)
    assert np.isclose(np.exp(np.log(live).mean()), 1.0) and np.isclose(flat.max() / flat.min(), np.sqrt(40.0))
    assert [p.norm for p in norm_pairs(2)] == ["blk.0.attn_norm", "blk.0.ffn_norm", "blk.1.attn_norm", "blk.1.ffn_norm", "output_norm"]


def test_equalized_source_is_the_same_model(trained_f16, tmp_path):
    """Each LayerNorm → matmul pair computes the same outputs after equalisation (up to F16
    rounding of the rescaled weights); the weights and norms did change (negative control)."""
    from neoxq.core.equalize import norm_pairs
    from neoxq.core.gguf_info import float_rows, read_info
    from neoxq.equalized import equalized_source

    src = read_info(trained_f16)
    rng = np.random.default_rng(3)
    pairs = norm_pairs(sum(t.name.endswith("attn_qkv.weight") for t in src.tensors))
    hidden = src.tensor("output_norm.weight").shape[0]
    absmax = {p.matmul: rng.uniform(0.1, 30, hidden) for p in pairs}
    eq, used = equalized_source(src, absmax, tmp_path / "eq.gguf")
    assert set(used) == {p.matmul for p in pairs}
    z = rng.standard_normal((64, hidden)).astype(np.float32)  # a normalised input
    for p in pairs:
        outs = []
        for info in (src, eq):
            nw, nb = (float_rows(info, info.tensor(p.norm + s)).reshape(-1) for s in (".weight", ".bias"))
            outs.append((z * nw + nb) @ float_rows(info, info.tensor(p.matmul)).T)
        assert np.abs(outs[0] - outs[1]).max() <= 3e-3 * np.abs(outs[0]).max(), p.matmul
        assert not np.array_equal(float_rows(src, src.tensor(p.matmul)), float_rows(eq, eq.tensor(p.matmul)))


def test_equalized_copy_refused_in_one_line_when_the_cache_disk_is_full(trained_f16, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from neoxq.core.errors import OutputError
    from neoxq.core.gguf_info import read_info
    from neoxq.equalized import equalized_source

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(1, 1, 10))
    with pytest.raises(OutputError, match="NEOXQ_CACHE"):
        equalized_source(read_info(trained_f16), {}, tmp_path / "eq.gguf")
    assert not (tmp_path / "eq.gguf").exists()


def test_convert_quant_optimize_needs_nothing_else(ckpt, tmp_path):
    """`convert CKPT --quant T --optimize`: the base file and `<T>-opt`, calibrated on the model's own
    sample; run again, both are reused. Contradicting options are refused before any work."""
    env = {"NEOXQ_CACHE": str(tmp_path / "cache")}
    argv = ("convert", ckpt, "--quant", "Q8_0", "--optimize", "--ctx", "32", "-o", tmp_path)
    first = run_cli(*argv, env=env)
    assert first.returncode == 0, first.stderr
    made = sorted(p.name for p in tmp_path.glob("*.gguf"))
    assert any(n.endswith("-Q8_0-opt.gguf") for n in made) and any(n.endswith("-F16.gguf") for n in made) and len(made) == 2
    opt = next(tmp_path.glob("*-Q8_0-opt.gguf"))
    assert read_info(opt).metadata["neoxq.optimize.calibration.source"].startswith("self-generated")
    mtime = opt.stat().st_mtime_ns
    again = run_cli(*argv, env=env)
    assert again.returncode == 0 and again.stdout == first.stdout and opt.stat().st_mtime_ns == mtime  # reused
    out = tmp_path / "refused"
    assert_one_line_error(run_cli("convert", ckpt, "--optimize", "-o", out), "--quant")
    assert_one_line_error(run_cli("convert", ckpt, "--quant", "Q8_0", "--calib", tmp_path / "x.txt", "-o", out), "--optimize")
    assert_one_line_error(run_cli("convert", ckpt, "--quant", "F16,Q8_0", "--optimize", "-o", out), "float")
    assert not out.exists()


def test_optimized_mix_at_any_budget(ckpt, tmp_path):
    """`--optimize --mix --target-bpw B`: an optimised mix within B bits per weight; a budget below
    every tensor at its smallest type, or a budget without --mix, is refused before any work."""
    from neoxq.convert.converter import convert
    from neoxq.optimize import MIX_TYPES

    f16 = convert(str(ckpt), "f16", out_dir=tmp_path)
    env = {"NEOXQ_CACHE": str(tmp_path / "cache")}
    base = ("quantize", f16, "--type", "Q8_0", "--optimize", "--ctx", "32")
    r = run_cli(*base, "--mix", "--target-bpw", "7", "-o", tmp_path / "m.gguf", "--json", env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    info = read_info(tmp_path / "m.gguf")
    assert out["type"] == "Q8_0-opt-mix" and out["mix"]["target_bytes"] == int(7 * info.n_params / 8) >= out["size_bytes"]
    assert set(out["mix"]["types"].values()) <= set(MIX_TYPES)  # only types whose levels are re-chosen
    assert_one_line_error(run_cli(*base, "--mix", "--target-bpw", "1", "-o", tmp_path / "s.gguf"), "below the smallest mix", "--target-bpw")
    assert_one_line_error(run_cli(*base, "--target-bpw", "7", "-o", tmp_path / "t.gguf"), "--mix")
    assert not (tmp_path / "s.gguf").exists() and not (tmp_path / "t.gguf").exists()


# Q5_1 differs from Q4_1 only in its block layout, IQ4_NL from IQ4_XS only in its header, the other
# codebook types from IQ2_XS in theirs: test_blocks, test_iq_blocks and test_gptvq cover those
@pytest.mark.parametrize("qtype", ["Q4_1", "IQ2_XS"])
def test_more_types_are_optimised(qtype, trained_f16, trained_imatrix, texts, tmp_path):
    """Q4_1 (value = d·L + m per block of 32) and IQ2_XS (a grid row and signs per 8 weights, with
    IQ4_NL where rows are too short for it): llama.cpp's own file with levels re-chosen, the same
    tensor types, lower KLD on held-out text than stock's (with the imatrix where llama.cpp needs
    one), and it runs."""
    from neoxq.core.qtypes import QuantType
    from neoxq.runtime.quantize import quantize

    r = run_cli(
        "quantize", trained_f16, "--type", qtype, "--optimize", "--ctx", "128", "-o", tmp_path / "opt.gguf", env={"NEOXQ_CACHE": str(tmp_path / "c")}
    )
    assert r.returncode == 0, r.stderr
    im = trained_imatrix if QuantType(qtype).needs_imatrix else None
    stock = quantize(trained_f16, qtype, output=tmp_path / "stock.gguf", imatrix=im)
    opt_types = {t.name: t.type for t in read_info(tmp_path / "opt.gguf").tensors}
    assert opt_types == {t.name: t.type for t in read_info(stock.path).tensors} and qtype.split("_M")[0] in opt_types.values()
    c = paired_kld(tmp_path / "opt.gguf", stock.path, trained_f16, texts["eval"], tmp_path / "kld")
    print(f"{qtype}-opt / stock KLD {c['ratio']:.3f} {c['ci95']}")
    assert c["verdict"] == "better"
    gen = run_cli("run", tmp_path / "opt.gguf", "-p", "def ", "-n", "4", "--temp", "0", "--ctx", "128")
    assert gen.returncode == 0 and len(gen.stdout) > len("def ")


@pytest.mark.parametrize("qtype", ["Q4_K_M", "F16"])
def test_rows_of_a_tensor_decode_as_the_whole(trained_f16, qtype, tmp_path):
    """The sequential pass decodes only the embedding rows its windows use: the same values as
    those rows of the whole tensor decoded, for a block format neoxq encodes and for a float type;
    rows out of order and repeated."""
    from neoxq.core.tensor_file import TensorFile
    from neoxq.rewrite import _LayerRounding
    from neoxq.runtime.quantize import quantize

    path = trained_f16 if qtype == "F16" else quantize(trained_f16, qtype, output=tmp_path / f"{qtype}.gguf").path
    rows = np.array([7, 0, 7, 63, 2])
    with TensorFile(path) as f:
        r = _LayerRounding(f, read_info(path), None, rows, {}, None)
        whole = r.current("token_embd.weight")[0]
        some = r.current_rows("token_embd.weight", rows)
    assert some.shape == (len(rows), whole.shape[1]) and np.array_equal(some, whole[rows])
    assert not np.array_equal(some, whole[rows + 1])  # negative control: other rows differ
