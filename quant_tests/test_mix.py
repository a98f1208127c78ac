"""Measured mixed precision: lower held-out KLD than llama.cpp's stock mixes at no
larger size, types written as planned, and the allocator's arithmetic on known numbers."""

from __future__ import annotations

import json

import pytest

from neoxq.core.gguf_info import TensorInfo
from neoxq.core.mix_plan import Sensitivity, allocate, hull

from .helpers import assert_one_line_error, run_cli


def test_hull_drops_dominated_and_concave_points():
    pts = [(100, 1.0, "a"), (150, 0.9, "b"), (200, 0.2, "c"), (250, 0.3, "d"), (400, 0.1, "e")]
    # b lies above the chord a–c (saves little per byte), d is dominated by c.
    assert [p[2] for p in hull(pts)] == ["a", "c", "e"]


def test_allocate_spends_bytes_where_kld_falls_most():
    a = TensorInfo("a.weight", "F16", (256, 256), 0, 0)
    b = TensorInfo("b.weight", "F16", (256, 256), 0, 0)
    sens = {
        "a.weight": Sensitivity({}, {}, {"Q2_K": 1.0, "Q4_K": 0.1, "Q8_0": 0.01, "F16": 0.0}),
        "b.weight": Sensitivity({}, {}, {"Q2_K": 0.05, "Q4_K": 0.02, "Q8_0": 0.001, "F16": 0.0}),
    }
    from neoxq.core.mix_plan import tensor_bytes

    cost = lambda t: tensor_bytes(a, t)  # noqa: E731 (same shape for both)
    plan = allocate([a, b], sens, cost("Q4_K") + cost("Q2_K"))
    assert plan == {"a.weight": "Q4_K", "b.weight": "Q2_K"}  # a's upgrade saves 18x more per byte
    assert allocate([a, b], sens, 2 * cost("F16")) == {"a.weight": "F16", "b.weight": "F16"}
    from neoxq.core.errors import UsageError

    with pytest.raises(UsageError, match="smallest mix needs"):
        allocate([a, b], sens, cost("Q2_K"))


def test_sensitivity_fit_through_measured_points():
    s = Sensitivity({"Q2_K": 4.0, "Q4_K": 1.0, "Q8_0": 0.01}, {"Q2_K": 0.08, "Q4_K": 0.01})
    s.fit()
    assert s.kld["Q2_K"] == 0.08 and s.kld["Q4_K"] == 0.01  # measured kept
    assert 0 < s.kld["Q8_0"] < s.kld["Q4_K"] / 10


def test_probe_groups_and_the_split_of_a_group_probe():
    """Single tensors while they fit; else alike tensors of consecutive layers share a probe, and its
    KLD is shared in proportion to their proxy errors (pure: no llama.cpp)."""
    from neoxq.core.mix_plan import measure_types, probe_groups, split_probed

    ts = [TensorInfo(f"blk.{i}.{k}.weight", "F16", (256, 256), 0, 0) for i in range(6) for k in ("attn_qkv", "ffn_up")]
    assert probe_groups(ts, 64) == [[t] for t in ts]
    groups = probe_groups(ts + [TensorInfo("output.weight", "F16", (512, 256), 0, 0)], 5)
    assert len(groups) <= 5 and sorted(t.name for g in groups for t in g) == sorted([t.name for t in ts] + ["output.weight"])
    assert all(len({t.name.split(".", 2)[-1] for t in g}) == 1 for g in groups)  # one kind per group
    errs = {"a": {"Q2_K": 3.0}, "b": {"Q2_K": 1.0}}
    a, b = (TensorInfo(n, "F16", (256, 256), 0, 0) for n in "ab")
    assert split_probed([a, b], 0.4, errs, "Q2_K") == pytest.approx({"a": 0.3, "b": 0.1})
    assert measure_types(a, False, True) == ["Q2_K", "Q4_K"] and measure_types(TensorInfo("c", "F16", (4, 64), 0, 0), False, False) == ["Q4_0"]


def test_cached_sensitivities_are_keyed_by_the_candidate_types(trained_f16, monkeypatch):
    """A sensitivity entry holds proxy errors for the candidates of its day: another candidate list
    is another key, so a type added later is never planned from an entry that lacks it."""
    from neoxq.core.gguf_info import read_info
    from neoxq.runtime import sensitivity

    info = read_info(trained_f16)
    before = sensitivity.sensitivity_key(info, [1, 2, 3], 64, None, True)
    assert sensitivity.sensitivity_key(info, [1, 2, 3], 64, None, True) == before  # negative control: stable
    monkeypatch.setattr(sensitivity, "CANDIDATE_TYPES", [*sensitivity.CANDIDATE_TYPES, "IQ1_M"])
    assert sensitivity.sensitivity_key(info, [1, 2, 3], 64, None, True) != before


def test_types_that_need_an_imatrix_row_are_offered_only_with_one():
    """ggml aborts quantizing IQ2_XXS or IQ2_XS without importance weights: a tensor the imatrix
    has no row for (an embedding, say) is never offered them, and the quantizer call itself refuses
    them as an exception, not an abort."""
    import gguf
    import numpy as np

    from neoxq.core.mix_plan import IQ_ROW_TYPES, candidates
    from neoxq.runtime import capi

    t = TensorInfo("token_embd.weight", "F16", (512, 256), 512 * 256 * 2, 0)
    assert set(IQ_ROW_TYPES) <= set(candidates(t, True)) and not set(IQ_ROW_TYPES) & set(candidates(t, True, imatrix_row=False))
    assert "IQ2_S" in candidates(t, True, imatrix_row=False)
    with pytest.raises(ValueError, match="importance weights"):
        capi.quantize_rows(np.ones((1, 256), np.float32), gguf.GGMLQuantizationType.IQ2_XXS.value)


def test_tensor_budget_counts_the_header_and_the_kept_tensors():
    """The bytes left for the matrices: the target less the header (the call's keys and the mix's own
    at their widest) and the tensors that stay as they are. Pure: a GGUFInfo made by hand."""
    from pathlib import Path

    from neoxq.core.gguf_info import GGUFInfo
    from neoxq.core.gguf_layout import string_kv_bytes
    from neoxq.core.mix_plan import tensor_budget

    mats = [TensorInfo("blk.0.attn_qkv.weight", "F16", (768, 256), 0, 0), TensorInfo("output.weight", "F16", (1000, 256), 0, 0)]
    norm = TensorInfo("blk.0.attn_norm.weight", "F32", (250,), 1000, 0)
    info = GGUFInfo(
        Path("x.gguf"), "gptneox", {"general.quantization_version": 2, "general.file_type": 1}, [*mats, norm], {}, data_offset=4096, header_bytes=4090
    )
    call_kv = {"neoxq.quant_type": "Q4_K_M-mix"}
    got = tensor_budget(info, 10**6, call_kv, "Q4_K_M", 900_000, "0" * 64, 128)
    mix_keys = (
        string_kv_bytes("neoxq.mix.base", "Q4_K_M")
        + string_kv_bytes("neoxq.mix.target_bytes", "1000000")
        + string_kv_bytes("neoxq.mix.stock_bytes", "900000")
        + string_kv_bytes("neoxq.mix.calib_sha256", "0" * 64)
        + string_kv_bytes("neoxq.mix.ctx", "128")
        + string_kv_bytes("neoxq.mix.predicted_kld", "-1.23457e-300")
        + sum(string_kv_bytes(f"neoxq.mix.type.{t.name}", "IQ4_XS") for t in mats)
    )
    header = -(-(4090 + string_kv_bytes("neoxq.quant_type", "Q4_K_M-mix") + mix_keys) // 32) * 32
    assert got == 10**6 - header - 1024  # the F32 norm: 1000 bytes padded to 1024


def test_override_strings_keep_llama_cpps_limit_visibly():
    """llama.cpp's override struct holds 127 bytes: a longer value is cut at a character boundary and
    says so; a longer key is refused (a bug, not data)."""
    from neoxq.core.gguf_layout import override_key, override_value

    assert override_value("short") == b"short"
    cut = override_value("é" * 100)  # 200 bytes of two-byte characters
    assert len(cut) <= 127 and cut.endswith(b"...") and cut.decode("utf-8")
    with pytest.raises(ValueError, match="127"):
        override_key("k" * 128)


def test_dry_run_gives_llama_cpps_types_and_the_exact_size(trained, trained_f16, texts, tmp_path):
    """llama.cpp's dry run (nothing written) names the types its quantizer writes, and the size they
    give (neoxq.core.gguf_layout) equals the written file byte for byte, with an imatrix and with
    per-tensor overrides too. Negative control: another type plans other types and another size."""
    from neoxq.core.gguf_info import read_info
    from neoxq.runtime.quantize import plan_quantize, quantize

    info = read_info(trained_f16)
    im = tmp_path / "c.imatrix"
    _calibration_imatrix(trained, texts, im)
    sizes = {}
    for t, kw in (
        ("Q4_K_M", {}),
        ("Q2_K", {}),
        ("Q8_0", {}),
        ("IQ2_XS", {"imatrix": im}),
        ("Q3_K_M", {"tensor_types": {"blk.0.ffn_down.weight": "Q8_0"}, "kv": {"neoxq.mix.base": "Q3_K_M"}, "label": "x" * 200}),
    ):
        plan = plan_quantize(info, t, kw.get("imatrix"), **{k: v for k, v in kw.items() if k != "imatrix"})
        assert list(tmp_path.iterdir()) == [im]  # the dry run wrote nothing
        r = quantize(info, t, output=tmp_path / "out.gguf", **kw)
        assert plan.types == {x["name"]: x["type"] for x in r.tensors}, t
        assert plan.size == r.size_bytes, t
        sizes[t] = plan.size
        label = read_info(r.path).metadata["neoxq.quant_type"]
        r.path.unlink()
    assert len(set(sizes.values())) == len(sizes)
    assert label == "x" * 124 + "..."


def _calibration_imatrix(checkpoint, texts, path):
    from neoxq.convert.imatrix import compute_imatrix
    from neoxq.core.imatrix_io import write_imatrix

    write_imatrix(path, compute_imatrix(str(checkpoint), texts["calib"][:4000], ctx=64, include_output=True))


@pytest.fixture(scope="module")
def mix_run(trained_f16, texts, tmp_path_factory):
    """Stock and mix at the Q4_K_M and Q2_K sizes, scored on held-out text (never the calibration)."""
    from neoxq.core.mix_plan import MixOptions
    from neoxq.mix import quantize_mix
    from neoxq.runtime.model import NeoxModel, RuntimeOptions
    from neoxq.runtime.quantize import quantize
    from neoxq.runtime.score import GGUFReference, kld

    d = tmp_path_factory.mktemp("mix")
    out = {}
    for t in ("Q4_K_M", "Q2_K"):
        stock = quantize(trained_f16, t, output=d / f"{t}.gguf")
        mix = quantize_mix(trained_f16, t, MixOptions(texts["calib"], ctx=128, cache_dir=d / "mixcache"), output=d / f"{t}-mix.gguf")
        scores = []
        for p in (stock.path, mix.path):
            with NeoxModel(p, RuntimeOptions(n_ctx=128, n_batch=128)) as m:
                scores.append(kld(m, GGUFReference(trained_f16), texts["eval"], 128, cache_dir=d / "cache"))
        out[t] = (stock, mix, *scores)
    return out


@pytest.mark.parametrize("qtype", ["Q4_K_M", "Q2_K"])
def test_mix_beats_stock_at_its_size(mix_run, qtype):
    stock, mix, k_stock, k_mix = mix_run[qtype]
    print(f"{qtype}: stock {stock.size_bytes} B KLD {k_stock.kld_mean:.5f}; mix {mix.size_bytes} B KLD {k_mix.kld_mean:.5f}")
    assert mix.size_bytes <= stock.size_bytes and mix.extra["mix"]["stock_bytes"] == stock.size_bytes  # from the dry run
    # Lower by more than the combined standard error (measured: 0.45x at Q4_K_M, 0.06x at Q2_K).
    assert k_mix.kld_mean + 2 * (k_mix.kld_mean_se + k_stock.kld_mean_se) < k_stock.kld_mean
    assert k_mix.top1 > k_stock.top1
    check = mix.extra["mix"]["calibration_check"]  # the guard ran: stock's types (fitted) were measured too
    assert check["stock_calibration_kld"] is not None and check["kept"] == "mix" and check["mix_calibration_kld"] < check["stock_calibration_kld"]


def test_mix_types_written_equal_the_plan(mix_run):
    import gguf

    _, mix, _, _ = mix_run["Q4_K_M"]
    plan = mix.extra["mix"]["types"]
    r = gguf.GGUFReader(mix.path)  # read back independently of neoxq's reader
    written = {t.name: t.tensor_type.name for t in r.tensors}
    assert {n: written[n] for n in plan} == plan
    meta = {k: f.contents() for k, f in r.fields.items() if k.startswith("neoxq.mix.type.")}
    assert {k[len("neoxq.mix.type.") :]: v for k, v in meta.items()} == plan
    assert r.fields["neoxq.quant_type"].contents() == "Q4_K_M-mix" and len(set(plan.values())) > 1


def test_mix_bad_input(trained_f16, texts, tmp_path):
    out = tmp_path / "m.gguf"
    (tmp_path / "short.txt").write_text("a few words only")
    assert_one_line_error(
        run_cli(
            "quantize", trained_f16, "--type", "Q4_K_M", "--mix", "--calib", tmp_path / "short.txt", "--imatrix", "none", "--ctx", "128", "-o", out
        ),
        "calibration text",
        "two windows",
    )
    (tmp_path / "calib.txt").write_text(texts["calib"][:20000])
    assert_one_line_error(
        run_cli(
            "quantize",
            trained_f16,
            "--type",
            "Q4_K_M",
            "--mix",
            "--calib",
            tmp_path / "calib.txt",
            "--imatrix",
            "none",
            "--ctx",
            "128",
            "--target-size",
            "100KB",
            "-o",
            out,
        ),
        "smallest mix",
    )
    assert_one_line_error(run_cli("quantize", trained_f16, "--type", "Q4_K_M", "--target-bpw", "4", "-o", out), "--mix")
    assert not out.exists() and not list(tmp_path.glob(".*.partial")) and not list(tmp_path.glob(".neoxq-stock-*"))


def test_mix_cli_json_and_target_bpw(trained, trained_f16, texts, tmp_path):
    (tmp_path / "calib.txt").write_text(texts["calib"][:20000])
    proc = run_cli(
        "quantize",
        trained_f16,
        "--type",
        "Q4_K_M",
        "--mix",
        "--calib",
        tmp_path / "calib.txt",
        "--ctx",
        "128",
        "--target-bpw",
        "5.0",
        "--json",
        "-o",
        tmp_path / "m.gguf",
    )  # no --reference: the folder trained_f16 was converted from is recorded in it
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["type"] == "Q4_K_M-mix" and r["mix"]["target_bytes"] >= r["size_bytes"]
    from neoxq.core.gguf_info import read_info

    assert "calibration sha256" in read_info(tmp_path / "m.gguf").metadata["quantize.imatrix.dataset"]  # made from --calib
    assert {t["name"]: t["type"] for t in r["tensors"] if t["name"] in r["mix"]["types"]} == r["mix"]["types"]


def test_mix_against_stock_paired_and_compare_cli(mix_run, trained_f16, texts, tmp_path):
    """The paired test says the mix is better with a 95 % interval below 1; `neoxq compare` on the two
    files gives the same, and on a file against its own copy exactly 1, [1, 1], not distinguishable."""
    import shutil

    from neoxq.core.scores_io import save_scores
    from neoxq.core.stats import compare

    stock, mix, k_stock, k_mix = mix_run["Q4_K_M"]
    c = compare(k_mix.tokens, k_stock.tokens)
    assert c["kld"]["verdict"] == "better" and c["kld"]["ci95"][1] < 1 and c["kld"]["ratio"] == pytest.approx(k_mix.kld_mean / k_stock.kld_mean)
    (tmp_path / "eval.txt").write_text(texts["eval"])
    common = ("--reference", trained_f16, "--text", tmp_path / "eval.txt", "--ctx", "128", "--json", "--cache-dir", tmp_path / "c")
    cli = run_cli("compare", mix.path, stock.path, *common)
    assert cli.returncode == 0, cli.stderr
    got = json.loads(cli.stdout)
    assert got["kld"]["ratio"] == pytest.approx(c["kld"]["ratio"], rel=1e-9) and got["kld"]["verdict"] == "better"
    shutil.copy(stock.path, tmp_path / "copy.gguf")
    same = json.loads(run_cli("compare", stock.path, tmp_path / "copy.gguf", *common).stdout)
    for key in ("kld", "ppl"):
        assert same[key]["ratio"] == 1.0 and same[key]["ci95"] == [1.0, 1.0] and same[key]["verdict"] == "not distinguishable"
    # the per-token files a report writes stand in for rescoring
    save_scores(tmp_path / "mix.npz", k_mix.tokens)
    save_scores(tmp_path / "stock.npz", k_stock.tokens)
    from_files = json.loads(run_cli("compare", tmp_path / "mix.npz", tmp_path / "stock.npz", "--json").stdout)
    assert from_files["kld"]["ratio"] == pytest.approx(c["kld"]["ratio"], rel=1e-5) and from_files["kld"]["verdict"] == "better"
    text = run_cli("compare", tmp_path / "mix.npz", tmp_path / "stock.npz")
    assert text.returncode == 0 and "A is better" in text.stdout
    assert_one_line_error(run_cli("compare", mix.path, stock.path), "--reference")


def test_split_probe_equals_llama_cpps_whole_probe_file_and_writes_only_what_it_changes(trained, trained_f16, texts, tmp_path):
    """A probe built from GGUF splits (the F16 splits written once, the probed matrices rewritten)
    gives the same logits as llama.cpp's quantizer writing the whole probe file with the same
    overrides and imatrix, and the same bytes for the probed matrices; it writes only those.
    Negative control: another type for one matrix changes the logits."""
    import numpy as np

    from neoxq.convert.imatrix import compute_imatrix
    from neoxq.core.gguf_info import read_info
    from neoxq.core.mix_plan import quantizable
    from neoxq.core.qtypes import QuantType
    from neoxq.runtime import capi
    from neoxq.runtime.model import NeoxModel, RuntimeOptions
    from neoxq.runtime.probe_files import SplitModel

    info = read_info(trained_f16)
    im = compute_imatrix(str(trained), texts["calib"][:4000], ctx=64, include_output=True)
    mats = [t.name for t in quantizable(info)]
    types = {"blk.0.ffn_down.weight": "Q2_K", "blk.1.attn_qkv.weight": "Q4_K", "token_embd.weight": "Q8_0"}
    splits = SplitModel(info, mats, tmp_path / "f16")
    f16_bytes = splits.bytes_written
    assert abs(f16_bytes - info.path.stat().st_size) < 0.01 * info.path.stat().st_size
    probe = splits.probe(types, im, tmp_path / "probe")
    assert splits.bytes_written - f16_bytes < sum(t.n_bytes for t in info.tensors if t.name in types)

    call = capi.QuantizeCall(ftype=QuantType.Q8_0.ftype, nthread=2)  # every matrix overridden below
    call.tensor_types = {n: types.get(n, "F16") for n in mats}
    call.imatrix = {n: im.values(n) for n in im.sums}
    whole = tmp_path / "whole.gguf"
    assert capi.quantize(str(trained_f16), str(whole), call)[0] == 0
    a, b = read_info(probe.parent / f"model-{mats.index('blk.0.ffn_down.weight') + 2:05d}-of-{len(mats) + 1:05d}.gguf"), read_info(whole)
    ta, tb = a.tensors[0], b.tensor("blk.0.ffn_down.weight")
    assert ta.type == tb.type == "Q2_K"
    assert np.array_equal(
        np.fromfile(a.path, np.uint8, ta.n_bytes, offset=a.data_offset + ta.offset),
        np.fromfile(b.path, np.uint8, tb.n_bytes, offset=b.data_offset + tb.offset),
    )

    def logits(path):
        with NeoxModel(path, RuntimeOptions(n_ctx=64, n_batch=64)) as m:
            return m.eval_logits(m.tokenize(texts["eval"][:400])[:48])

    ref = logits(whole)
    assert np.isfinite(ref).all() and ref.std() > 0 and np.array_equal(logits(probe), ref)
    other = splits.probe({**types, "blk.0.ffn_down.weight": "Q4_K"}, im, tmp_path / "probe2")
    assert not np.array_equal(logits(other), ref)


def test_stock_fallback_steps_down_where_it_costs_least_until_it_fits():
    """Stock's types over the budget (by a mix's header keys) are stepped down where the predicted
    KLD rises least per byte of the overshoot covered, repeated until they fit, and what a step freed
    past the overshoot is spent on upgrades. Pure: no llama.cpp."""
    from neoxq.core.mix_plan import fitted_fallback, tensor_bytes

    a, b = (TensorInfo(f"{n}.weight", "F16", (256, 256), 0, 0) for n in "ab")
    sens = {
        "a.weight": Sensitivity({}, {}, {"Q2_K": 1.0, "Q4_K": 0.1, "Q6_K": 0.01}),
        "b.weight": Sensitivity({}, {}, {"Q2_K": 0.05, "Q4_K": 0.02, "Q6_K": 0.015}),
    }
    stock = {"a.weight": "Q6_K", "b.weight": "Q6_K"}
    full = 2 * tensor_bytes(a, "Q6_K")
    assert fitted_fallback([a, b], sens, stock, full) == stock  # fits: unchanged
    assert fitted_fallback([a, b], sens, stock, full - 100) == {"a.weight": "Q6_K", "b.weight": "Q4_K"}  # b's step costs 0.005, a's 0.09
    q4, q2 = tensor_bytes(a, "Q4_K"), tensor_bytes(a, "Q2_K")
    # no step frees it all: b down twice (cheapest per byte covered), then a once; not a to Q2_K, the only step that frees all
    assert fitted_fallback([a, b], sens, stock, q4 + q2) == {"a.weight": "Q4_K", "b.weight": "Q2_K"}
    assert fitted_fallback([a, b], sens, stock, 2 * q2 - 1) is None  # nothing left to step down to
    # the bytes a step frees past the overshoot are spent on the upgrade that lowers the KLD most
    c = TensorInfo("c.weight", "F16", (256, 256), 0, 0)
    sens["c.weight"] = Sensitivity({}, {}, {"Q4_K": 0.05, "Q5_K": 0.01, "Q6_K": 0.005})
    got = fitted_fallback([a, b, c], sens, {**stock, "c.weight": "Q4_K"}, full + q4 - 100)
    assert got == {"a.weight": "Q6_K", "b.weight": "Q4_K", "c.weight": "Q5_K"}  # c to Q6_K would not fit in what b freed


def test_guard_keeps_stock_when_the_plan_measures_worse_even_when_stock_was_over_budget():
    """The defect measured on the 70m shape: the guard was skipped when stock's types exceeded the
    budget by the mix's keys. Now the fitted stock is always measured against the plan and kept when
    no worse; the plan is kept when better. Negative control: no fallback, the plan stays unmeasured
    against anything."""
    from neoxq.core.mix_plan import guarded

    plan, stock = {"a": "IQ3_S", "b": "Q6_K"}, {"a": "Q5_K", "b": "Q4_K"}
    calls = []

    def measure(kl):
        def m(types):
            calls.append(dict(types))
            return kl[tuple(sorted(types.values()))]

        return m

    worse = measure({("IQ3_S", "Q6_K"): 3e-4, ("Q4_K", "Q5_K"): 1.6e-4})
    kept, check = guarded(plan, stock, worse)
    assert kept == stock and check["kept"].startswith("stock") and check["stock_calibration_kld"] == 1.6e-4
    assert calls == [plan, stock]
    better = measure({("IQ3_S", "Q6_K"): 1e-4, ("Q4_K", "Q5_K"): 1.6e-4})
    assert guarded(plan, stock, better) == (plan, {"mix_calibration_kld": 1e-4, "stock_calibration_kld": 1.6e-4, "kept": "mix", "probes": 2})
    calls.clear()
    assert guarded(plan, plan, worse)[0] == plan and calls == [plan]  # the same types are measured once
    assert guarded(plan, None, worse) == (plan, {"mix_calibration_kld": 3e-4, "stock_calibration_kld": None, "kept": "mix", "probes": 1})
