"""Choose what a KLD is measured against, from what the user typed: a GGUF file (llama.cpp's way),
or a Hugging Face checkpoint (folder or hub id) scored by transformers in fp32, in memory when it
fits the budget and streamed layer by layer otherwise."""

from __future__ import annotations

from pathlib import Path

from neoxq.core.machine import available_memory
from neoxq.runtime.score import GGUFReference, Reference


def hf_reference(ckpt, max_memory: int | None, reserved: int = 0):
    """The transformers reference with a budget: --max-memory, else what is available minus what
    the llama.cpp side (`reserved`) holds at the same time."""
    from neoxq.convert.reference import HFReference

    budget = max_memory if max_memory is not None else max(available_memory() - reserved, 0)
    return HFReference(ckpt, max_memory=budget)


def open_reference(spec: str | Path, revision: str | None = None, options=None, max_memory: int | None = None,
                   reserved: int = 0) -> Reference:
    path = Path(spec).expanduser()
    if path.is_file():
        return GGUFReference(path, options)
    from neoxq.convert.checkpoint import open_checkpoint

    ckpt = open_checkpoint(str(spec), revision)
    return hf_reference(ckpt, max_memory, reserved)
