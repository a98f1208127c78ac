"""neoxq.core.blocks against ggml's own dequantize (the type's to_float, through ctypes): the values
computed from (a, m, L) equal ggml's bit for bit, llama.cpp's blocks round-trip byte for byte, and
new levels written into them read back, through ggml, as exactly the values chosen."""

from __future__ import annotations

import numpy as np
import pytest

from neoxq.core import blocks
from neoxq.runtime import capi


def _raw(fmt, rng, rows=6, cols=512, imatrix=True):
    w = (rng.standard_normal((rows, cols)) * rng.uniform(0.01, 2, (rows, 1))).astype(np.float32)
    w[:, 7] = 4.0  # an outlier per row: sub-scales differ across a block
    im = rng.uniform(0.1, 3, cols).astype(np.float32) if imatrix else None
    raw = capi.quantize_rows(w, fmt.ggml_type, im)
    return raw.reshape(-1, fmt.size), w.size


@pytest.mark.parametrize("name", list(blocks.FORMATS))
def test_levels_and_values_equal_ggml(name):
    fmt, rng = blocks.FORMATS[name], np.random.default_rng(1)
    raw, n = _raw(fmt, rng)
    ggml = capi.dequantize(raw, fmt.ggml_type, n)
    assert np.array_equal(blocks.values(fmt, raw).reshape(-1), ggml)
    lv = blocks.levels(fmt, raw)
    assert fmt.lmin <= lv.min() and lv.max() <= fmt.lmax
    assert np.array_equal(blocks.with_levels(fmt, raw, lv), raw)  # llama.cpp's own choices, byte for byte
    # levels nobody chose: ggml reads back exactly what the grid says
    new = rng.choice(fmt.points, lv.shape) if fmt.points is not None else rng.integers(fmt.lmin, fmt.lmax + 1, lv.shape)
    raw2 = blocks.with_levels(fmt, raw, new)
    assert np.array_equal(blocks.levels(fmt, raw2), new)
    assert np.array_equal(capi.dequantize(raw2, fmt.ggml_type, n), blocks.values(fmt, raw2).reshape(-1))
    assert not np.array_equal(raw2, raw)
    hdr = np.ones(fmt.size, bool)  # every byte no field touches is header: kept
    for f in fmt.fields:
        hdr[f.bytes] = False
    assert np.array_equal(raw2[:, hdr], raw[:, hdr])


def test_a_wrong_layout_is_caught():
    """Negative control: the check above fails for a layout with two fields swapped."""
    import dataclasses

    fmt = blocks.Q4_K
    swapped = dataclasses.replace(fmt, fields=(dataclasses.replace(fmt.fields[0], shift=4), dataclasses.replace(fmt.fields[1], shift=0)))
    raw, n = _raw(fmt, np.random.default_rng(2))
    assert not np.array_equal(blocks.values(swapped, raw).reshape(-1), capi.dequantize(raw, fmt.ggml_type, n))


def test_a_level_off_the_codebook_is_refused():
    """Inside [lmin, lmax] but not one of iq4's values: refused, not written as some other level."""
    raw, _ = _raw(blocks.IQ4_NL, np.random.default_rng(4))
    lv = blocks.levels(blocks.IQ4_NL, raw)
    assert set(np.unique(lv)) <= set(blocks.KVALUES_IQ4NL.tolist())
    with pytest.raises(ValueError, match="codebook"):
        blocks.with_levels(blocks.IQ4_NL, raw, np.where(lv == 1, 2, lv))


def test_out_of_range_levels_refused():
    raw, _ = _raw(blocks.Q4_0, np.random.default_rng(3))
    with pytest.raises(ValueError, match="levels must lie"):
        blocks.with_levels(blocks.Q4_0, raw, np.full((len(raw), 32), 8))
