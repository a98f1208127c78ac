"""Byte sizes as people write them (`2.1GB`, `850MB`, `4GiB`, `1.5e9`) and as we print them."""

from __future__ import annotations

import re

from .errors import UsageError

_UNITS = {
    "": 1,
    "B": 1,
    "K": 1e3,
    "KB": 1e3,
    "M": 1e6,
    "MB": 1e6,
    "G": 1e9,
    "GB": 1e9,
    "T": 1e12,
    "TB": 1e12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


# One working copy of a row chunk of a large matrix (GPTQ's float64 rows, calibration products,
# probe rows): bounds the memory a 50k × 4096 matrix needs without changing any result.
CHUNK_BYTES = 64 << 20

# The optimiser's layer passes (neoxq.convert.calibrate) run this many calibration windows at once,
# which bounds eager attention's ctx × ctx scores; the result does not depend on it.
WINDOWS_PER_PASS = 4
# Tokens per product with the output matrix in those passes: bounds the float64 logits (vocab wide).
HEAD_TOKENS = 512


def rows_per_chunk(cols: int, itemsize: int) -> int:
    """Rows of a `cols`-wide matrix of `itemsize`-byte values that fit one CHUNK_BYTES copy."""
    return max(1, CHUNK_BYTES // (itemsize * cols))


def parse_size(text: str, option: str = "size") -> int:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else None
    if not m or unit not in _UNITS or float(m.group(1)) <= 0:
        raise UsageError(f"{option} {text!r} is not a size; write it like 2.1GB, 850MB or 4GiB")
    return int(float(m.group(1)) * _UNITS[unit])


def format_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}" if unit == "GB" else f"{n / size:.0f}{unit}"
    return f"{int(n)}B"
