"""ggml's codebook block formats (the IQ3/IQ2/IQ1 types) as data: where each group's grid index and
each weight's sign sit in a block's bytes, and how the header turns them into ggml's values.

A super-block of 256 weights is cut into units of 8. Each unit has one scale `a` and one offset `o`
from the header (fp16 super-scale times a small integer sub-scale; `o` is IQ1's ±1/8 shift, 0
elsewhere), and is covered by grid points of G weights (G = 4 for IQ3, 8 for IQ2 and IQ1), each one
row of the type's grid (a table of small integers), with a sign per weight where the type has
signs. ggml's dequantize computes, in float32,
    value = a · (± grid[index][j] + o)
so a weight's code is its signed grid component c = ± grid[index][j], and `values` needs only (a, o)
and c. The signs are free bits (IQ2_S, IQ3_S) or 7 bits per unit whose eighth is the parity
(IQ2_XXS, IQ2_XS, IQ3_XXS: an even number of negative weights per unit, ggml's ksigns table).

`codes` reads (index, negative) from raw blocks and `with_codes` writes new ones, header bytes
untouched, so a rounding optimiser can choose grid points on llama.cpp's own scales and the result
is, byte for byte, a block llama.cpp reads. The grids themselves are ggml's tables, read through its
own dequantize (neoxq.codebooks), not copied here. Layouts are from ggml-common.h and ggml-quants.c
(dequantize_row_iq*); the tests check them against ggml's dequantize (quant_tests/test_iq_blocks.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .blocks import QK_K, Field, f16, read_fields, write_fields

UNIT = 8  # weights per unit: one scale, one offset, one sign byte


@dataclass(frozen=True)
class CodebookFormat:
    name: str
    ggml_type: int
    size: int  # bytes per block of 256
    width: int  # G: weights per grid point
    grid_size: int  # rows of the grid (how many indices)
    index: tuple[Field, ...]  # the grid index of each group ("weights" here are group numbers)
    signs: tuple[Field, ...]  # free sign bits per weight, or the 7 stored bits per unit (parity)
    parity: bool  # signs hold 7 bits per unit, the eighth making the negatives even
    header: object  # raw [n, size] uint8 → (a, o) float32 [n, 32], per unit of 8

    @property
    def block(self) -> int:
        return QK_K

    @property
    def groups(self) -> int:
        return QK_K // self.width

    @property
    def signed(self) -> bool:
        return bool(self.signs)


def _bits(ids, word_bytes, bit: int, width: int, at: int = 0) -> tuple[Field, ...]:
    """Fields for `width` bits at bit offset `bit` of a little-endian word starting at
    `word_bytes` (one per id), split where they cross a byte; they go to bit `at` of the value."""
    ids, word_bytes = np.asarray(ids), np.asarray(word_bytes)
    out, pos = [], 0
    while pos < width:
        byte, shift = divmod(bit + pos, 8)
        take = min(8 - shift, width - pos)
        out.append(Field(ids, word_bytes + byte, shift, take, at + pos))
        pos += take
    return tuple(out)


def _per_unit(a: np.ndarray, units_each: int, o: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(a, o) per unit of 8 [n, 32] from a per sub-block (`units_each` units each) and o per unit."""
    a = np.repeat(a.astype(np.float32), units_each, axis=1)
    return a, np.zeros_like(a) if o is None else o.astype(np.float32)


_ib = np.arange(8)  # sub-blocks of 32
_u = np.arange(32)  # units of 8


def _weight_bits(units_of_byte: np.ndarray, byte_of_unit: np.ndarray) -> tuple[Field, ...]:
    """Free signs: weight 8u + j is bit j of the byte at byte_of_unit[u]."""
    return tuple(Field(8 * units_of_byte + j, byte_of_unit, j, 1) for j in range(8))


# iq2_xxs: d; then per sub-block ib two uint32 at 2 + 8ib: the first holds the four groups' 8-bit
# indices, the second four 7-bit signs (unit 4ib + l at bit 7l) and the 4-bit scale at bit 28.
def _h_iq2xxs(raw):
    s = (raw[:, 2 + 8 * _ib + 7] >> 4).astype(np.float32)
    return _per_unit(f16(raw, 0)[:, None] * (0.5 + s) * np.float32(0.25), 4)


_IQ2XXS_SIGNS = sum((_bits(4 * _ib + l, 2 + 8 * _ib + 4, 7 * l, 7) for l in range(4)), ())
IQ2_XXS = CodebookFormat("IQ2_XXS", 16, 66, 8, 256, (Field(_u, 2 + 8 * (_u // 4) + _u % 4, 0, 8),), _IQ2XXS_SIGNS, True, _h_iq2xxs)


# iq2_xs: d; qs: uint16 per group at 2 + 2g, index in bits 0..8, signs in 9..15; a scale nibble per
# 16 weights at 66 + ib (low: the first 16).
def _h_iq2xs(raw):
    sc = raw[:, 66 + _ib].astype(np.int32)
    s = np.stack([sc & 0xF, sc >> 4], 2).reshape(len(raw), 16).astype(np.float32)
    return _per_unit(f16(raw, 0)[:, None] * (0.5 + s) * np.float32(0.25), 2)


IQ2_XS = CodebookFormat("IQ2_XS", 17, 74, 8, 512, _bits(_u, 2 + 2 * _u, 0, 9), _bits(_u, 2 + 2 * _u, 9, 7), True, _h_iq2xs)


# iq2_s: d; qs[64]: the groups' low 8 index bits (bytes 2..33), then a sign byte per unit (34..65);
# qh[8] at 66: the two high index bits of group 4ib + l at bits 2l of qh[ib]; scales as iq2_xs's at 74.
def _h_iq2s(raw):
    sc = raw[:, 74 + _ib].astype(np.int32)
    s = np.stack([sc & 0xF, sc >> 4], 2).reshape(len(raw), 16).astype(np.float32)
    return _per_unit(f16(raw, 0)[:, None] * (0.5 + s) * np.float32(0.25), 2)


IQ2_S = CodebookFormat(
    "IQ2_S",
    22,
    82,
    8,
    1024,
    (Field(_u, 2 + _u, 0, 8), *(Field(_u[l::4], 66 + _ib, 2 * l, 2, 8) for l in range(4))),
    _weight_bits(_u, 34 + _u),
    False,
    _h_iq2s,
)


# iq3_xxs: d; 64 bytes of 8-bit indices (a group of 4 each, from byte 2); then per sub-block a
# uint32 at 66 + 4ib: four 7-bit signs (unit 4ib + l at bit 7l) and the scale at bit 28.
def _h_iq3xxs(raw):
    s = (raw[:, 66 + 4 * _ib + 3] >> 4).astype(np.float32)
    return _per_unit(f16(raw, 0)[:, None] * (0.5 + s) * np.float32(0.5), 4)


_g64 = np.arange(64)
_IQ3XXS_SIGNS = sum((_bits(4 * _ib + l, 66 + 4 * _ib, 7 * l, 7) for l in range(4)), ())
IQ3_XXS = CodebookFormat("IQ3_XXS", 18, 98, 4, 256, (Field(_g64, 2 + _g64, 0, 8),), _IQ3XXS_SIGNS, True, _h_iq3xxs)


# iq3_s: d; qs[64] at 2: groups' low 8 index bits; qh[8] at 66: the ninth bit of group 8ib + k at
# bit k of qh[ib]; signs[32] at 74: a byte per unit; scales[4] at 106: a nibble per sub-block,
# a = d · (1 + 2 · nibble).
def _h_iq3s(raw):
    sc = raw[:, 106 + _ib // 2].astype(np.int32) >> (4 * (_ib % 2))
    return _per_unit(f16(raw, 0)[:, None] * (1 + 2 * (sc & 0xF)).astype(np.float32), 4)


IQ3_S = CodebookFormat(
    "IQ3_S",
    21,
    110,
    4,
    512,
    (Field(_g64, 2 + _g64, 0, 8), *(Field(_g64[k::8], 66 + _ib, k, 1, 8) for k in range(8))),
    _weight_bits(_u, 74 + _u),
    False,
    _h_iq3s,
)


# iq1_s: d; qs[32] at 2: groups' low 8 index bits; qh uint16 per sub-block at 34 + 2ib: group
# 4ib + l's three high bits at bit 3l, the scale's 3 bits at bit 12 (a = d · (2s + 1)), and the
# shift's sign at bit 15 (o = ∓1/8). No signs: the grid's values are −1, 0 and 1.
def _h_iq1s(raw):
    qh = raw[:, 34:50].copy().view("<u2").astype(np.int32)
    a = f16(raw, 0)[:, None] * (2 * ((qh >> 12) & 7) + 1).astype(np.float32)
    o = np.where(qh & 0x8000, np.float32(-0.125), np.float32(0.125))
    return _per_unit(a, 4, np.repeat(o, 4, axis=1))


def _iq1_index(low_at: int, high) -> tuple[Field, ...]:
    """IQ1's 11-bit group index: the low 8 bits in a byte per group from low_at, the high 3 from
    `high`: (word bytes per group, bit offset per group) of a little-endian word."""
    word, bit = high
    high_fields = sum((_bits(_u[bit == b], word[bit == b], b, 3, at=8) for b in np.unique(bit)), ())
    return (Field(_u, low_at + _u, 0, 8), *high_fields)


IQ1_S = CodebookFormat("IQ1_S", 19, 50, 8, 2048, _iq1_index(2, (34 + 2 * (_u // 4), 3 * (_u % 4))), (), False, _h_iq1s)


# iq1_m: no fp16 d of its own; qs[32] at 0: low index bits; qh[16] at 32: group 4ib + l's high 3
# bits at bit 4(l % 2) of qh[2ib + l / 2], its shift's sign at bit 4(l % 2) + 3; scales: four
# uint16 at 48, whose top nibbles make d's fp16 bits and whose low 12 bits per pair of sub-blocks
# are four 3-bit scales (a = d · (2s + 1), one per 16 weights).
def _h_iq1m(raw):
    sc = raw[:, 48:56].copy().view("<u2").astype(np.int32)
    bits = (sc[:, 0] >> 12) | ((sc[:, 1] >> 8) & 0x00F0) | ((sc[:, 2] >> 4) & 0x0F00) | (sc[:, 3] & 0xF000)
    d = bits.astype(np.uint16).view(np.float16).astype(np.float32)[:, None]
    halves = np.stack([(sc[:, _ib // 2] >> (6 * (_ib % 2) + 3 * h)) & 7 for h in range(2)], 2).reshape(len(raw), 16)
    qh = raw[:, 32:48].astype(np.int32)
    o = np.where(np.stack([qh & 0x08, qh & 0x80], 2).reshape(len(raw), 32), np.float32(-0.125), np.float32(0.125))
    return _per_unit(d * (2 * halves + 1).astype(np.float32), 2, o)


IQ1_M = CodebookFormat("IQ1_M", 29, 56, 8, 2048, _iq1_index(0, (32 + 2 * (_u // 4) + (_u % 4) // 2, 4 * (_u % 2))), (), False, _h_iq1m)

FORMATS = {f.name: f for f in (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M)}
BY_GGML_TYPE = {f.ggml_type: f for f in FORMATS.values()}


# Reading and writing codes ------------------------------------------------------------------------


def _parity_bit(seven: np.ndarray) -> np.ndarray:
    """ksigns' eighth bit: set when the 7 stored bits hold an odd number of negatives."""
    p = seven.copy()
    for k in (4, 2, 1):
        p ^= p >> k
    return p & 1


def codes(fmt: CodebookFormat, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(grid index int32 [n, groups], negative bool [n, 256]) of raw blocks [n, size]."""
    idx = read_fields(fmt.index, raw, fmt.groups)
    if not fmt.signed:
        return idx, np.zeros((len(raw), QK_K), bool)
    if not fmt.parity:
        return idx, read_fields(fmt.signs, raw, QK_K).astype(bool)
    seven = read_fields(fmt.signs, raw, QK_K // UNIT)
    byte = seven | (_parity_bit(seven) << 7)
    return idx, ((byte[:, :, None] >> np.arange(8)) & 1).astype(bool).reshape(len(raw), QK_K)


def with_codes(fmt: CodebookFormat, raw: np.ndarray, idx: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """A copy of raw blocks with every group's index and weight's sign replaced (header bytes kept).
    Refused: an index off the grid, a negative weight in an unsigned type, or (parity types) a unit
    with an odd number of negatives."""
    idx, negative = np.asarray(idx), np.asarray(negative, bool).reshape(len(raw), QK_K)
    if idx.min(initial=0) < 0 or idx.max(initial=0) >= fmt.grid_size:
        raise ValueError(f"{fmt.name} grid indices must lie in [0, {fmt.grid_size - 1}]")
    out = write_fields(fmt.index, raw, idx)
    if not fmt.signed:
        if negative.any():
            raise ValueError(f"{fmt.name} has no sign bits")
        return out
    if not fmt.parity:
        return write_fields(fmt.signs, out, negative)
    byte = (negative.reshape(len(raw), -1, UNIT).astype(np.int32) << np.arange(8)).sum(2)
    if (_parity_bit(byte & 0x7F) != byte >> 7).any():
        raise ValueError(f"{fmt.name} needs an even number of negative weights in every 8")
    return write_fields(fmt.signs, out, byte & 0x7F)


def components(fmt: CodebookFormat, grid: np.ndarray, idx: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """Each weight's signed grid component c, float32 [n, 256], from the grid [grid_size, width]."""
    c = grid[idx].reshape(len(idx), QK_K).astype(np.float32)
    return np.where(negative.reshape(c.shape), -c, c)


def unit_grid(fmt: CodebookFormat, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per weight (a, o) float32 [n, 256]: value = a · (c + o)."""
    a, o = fmt.header(raw)
    return np.repeat(a, UNIT, axis=1), np.repeat(o, UNIT, axis=1)


def code_values(a: np.ndarray, o: np.ndarray, c: np.ndarray) -> np.ndarray:
    """ggml's dequantize of components c on their scales: a · (c + o), in float32 as ggml's."""
    return np.multiply(a, np.add(c, o, dtype=np.float32), dtype=np.float32)


def values(fmt: CodebookFormat, grid: np.ndarray, raw: np.ndarray) -> np.ndarray:
    """What ggml's dequantize returns for these blocks, computed here from the header and codes."""
    a, o = unit_grid(fmt, raw)
    return code_values(a, o, components(fmt, grid, *codes(fmt, raw)))
