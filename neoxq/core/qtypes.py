"""Quantization and output types: one str Enum carrying llama.cpp's file-type id and nominal bpw.

Nothing parses a type out of a file name: the type is written into GGUF metadata
(`general.file_type`, `neoxq.quant_type`) and read back from there.
"""

from __future__ import annotations

from enum import Enum

from .errors import UsageError


class QuantType(str, Enum):
    # value = llama.cpp's name; attributes: ftype id (llama_ftype), nominal bpw, needs imatrix.
    F32 = "F32"
    F16 = "F16"
    BF16 = "BF16"
    Q8_0 = "Q8_0"
    Q6_K = "Q6_K"
    Q5_K_M = "Q5_K_M"
    Q5_K_S = "Q5_K_S"
    Q5_1 = "Q5_1"
    Q5_0 = "Q5_0"
    Q4_K_M = "Q4_K_M"
    Q4_K_S = "Q4_K_S"
    Q4_1 = "Q4_1"
    Q4_0 = "Q4_0"
    IQ4_NL = "IQ4_NL"
    IQ4_XS = "IQ4_XS"
    Q3_K_L = "Q3_K_L"
    Q3_K_M = "Q3_K_M"
    Q3_K_S = "Q3_K_S"
    IQ3_M = "IQ3_M"
    IQ3_S = "IQ3_S"
    IQ3_XS = "IQ3_XS"
    IQ3_XXS = "IQ3_XXS"
    Q2_K = "Q2_K"
    Q2_K_S = "Q2_K_S"
    IQ2_M = "IQ2_M"
    IQ2_S = "IQ2_S"
    IQ2_XS = "IQ2_XS"
    IQ2_XXS = "IQ2_XXS"
    IQ1_M = "IQ1_M"
    IQ1_S = "IQ1_S"

    @property
    def ftype(self) -> int:
        return _INFO[self][0]

    @property
    def nominal_bpw(self) -> float:
        return _INFO[self][1]

    @property
    def needs_imatrix(self) -> bool:
        return _INFO[self][2]

    @property
    def is_float(self) -> bool:
        return self in (QuantType.F32, QuantType.F16, QuantType.BF16)

    @classmethod
    def parse(cls, name: str) -> "QuantType":
        try:
            return cls(name.strip().upper())
        except ValueError:
            raise UsageError(f"unknown quant type {name!r}; valid types: {', '.join(t.value for t in cls)}") from None

    @classmethod
    def parse_list(cls, names: str) -> list["QuantType"]:
        out = [cls.parse(n) for n in names.split(",") if n.strip()]
        if not out:
            raise UsageError("no quant type given; pass e.g. --quant Q8_0,Q4_K_M (see `neoxq types`)")
        return list(dict.fromkeys(out))

    @classmethod
    def from_ftype(cls, ftype: int) -> "QuantType | None":
        for t in cls:
            if t.ftype == ftype:
                return t
        return None


# ftype ids from llama.h's llama_ftype; bpw: llama.cpp's own figure for the mix (quantize's help,
# sizes at Llama-3-8B turned into bits/weight, or the type's stated bpw). Types that llama.cpp
# refuses to make without an importance matrix carry True.
_INFO: dict[QuantType, tuple[int, float, bool]] = {
    QuantType.F32: (0, 32.0, False),
    QuantType.F16: (1, 16.0, False),
    QuantType.BF16: (32, 16.0, False),
    QuantType.Q8_0: (7, 8.5, False),
    QuantType.Q6_K: (18, 6.56, False),
    QuantType.Q5_K_M: (17, 5.33, False),
    QuantType.Q5_K_S: (16, 5.21, False),
    QuantType.Q5_1: (9, 6.0, False),
    QuantType.Q5_0: (8, 5.5, False),
    QuantType.Q4_K_M: (15, 4.58, False),
    QuantType.Q4_K_S: (14, 4.37, False),
    QuantType.Q4_1: (3, 5.0, False),
    QuantType.Q4_0: (2, 4.5, False),
    QuantType.IQ4_NL: (25, 4.5, False),
    QuantType.IQ4_XS: (30, 4.25, False),
    QuantType.Q3_K_L: (13, 4.03, False),
    QuantType.Q3_K_M: (12, 3.74, False),
    QuantType.Q3_K_S: (11, 3.41, False),
    QuantType.IQ3_M: (27, 3.66, False),
    QuantType.IQ3_S: (26, 3.44, False),
    QuantType.IQ3_XS: (22, 3.3, True),
    QuantType.IQ3_XXS: (23, 3.06, True),
    QuantType.Q2_K: (10, 2.96, False),
    QuantType.Q2_K_S: (21, 2.96, True),
    QuantType.IQ2_M: (29, 2.7, True),
    QuantType.IQ2_S: (28, 2.5, True),
    QuantType.IQ2_XS: (20, 2.31, True),
    QuantType.IQ2_XXS: (19, 2.06, True),
    QuantType.IQ1_M: (31, 1.75, True),
    QuantType.IQ1_S: (24, 1.56, True),
}

# The types `neoxq quantize` accepts: every llama.cpp file type from 1.5 to 8 bits.
QUANTIZED = [t for t in QuantType if not t.is_float]
# The types the converter writes directly (gguf-py does the packing).
CONVERT_OUTTYPES = [QuantType.F32, QuantType.F16, QuantType.BF16, QuantType.Q8_0]
