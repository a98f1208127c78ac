"""Read an evaluation or calibration text file, with one clear error for what is wrong."""

from __future__ import annotations

import hashlib
from pathlib import Path

from .errors import SourceError, UsageError


def read_text(path: Path | str) -> str:
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"text file {path}: no such file; pass --text with a UTF-8 text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path} is not UTF-8 text; convert it to UTF-8 first") from exc
    if not text.strip():
        raise UsageError(f"{path} is empty; pass a text with at least two context windows of tokens")
    return text


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
