"""Calibration text sampled from the checkpoint itself: seeded, cached by its inputs, long enough."""

from __future__ import annotations

import pytest

from neoxq.convert.checkpoint import open_checkpoint
from neoxq.convert.neox import GPTNeoXArgs
from neoxq.core.errors import UsageError
from neoxq.self_calibration import MIN_WINDOWS, self_calibration, windows_needed


def test_windows_cover_the_widest_matmul_input():
    small = GPTNeoXArgs(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=256, vocab_size=100)
    wide = GPTNeoXArgs(hidden_size=4096, num_attention_heads=32, num_hidden_layers=32, intermediate_size=16384, vocab_size=50432)
    assert windows_needed(small, 512) == MIN_WINDOWS
    assert windows_needed(wide, 512) * 512 >= 2 * 16384 > (windows_needed(wide, 512) - 1) * 512


def test_sample_is_seeded_cached_and_leaves_the_global_rng_alone(ckpt, tmp_path, monkeypatch):
    import torch
    from tokenizers import Tokenizer

    from neoxq import self_calibration as sc
    from neoxq.convert.imatrix import calibration_windows

    monkeypatch.setenv("NEOXQ_CACHE", str(tmp_path / "cache"))
    model = open_checkpoint(str(ckpt))
    state = torch.random.get_rng_state()
    a = self_calibration(model, 32, seed=0, windows=3)
    assert torch.equal(state, torch.random.get_rng_state())
    assert calibration_windows(model, a.text, 32).shape == (3, 32)  # tokenized again, it fills the windows
    assert a.text.startswith("<|endoftext|>") and "seed 0" in a.describe()
    other = self_calibration(model, 32, seed=1, windows=3)
    assert other.text != a.text and other.sha256 != a.sha256  # negative control: the seed matters
    monkeypatch.setattr(sc, "load_reference", lambda *a, **k: pytest.fail("a cached sample was made again"))
    assert self_calibration(model, 32, seed=0, windows=3).text == a.text
    (tmp_path / "cache").rename(tmp_path / "gone")
    monkeypatch.undo()
    monkeypatch.setenv("NEOXQ_CACHE", str(tmp_path / "cache"))
    assert self_calibration(model, 32, seed=0, windows=3).text == a.text  # made again: the same text
    ids = Tokenizer.from_file(str(ckpt / "tokenizer.json")).encode(a.text).ids
    assert len(set(ids)) > 20  # sampled from the full distribution, not a repeated token


def test_sample_refused_in_one_line_when_the_model_does_not_fit(ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("NEOXQ_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UsageError, match="--calib FILE"):
        self_calibration(open_checkpoint(str(ckpt)), 32, windows=2, max_memory=1 << 20)
    assert not (tmp_path / "cache").exists()


def test_windows_as_long_as_the_context_still_fill(ckpt, tmp_path, monkeypatch):
    """ctx equal to the model's context: no sequence runs past it, and the text still fills the
    windows asked for (the slack comes as extra sequences)."""
    from neoxq.convert.imatrix import calibration_windows

    monkeypatch.setenv("NEOXQ_CACHE", str(tmp_path / "cache"))
    model = open_checkpoint(str(ckpt))
    ctx = GPTNeoXArgs.from_config(model.config).max_position_embeddings
    sample = self_calibration(model, ctx, windows=2)
    n, width = calibration_windows(model, sample.text, ctx).shape
    assert sample.text.count("<|endoftext|>") >= 3 and n >= 2 and width == ctx
