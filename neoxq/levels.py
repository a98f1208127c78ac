"""Whole tensors on llama.cpp's grids: reading the float source a row range at a time, the values a
quantized tensor's bytes hold, and GPTQ's rounding of a target matrix into llama.cpp's blocks (only
the levels change; the blocks' scales and mins, the grids, stay llama.cpp's). Two families of
format: scalar grids (neoxq.core.blocks: a level per weight) and codebook grids
(neoxq.core.iq_blocks: a grid row per group of weights, neoxq.core.gptvq)."""

from __future__ import annotations

import functools

import gguf
import numpy as np

from neoxq import codebooks
from neoxq.core import blocks, gptq, gptvq, iq_blocks
from neoxq.core.errors import UsageError
from neoxq.core.gguf_info import FLOAT_DTYPES, GGUFInfo, TensorInfo, float_rows
from neoxq.runtime import capi

# Rows the per-tensor output-error ratio (a report line, not an input to anything) is estimated on,
# evenly spaced: the exact figure would be two [rows, in] × [in, in] products per matrix, and rows
# are rounded alike.
ERROR_ROWS = 256


def read_weights(info: GGUFInfo, t: TensorInfo, rows: slice = slice(None)) -> np.ndarray:
    """A float tensor of an F32/F16/BF16 GGUF (or some of its rows) as float32 [rows, cols]."""
    if t.type not in FLOAT_DTYPES:
        raise UsageError(f"{info.path.name} holds {t.name} as {t.type}; optimise from the F32/F16/BF16 file")
    return float_rows(info, t, rows)


class RowChunks:
    """A [rows, cols] matrix produced a row range at a time (read from a file, dequantized): the
    largest tensors (an embedding or output matrix of a 50k vocabulary) are never held whole in
    float32 or float64."""

    def __init__(self, shape: tuple[int, int], rows_fn):
        self.shape, self._rows = tuple(shape), rows_fn

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        return self._rows(rows)


def source_weights(src: GGUFInfo, name: str) -> RowChunks:
    t = src.tensor(name)
    return RowChunks(t.shape, lambda rows: read_weights(src, t, rows))


def error_rows(n: int) -> np.ndarray:
    """The rows (of n) an output-error ratio is estimated on."""
    return np.arange(0, n, -(-n // ERROR_ROWS))


def at(v: np.ndarray | None, idx: np.ndarray) -> np.ndarray | None:
    return None if v is None else v[idx]


Format = blocks.BlockFormat | iq_blocks.CodebookFormat


def format_of(type_name: str) -> Format | None:
    """The block format whose levels neoxq chooses for a tensor type; None for the others."""
    return blocks.FORMATS.get(type_name) or iq_blocks.FORMATS.get(type_name)


def column_group(fmt: Format) -> int:
    """Columns GPTQ must keep together and in order for this format (gptq.compensation's group)."""
    return gptvq.UNIT if isinstance(fmt, iq_blocks.CodebookFormat) else 1


@functools.cache
def _grid(name: str) -> gptvq.Grid:
    fmt = iq_blocks.FORMATS[name]
    return gptvq.Grid(codebooks.grid(name), fmt.signed, fmt.parity)


def block_values(fmt: Format, raw: np.ndarray) -> np.ndarray:
    """ggml's dequantize of raw blocks [n, size], computed from their headers and levels or codes."""
    if isinstance(fmt, iq_blocks.CodebookFormat):
        return iq_blocks.values(fmt, codebooks.grid(fmt.name), raw)
    return blocks.values(fmt, raw)


def dequantized_rows(fmt: Format, raw: np.ndarray, shape: tuple[int, int], rows: np.ndarray) -> np.ndarray:
    """What ggml's dequantize gives for some rows (an index array) of `raw` blocks [n, size] of a
    [rows, cols] tensor, float32 [len(rows), cols]."""
    per_row = raw.reshape(shape[0], -1, fmt.size)[rows]
    return block_values(fmt, per_row.reshape(-1, fmt.size)).reshape(len(rows), shape[1])


def tensor_values(info: GGUFInfo, t: TensorInfo, raw: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """float32 [rows, cols] of a tensor's raw bytes: neoxq's block formats, the float types, or
    ggml's own dequantize for the rest (a mix's IQ types). rows: only these (an index array); in
    neoxq's block formats only their blocks are decoded (the embedding rows a few calibration
    windows use, of a large vocabulary)."""
    fmt = format_of(t.type)
    if rows is not None:
        return dequantized_rows(fmt, raw.reshape(-1, fmt.size), t.shape, rows) if fmt is not None else tensor_values(info, t, raw)[rows]
    if fmt is not None:
        return block_values(fmt, raw.reshape(-1, fmt.size)).reshape(t.shape)
    if t.type in FLOAT_DTYPES:
        return read_weights(info, t)
    return capi.dequantize(raw, int(gguf.GGMLQuantizationType[t.type]), t.n_elements).reshape(t.shape)


def rounded_chunks(fmt: Format, raw: np.ndarray, target, factor):
    """The one rounding loop: GPTQ levels for `target` ([rows, cols], an array or RowChunks) on the
    grids of `raw` (its blocks [n, size], rewritten in place), a row chunk at a time against one
    factor (gptq.compensation). Yields, per chunk, (rows, the target's rows, the chunk's values
    now: float32 [rows, cols])."""
    n, cols = target.shape
    step = gptq.row_chunk(cols)
    per_row = cols // fmt.block
    if isinstance(fmt, iq_blocks.CodebookFormat):
        factor = gptq.on_host(factor)  # gptvq's sweep runs on the host: U copied there once, not per chunk
    for r0 in range(0, n, step):
        rows = slice(r0, min(r0 + step, n))
        wr, chunk = target[rows], raw[rows.start * per_row : rows.stop * per_row]
        if isinstance(fmt, iq_blocks.CodebookFormat):
            yield rows, wr, _codebook_chunk(fmt, chunk, wr, factor)
            continue
        a, m = (g.reshape(wr.shape) for g in blocks.grid(fmt, chunk))
        lv = gptq.gptq_levels(wr, None, a, m, fmt.lmin, fmt.lmax, factor=factor, points=fmt.points)
        chunk[:] = blocks.with_levels(fmt, chunk, lv.reshape(-1, fmt.block))
        yield rows, wr, blocks.level_values(a, m, lv)


def _codebook_chunk(fmt: iq_blocks.CodebookFormat, chunk: np.ndarray, wr: np.ndarray, factor) -> np.ndarray:
    """gptvq's grid rows and signs for target rows wr, written into their blocks `chunk` in place;
    returns their values."""
    a, o = (g.reshape(wr.shape) for g in iq_blocks.unit_grid(fmt, chunk))
    c, idx, neg = gptvq.codebook_round(wr, a, o, factor, _grid(fmt.name))
    chunk[:] = iq_blocks.with_codes(fmt, chunk, idx.reshape(len(chunk), -1), neg.reshape(len(chunk), -1))
    return iq_blocks.code_values(a, o, c)


def round_rows(fmt: Format, raw: np.ndarray, target: np.ndarray, factor, coupling=None) -> np.ndarray:
    """rounded_chunks for a matrix held whole, or with its rows coupled (gptq.coupled_levels; the
    codebook formats' rows are rounded alike); returns its new values, float32."""
    if coupling is not None and isinstance(fmt, blocks.BlockFormat):
        a, m = (g.reshape(target.shape) for g in blocks.grid(fmt, raw))
        lv = gptq.coupled_levels(target, a, m, fmt.lmin, fmt.lmax, factor, coupling, points=fmt.points)
        raw[:] = blocks.with_levels(fmt, raw, lv.reshape(-1, fmt.block))
        return blocks.level_values(a, m, lv)
    q = np.empty(target.shape, np.float32)
    for rows, _, values in rounded_chunks(fmt, raw, target, factor):
        q[rows] = values
    return q
