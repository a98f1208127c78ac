"""ggml's block formats as data: where each weight's quantized level sits in a block's bytes, and
how a block's header turns a level into the value ggml's dequantize computes.

A block of B weights holds, per sub-block, a scale `a` and (for the "_K with min" formats) an
offset `m`, and per weight an integer level L; ggml's dequantize computes, in float32,
    value = a · L − m
(`a` and `m` themselves computed from the header exactly as ggml does: fp16 super-scales times the
small integer sub-scales). `decode` reads (a, m, L) from raw blocks; `with_levels` writes new levels
into raw blocks and leaves every header byte as it was, so a rounding optimiser can choose levels on
llama.cpp's own grids and the result is, byte for byte, a block llama.cpp reads. Layouts are from
ggml-common.h and ggml-quants.c (dequantize_row_*); they are checked against ggml's own dequantize
in the tests (quant_tests/test_blocks.py).

Each format's level bits are listed as fields: (weight indices, byte indices, shift, width, bit
position in the level). Within one field every byte appears at most once, so a field is written
with one vectorised assignment; fields never overlap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .transpose import transposed

QK_K = 256


@dataclass(frozen=True)
class Field:
    weights: np.ndarray  # positions in the block
    bytes: np.ndarray  # byte offsets in the block, one per weight
    shift: int  # where the bits sit in that byte
    width: int  # how many bits
    pos: int = 0  # where they go in the stored level


@dataclass(frozen=True)
class BlockFormat:
    name: str
    ggml_type: int  # ggml's type id (gguf.GGMLQuantizationType)
    block: int  # weights per block
    size: int  # bytes per block
    sub: int  # weights per sub-block (one scale each)
    fields: tuple[Field, ...]
    offset: int  # level L = stored − offset (q8_0: stored is the int8 level itself)
    levels: int  # number of levels: L ∈ [−offset, levels − offset − 1]
    header: object  # raw [n, size] uint8 → (a, m) float32 [n, block // sub]
    # A non-uniform grid's levels, indexed by the stored bits (the IQ4 types' codebook): a weight's
    # level is then points[stored], not stored − offset, and only these levels exist in [lmin, lmax].
    points: np.ndarray | None = None

    @property
    def lmin(self) -> int:
        return int(self.points[0]) if self.points is not None else -self.offset

    @property
    def lmax(self) -> int:
        return int(self.points[-1]) if self.points is not None else self.levels - self.offset - 1


def f16(raw: np.ndarray, at: int) -> np.ndarray:
    return raw[:, at : at + 2].copy().view(np.float16)[:, 0].astype(np.float32)


def _field(weights, bytes_, shift, width, pos=0) -> Field:
    return Field(np.asarray(weights), np.asarray(bytes_), shift, width, pos)


# Block-of-32 formats ------------------------------------------------------------------------------


def _h_d_only(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = f16(raw, 0)[:, None]
    return d, np.zeros_like(d)


_l16 = np.arange(16)
Q4_0 = BlockFormat("Q4_0", 2, 32, 18, 32, (_field(_l16, 2 + _l16, 0, 4), _field(16 + _l16, 2 + _l16, 4, 4)), 8, 16, _h_d_only)


def _q5_fields(qh_at: int, qs_at: int) -> tuple[Field, ...]:
    """q5_0 / q5_1: q4's nibbles at qs_at, and the fifth bit of weight k at bit k of the
    little-endian uint32 qh at qh_at."""
    nibbles = (_field(_l16, qs_at + _l16, 0, 4), _field(16 + _l16, qs_at + _l16, 4, 4))
    return nibbles + tuple(_field(np.arange(b, 32, 8), qh_at + np.arange(4), b, 1, 4) for b in range(8))


Q5_0 = BlockFormat("Q5_0", 6, 32, 22, 32, _q5_fields(2, 6), 16, 32, _h_d_only)


def _h_d_and_min(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """q4_1 / q5_1: value = d · L + m, with the fp16 d and m at bytes 0 and 2 (our m is its negative)."""
    return f16(raw, 0)[:, None], -f16(raw, 2)[:, None]


# q4_1: q4_0's nibbles after two fp16 (d, m); q5_1: q5_0's fifth bits and nibbles after them
Q4_1 = BlockFormat("Q4_1", 3, 32, 20, 32, (_field(_l16, 4 + _l16, 0, 4), _field(16 + _l16, 4 + _l16, 4, 4)), 0, 16, _h_d_and_min)
Q5_1 = BlockFormat("Q5_1", 7, 32, 24, 32, _q5_fields(4, 8), 0, 32, _h_d_and_min)
# q8_0 stores int8 levels (two's complement, not offset): levels() and with_levels() special-case it
Q8_0 = BlockFormat("Q8_0", 8, 32, 34, 32, (_field(np.arange(32), 2 + np.arange(32), 0, 8),), 128, 256, _h_d_only)


# k-quants (super-blocks of 256) -------------------------------------------------------------------


def _low2_fields(qs_at: int) -> tuple[Field, ...]:
    """q2_K / q3_K: weight 128h + 32j + 16s + l holds bits 2j..2j+1 of qs[32h + 16s + l]."""
    out = []
    for j in range(4):
        w = np.array([128 * h + 32 * j + 16 * s + l for h in range(2) for s in range(2) for l in range(16)])
        b = np.array([qs_at + 32 * h + 16 * s + l for h in range(2) for s in range(2) for l in range(16)])
        out.append(_field(w, b, 2 * j, 2))
    return tuple(out)


def _h_q2k(raw):
    d, dmin, sc = f16(raw, 80)[:, None], f16(raw, 82)[:, None], raw[:, 0:16]
    return d * (sc & 0xF).astype(np.float32), dmin * (sc >> 4).astype(np.float32)


Q2_K = BlockFormat("Q2_K", 10, QK_K, 84, 16, _low2_fields(16), 0, 4, _h_q2k)


def _q3k_scales(raw: np.ndarray) -> np.ndarray:
    """The 16 six-bit scales (as int, before − 32) from the 12 scale bytes, as dequantize_row_q3_K
    unpacks them through four uint32 words."""
    aux = raw[:, 96:108].copy().view("<u4").astype(np.uint32)
    a0, a1, tmp = aux[:, 0], aux[:, 1], aux[:, 2]
    k1, k2 = np.uint32(0x03030303), np.uint32(0x0F0F0F0F)
    words = np.stack(
        [
            (a0 & k2) | (((tmp >> 0) & k1) << 4),
            (a1 & k2) | (((tmp >> 2) & k1) << 4),
            ((a0 >> 4) & k2) | (((tmp >> 4) & k1) << 4),
            ((a1 >> 4) & k2) | (((tmp >> 6) & k1) << 4),
        ],
        1,
    )
    return words.astype("<u4").view(np.int8).astype(np.int32)


def _h_q3k(raw):
    d = f16(raw, 108)[:, None]
    a = (d * (_q3k_scales(raw) - 32).astype(np.float32)).astype(np.float32)
    return a, np.zeros_like(a)


# hmask: weight 128h + 32j + 16s + l has its high bit (set = no −4) at bit 4h + j of hmask[16s + l]
_Q3_HM = tuple(
    _field(
        np.array([128 * h + 32 * j + 16 * s + l for s in range(2) for l in range(16)]),
        np.array([16 * s + l for s in range(2) for l in range(16)]),
        4 * h + j,
        1,
        2,
    )
    for h in range(2)
    for j in range(4)
)
Q3_K = BlockFormat("Q3_K", 11, QK_K, 110, 16, _low2_fields(32) + _Q3_HM, 4, 8, _h_q3k)


def _scale_min_k4(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """get_scale_min_k4 for j = 0..7 over the 12 scale bytes: (scales, mins) [n, 8]."""
    s, m = np.empty((len(sc), 8), np.int32), np.empty((len(sc), 8), np.int32)
    s[:, :4], m[:, :4] = sc[:, 0:4] & 63, sc[:, 4:8] & 63
    s[:, 4:] = (sc[:, 8:12] & 0xF) | ((sc[:, 0:4] >> 6) << 4)
    m[:, 4:] = (sc[:, 8:12] >> 4) | ((sc[:, 4:8] >> 6) << 4)
    return s, m


def _h_q45k(raw):
    d, dmin = f16(raw, 0)[:, None], f16(raw, 2)[:, None]
    s, m = _scale_min_k4(raw[:, 4:16].astype(np.int32))
    return (d * s.astype(np.float32)).astype(np.float32), (dmin * m.astype(np.float32)).astype(np.float32)


def _nibble_fields(qs_at: int) -> tuple[Field, ...]:
    """q4_K / q5_K: weight 64c + l holds the low nibble of qs[32c + l], 64c + 32 + l the high one."""
    lo = np.array([64 * c + l for c in range(4) for l in range(32)])
    b = np.array([qs_at + 32 * c + l for c in range(4) for l in range(32)])
    return _field(lo, b, 0, 4), _field(lo + 32, b, 4, 4)


Q4_K = BlockFormat("Q4_K", 12, QK_K, 144, 32, _nibble_fields(16), 0, 16, _h_q45k)
# q5_K's fifth bit: weight w at bit w // 32 of qh[w % 32]
_Q5_QH = tuple(_field(32 * k + np.arange(32), 16 + np.arange(32), k, 1, 4) for k in range(8))
Q5_K = BlockFormat("Q5_K", 13, QK_K, 176, 32, _nibble_fields(48) + _Q5_QH, 0, 32, _h_q45k)


def _h_q6k(raw):
    d = f16(raw, 208)[:, None]
    a = (d * raw[:, 192:208].view(np.int8).astype(np.float32)).astype(np.float32)
    return a, np.zeros_like(a)


def _q6k_fields() -> tuple[Field, ...]:
    """Weight 128h + 32k + l: low nibble (k < 2) or high nibble (k ≥ 2) of ql[64h + 32(k & 1) + l],
    and bits 2k..2k+1 of qh[32h + l] as its top two bits."""
    out = []
    for k in range(4):
        w = np.array([128 * h + 32 * k + l for h in range(2) for l in range(32)])
        out.append(_field(w, np.array([64 * h + 32 * (k & 1) + l for h in range(2) for l in range(32)]), 4 * (k >> 1), 4))
        out.append(_field(w, np.array([128 + 32 * h + l for h in range(2) for l in range(32)]), 2 * k, 2, 4))
    return tuple(out)


Q6_K = BlockFormat("Q6_K", 14, QK_K, 210, 16, _q6k_fields(), 32, 64, _h_q6k)


# Non-linear 4-bit types: value = scale · kvalues_iq4nl[stored] (ggml-common.h), levels not evenly
# spaced. The table is sorted, so stored index and level order agree.
KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int16)
# iq4_nl: q4_0's block (fp16 d, then 16 bytes of nibbles) on the codebook
IQ4_NL = BlockFormat("IQ4_NL", 20, 32, 18, 32, Q4_0.fields, 0, 16, _h_d_only, KVALUES_IQ4NL)


def _h_iq4xs(raw):
    """iq4_xs: sub-block ib's scale d · (ls − 32), ls six bits: the low four in nibble ib % 2 of
    scales_l[ib / 2] (bytes 4..7), the high two at bits 2ib of the little-endian uint16 scales_h (byte 2)."""
    d = f16(raw, 0)[:, None]
    ib = np.arange(8)
    low = (raw[:, 4 + ib // 2].astype(np.int32) >> (4 * (ib % 2))) & 0xF
    high = (raw[:, 2:4].copy().view("<u2").astype(np.int32) >> (2 * ib)) & 3
    a = (d * ((low | (high << 4)) - 32).astype(np.float32)).astype(np.float32)
    return a, np.zeros_like(a)


# iq4_xs: weight 32ib + l holds the low nibble of qs[16ib + l] (qs from byte 8), 32ib + 16 + l the high one
_IQ4XS_LO = np.array([32 * ib + l for ib in range(8) for l in range(16)])
_IQ4XS_B = np.array([8 + 16 * ib + l for ib in range(8) for l in range(16)])
IQ4_XS = BlockFormat(
    "IQ4_XS", 23, QK_K, 136, 32, (_field(_IQ4XS_LO, _IQ4XS_B, 0, 4), _field(_IQ4XS_LO + 16, _IQ4XS_B, 4, 4)), 0, 16, _h_iq4xs, KVALUES_IQ4NL
)

FORMATS = {f.name: f for f in (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS)}
BY_GGML_TYPE = {f.ggml_type: f for f in FORMATS.values()}


# Reading and writing levels -----------------------------------------------------------------------


# Both work on the blocks transposed ([size, n] bytes, [block, n] levels): a field's gather and
# scatter then move whole rows of n values instead of a few bytes of every block.


def read_fields(fields: tuple[Field, ...], raw: np.ndarray, count: int) -> np.ndarray:
    """The values `fields` hold in raw blocks [n, size]: int32 [n, count] (count: how many
    positions the fields' `weights` index)."""
    rt = transposed(raw)
    v = np.zeros((count, len(raw)), np.int32)
    for f in fields:
        v[f.weights] |= ((rt[f.bytes].astype(np.int32) >> f.shift) & ((1 << f.width) - 1)) << f.pos
    return v.T


def write_fields(fields: tuple[Field, ...], raw: np.ndarray, values: np.ndarray) -> np.ndarray:
    """A copy of raw blocks with `fields` set to values [n, count]; every other bit kept."""
    v, out = transposed(np.asarray(values, np.int32)), transposed(raw)
    for f in fields:
        mask = ((1 << f.width) - 1) << f.shift
        out[f.bytes] &= np.uint8(0xFF ^ mask)
        out[f.bytes] |= (((v[f.weights] >> f.pos) & ((1 << f.width) - 1)) << f.shift).astype(np.uint8)
    return transposed(out)


def levels(fmt: BlockFormat, raw: np.ndarray) -> np.ndarray:
    """The level L of every weight: raw [n, size] uint8 → int16 [n, block]."""
    v = read_fields(fmt.fields, raw, fmt.block)
    if fmt.name == "Q8_0":
        return v.astype(np.uint8).view(np.int8).astype(np.int16)
    if fmt.points is not None:
        return fmt.points[v]
    return (v - fmt.offset).astype(np.int16)


def with_levels(fmt: BlockFormat, raw: np.ndarray, lv: np.ndarray) -> np.ndarray:
    """A copy of raw blocks with every weight's level replaced by `lv` [n, block] (each within
    [lmin, lmax]); header bytes (scales, mins, super-scales) are kept as they are."""
    lv = np.asarray(lv)
    if lv.min(initial=fmt.lmin) < fmt.lmin or lv.max(initial=fmt.lmax) > fmt.lmax:
        raise ValueError(f"{fmt.name} levels must lie in [{fmt.lmin}, {fmt.lmax}]")
    return write_fields(fmt.fields, raw, _stored(fmt, lv.astype(np.int32)))


def _stored(fmt: BlockFormat, lv: np.ndarray) -> np.ndarray:
    """The bits a level is stored as (int32): two's complement (q8_0), its index in the codebook
    (only its points are levels), or level + offset."""
    if fmt.name == "Q8_0":
        return lv & 0xFF
    if fmt.points is None:
        return lv + fmt.offset
    index = np.full(fmt.lmax - fmt.lmin + 1, -1, np.int32)
    index[fmt.points - fmt.lmin] = np.arange(len(fmt.points))
    stored = index[lv - fmt.lmin]
    if (stored < 0).any():
        raise ValueError(f"{fmt.name} levels must be among its codebook's {len(fmt.points)} values")
    return stored


def grid(fmt: BlockFormat, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per weight (a, m) float32 [n, block]: value = a · L − m, each op rounded to float32 as ggml's
    dequantize does it."""
    a, m = fmt.header(raw)
    return np.repeat(a, fmt.sub, axis=1), np.repeat(m, fmt.sub, axis=1)


def values(fmt: BlockFormat, raw: np.ndarray) -> np.ndarray:
    """What ggml's dequantize returns for these blocks, computed from (a, m, L) here."""
    a, m = grid(fmt, raw)
    return level_values(a, m, levels(fmt, raw))


def level_values(a: np.ndarray, m: np.ndarray, lv: np.ndarray) -> np.ndarray:
    """ggml's dequantize of levels L on their grids (a, m): a · L − m, each op in float32 as ggml's."""
    return np.multiply(a, lv, dtype=np.float32) - m
