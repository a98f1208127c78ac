"""A GGUF file opened for rewriting its tensors' bytes in place: the header, the tensor table and
every tensor's size stay as they are, so whatever reads the file (llama.cpp included) sees the same
layout with new values."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .gguf_info import GGUFInfo, TensorInfo, read_info


class TensorFile:
    """`with TensorFile(path) as f:` — read(t) and write(t, data) a tensor's raw bytes (or, with
    `row0`, its rows from there on). Writing more bytes than the tensor holds is refused, so a
    rewrite can never spill into the next tensor."""

    def __init__(self, path: Path | str, info: GGUFInfo | None = None):
        self.info = info if info is not None else read_info(path)
        self.by_name = {t.name: t for t in self.info.tensors}
        self._fh = open(path, "r+b")

    def __enter__(self) -> "TensorFile":
        return self

    def __exit__(self, *exc) -> None:
        self._fh.close()

    def tensor(self, name: str) -> TensorInfo:
        return self.by_name[name]

    def read(self, t: TensorInfo) -> np.ndarray:
        """The tensor's bytes, uint8 (a fresh, writable copy)."""
        self._fh.seek(self.info.data_offset + t.offset)
        return np.frombuffer(self._fh.read(t.n_bytes), np.uint8).copy()

    def write(self, t: TensorInfo, data: np.ndarray, row0: int = 0) -> None:
        raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        start = row0 * (t.n_bytes // t.shape[0]) if len(t.shape) > 1 else 0
        if start + raw.size > t.n_bytes:
            raise ValueError(f"{t.name}: {raw.size} bytes from byte {start} would overrun its {t.n_bytes}")
        self._fh.seek(self.info.data_offset + t.offset + start)
        self._fh.write(raw.tobytes())

    def flush(self) -> None:
        self._fh.flush()
