"""Write-to-temp-then-rename, so a failed or interrupted run never leaves a file that looks valid."""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Iterator

from .errors import OutputError


def check_output(path: Path, force: bool) -> None:
    """Refuse an existing output unless forced, and an unwritable folder, before any work starts."""
    if path.exists() and not force:
        raise OutputError(f"{path} already exists; pass --force to overwrite it or -o to choose another name")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"output folder {folder} does not exist; create it or pass -o with an existing folder")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"output folder {folder} is not writable; pass -o with a folder you can write to")


def temp_name(path: Path) -> Path:
    # Hidden and suffixed .partial: never mistaken for a finished file by globbing *.gguf.
    return path.with_name(f".{path.name}.{os.getpid()}.partial")


@contextlib.contextmanager
def atomic_output(path: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path; rename it onto `path` only if the block finishes without error."""
    path = Path(path)
    check_output(path, force)
    tmp = temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise OutputError(f"disk full while writing {path}; free space or pass -o on another disk") from exc
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) or exc.filename in (str(tmp), str(path)):
            raise OutputError(f"cannot write {path} ({exc.strerror}); pass -o with a writable folder") from exc
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
