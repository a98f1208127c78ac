"""`neoxq quantize --optimize` (issue 26): llama.cpp's tensor types and block headers, levels chosen
by GPTQ on llama.cpp's grids against each layer's output; lower held-out KLD than stock with the same
imatrix (paired), loads and runs in llama.cpp; bad input in one line; GPTQ's arithmetic on arrays."""

from __future__ import annotations

import json

import numpy as np
import pytest

from neoxq.core import blocks, gptq

from .helpers import assert_one_line_error, run_cli


def test_gptq_lowers_output_error_on_correlated_inputs_and_is_rtn_on_diagonal_ones():
    from neoxq.runtime import capi

    rng = np.random.default_rng(0)
    x = rng.standard_normal((4096, 256)) @ (np.eye(256) + 0.3 * rng.standard_normal((256, 256)))
    h = x.T @ x / len(x)
    w = (0.05 * rng.standard_normal((64, 256))).astype(np.float32)
    fmt = blocks.Q4_K
    raw = capi.quantize_rows(w, fmt.ggml_type, np.diag(h).astype(np.float32)).reshape(-1, fmt.size)
    a, m = (g.reshape(w.shape) for g in blocks.grid(fmt, raw))
    stock = blocks.values(fmt, raw).reshape(w.shape)
    lv = gptq.gptq_levels(w, h, a, m, fmt.lmin, fmt.lmax)
    ours = capi.dequantize(blocks.with_levels(fmt, raw, lv.reshape(-1, fmt.block)), fmt.ggml_type, w.size).reshape(w.shape)
    assert gptq.output_error(w, ours, h) < 0.7 * gptq.output_error(w, stock, h)
    # negative control: with uncorrelated inputs there is nothing to compensate — nearest rounding
    diag = np.diag(np.diag(h))
    assert np.array_equal(gptq.gptq_levels(w, diag, a, m, fmt.lmin, fmt.lmax), gptq.nearest(w, a, m, fmt.lmin, fmt.lmax))


def test_dynamic_grids_rechoose_each_block_from_compensated_weights():
    """regrid is asked once per block column, with the weights as compensation left them, in
    natural order; the levels it gets back lie on the grids it returned."""
    from neoxq.runtime import capi

    rng = np.random.default_rng(1)
    x = rng.standard_normal((2048, 64)) @ (np.eye(64) + 0.3 * rng.standard_normal((64, 64)))
    h = x.T @ x / len(x)
    w = (0.05 * rng.standard_normal((16, 64))).astype(np.float32)
    fmt = blocks.Q8_0
    raw = capi.quantize_rows(w, fmt.ggml_type).reshape(16, 2, fmt.size)
    asked, grids = [], {}

    def regrid(rows, col, wcur):
        asked.append(col)
        new = capi.quantize_rows(wcur.astype(np.float32), fmt.ggml_type)
        raw[rows, col // 32] = new
        grids[col] = blocks.grid(fmt, new)
        return grids[col]

    a, m = (g.reshape(w.shape) for g in blocks.grid(fmt, raw.reshape(-1, fmt.size)))
    lv = gptq.gptq_levels(w, h, a, m, fmt.lmin, fmt.lmax, regrid=regrid, group=32)
    assert asked == [0, 32]
    vals = capi.dequantize(blocks.with_levels(fmt, raw.reshape(-1, fmt.size), lv.reshape(-1, 32)), fmt.ggml_type, w.size).reshape(w.shape)
    for col, (ga, gm) in grids.items():
        assert np.allclose(vals[:, col:col + 32], ga * lv[:, col:col + 32] - gm)


@pytest.fixture(scope="module")
def optimized(trained, trained_f16, texts, tmp_path_factory):
    from neoxq.convert.imatrix import compute_imatrix
    from neoxq.core.imatrix_io import write_imatrix
    from neoxq.runtime.quantize import quantize

    d = tmp_path_factory.mktemp("opt")
    (d / "calib.txt").write_text(texts["calib"])
    im = write_imatrix(d / "im.gguf", compute_imatrix(str(trained), texts["calib"], ctx=128, include_output=True))
    # the same imatrix for both files, so their grids (llama.cpp's search) must be identical
    proc = run_cli("quantize", trained_f16, "--type", "Q4_K_M", "--optimize", "--calib", d / "calib.txt", "--reference", trained,
                   "--imatrix", im, "--ctx", "128", "-o", d / "opt.gguf", "--json", "--quiet")
    assert proc.returncode == 0, proc.stderr
    stock = quantize(trained_f16, "Q4_K_M", output=d / "stock-im.gguf", imatrix=im)
    return d, json.loads(proc.stdout), stock


def test_optimized_file_is_llama_cpps_file_with_other_levels(optimized):
    from neoxq.core.gguf_info import read_info

    d, res, stock = optimized
    opt, ref = read_info(d / "opt.gguf"), read_info(stock.path)
    assert res["type"] == "Q4_K_M-opt" and opt.metadata["neoxq.optimize.method"] == "gptq-on-llama.cpp-grids"
    assert opt.metadata["neoxq.imatrix.sha256"] == ref.metadata["neoxq.imatrix.sha256"]
    assert [(t.name, t.type, t.n_bytes) for t in opt.tensors] == [(t.name, t.type, t.n_bytes) for t in ref.tensors]
    changed = 0
    for t, s in zip(opt.tensors, ref.tensors):
        a = np.fromfile(opt.path, np.uint8, t.n_bytes, offset=opt.data_offset + t.offset)
        b = np.fromfile(ref.path, np.uint8, s.n_bytes, offset=ref.data_offset + s.offset)
        fmt = blocks.FORMATS.get(t.type)
        if fmt is None or len(t.shape) < 2:
            assert np.array_equal(a, b), t.name  # not optimised: llama.cpp's bytes
            continue
        hdr = np.ones(fmt.size, bool)
        for f in fmt.fields:
            hdr[f.bytes] = False
        assert np.array_equal(a.reshape(-1, fmt.size)[:, hdr], b.reshape(-1, fmt.size)[:, hdr]), t.name  # the same grids
        changed += not np.array_equal(a, b)
    assert changed >= 18  # every matmul and the embedding got new levels
    shown = run_cli("info", d / "opt.gguf")
    assert shown.returncode == 0 and "gptq-on-llama.cpp-grids on" in shown.stdout and "calibration tokens" in shown.stdout
    assert all(x["output_error_ratio"] < 1 for x in res["optimize"]["tensors"])


def test_optimized_beats_stock_with_the_same_imatrix_and_runs(optimized, trained_f16, texts):
    from neoxq.core.stats import compare
    from neoxq.runtime.model import NeoxModel, RuntimeOptions
    from neoxq.runtime.score import GGUFReference, kld

    d, _, stock = optimized
    scores = {}
    for name, path in (("opt", d / "opt.gguf"), ("stock", stock.path)):
        with NeoxModel(path, RuntimeOptions(n_ctx=128, n_batch=128)) as m:
            scores[name] = kld(m, GGUFReference(trained_f16), texts["eval"], 128, cache_dir=d / "cache")
    c = compare(scores["opt"].tokens, scores["stock"].tokens)
    print(f"opt/stock+imatrix KLD {c['kld']['ratio']:.3f} {c['kld']['ci95']}")
    assert c["kld"]["verdict"] == "better"
    gen = run_cli("run", d / "opt.gguf", "-p", "def ", "-n", "8", "--temp", "0", "--ctx", "128")
    assert gen.returncode == 0 and len(gen.stdout) > len("def ")


def test_optimize_default_imatrix_comes_from_the_calibration_pass(trained, trained_f16, texts, tmp_path):
    from neoxq.core.gguf_info import read_info
    from neoxq.core.textfile import text_sha256
    from neoxq.optimize import OptimizeOptions, quantize_optimized

    r = quantize_optimized(trained_f16, "Q3_K_M", OptimizeOptions(texts["calib"], reference=str(trained), ctx=128), output=tmp_path / "o.gguf")
    meta = read_info(r.path).metadata
    assert meta["neoxq.quant_type"] == "Q3_K_M-opt" and meta.get("neoxq.imatrix.sha256")
    assert text_sha256(texts["calib"])[:16] in meta["quantize.imatrix.dataset"]
    assert meta["neoxq.optimize.calibration.sha256"] == text_sha256(texts["calib"])


def test_optimize_bad_input(trained, trained_f16, checkpoints, texts, tmp_path):
    (tmp_path / "c.txt").write_text(texts["calib"])
    base = ("quantize", trained_f16, "--type", "Q4_K_M", "--optimize")
    assert_one_line_error(run_cli(*base, "-o", tmp_path / "a.gguf"), "--calib")
    assert_one_line_error(run_cli(*base, "--calib", tmp_path / "c.txt", "-o", tmp_path / "b.gguf"), "--reference")
    other = next(iter(checkpoints.values()))
    assert_one_line_error(run_cli(*base, "--calib", tmp_path / "c.txt", "--reference", other, "-o", tmp_path / "c.gguf"),
                          "not the checkpoint")
    assert_one_line_error(run_cli("quantize", trained_f16, "--type", "Q4_K_M", "--reference", trained, "-o", tmp_path / "d.gguf"), "--optimize")
    shim = tmp_path / "sim" / "sitecustomize.py"  # too little memory: refused before any work
    shim.parent.mkdir()
    shim.write_text("import neoxq.core.machine as m\nm.available_memory = lambda: 400 << 20\n")
    assert_one_line_error(run_cli(*base, "--calib", tmp_path / "c.txt", "--reference", trained, "-o", tmp_path / "e.gguf",
                                  env={"PYTHONPATH": str(shim.parent)}), "--optimize on", "calibration moments", "available")
    assert not list(tmp_path.glob("*.gguf"))


def test_report_optimize_rows_compared_with_stock(trained, texts, tmp_path):
    from neoxq.report import ReportOptions, run_report

    (tmp_path / "t.txt").write_text(texts["eval"] + texts["calib"])
    rj = run_report(str(trained), tmp_path / "t.txt", tmp_path / "r", ReportOptions(types="F16,Q4_K_M", ctx=128, optimize=True))
    data = json.loads(rj.read_text())
    rows = {r["type"]: r for r in data["results"]}
    assert list(rows) == ["F16", "Q4_K_M", "Q4_K_M-opt"]
    opt = rows["Q4_K_M-opt"]
    assert opt["optimize"]["method"] == "gptq-on-llama.cpp-grids" and opt["size_bytes"] - rows["Q4_K_M"]["size_bytes"] < 1024
    assert opt["vs_stock"]["stock"] == "Q4_K_M" and opt["vs_stock"]["kld"]["verdict"] == "better"
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| Q4_K_M-opt |" in md and "better" in md
    # a rerun reuses the optimised file (same source, method, imatrix and calibration text)
    stamp = (tmp_path / "r" / opt["file"]).stat().st_mtime_ns
    run_report(str(trained), tmp_path / "t.txt", tmp_path / "r", ReportOptions(types="F16,Q4_K_M", ctx=128, optimize=True))
    assert (tmp_path / "r" / opt["file"]).stat().st_mtime_ns == stamp


def test_optimized_mix_beats_the_mix_alone(trained, trained_f16, texts, tmp_path):
    """--optimize --mix: the measured mix's types (same plan as --mix alone with the same imatrix),
    levels chosen against each layer's output; lower held-out KLD than the mix alone, no larger."""
    from neoxq.convert.imatrix import compute_imatrix
    from neoxq.core.imatrix_io import write_imatrix
    from neoxq.core.stats import compare
    from neoxq.optimize import OptimizeOptions, quantize_optimized
    from neoxq.runtime.mix import MixOptions, quantize_mix
    from neoxq.runtime.model import NeoxModel, RuntimeOptions
    from neoxq.runtime.score import GGUFReference, kld

    im = write_imatrix(tmp_path / "im.gguf", compute_imatrix(str(trained), texts["calib"], ctx=128, include_output=True))
    mix = quantize_mix(trained_f16, "Q4_K_M", MixOptions(texts["calib"], ctx=128, cache_dir=tmp_path / "mc"), output=tmp_path / "mix.gguf", imatrix=im)
    om = quantize_optimized(trained_f16, "Q4_K_M", OptimizeOptions(texts["calib"], reference=str(trained), imatrix=str(im), ctx=128, mix=True),
                            output=tmp_path / "om.gguf")
    assert om.label == "Q4_K_M-opt-mix" and om.extra["mix"]["types"] == mix.extra["mix"]["types"]
    assert {t["name"]: t["type"] for t in om.tensors} == {t["name"]: t["type"] for t in mix.tensors}
    assert om.size_bytes - mix.size_bytes < 1024  # the same tensor bytes; provenance keys only
    scores = []
    for p in (om.path, mix.path):
        with NeoxModel(p, RuntimeOptions(n_ctx=128, n_batch=128)) as m:
            scores.append(kld(m, GGUFReference(trained_f16), texts["eval"], 128, cache_dir=tmp_path / "cache").tokens)
    c = compare(*scores)
    print(f"opt-mix / mix KLD {c['kld']['ratio']:.3f} {c['kld']['ci95']}")
    assert c["kld"]["verdict"] == "better"
