"""Stream tensors into a GGUF file with gguf-py's writer: header and tensor infos first, then one
tensor's data at a time, so memory follows the largest tensor rather than the checkpoint.
Written under a temporary name and renamed into place only when complete.

A tensor whose GGUF bytes are exactly a span of a checkpoint file (F16 → F16, F32 → F32, no
reordering) is copied file to file by the kernel (`copy_file_range`) instead of through user space,
several times faster than read + write."""

from __future__ import annotations

import errno
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import gguf
import numpy as np

from neoxq.core.atomic import atomic_output
from neoxq.core.progress import Progress


@dataclass
class PlannedTensor:
    name: str
    shape: tuple[int, ...]  # numpy order (rows, cols)
    qtype: int  # gguf.GGMLQuantizationType
    source: str  # the checkpoint tensor it comes from

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(self.qtype)]
        return int(np.prod(self.shape)) // block * size


class FileSpan(np.ndarray):
    """An array whose bytes are `span` = (path, offset) of a file; gguf-py's writer calls `tofile`,
    which then copies file to file. Arrays derived from it (views, reshapes, arithmetic) carry no
    span and write their own bytes."""

    span: tuple[str, int] | None = None

    @classmethod
    def of(cls, mapped: np.memmap) -> "FileSpan":
        out = mapped.view(cls)
        out.span = (mapped.filename, mapped.offset)
        return out

    def __array_finalize__(self, obj) -> None:
        self.span = None

    def tofile(self, fout, *args) -> None:
        if self.span is None or args or not _copy_span(self.span, self.nbytes, fout):
            np.asarray(self).tofile(fout, *args)


def _copy_span(span: tuple[str, int], nbytes: int, fout) -> bool:
    """copy_file_range from span to fout's position; False (nothing written) where the kernel or
    filesystem cannot (other filesystem on old kernels, no such call), so the caller writes."""
    if not hasattr(os, "copy_file_range"):
        return False
    fout.flush()
    pos, done = fout.tell(), 0
    with open(span[0], "rb") as src:
        while done < nbytes:
            try:
                k = os.copy_file_range(src.fileno(), fout.fileno(), nbytes - done, span[1] + done, pos + done)
            except OSError as exc:
                if done == 0 and exc.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                    return False
                raise
            if k == 0:
                raise OSError(errno.EIO, f"{span[0]} ended {nbytes - done} bytes early while copying a tensor")
            done += k
    fout.seek(pos + nbytes)
    return True


def encode(arr: np.ndarray, qtype: int) -> np.ndarray:
    """float32 array → the bytes of `qtype` (F32/F16 plain numpy, BF16/Q8_0 packed by gguf-py)."""
    q = gguf.GGMLQuantizationType(qtype)
    if q == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(arr, dtype=np.float32)
    if q == gguf.GGMLQuantizationType.F16:
        return np.ascontiguousarray(arr, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), q)


def write_gguf(
    path: Path,
    arch: str,
    add_metadata: Callable[[object], None],
    plan: list[PlannedTensor],
    produce: Callable[[list[PlannedTensor]], Iterable[tuple[PlannedTensor, np.ndarray]]],
    force: bool = False,
    inputs: Iterable[Path] = (),
) -> Path:
    """Write `plan`'s tensors (arrays yielded by `produce`, in plan order) with the metadata."""
    with atomic_output(path, force, need_bytes=sum(t.nbytes for t in plan), inputs=inputs) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        add_metadata(writer)
        for t in plan:
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=gguf.GGMLQuantizationType(t.qtype))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        progress = Progress(f"writing {path.name}", len(plan), "tensors")
        try:
            with _BackgroundWriter(writer) as bg:
                for planned, data in produce(plan):
                    bg.put(data if isinstance(data, FileSpan) and data.span else encode(data, planned.qtype))
                    progress.update(1, planned.nbytes)
            writer.close()
        finally:
            progress.close()
            if writer.fout:
                for f in writer.fout:
                    f.close()
    return path


class _BackgroundWriter:
    """Writes tensors on a thread while the next one is read and reordered (numpy releases the GIL
    in tofile): conversion time approaches the larger of reading and writing, not their sum. At most
    one tensor waits, so memory stays at about two of the largest tensors."""

    def __init__(self, writer):
        self.writer, self.queue, self.error = writer, queue.Queue(maxsize=1), None
        self.thread = threading.Thread(target=self._run, name="gguf-writer", daemon=True)

    def _run(self) -> None:
        while (arr := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.writer.write_tensor_data(arr)
                except BaseException as exc:  # handed to the main thread at the next put/exit
                    self.error = exc

    def put(self, arr: np.ndarray) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(arr)

    def __enter__(self) -> "_BackgroundWriter":
        self.thread.start()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None and exc_type is None:
            raise self.error
