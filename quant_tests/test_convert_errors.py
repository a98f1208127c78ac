"""Bad input: one line naming the problem and the fix, exit 1, no traceback, no .gguf left behind
, plus sources (hub cache offline), unsafe pickles and progress output."""

from __future__ import annotations

import errno
import json
import os
import shutil

import pytest

from .helpers import assert_one_line_error, copy_ckpt, no_gguf_left, run_cli


def test_unsupported_architecture(ckpt, tmp_path):
    bad = copy_ckpt(ckpt, tmp_path / "llama")
    cfg = json.loads((bad / "config.json").read_text())
    cfg |= {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    (bad / "config.json").write_text(json.dumps(cfg))
    proc = run_cli("convert", bad, "-o", tmp_path / "x.gguf")
    assert_one_line_error(proc, "LlamaForCausalLM", "GPTNeoXForCausalLM")
    assert no_gguf_left(tmp_path)


@pytest.mark.parametrize("remove,needle", [("config.json", "config.json"), ("tokenizer.json", "tokenizer.json"), ("model.safetensors", "no weights")])
def test_missing_files(ckpt, tmp_path, remove, needle):
    bad = copy_ckpt(ckpt, tmp_path / "ck")
    (bad / remove).unlink()
    proc = run_cli("convert", bad, "-o", tmp_path / "x.gguf")
    assert_one_line_error(proc, needle)
    assert no_gguf_left(tmp_path)


def test_truncated_safetensors(ckpt, tmp_path):
    bad = copy_ckpt(ckpt, tmp_path / "ck")
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    proc = run_cli("convert", bad, "-o", tmp_path / "x.gguf")
    assert_one_line_error(proc, "model.safetensors", "truncated or corrupt")
    assert no_gguf_left(tmp_path)


def test_garbage_safetensors(ckpt, tmp_path):
    bad = copy_ckpt(ckpt, tmp_path / "ck")
    (bad / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    assert_one_line_error(run_cli("convert", bad, "-o", tmp_path / "x.gguf"), "model.safetensors")


def test_index_names_missing_shard(checkpoints, tmp_path):
    bad = copy_ckpt(checkpoints["hf5-sequential-rot1-sharded-tied"], tmp_path / "ck")
    shard = sorted(bad.glob("model-*.safetensors"))[-1]
    shard.unlink()
    proc = run_cli("convert", bad, "-o", tmp_path / "x.gguf")
    assert_one_line_error(proc, shard.name, "missing")


def test_unexpected_tensor_is_an_error(ckpt, tmp_path):
    from safetensors.torch import load_file, save_file
    import torch

    bad = copy_ckpt(ckpt, tmp_path / "ck")
    sd = load_file(bad / "model.safetensors")
    sd["gpt_neox.layers.0.mystery.weight"] = torch.zeros(3, 3)
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    assert_one_line_error(run_cli("convert", bad, "-o", tmp_path / "x.gguf"), "mystery")


def test_existing_output_needs_force(ckpt, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    assert_one_line_error(run_cli("convert", ckpt, "-o", out), "--force")
    assert out.read_bytes() == b"keep me"
    ok = run_cli("convert", ckpt, "-o", out, "--force")
    assert ok.returncode == 0, ok.stderr
    assert out.read_bytes()[:4] == b"GGUF"


def test_unwritable_output_folder(ckpt, tmp_path):
    assert_one_line_error(run_cli("convert", ckpt, "-o", tmp_path / "nope" / "m.gguf"), "does not exist")
    # /proc refuses new files even to root, which ignores permission bits.
    assert_one_line_error(run_cli("convert", ckpt, "-o", "/proc/neoxq-test.gguf"), "/proc")


def test_disk_full_leaves_nothing(ckpt, tmp_path, monkeypatch):
    import gguf

    from neoxq.convert.converter import convert
    from neoxq.core.errors import OutputError

    calls = {"n": 0}
    real = gguf.GGUFWriter.write_tensor_data

    def failing(self, tensor, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, tensor, *a, **k)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", failing)
    with pytest.raises(OutputError, match="disk full"):
        convert(str(ckpt), output=tmp_path / "m.gguf")
    assert no_gguf_left(tmp_path)


def test_interrupted_run_leaves_nothing(ckpt, tmp_path, monkeypatch):
    import gguf

    from neoxq.convert.converter import convert

    def interrupt(self, tensor, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert(str(ckpt), output=tmp_path / "m.gguf")
    assert no_gguf_left(tmp_path)


def test_malicious_pickle_is_refused(checkpoints, tmp_path):
    """A real code-running pickle inside a torch checkpoint: refused, and the code never runs."""
    import torch

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = copy_ckpt(checkpoints["hf4-bin-fp16"], tmp_path / "ck")
    sd = torch.load(bad / "pytorch_model.bin", weights_only=True)
    sd["evil"] = Evil()
    torch.save(sd, bad / "pytorch_model.bin")
    proc = run_cli("convert", bad, "-o", tmp_path / "x.gguf")
    assert_one_line_error(proc, "pytorch_model.bin", "refused")
    assert not marker.exists()
    assert no_gguf_left(tmp_path)


def test_hub_revision_from_offline_cache(ckpt, tmp_path):
    """org/name@revision through huggingface_hub, answered from a cache this test populates."""
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--EleutherAI--pythia-tiny"
    snap = repo / "snapshots" / commit
    shutil.copytree(ckpt, snap)
    (snap / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "step3000").write_text(commit)
    out = tmp_path / "out"
    out.mkdir()
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hfhome")}
    proc = run_cli("convert", "EleutherAI/pythia-tiny", "--revision", "step3000", "--outtype", "f32", env=env, cwd=out)
    assert proc.returncode == 0, proc.stderr
    made = out / "pythia-tiny-step3000-F32.gguf"
    assert made.is_file()
    from neoxq.core.gguf_info import read_info

    meta = read_info(made).metadata
    assert meta["neoxq.source.repo"] == "EleutherAI/pythia-tiny"
    assert meta["neoxq.source.revision"] == "step3000"
    assert meta["neoxq.source.commit"] == commit
    assert meta["general.license"] == "apache-2.0"
    # A revision that is not cached: one clear line, not a traceback.
    proc = run_cli("convert", "EleutherAI/pythia-tiny@step9", env=env, cwd=out)
    assert_one_line_error(proc, "step9")
    # kld --reference auto finds the checkpoint the file was converted from (repo + commit recorded).
    (out / "t.txt").write_text((ckpt / "tokenizer.json").read_text()[:6000])
    proc = run_cli("kld", made, "--reference", "auto", "--text", out / "t.txt", "--ctx", "64", "--json", env=env, cwd=out)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert "transformers" in r["reference"] and r["kld_mean"] < 1e-4


def test_metadata_complete(ckpt, tmp_path):
    from neoxq.convert.converter import convert
    from neoxq.core.gguf_info import read_info
    import gguf

    path = convert(str(ckpt), "q8_0", output=tmp_path / "m.gguf")
    info = read_info(path)
    m = info.metadata
    cfg = json.loads((ckpt / "config.json").read_text())
    assert m["gptneox.context_length"] == cfg["max_position_embeddings"]
    assert m["gptneox.embedding_length"] == cfg["hidden_size"]
    assert m["gptneox.block_count"] == cfg["num_hidden_layers"]
    assert m["gptneox.feed_forward_length"] == cfg["intermediate_size"]
    assert m["gptneox.rope.dimension_count"] == int(cfg["hidden_size"] // cfg["num_attention_heads"] * cfg["rotary_pct"])
    assert m["gptneox.attention.head_count"] == cfg["num_attention_heads"]
    assert m["gptneox.use_parallel_residual"] is True
    assert m["general.file_type"] == 7 and m["neoxq.quant_type"] == "Q8_0"
    assert m["general.size_label"] and m["general.name"] and m["neoxq.converter_version"]
    r = gguf.GGUFReader(path)
    types = r.fields["tokenizer.ggml.token_type"].contents()
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    assert r.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert r.fields["tokenizer.ggml.pre"].contents() == "olmo"
    assert len(tokens) == cfg["vocab_size"]  # padded to the embedding rows
    assert types[tokens.index("<|endoftext|>")] == gguf.TokenType.CONTROL
    assert types[tokens.index("    ")] == gguf.TokenType.USER_DEFINED
    assert types[-1] == gguf.TokenType.UNUSED
    assert r.fields["tokenizer.ggml.eos_token_id"].contents() == 0
    assert len(r.fields["tokenizer.ggml.merges"].contents()) > 100


def test_default_name_and_quiet_in_pipes(ckpt, tmp_path):
    proc = run_cli("convert", ckpt, "--outtype", "bf16", cwd=tmp_path)
    assert proc.returncode == 0
    assert proc.stdout == "" and proc.stderr == ""  # not a TTY: nothing but errors
    assert (tmp_path / f"{ckpt.name}-BF16.gguf").is_file()


def test_progress_on_a_terminal(ckpt, tmp_path):
    """On a TTY the converter shows tensors written and MB/s; --quiet silences it."""
    import pty
    import subprocess
    import sys

    def run(*extra):
        master, slave = pty.openpty()
        proc = subprocess.run(
            [sys.executable, "-m", "neoxq", "convert", str(ckpt), "-o", str(tmp_path / "p.gguf"), "--force", *extra],
            stdout=slave,
            stderr=slave,
            timeout=300,
        )
        os.close(slave)
        out = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        os.close(master)
        return proc.returncode, out.decode(errors="replace")

    rc, out = run()
    assert rc == 0 and "tensors" in out and "MB/s" in out
    rc, out = run("--quiet")
    assert rc == 0 and out.strip() == ""


@pytest.mark.parametrize("dtype,outtype", [("float16", "f16"), ("float32", "f32")])
def test_unchanged_tensors_copied_file_to_file(dtype, outtype, corpus, tmp_path, monkeypatch):
    """Tensors written unchanged go by copy_file_range; the file is byte-identical to writing every
    tensor through numpy, also where the kernel refuses the call (EXDEV) or space runs out."""
    from neoxq.convert import writer
    from neoxq.convert.converter import convert
    from neoxq.convert.tiny import TinySpec, build_random
    from neoxq.core.errors import OutputError

    folder = build_random(tmp_path / "ck", TinySpec(weights="safetensors", dtype=dtype), corpus)
    copied, real = [], writer._copy_span
    monkeypatch.setattr(writer, "_copy_span", lambda span, n, f: copied.append(n) or real(span, n, f))
    fast = convert(str(folder), outtype, output=tmp_path / "fast.gguf").read_bytes()
    layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    # F16: both embeddings and each layer's dense and MLP weights (1-D tensors become F32); F32:
    # every tensor but each layer's reordered QKV weight and bias
    assert len(copied) == (2 + 3 * layers if outtype == "f16" else 4 + 10 * layers)
    monkeypatch.setattr(writer, "_copy_span", lambda span, n, f: False)
    assert fast == convert(str(folder), outtype, output=tmp_path / "numpy.gguf").read_bytes()

    monkeypatch.setattr(writer, "_copy_span", real)

    def refuse(*a):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    assert fast == convert(str(folder), outtype, output=tmp_path / "exdev.gguf").read_bytes()

    def full(*a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "copy_file_range", full)
    with pytest.raises(OutputError, match="disk full"):
        convert(str(folder), outtype, output=tmp_path / "full.gguf")
    assert not (tmp_path / "full.gguf").exists()
