"""neoxq.core.gptvq: grid rows chosen jointly in the layer-output metric with GPTQ's compensation,
on llama.cpp's own IQ scales. Lower output error than llama.cpp's choices on correlated inputs; on
uncorrelated inputs, exactly the per-group exhaustive search (nothing to compensate); parity kept;
the codes written into llama.cpp's blocks read back through ggml as the values chosen."""

from __future__ import annotations

import numpy as np
import pytest

from neoxq import codebooks
from neoxq.core import gptq, gptvq, iq_blocks
from neoxq.runtime import capi

from .helpers import correlated_layer

TYPES = ["IQ3_S", "IQ3_XXS", "IQ2_XS", "IQ1_S"]  # free signs, parity over two grid rows, parity, no signs


def _problem(name: str, seed: int = 0, tokens: int = 2048, cols: int = 256, rows: int = 32, mix: float = 0.3):
    fmt = iq_blocks.FORMATS[name]
    h, w = correlated_layer(seed, tokens, cols, rows, mix)
    raw = capi.quantize_rows(w, fmt.ggml_type, np.diag(h).astype(np.float32)).reshape(-1, fmt.size)
    a, o = (g.reshape(w.shape) for g in iq_blocks.unit_grid(fmt, raw))
    grid = gptvq.Grid(codebooks.grid(name), fmt.signed, fmt.parity)
    return fmt, h, w, raw, a, o, grid


def _write(fmt, raw, w, idx, neg):
    return iq_blocks.with_codes(fmt, raw, idx.reshape(-1, fmt.groups), neg.reshape(-1, iq_blocks.QK_K))


@pytest.mark.parametrize("name", TYPES)
def test_joint_rounding_lowers_the_output_error(name):
    fmt, h, w, raw, a, o, grid = _problem(name)
    stock = capi.dequantize(raw, fmt.ggml_type, w.size).reshape(w.shape)
    c, idx, neg = gptvq.codebook_round(w, a, o, gptq.compensation(h, group=gptvq.UNIT), grid)
    raw2 = _write(fmt, raw, w, idx, neg)  # refused if a unit's parity were odd
    ours = capi.dequantize(raw2, fmt.ggml_type, w.size).reshape(w.shape)
    assert np.array_equal(ours, iq_blocks.code_values(a, o, c))
    assert gptq.output_error(w, ours, h) < 0.8 * gptq.output_error(w, stock, h)


@pytest.mark.parametrize("name", ["IQ3_S", "IQ2_XS", "IQ1_S"])
def test_uncorrelated_inputs_give_the_exhaustive_per_group_choice(name):
    """Negative control: a diagonal H leaves nothing to compensate, so each group's row is the one
    an exhaustive search over the grid (signs from the weights) finds in the diagonal metric."""
    fmt, h, w, raw, a, o, grid = _problem(name, seed=1, rows=8, cols=256)
    diag = np.diag(np.diag(h))
    _, idx, neg = gptvq.codebook_round(w, a, o, gptq.compensation(diag, group=gptvq.UNIT), grid)
    t = w / np.where(a == 0, 1, a) - o
    hd = np.diag(h) + gptq.DAMP * np.mean(np.diag(h))
    g = grid.rows.astype(np.float64)
    for r in range(w.shape[0]):
        for k in range(w.shape[1] // grid.width):
            s = slice(k * grid.width, (k + 1) * grid.width)
            sign = np.where(t[r, s] < 0, -1.0, 1.0) if grid.signed else 1.0
            loss = (((t[r, s] - sign * g) ** 2) * hd[s]).sum(1)
            assert loss[idx[r, k]] <= loss.min() * (1 + 1e-5) + 1e-12, (r, k)
    if not grid.signed:
        assert not neg.any()


def test_the_lazy_batches_do_not_change_the_choice(monkeypatch):
    """Compensating inside blocks of columns and then the rest at once is only a regrouping: the
    choices equal those of blocks of a single unit (the whole row updated after every unit)."""
    fmt, h, w, raw, a, o, grid = _problem("IQ2_XS", seed=2, cols=512, rows=16)
    factor = gptq.compensation(h, group=gptvq.UNIT)
    ours = gptvq.codebook_round(w, a, o, factor, grid)[1]
    monkeypatch.setattr(gptvq, "BLOCK", gptvq.UNIT)
    plain = gptvq.codebook_round(w, a, o, factor, grid)[1]
    assert (ours == plain).mean() > 0.99
