"""The bounded-memory fp32 reference and the memory preflight."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from .helpers import assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def windows(trained, texts):
    from tokenizers import Tokenizer

    from neoxq.runtime.score import Windows

    ids = Tokenizer.from_file(str(trained / "tokenizer.json")).encode(texts["eval"][:20000]).ids
    return Windows(ids, 128)


def _log_probs(ref, w):
    return dict(ref.log_probs(w))


def test_streamed_equals_in_memory(trained, windows):
    from neoxq.convert.checkpoint import open_checkpoint
    from neoxq.convert.reference import HFReference

    ck = open_checkpoint(str(trained))
    mem, streamed = HFReference(ck, mode="memory"), HFReference(ck, max_memory=2 << 30, mode="streamed")
    assert streamed.prepare(128, windows.n_chunks).mode == "streamed"
    a, b = _log_probs(mem, windows), _log_probs(streamed, windows)
    diff = max(np.abs(a[c] - b[c]).max() for c in a)
    print(f"max |Δ log-prob| streamed vs in memory: {diff:.2e} over {windows.tokens_scored} tokens")
    assert sorted(a) == sorted(b) == list(range(windows.n_chunks)) and diff <= 1e-5


def test_streamed_comparison_can_fail(trained, windows, monkeypatch):
    """Negative control: a streamed pass that skips one layer's weights must not match."""
    import neoxq.convert.reference as R
    from neoxq.convert.checkpoint import open_checkpoint

    real = R._tensors

    def scaled(ckpt, names):
        out = real(ckpt, names)
        return {n: (v * 1.01 if "layers.1.mlp.dense_4h_to_h.weight" in n else v) for n, v in out.items()}

    ck = open_checkpoint(str(trained))
    a = _log_probs(R.HFReference(ck, mode="memory"), windows)
    monkeypatch.setattr(R, "_tensors", scaled)
    b = _log_probs(R.HFReference(ck, max_memory=2 << 30, mode="streamed"), windows)
    assert max(np.abs(a[c] - b[c]).max() for c in a) > 1e-3


def test_budget_between_layer_and_model_streams(trained, trained_f32, texts, tmp_path):
    from neoxq.convert.checkpoint import open_checkpoint
    from neoxq.convert.reference import plan_reference

    ck = open_checkpoint(str(trained))
    whole = plan_reference(ck, 128, 8, None).peak_bytes  # the in-memory plan's need
    floor = plan_reference(ck, 128, 1, 1 << 40, mode="streamed").peak_bytes  # one layer + one window
    budget = (whole + floor) // 2
    assert floor < budget < whole
    (tmp_path / "t.txt").write_text(texts["eval"][:12000])
    proc = run_cli(
        "kld",
        trained_f32,
        "--reference",
        trained,
        "--text",
        tmp_path / "t.txt",
        "--ctx",
        "128",
        "--json",
        "--max-memory",
        str(budget),
        "--cache-dir",
        tmp_path / "c",
    )
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert "streamed" in r["reference"] and r["kld_mean"] < 1e-4 and r["top1"] > 0.99


def test_max_memory_below_one_layer_is_refused(trained, trained_f32, texts, tmp_path):
    (tmp_path / "t.txt").write_text(texts["eval"][:12000])
    proc = run_cli(
        "kld", trained_f32, "--reference", trained, "--text", tmp_path / "t.txt", "--ctx", "128", "--max-memory", "1MB", "--cache-dir", tmp_path / "c"
    )
    assert_one_line_error(proc, "one layer", "--max-memory")
    proc = run_cli("report", trained, "--text", tmp_path / "t.txt", "--ctx", "128", "--types", "Q8_0", "--max-memory", "1MB", "-o", tmp_path / "r")
    assert_one_line_error(proc, "one layer")
    assert not list((tmp_path / "r").glob("*.gguf"))  # refused before any work
    assert_one_line_error(run_cli("kld", trained_f32, "--reference", trained, "--text", tmp_path / "t.txt", "--max-memory", "lots"), "not a size")


def test_preflight_refuses_what_cannot_fit(ckpt, tmp_path):
    """With the available memory faked down, every heavy command stops before work, in one line."""
    from neoxq import preflight
    from neoxq.core.errors import UsageError

    with pytest.raises(UsageError, match="needs about .* available; pass a smaller --ctx"):
        preflight.check("loading m.gguf", 10 << 30, "pass a smaller --ctx", available=1 << 30)
    preflight.check("fits", 1 << 20, "-", available=1 << 30)
    shim = tmp_path / "sitecustomize.py"
    shim.write_text("import neoxq.core.machine as m\nm.available_memory = lambda: 1 << 20\n")
    proc = run_cli("convert", ckpt, "-o", tmp_path / "x.gguf", env={"PYTHONPATH": str(tmp_path)})
    assert_one_line_error(proc, "converting", "available")
    assert not (tmp_path / "x.gguf").exists()


def test_reference_auto_finds_the_local_folder(ckpt, corpus, tmp_path):
    """--reference auto = the checkpoint the file came from: a local conversion records its folder,
    found while it holds the same weights; moved or changed, one line asks for --reference."""
    import shutil

    from neoxq.convert.converter import convert

    folder = shutil.copytree(ckpt, tmp_path / "model")
    f16 = convert(str(folder), "f16", out_dir=tmp_path)
    (tmp_path / "t.txt").write_text(corpus[:6000])
    argv = ("kld", f16, "--reference", "auto", "--text", tmp_path / "t.txt", "--ctx", "32", "--json")
    proc = run_cli(*argv)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["kld_mean"] < 1e-3 and r["reference"].startswith("transformers")  # F16 against its own fp32 checkpoint
    weights = next(folder.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert_one_line_error(run_cli(*argv), "has changed", "--reference")
    shutil.move(folder, tmp_path / "moved")
    assert_one_line_error(run_cli(*argv), "no longer there", "--reference")
    quantize = ("quantize", f16, "--type", "Q4_K_M", "--optimize", "-o", tmp_path / "o.gguf")
    assert_one_line_error(run_cli(*quantize), "no longer there", "--reference")
    assert not (tmp_path / "o.gguf").exists()
    assert_one_line_error(run_cli("kld", f16, "--reference", "f16", "--text", tmp_path / "t.txt", "--ctx", "32"), "F16 GGUF")
