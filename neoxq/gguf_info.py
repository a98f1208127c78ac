"""Read a GGUF's metadata (never its tensors) and check it is a complete GPT-NeoX file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CorruptFileError, SourceError, UnsupportedModelError
from .qtypes import QuantType

GGUF_MAGIC = b"GGUF"


@dataclass
class GGUFInfo:
    path: Path
    arch: str
    metadata: dict[str, Any]
    tensors: list[tuple[str, str, tuple[int, ...], int]]  # name, ggml type, shape, n_bytes

    @property
    def quant_type(self) -> QuantType | None:
        name = self.metadata.get("neoxq.quant_type")
        if name:
            return QuantType(name)
        ft = self.metadata.get("general.file_type")
        return QuantType.from_ftype(int(ft)) if ft is not None else None

    @property
    def n_params(self) -> int:
        import math

        return sum(math.prod(s) for _, _, s, _ in self.tensors)

    @property
    def bpw(self) -> float:
        """Bits per weight over all tensors, as llama.cpp prints it."""
        return 8 * sum(n for *_, n in self.tensors) / max(self.n_params, 1)

    @property
    def context_length(self) -> int:
        return int(self.metadata.get(f"{self.arch}.context_length", 0))


def read_info(path: Path | str, require_arch: str | None = "gptneox") -> GGUFInfo:
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{path}: no such file; pass the path of a .gguf file")
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise CorruptFileError(f"{path} is not a GGUF file (bad magic); pass a .gguf made by neoxq or llama.cpp")
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # gguf-py raises ValueError/IndexError/struct errors on short files
        raise CorruptFileError(f"{path} is truncated or corrupt ({type(exc).__name__}); re-create or re-download it") from exc
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key.startswith("tokenizer.ggml."):
            continue
        try:
            meta[key] = field.contents()
        except Exception:
            continue
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > path.stat().st_size:
        raise CorruptFileError(f"{path} is truncated ({path.stat().st_size} of {end} bytes); re-create or re-download it")
    tensors = [(t.name, t.tensor_type.name, tuple(int(x) for x in reversed(t.shape)), int(t.n_bytes)) for t in reader.tensors]
    arch = str(meta.get("general.architecture", ""))
    if require_arch and arch != require_arch:
        raise UnsupportedModelError(f"{path} is a {arch or 'non-model'} GGUF; neoxq runs GPT-NeoX (gptneox) models — convert one with `neoxq convert`")
    return GGUFInfo(path, arch, meta, tensors)
