"""GGUF under llama.cpp vs transformers on the same weights and ids."""

from __future__ import annotations

import pytest

from neoxq.convert.converter import convert
from neoxq.runtime.model import NeoxModel, RuntimeOptions

from .conftest import CASES
from .helpers import hf_logits, kl_stats

# (max mean KL, min top-1). Measured on these fixtures with llama.cpp's defaults (flash attention
# on): F32 3.7e-7..7.2e-7 (summation order, llama.cpp's tanh-GELU, and flash attention's F16 Q and
# V accumulation, which flips one near-tie of 96 tokens in one fixture), F16 7e-7..3.5e-6, BF16
# 7e-5..1.5e-4 (8 mantissa bits vs F16's 11: the squared rounding error is ~64x larger), Q8_0
# 8e-4..1.7e-3 (weights and, in the matmul, the activations rounded to 8 bits). KL bounds are
# ~3-7x the worst measurement.
BOUNDS = {"f32": (5e-6, 0.98), "f16": (2e-5, 0.98), "bf16": (5e-4, 0.95), "q8_0": (6e-3, 0.9)}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("outtype", list(BOUNDS))
def test_logits_match_transformers(case, outtype, checkpoints, sample_ids, tmp_path):
    folder = checkpoints[case]
    path = convert(str(folder), outtype=outtype, output=tmp_path / f"m-{outtype}.gguf")
    ref = hf_logits(folder, sample_ids)
    with NeoxModel(path, RuntimeOptions(n_ctx=128)) as m:
        got = m.eval_logits(sample_ids)
    kl, top1 = kl_stats(ref, got)
    max_kl, min_top1 = BOUNDS[outtype]
    print(f"{case} {outtype}: mean KL {kl:.3e} top1 {top1:.3f}")
    assert kl < max_kl, f"mean KL {kl:.3e} ≥ {max_kl}"
    assert top1 >= min_top1
    # The reference is not near-uniform: a broken conversion could not pass by accident.
    assert ref.std(-1).mean() > 1.0


def test_broken_qkv_layout_is_detected(ckpt, sample_ids, tmp_path, monkeypatch):
    """The parity check can fail: skipping the QKV de-interleave must blow the F32 bound."""
    import neoxq.convert.neox as neox

    monkeypatch.setattr(neox, "deinterleave_qkv", lambda arr, args: arr)
    path = convert(str(ckpt), outtype="f32", output=tmp_path / "bad.gguf")
    with NeoxModel(path, RuntimeOptions(n_ctx=128)) as m:
        got = m.eval_logits(sample_ids)
    kl, _ = kl_stats(hf_logits(ckpt, sample_ids), got)
    assert kl > 1e-2
