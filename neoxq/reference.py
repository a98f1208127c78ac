"""Choose the reference a KLD is taken against, from what the user typed: a GGUF file (llama.cpp's way),
or a Hugging Face checkpoint (folder or hub id) scored by transformers in fp32, in memory when it
fits the budget and streamed layer by layer otherwise."""

from __future__ import annotations

from pathlib import Path

from neoxq.convert.checkpoint import open_checkpoint
from neoxq.convert.reference import HFReference
from neoxq.core.choices import F16, is_transformers, reference_choice
from neoxq.core.errors import UsageError
from neoxq.core.gguf_info import SOURCE_PATH_KEY, read_info
from neoxq.core.machine import available_memory
from neoxq.runtime.score import GGUFReference, Reference


def hf_reference(ckpt, max_memory: int | None, reserved: int = 0):
    """The transformers reference with a budget: --max-memory, else what is available minus what
    the llama.cpp side (`reserved`) holds at the same time."""
    budget = max_memory if max_memory is not None else max(available_memory() - reserved, 0)
    return HFReference(ckpt, max_memory=budget)


def open_reference(
    spec: str | Path, revision: str | None = None, options=None, max_memory: int | None = None, reserved: int = 0, model_info=None
) -> Reference:
    """`spec`: a GGUF or checkpoint path / hub id, or auto|hf = the checkpoint the scored file was
    converted from (its repo and commit are in the file's metadata)."""
    spec = reference_choice(spec)
    if is_transformers(spec):
        spec, revision = source_of(model_info)
    elif spec == F16:
        raise UsageError("--reference f16 belongs to report and sweep (which build the F16 file); pass the F16 GGUF's path here")
    path = Path(spec).expanduser()
    if path.is_file():
        if max_memory is not None:
            raise UsageError(f"--max-memory bounds the fp32 checkpoint reference; {path.name} is a GGUF scored by llama.cpp: drop --max-memory")
        if model_info is not None:
            check_gguf_belongs(read_info(path), model_info)
        return GGUFReference(path, options)

    ckpt = open_checkpoint(str(spec), revision)
    if model_info is not None:
        check_checkpoint_belongs(ckpt, model_info)
    return hf_reference(ckpt, max_memory, reserved)


def _refuse(what: str, model, why: str) -> UsageError:
    return UsageError(
        f"--reference {what} does not belong to {model.path.name} ({why}); pass the F16/F32 GGUF or the checkpoint this file was made from"
    )


def check_gguf_belongs(ref, model) -> None:
    """A GGUF reference must be the same model: the same source fingerprint where both record one,
    the same tensors with the same shapes, the same vocabulary size."""
    if ref.source_fingerprint and model.source_fingerprint and ref.source_fingerprint != model.source_fingerprint:
        raise _refuse(ref.path.name, model, "converted from other weights: the source fingerprints differ")
    shapes = {t.name: t.shape for t in ref.tensors}
    for t in model.tensors:
        if shapes.get(t.name) != t.shape:
            raise _refuse(ref.path.name, model, f"{t.name} is {shapes.get(t.name, 'missing')} there, {t.shape} here")
    n_ref, n_model = ref.array_lengths.get("tokenizer.ggml.tokens"), model.array_lengths.get("tokenizer.ggml.tokens")
    if n_ref != n_model:
        raise _refuse(ref.path.name, model, f"its vocabulary has {n_ref} tokens, this file's {n_model}")


def check_checkpoint_belongs(ckpt, model) -> None:
    """A checkpoint reference (for kld/compare, and --optimize's calibration): the fingerprint the
    file records (when it does), and the embedding's shape."""
    if model.source_fingerprint and ckpt.fingerprint() != model.source_fingerprint:
        raise _refuse(str(ckpt.folder), model, "not the checkpoint it was converted from: the weights' fingerprint differs")
    embd = next((t for t in model.tensors if t.name == "token_embd.weight"), None)
    vocab, width = ckpt.config.get("vocab_size"), ckpt.config.get("hidden_size")
    if embd is not None and tuple(embd.shape) != (vocab, width):
        raise _refuse(str(ckpt.folder), model, f"its embedding is {vocab}x{width}, this file's {embd.shape[0]}x{embd.shape[1]}")


def source_of(info, accepts: str = "the checkpoint folder or an F16/F32 GGUF") -> tuple[str, str | None]:
    """(hub repo or local folder, commit or revision) a file records as its source. A local folder
    counts only while it holds the same weights (fingerprint); otherwise one line naming what
    --reference `accepts` instead."""
    meta = info.metadata if info is not None else {}
    repo = meta.get("neoxq.source.repo")
    if repo:
        return repo, meta.get("neoxq.source.commit") or meta.get("neoxq.source.revision") or None
    name = f"{info.path.name}" if info is not None else "this file"
    folder = meta.get(SOURCE_PATH_KEY)
    if not folder:
        raise UsageError(f"{name} does not record where it was converted from; pass --reference with {accepts}")
    if not (Path(folder) / "config.json").is_file():
        raise UsageError(f"{name} was converted from {folder}, which is no longer there; pass --reference with {accepts}")
    if info.source_fingerprint and open_checkpoint(folder).fingerprint() != info.source_fingerprint:
        raise UsageError(
            f"{folder} has changed since {name} was converted from it (its weights' fingerprint differs); pass --reference with {accepts}"
        )
    return folder, None
