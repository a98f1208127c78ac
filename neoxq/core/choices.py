"""The keyword values that options take besides a path: one parser for each option, so every
command reads `AUTO`, `none`, `Hf` and `F16` alike (keywords are case-insensitive; paths are not)."""

from __future__ import annotations

from pathlib import Path

from neoxq.core.errors import UsageError

AUTO = "auto"
NONE = "none"
HF = "hf"
F16 = "f16"


def _keyword(value: str | Path, words: tuple[str, ...]) -> str | None:
    low = str(value).strip().lower()
    return low if low in words else None


def imatrix_choice(value: str | Path | None, default: str | None = AUTO, files: bool = True) -> str | None:
    """--imatrix: `auto` (computed from the calibration text) → "auto"; `none` → None; otherwise a
    file's path, when `files` allows one. Unset → `default`."""
    if value is None:
        return default
    word = _keyword(value, (AUTO, NONE))
    if word is not None:
        return None if word == NONE else AUTO
    if not files:
        raise UsageError(f"--imatrix {str(value)!r}: here it is computed for each revision (auto) or not used (none)")
    return str(value)


def reference_choice(value: str | Path | None, default: str = AUTO, paths: bool = True) -> str:
    """--reference: `auto` or `hf` (the fp32 checkpoint the file came from, run by transformers), `f16`
    (the F16 GGUF a report builds), or a GGUF file / checkpoint folder / hub id when `paths` allows."""
    if value is None:
        return default
    word = _keyword(value, (AUTO, HF, F16))
    if word is not None:
        return word
    if not paths:
        raise UsageError(f"--reference {str(value)!r}: here each revision is scored against its own model: auto, hf or f16")
    return str(value)


def is_transformers(reference: str) -> bool:
    """Whether a parsed --reference keyword means the checkpoint the scored file was converted from."""
    return reference in (AUTO, HF)
