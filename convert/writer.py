"""Stream tensors into a GGUF file with gguf-py's writer: header and tensor infos first, then one
tensor's data at a time, so memory follows the largest tensor rather than the checkpoint.
Written under a temporary name and renamed into place only when complete."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

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
        import gguf

        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(self.qtype)]
        return int(np.prod(self.shape)) // block * size


def encode(arr: np.ndarray, qtype: int) -> np.ndarray:
    """float32 array → the bytes of `qtype` (F32/F16 plain numpy, BF16/Q8_0 packed by gguf-py)."""
    import gguf

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
) -> Path:
    """Write `plan`'s tensors (arrays yielded by `produce`, in plan order) with the metadata."""
    import gguf

    with atomic_output(path, force, need_bytes=sum(t.nbytes for t in plan)) as tmp:
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
                    bg.put(encode(data, planned.qtype))
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
        import queue
        import threading

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
