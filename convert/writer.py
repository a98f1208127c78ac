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
            for planned, data in produce(plan):
                writer.write_tensor_data(encode(data, planned.qtype))
                progress.update(1, planned.nbytes)
            writer.close()
        finally:
            progress.close()
            if writer.fout:
                for f in writer.fout:
                    f.close()
    return path
