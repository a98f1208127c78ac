"""Choose what a KLD is measured against, from what the user typed: a GGUF file (llama.cpp's way),
or a Hugging Face checkpoint (folder or hub id) scored by transformers in fp32."""

from __future__ import annotations

from pathlib import Path

from neoxq.core.errors import require_convert_extra
from neoxq.runtime.score import GGUFReference, Reference


def open_reference(spec: str | Path, revision: str | None = None, options=None) -> Reference:
    path = Path(spec).expanduser()
    if path.is_file():
        return GGUFReference(path, options)
    try:
        import torch  # noqa: F401  (the HF reference needs it; say so before any work starts)
        import transformers  # noqa: F401
    except ImportError as exc:
        raise require_convert_extra(exc) from exc
    from neoxq.convert.checkpoint import open_checkpoint
    from neoxq.convert.reference import HFReference

    return HFReference(open_checkpoint(str(spec), revision))
