"""The one check of a number a user gives (an option, a request field): finite and in range.

click's FloatRange and plain comparisons let NaN through (every comparison with NaN is false), so
`--temp nan` or `"temperature": NaN` would reach llama.cpp's sampler; every entry point calls
`check_number` instead, and the message names the option as the user spelled it."""

from __future__ import annotations

import math

from .errors import UsageError


def _num(v: float) -> str:
    return str(v) if isinstance(v, int) else f"{v:g}"


def _range(lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f"from {_num(lo)} to {_num(hi)}"
    if lo is not None:
        return f"of {_num(lo)} or more"
    return f"of {_num(hi)} or less" if hi is not None else ""


def check_number(value, name: str, lo: float | None = None, hi: float | None = None, integer: bool = False):
    """`value` if it is a finite number (an integer where `integer`) within [lo, hi]; else one
    UsageError naming `name`, the value and the accepted range. None passes (an unset option)."""
    if value is None:
        return None
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise UsageError(f"{name} {value!r} is not {kind}; pass {kind} {_range(lo, hi)}".rstrip())
    if not math.isfinite(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        raise UsageError(f"{name} {value!r} is out of range; pass {kind} {_range(lo, hi)}".rstrip())
    return value
