"""neoxq.core.iq_blocks against ggml's own dequantize: the values computed from the header and the
codes equal ggml's bit for bit, llama.cpp's blocks round-trip byte for byte, and new grid indices
and signs written into them read back, through ggml, as exactly the values chosen."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from neoxq import codebooks
from neoxq.core import iq_blocks
from neoxq.runtime import capi


def _raw(fmt, rng, rows=4, cols=512):
    w = (rng.standard_normal((rows, cols)) * rng.uniform(0.01, 2, (rows, 1))).astype(np.float32)
    w[:, 7] = 4.0  # an outlier per row: sub-scales differ across a block
    raw = capi.quantize_rows(w, fmt.ggml_type, rng.uniform(0.1, 3, cols).astype(np.float32))
    return raw.reshape(-1, fmt.size), w.size


def _random_codes(fmt, rng, n):
    idx = rng.integers(0, fmt.grid_size, (n, fmt.groups))
    neg = rng.random((n, iq_blocks.QK_K)) < 0.5 if fmt.signed else np.zeros((n, iq_blocks.QK_K), bool)
    if fmt.parity:  # make each unit's negatives even through its last weight
        units = neg.reshape(n, -1, 8)
        units[:, :, 7] = units[:, :, :7].sum(2) % 2 == 1
    return idx, neg


@pytest.mark.parametrize("name", list(iq_blocks.FORMATS))
def test_codes_and_values_equal_ggml(name):
    fmt, rng = iq_blocks.FORMATS[name], np.random.default_rng(1)
    grid = codebooks.grid(name)
    raw, n = _raw(fmt, rng)
    assert np.array_equal(iq_blocks.values(fmt, grid, raw).reshape(-1), capi.dequantize(raw, fmt.ggml_type, n))
    idx, neg = iq_blocks.codes(fmt, raw)
    assert np.array_equal(iq_blocks.with_codes(fmt, raw, idx, neg), raw)  # llama.cpp's own choices, byte for byte
    new_idx, new_neg = _random_codes(fmt, rng, len(raw))
    raw2 = iq_blocks.with_codes(fmt, raw, new_idx, new_neg)
    got_idx, got_neg = iq_blocks.codes(fmt, raw2)
    assert np.array_equal(got_idx, new_idx) and np.array_equal(got_neg, new_neg)
    assert np.array_equal(capi.dequantize(raw2, fmt.ggml_type, n), iq_blocks.values(fmt, grid, raw2).reshape(-1))
    assert not np.array_equal(raw2, raw)
    assert [h.tobytes() for h in fmt.header(raw2)] == [h.tobytes() for h in fmt.header(raw)]  # scales kept


def test_a_wrong_layout_is_caught():
    """Negative control: the check above fails for IQ3_S with its sign bytes shifted by one."""
    fmt = iq_blocks.IQ3_S
    shifted = dataclasses.replace(fmt, signs=tuple(dataclasses.replace(f, bytes=f.bytes + 1) for f in fmt.signs))
    raw, n = _raw(fmt, np.random.default_rng(2))
    assert not np.array_equal(iq_blocks.values(shifted, codebooks.grid("IQ3_S"), raw).reshape(-1), capi.dequantize(raw, fmt.ggml_type, n))


def test_codes_a_type_cannot_hold_are_refused():
    rng = np.random.default_rng(3)
    raw, _ = _raw(iq_blocks.IQ2_XXS, rng)
    idx, neg = iq_blocks.codes(iq_blocks.IQ2_XXS, raw)
    odd = neg.copy()
    odd[:, 0] ^= True
    with pytest.raises(ValueError, match="even number"):
        iq_blocks.with_codes(iq_blocks.IQ2_XXS, raw, idx, odd)
    with pytest.raises(ValueError, match="grid indices"):
        iq_blocks.with_codes(iq_blocks.IQ2_XXS, raw, idx + 256, neg)
    raw1, _ = _raw(iq_blocks.IQ1_S, rng)
    idx1, neg1 = iq_blocks.codes(iq_blocks.IQ1_S, raw1)
    with pytest.raises(ValueError, match="no sign"):
        iq_blocks.with_codes(iq_blocks.IQ1_S, raw1, idx1, ~neg1)
