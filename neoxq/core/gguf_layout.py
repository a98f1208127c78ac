"""What a GGUF that llama.cpp's quantizer writes adds up to, in bytes, computed before it is written.

A GGUF file is a header (magic, version, counts), the key/value metadata, the tensor infos, padding
to the alignment, then every tensor's data padded to the alignment (ggml's gguf.cpp). The quantizer
copies the source's metadata and tensor infos (same names, same shapes: only the type field and the
offsets change, at fixed widths), sets `general.quantization_version` and `general.file_type` (u32),
and sets the string key/value overrides it is given. So the output's size follows from where the
source's tensor infos end, what the overrides add or replace, and each tensor's bytes in its new
type: quant_tests/test_mix.py checks it equals written files byte for byte.
"""

from __future__ import annotations

from .ggml_types import BY_NAME
from .gguf_info import DEFAULT_ALIGNMENT, GGUFInfo

# llama.cpp's llama_model_kv_override holds key[128] and val_str[128], both NUL-terminated.
OVERRIDE_MAX_BYTES = 127
_CUT = "..."


def override_key(key: str) -> bytes:
    """A metadata key as llama.cpp's override struct holds it; a longer key is a bug, not data."""
    raw = key.encode("utf-8")
    if len(raw) > OVERRIDE_MAX_BYTES:
        raise ValueError(f"metadata key {key!r} is longer than llama.cpp's {OVERRIDE_MAX_BYTES}-byte override limit")
    return raw


def override_value(value: str) -> bytes:
    """A string value as llama.cpp's override struct holds it: a longer one (a long file name) is cut
    at a character boundary and ends with "..." so the cut is visible in the file."""
    raw = value.encode("utf-8")
    if len(raw) <= OVERRIDE_MAX_BYTES:
        return raw
    keep = raw[: OVERRIDE_MAX_BYTES - len(_CUT)].decode("utf-8", errors="ignore")
    return (keep + _CUT).encode("utf-8")


def padded(n: int, align: int = DEFAULT_ALIGNMENT) -> int:
    return -(-n // align) * align


def tensor_bytes(n_elements: int, type_name: str, align: int = DEFAULT_ALIGNMENT) -> int:
    """One tensor's data in `type_name`, with the padding that follows it."""
    _, block, size = BY_NAME[type_name]
    return padded(n_elements // block * size, align)


def string_kv_bytes(key: str, value: str) -> int:
    """A string key/value entry: key (u64 length + bytes), value type (u32), value (u64 length + bytes)."""
    return 8 + len(override_key(key)) + 4 + 8 + len(override_value(value))


_U32_KEYS = ("general.quantization_version", "general.file_type")  # set by the quantizer


def alignment(src: GGUFInfo) -> int:
    return int(src.metadata.get("general.alignment", DEFAULT_ALIGNMENT)) or DEFAULT_ALIGNMENT


def header_size(src: GGUFInfo, kv: dict[str, str]) -> int:
    """Where the tensor data starts in the file llama.cpp's quantizer writes from `src` with these
    string overrides (a key the source has already is replaced, any other added)."""
    grown = 0
    for key, value in kv.items():
        old = src.metadata.get(key)
        if isinstance(old, str):
            grown += len(override_value(value)) - len(old.encode("utf-8"))
        else:  # new (an overridden key of another type is not something neoxq writes)
            grown += string_kv_bytes(key, value)
    grown += sum(8 + len(k) + 4 + 4 for k in _U32_KEYS if k not in src.metadata)
    return padded(src.header_bytes + grown, alignment(src))


def quantized_size(src: GGUFInfo, types: dict[str, str], kv: dict[str, str]) -> int:
    """The size of that file with these tensor types (name → ggml type; a tensor not named keeps its type)."""
    return header_size(src, kv) + sum(tensor_bytes(t.n_elements, types.get(t.name, t.type), alignment(src)) for t in src.tensors)
