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
                   reserved: int = 0, model_info=None) -> Reference:
    """`spec`: a GGUF or checkpoint path / hub id, or auto|hf = the checkpoint the scored file was
    converted from (its repo and commit are in the file's metadata)."""
    if str(spec) in ("auto", "hf"):
        spec, revision = _source_of(model_info)
    elif str(spec) == "f16":
        from neoxq.core.errors import UsageError

        raise UsageError("--reference f16 belongs to report and sweep (which build the F16 file); pass the F16 GGUF's path here")
    path = Path(spec).expanduser()
    if path.is_file():
        return GGUFReference(path, options)
    from neoxq.convert.checkpoint import open_checkpoint

    ckpt = open_checkpoint(str(spec), revision)
    return hf_reference(ckpt, max_memory, reserved)


def _source_of(info) -> tuple[str, str | None]:
    from neoxq.core.errors import UsageError

    meta = info.metadata if info is not None else {}
    repo = meta.get("neoxq.source.repo")
    if not repo:
        raise UsageError("this file does not record a hub source (it was converted from a local folder); "
                         "pass --reference with the checkpoint folder or an F16/F32 GGUF")
    return repo, meta.get("neoxq.source.commit") or meta.get("neoxq.source.revision") or None
