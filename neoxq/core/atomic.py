"""Write-to-temp-then-rename, so a failed or interrupted run never leaves a file that looks valid.

Temporary files are named `.<name>.<pid>.partial`: hidden, never matched by `*.gguf`, and tagged
with the writing process so that the next writer in the folder can remove those of dead processes
(a SIGKILL leaves one behind; nothing can prevent that, but nothing keeps it either).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

from .errors import OutputError

_PARTIAL = re.compile(r"^\..+\.(\d+)\.partial$")


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
    return path.with_name(f".{path.name}.{os.getpid()}.partial")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def remove_stale_partials(folder: Path) -> list[Path]:
    """Delete `.*.<pid>.partial` files whose writer is no longer running; never a live one's."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            m = _PARTIAL.match(entry.name)
            if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def out_of_space(path: Path, need_bytes: int | None = None, too_large: bool = False) -> OutputError:
    folder = path.parent if str(path.parent) else Path(".")
    free = shutil.disk_usage(folder).free if folder.is_dir() else 0
    need = f"about {need_bytes / 1e6:.0f} MB needed, " if need_bytes else ""
    if too_large:
        return OutputError(f"file too large while writing {path}: {need}over this process's file-size limit (ulimit -f); "
                           "raise the limit or pass -o on another disk")
    return OutputError(f"disk full while writing {path}: {need}{free / 1e6:.0f} MB free; free space or pass -o on another disk")


def _fsize_limited() -> bool:
    import resource

    return resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY


@contextlib.contextmanager
def atomic_output(path: Path, force: bool = False, need_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary path; rename it onto `path` only if the block finishes without error.

    Out of space (ENOSPC) and over the file-size limit (EFBIG) become one line naming the output."""
    path = Path(path)
    check_output(path, force)
    remove_stale_partials(path.parent if str(path.parent) else Path("."))
    tmp = temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        # numpy's tofile reports a short write as a plain OSError without errno
        # ("Not enough free space …", "N requested and M written"): then the file-size limit decides.
        short = exc.errno is None and ("free space" in str(exc) or "written" in str(exc))
        if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) or short:
            raise out_of_space(path, need_bytes, too_large=exc.errno == errno.EFBIG or (short and _fsize_limited())) from exc
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) or exc.filename in (str(tmp), str(path)):
            raise OutputError(f"cannot write {path} ({exc.strerror}); pass -o with a writable folder") from exc
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
