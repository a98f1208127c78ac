"""Quantization through llama.cpp's quantizer, importance matrices, and their quality."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from neoxq.core.imatrix_io import read_imatrix
from neoxq.runtime.quantize import quantize
from neoxq.core.gguf_info import read_info
from neoxq.core.qtypes import QUANTIZED, QuantType
from neoxq.runtime.model import NeoxModel, RuntimeOptions
from neoxq.runtime.score import GGUFReference, kld

from .helpers import assert_one_line_error, run_cli

# Bits/weight of the whole file relative to llama.cpp's nominal figure for the type. Measured on
# the trained fixture: 0.98x (Q2_K_S) .. 1.23x (Q3_K_L); small models carry a larger share of
# higher-precision tensors (embedding, output, norms, and rows too short for the IQ types), which
# at the 1.5-bit types is a larger ratio for the same extra bits (IQ1_M: 2.28 bpw, 1.30x; IQ1_S:
# 2.16 bpw, 1.38x): above the range, at most EXTRA_BITS more than nominal.
BPW_RANGE = (0.95, 1.25)
EXTRA_BITS = 0.75


def _kld(path, f16, text, cache):
    with NeoxModel(path, RuntimeOptions(n_ctx=128)) as m:
        return kld(m, GGUFReference(f16), text, ctx=128, cache_dir=cache)


@pytest.mark.slow
def test_every_type_loads_runs_and_has_its_size(trained_f16, trained_imatrix, tmp_path, texts):
    with NeoxModel(trained_f16, RuntimeOptions(n_ctx=128)) as ref:
        ids = ref.tokenize(texts["eval"][:2000])[:64]
        ref_logits = ref.eval_logits(ids)
    for t in QUANTIZED:
        r = quantize(trained_f16, t, output=tmp_path / f"{t.value}.gguf", imatrix=trained_imatrix)
        with NeoxModel(r.path, RuntimeOptions(n_ctx=128)) as m:
            got = m.eval_logits(ids)
        assert np.isfinite(got).all()
        top1 = float((got.argmax(-1) == ref_logits.argmax(-1)).mean())
        assert top1 > 0.6, f"{t.value}: top-1 agreement with F16 only {top1:.2f}"
        ratio = r.bpw / t.nominal_bpw
        in_range = BPW_RANGE[0] <= ratio and (ratio <= BPW_RANGE[1] or r.bpw - t.nominal_bpw <= EXTRA_BITS)
        assert in_range, f"{t.value}: {r.bpw:.2f} bpw is {ratio:.2f}x nominal"
        assert read_info(r.path).quant_type == t  # read from metadata, not the name
        r.path.unlink()


def test_kld_orders_the_k_quants(trained_f16, tmp_path, texts):
    """Measured against F16 on held-out text: Q8_0 < Q6_K < Q5_K_M < Q4_K_M < Q3_K_M < Q2_K."""
    order = [QuantType.Q8_0, QuantType.Q6_K, QuantType.Q5_K_M, QuantType.Q4_K_M, QuantType.Q3_K_M, QuantType.Q2_K]
    klds = []
    for t in order:
        r = quantize(trained_f16, t, output=tmp_path / f"{t.value}.gguf")
        res = _kld(r.path, trained_f16, texts["eval"], tmp_path / "cache")
        klds.append(res.kld_mean)
        print(f"{t.value}: KLD {res.kld_mean:.5f} ± {res.kld_mean_se:.5f}, top1 {res.top1:.3f}, {res.tokens_scored} tokens")
    assert klds == sorted(klds), dict(zip([t.value for t in order], klds))
    # Not all near zero: the quantizer really ran (measured Q8_0 ~3e-4, Q2_K ~0.16).
    assert klds[0] < 2e-3 and klds[-1] > 0.02


def test_imatrix_lowers_kld(trained_f16, trained_imatrix, tmp_path, texts):
    """Q2_K with vs without; IQ3_XXS (which llama.cpp refuses to make without one) with the real
    imatrix vs a uniform one, the closest to 'no information'."""
    from neoxq.core.imatrix_io import IMatrix, write_imatrix

    im = read_imatrix(trained_imatrix)
    uniform = write_imatrix(
        tmp_path / "uniform.imatrix", IMatrix({k: np.ones_like(v) for k, v in im.sums.items()}, {k: 1.0 for k in im.counts}, ["uniform"])
    )
    cache = tmp_path / "cache"
    q2_plain = _kld(quantize(trained_f16, "Q2_K", output=tmp_path / "a.gguf").path, trained_f16, texts["eval"], cache)
    q2_im = _kld(quantize(trained_f16, "Q2_K", output=tmp_path / "b.gguf", imatrix=trained_imatrix).path, trained_f16, texts["eval"], cache)
    iq3_uni = _kld(quantize(trained_f16, "IQ3_XXS", output=tmp_path / "c.gguf", imatrix=uniform).path, trained_f16, texts["eval"], cache)
    iq3_im = _kld(quantize(trained_f16, "IQ3_XXS", output=tmp_path / "d.gguf", imatrix=trained_imatrix).path, trained_f16, texts["eval"], cache)
    print(f"Q2_K {q2_plain.kld_mean:.5f} -> {q2_im.kld_mean:.5f}; IQ3_XXS {iq3_uni.kld_mean:.5f} -> {iq3_im.kld_mean:.5f}")
    assert q2_im.kld_mean + 3 * q2_im.kld_mean_se < q2_plain.kld_mean - 3 * q2_plain.kld_mean_se
    assert iq3_im.kld_mean + 3 * iq3_im.kld_mean_se < iq3_uni.kld_mean - 3 * iq3_uni.kld_mean_se


def test_imatrix_provenance_in_metadata(trained_f16, trained_imatrix, tmp_path):
    from neoxq.core.imatrix_io import file_sha256

    r = quantize(trained_f16, "IQ2_XXS", output=tmp_path / "q.gguf", imatrix=trained_imatrix)
    meta = read_info(r.path).metadata
    assert meta["neoxq.quant_type"] == "IQ2_XXS" and meta["general.file_type"] == QuantType.IQ2_XXS.ftype
    assert meta["quantize.imatrix.file"] == trained_imatrix.name
    assert meta["neoxq.imatrix.sha256"] == file_sha256(trained_imatrix)
    assert meta["quantize.imatrix.dataset"] == "calib"


def write_legacy_dat(path, im, ncall=7):
    """llama-imatrix's legacy layout, written independently of our reader."""
    with open(path, "wb") as f:
        f.write(struct.pack("<i", len(im.sums)))
        for name, sums in im.sums.items():
            f.write(struct.pack("<i", len(name)) + name.encode())
            f.write(struct.pack("<ii", ncall, sums.size))
            f.write((im.values(name) * ncall).astype("<f4").tobytes())
        f.write(struct.pack("<i", 3) + struct.pack("<i", 5) + b"calib")


def test_legacy_dat_and_gguf_imatrix_agree(trained_f16, trained_imatrix, tmp_path):
    im = read_imatrix(trained_imatrix)
    dat = tmp_path / "legacy.dat"
    write_legacy_dat(dat, im)
    legacy = read_imatrix(dat)
    for name in im.sums:
        np.testing.assert_allclose(legacy.values(name), im.values(name), rtol=1e-6)
    assert legacy.datasets == ["calib"] and legacy.chunk_count == 3
    # ncall=1 keeps the values bit-exact, so the two quantizations must be byte-identical.
    exact = tmp_path / "exact.dat"
    write_legacy_dat(exact, im, ncall=1)
    a = quantize(trained_f16, "IQ3_XXS", output=tmp_path / "a.gguf", imatrix=trained_imatrix)
    b = quantize(trained_f16, "IQ3_XXS", output=tmp_path / "b.gguf", imatrix=exact)
    import gguf

    ra, rb = gguf.GGUFReader(a.path), gguf.GGUFReader(b.path)
    for ta, tb in zip(ra.tensors, rb.tensors):
        assert ta.name == tb.name and np.array_equal(np.asarray(ta.data), np.asarray(tb.data)), ta.name


def test_imatrix_cli_writes_llama_cpp_format(trained, texts, tmp_path):
    import gguf

    (tmp_path / "calib.txt").write_text(texts["calib"][:20000])
    proc = run_cli("imatrix", trained, "--text", tmp_path / "calib.txt", "-o", tmp_path / "m.imatrix", "--ctx", "128")
    assert proc.returncode == 0, proc.stderr
    r = gguf.GGUFReader(tmp_path / "m.imatrix")
    assert r.fields["general.type"].contents() == "imatrix"
    names = {t.name for t in r.tensors}
    assert "blk.0.attn_qkv.weight.in_sum2" in names and "blk.1.ffn_down.weight.counts" in names
    assert r.fields["imatrix.chunk_size"].contents() == 128 and r.fields["imatrix.chunk_count"].contents() > 0


def test_quantize_cli_table_json_and_fallbacks(ckpt, tmp_path):
    """64-wide rows (like Pythia-14M's 128) are not multiples of 256: llama.cpp falls back."""
    from neoxq.convert.converter import convert

    f16 = convert(str(ckpt), "f16", output=tmp_path / "small-F16.gguf")
    proc = run_cli("quantize", f16, "--type", "Q4_K_M", "--json", "-o", tmp_path / "q.gguf")
    assert proc.returncode == 0, proc.stderr
    rows = {t["name"]: t for t in json.loads(proc.stdout)["tensors"]}
    qkv = rows["blk.0.attn_qkv.weight"]
    assert qkv["type"] not in ("Q4_K", "Q6_K") and "fallback" in qkv["note"]
    proc = run_cli("quantize", f16, "--type", "Q4_0", "-o", tmp_path / "q0.gguf")
    assert "blk.0.attn_qkv.weight" in proc.stdout and "Q4_0" in proc.stdout


def test_convert_writes_every_listed_type(ckpt, tmp_path):
    proc = run_cli("convert", ckpt, "--quant", "Q8_0,Q4_0,Q5_1", "-o", tmp_path)
    assert proc.returncode == 0, proc.stderr
    made = {read_info(p).quant_type for p in tmp_path.glob("*.gguf")}
    assert {QuantType.F16, QuantType.Q8_0, QuantType.Q4_0, QuantType.Q5_1} <= made


def test_quantize_bad_input(trained_f16, ckpt, tmp_path, texts):
    out = tmp_path / "o.gguf"
    assert_one_line_error(run_cli("quantize", trained_f16, "--type", "Q3_K_XL", "-o", out), "Q3_K_XL", "Q4_K_M")
    assert_one_line_error(run_cli("quantize", trained_f16, "--type", "IQ2_XXS", "-o", out), "neoxq imatrix")
    notgguf = tmp_path / "x.gguf"
    notgguf.write_text("hello")
    assert_one_line_error(run_cli("quantize", notgguf, "--type", "Q4_0", "-o", out), "not a GGUF")
    trunc = tmp_path / "t.gguf"
    trunc.write_bytes(trained_f16.read_bytes()[:300_000])
    assert_one_line_error(run_cli("quantize", trunc, "--type", "Q4_0", "-o", out), "truncated")
    # An imatrix made for another model (the 64-wide random checkpoint).
    (tmp_path / "c.txt").write_text(texts["calib"][:8000])
    other = tmp_path / "other.imatrix"
    assert run_cli("imatrix", ckpt, "--text", tmp_path / "c.txt", "-o", other, "--ctx", "64").returncode == 0
    assert_one_line_error(run_cli("quantize", trained_f16, "--type", "Q2_K", "--imatrix", other, "-o", out), "another model")
    assert not out.exists() and not list(tmp_path.glob(".*.partial"))
