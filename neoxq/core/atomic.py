"""Write-to-temp-then-rename, so a failed or interrupted run never leaves a file that looks valid.

Temporary files are named `.<name>.<pid>.partial`: hidden, never matched by `*.gguf`, and tagged
with the writing process so that the next writer in the folder can remove those of dead processes
(a SIGKILL leaves one behind; nothing can prevent that, but nothing keeps it either).

It is also the one output-path policy (`check_output`): regular files only, links followed to
their target, never a command's own input, an existing file only with --force, and one writer per
file at a time (`.<name>.lock`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import resource
import shutil
import stat
from pathlib import Path
from typing import Iterable, Iterator

from .errors import OutputError

_PARTIAL = re.compile(r"^\..+\.(\d+)\.partial$")
_LOCK = re.compile(r"^\..+\.lock$")


def _kind(st: os.stat_result) -> str:
    for test, word in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(st.st_mode):
            return word
    return "not a regular file"


def resolve_output(path: Path | str) -> Path:
    """The file a write to `path` lands in: a symbolic link is followed to its target (so the
    link keeps pointing at the new file instead of being replaced by it)."""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def check_output(path: Path, force: bool, inputs: Iterable[Path | str] = ()) -> None:
    """The one output-path policy, applied before any work starts: only regular files are written
    (never a folder, device or FIFO, --force or not); never one of the command's inputs; an existing
    file only with --force; the folder must exist and be writable."""
    path = resolve_output(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        hint = f" inside it, such as {path / 'out.gguf'}" if stat.S_ISDIR(st.st_mode) else ""
        raise OutputError(f"{path} is {_kind(st)}, not a file; pass -o with a file name{hint}")
    if st is not None:
        for src in inputs:
            with contextlib.suppress(OSError):
                if os.path.samefile(src, path):
                    raise OutputError(f"{path} is this command's input; pass -o with another name (the input is read while the output is written)")
    if st is not None and not force:
        raise OutputError(f"{path} already exists; pass --force to overwrite it or -o to choose another name")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"output folder {folder} does not exist; create it or pass -o with an existing folder")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"output folder {folder} is not writable; pass -o with a folder you can write to")


def output_in(output: Path | str | None, default: Path) -> Path:
    """`-o` as users write it: a file, an existing folder (the default name inside it), or nothing."""
    if output is None:
        return default
    output = Path(output)
    return output / default.name if output.is_dir() else output


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


def _lock_owner(lock: Path) -> int | None:
    try:
        return int(lock.read_text().strip() or 0) or None
    except (OSError, ValueError):
        return None


def remove_stale_partials(folder: Path) -> list[Path]:
    """Delete `.*.<pid>.partial` files and `.*.lock` files whose writer is no longer running; never
    a live one's."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            m = _PARTIAL.match(entry.name)
            pid = int(m.group(1)) if m else (_lock_owner(Path(entry.path)) if _LOCK.match(entry.name) else None)
            if pid and pid != os.getpid() and not _alive(pid):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def _writer_lock(path: Path) -> Iterator[None]:
    """One writer per output at a time: `.<name>.lock`, created exclusively and holding the writer's
    pid. A second writer (another process, or this one twice) is refused instead of both finishing
    and one result being silently lost; a lock left by a killed process is taken over."""
    lock = path.with_name(f".{path.name}.lock")
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            owner = _lock_owner(lock)
            if owner is not None and (owner == os.getpid() or _alive(owner)):
                raise OutputError(
                    f"{path} is being written by another neoxq run (pid {owner}); wait for it to finish or pass -o with another name"
                ) from None
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
    else:
        raise OutputError(f"cannot lock {path} for writing ({lock} keeps reappearing); pass -o with another name")
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()


def out_of_space(path: Path, need_bytes: int | None = None, too_large: bool = False) -> OutputError:
    folder = path.parent if str(path.parent) else Path(".")
    free = shutil.disk_usage(folder).free if folder.is_dir() else 0
    need = f"about {need_bytes / 1e6:.0f} MB needed, " if need_bytes else ""
    if too_large:
        return OutputError(
            f"file too large while writing {path}: {need}over this process's file-size limit (ulimit -f); raise the limit or pass -o on another disk"
        )
    return OutputError(f"disk full while writing {path}: {need}{free / 1e6:.0f} MB free; free space or pass -o on another disk")


def _fsize_limited() -> bool:
    return resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY


@contextlib.contextmanager
def atomic_output(
    path: Path, force: bool = False, need_bytes: int | None = None, inputs: Iterable[Path | str] = (), lock: bool = True
) -> Iterator[Path]:
    """Yield a temporary path; rename it onto `path` only if the block finishes without error.

    The output policy is `check_output`'s; with `lock` (every user-facing output) a second
    concurrent writer of the same file is refused (content-addressed caches, whose concurrent
    writers write the same bytes, pass lock=False). Out of space (ENOSPC) and over the file-size
    limit (EFBIG) become one line naming the output."""
    path = resolve_output(path)
    check_output(path, force, inputs)
    remove_stale_partials(path.parent if str(path.parent) else Path("."))
    tmp = temp_name(path)
    with _writer_lock(path) if lock else contextlib.nullcontext():
        try:
            yield tmp
            if not force and path.exists():  # appeared while we worked (a writer that is not neoxq)
                raise OutputError(f"{path} appeared while it was being written; pass --force to overwrite it or -o to choose another name")
            os.replace(tmp, path)
        except OSError as exc:
            err = _write_error(exc, path, tmp, need_bytes)
            if err is exc:
                raise
            raise err from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def _write_error(exc: OSError, path: Path, tmp: Path, need_bytes: int | None) -> Exception:
    # numpy's tofile reports a short write as a plain OSError without errno
    # ("Not enough free space …", "N requested and M written"): then the file-size limit decides.
    short = exc.errno is None and ("free space" in str(exc) or "written" in str(exc))
    if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) or short:
        return out_of_space(path, need_bytes, too_large=exc.errno == errno.EFBIG or (short and _fsize_limited()))
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) or exc.filename in (str(tmp), str(path)):
        return OutputError(f"cannot write {path} ({exc.strerror}); pass -o with a writable folder")
    return exc
