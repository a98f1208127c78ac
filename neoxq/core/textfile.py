"""Read an evaluation or calibration text file, with one clear error for what is wrong."""

from __future__ import annotations

import hashlib
from pathlib import Path

from .errors import SourceError, UsageError


def read_text(path: Path | str, option: str = "--text", allow_empty: bool = False) -> str:
    """The file's text; the messages name `option`, the flag the user gave it with. Only a file
    with no characters at all is empty (whitespace is text: it tokenises)."""
    path = Path(path)
    if path.is_dir():
        raise SourceError(f"{option} {path} is a folder; pass {option} with a UTF-8 text file")
    if not path.is_file() and not path.exists():
        raise SourceError(f"{option} {path}: no such file; pass {option} with a UTF-8 text file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{option} {path} is not UTF-8 text; convert it to UTF-8 first") from exc
    except OSError as exc:
        raise SourceError(f"{option} {path}: cannot read it ({exc.strerror}); pass {option} with a readable text file") from exc
    if not text and not allow_empty:
        raise UsageError(f"{option} {path} is empty; pass {option} with a file that holds text")
    return text


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
