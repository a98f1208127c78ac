"""The conversion pipeline: checkpoint → GPT-NeoX plan → streamed GGUF (F32/F16/BF16/Q8_0)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import gguf
import numpy as np

from neoxq import __version__
from neoxq.core.atomic import output_in
from neoxq.core.errors import CorruptFileError, UnsupportedModelError, UsageError
from neoxq.core.gguf_info import FINGERPRINT_KEY, SOURCE_PATH_KEY
from neoxq.core.naming import gguf_name
from neoxq.core.qtypes import CONVERT_OUTTYPES, QuantType

from . import neox
from .checkpoint import Checkpoint, open_checkpoint
from .vocab import PRE_TOKENIZER, Vocab, load_vocab
from .writer import FileSpan, PlannedTensor, write_gguf

ARCH = "gptneox"
QKV = re.compile(r"\.attention\.query_key_value\.(weight|bias)$")


@dataclass
class ConversionPlan:
    ckpt: Checkpoint
    args: neox.GPTNeoXArgs
    vocab: Vocab
    outtype: QuantType
    tensors: list[PlannedTensor]


def default_output_name(ckpt: Checkpoint, outtype: QuantType) -> str:
    return gguf_name(ckpt.name, ckpt.revision, outtype.value)


def plan_conversion(ckpt: Checkpoint, outtype: QuantType) -> ConversionPlan:
    if outtype not in CONVERT_OUTTYPES:
        raise UsageError(
            f"convert writes {', '.join(t.value for t in CONVERT_OUTTYPES)}; for {outtype.value} use --quant {outtype.value} (or `neoxq quantize`)"
        )
    args = neox.GPTNeoXArgs.from_config(ckpt.config)
    vocab = load_vocab(ckpt.folder, args.vocab_size)
    name_map = neox.tensor_name_map(args.num_hidden_layers)
    planned: list[PlannedTensor] = []
    for name in ckpt.tensor_names():
        if neox.is_ignored(name):
            continue
        target = neox.gguf_name(name, name_map)
        if target is None:
            raise UnsupportedModelError(
                f"checkpoint tensor {name!r} has no GPT-NeoX GGUF counterpart; this is not a plain GPTNeoXForCausalLM checkpoint"
            )
        planned.append(PlannedTensor(target, ckpt.shape(name), _out_qtype(ckpt.shape(name), outtype), name))
    names = {t.name for t in planned}
    if "output.weight" not in names:
        # Tied embeddings: llama.cpp's gptneox always reads output.weight, so write the embedding twice.
        emb = next((t for t in planned if t.name == "token_embd.weight"), None)
        if emb is None:
            raise CorruptFileError("the checkpoint has no gpt_neox.embed_in.weight; the weights are incomplete, re-download them")
        planned.append(PlannedTensor("output.weight", emb.shape, emb.qtype, emb.source))
    _check_complete(planned, args)
    # Grouped by shard (stable within one), so each shard is opened once while streaming.
    planned.sort(key=lambda t: ckpt.file_index(t.source))
    return ConversionPlan(ckpt, args, vocab, outtype, planned)


def _out_qtype(shape: tuple[int, ...], outtype: QuantType) -> int:
    Q = gguf.GGMLQuantizationType
    if len(shape) == 1 or outtype == QuantType.F32:
        return Q.F32  # norms and biases stay F32, as llama.cpp expects
    if outtype == QuantType.Q8_0:
        return Q.Q8_0 if shape[-1] % 32 == 0 else Q.F16  # Q8_0 needs rows in blocks of 32
    return Q.BF16 if outtype == QuantType.BF16 else Q.F16


def _check_complete(planned: list[PlannedTensor], args: neox.GPTNeoXArgs) -> None:
    """Every tensor llama.cpp's gptneox loader requires, with the shape it requires."""
    want = neox.required_tensors(args)
    have = {t.name: tuple(t.shape) for t in planned}
    missing = sorted(set(want) - set(have))
    if missing:
        raise CorruptFileError(f"the checkpoint lacks {len(missing)} tensor(s), e.g. {missing[0]}; the weights are incomplete, re-download them")
    for n, shape in want.items():
        if have[n] != shape:
            raise CorruptFileError(f"{n} has shape {have[n]} but config.json implies {shape}; the weights do not match the config")


def _produce(plan: ConversionPlan):
    def gen(tensors: list[PlannedTensor]) -> Iterator[tuple[PlannedTensor, np.ndarray]]:
        # One source tensor at a time; a tied embedding is read again for output.weight.
        for t, (_, data) in zip(tensors, plan.ckpt.iter_tensors([t.source for t in tensors])):
            yield t, _as_numpy(data, t.qtype, reorder=bool(QKV.search(t.source)), args=plan.args)
            del data

    return gen


def _as_numpy(data: np.ndarray, qtype: int, reorder: bool, args: neox.GPTNeoXArgs) -> np.ndarray:
    """A float16 source bound for F16 stays float16 (no float32 copy); everything else goes float32.
    A memory-mapped tensor written unchanged goes as a FileSpan (copied file to file)."""
    same = {gguf.GGMLQuantizationType.F16: np.float16, gguf.GGMLQuantizationType.F32: np.float32}.get(qtype)
    if not reorder and isinstance(data, np.memmap) and data.dtype == same and data.flags.c_contiguous:
        return FileSpan.of(data)
    if not (data.dtype == np.float16 and qtype == gguf.GGMLQuantizationType.F16):
        data = data.astype(np.float32, copy=False)
    return neox.deinterleave_qkv(data, args) if reorder else data


def _metadata(plan: ConversionPlan):
    def add(w) -> None:
        _add_hparams(w, plan)
        _add_tokenizer(w, plan.vocab)
        _add_provenance(w, plan)

    return add


def _add_hparams(w, plan: ConversionPlan) -> None:
    a, ck = plan.args, plan.ckpt
    w.add_name(ck.name if not ck.revision or ck.revision == "main" else f"{ck.name}@{ck.revision}")
    w.add_basename(ck.name)
    w.add_size_label(neox.size_label(a))
    w.add_context_length(a.max_position_embeddings)
    w.add_embedding_length(a.hidden_size)
    w.add_block_count(a.num_hidden_layers)
    w.add_feed_forward_length(a.intermediate_size)
    w.add_rope_dimension_count(a.n_rot)
    w.add_rope_freq_base(a.rope_base)
    w.add_head_count(a.num_attention_heads)
    w.add_parallel_residual(a.use_parallel_residual)
    w.add_layer_norm_eps(a.layer_norm_eps)
    w.add_file_type(plan.outtype.ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tokenizer(w, voc: Vocab) -> None:
    # GPT-NeoX's byte-level BPE, which llama.cpp calls "gpt2".
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(PRE_TOKENIZER)
    w.add_token_list(voc.tokens)
    w.add_token_types(voc.types)
    voc.special.add_to_gguf(w, quiet=True)  # merges, special ids, add_bos/add_eos = false (GPT-NeoX prepends nothing)


def _add_provenance(w, plan: ConversionPlan) -> None:
    """Where the weights came from: read back to decide whether an existing file is still valid."""
    ck = plan.ckpt
    if ck.repo_id:
        w.add_source_url(f"https://huggingface.co/{ck.repo_id}")
    for key, value in source_keys(ck).items():
        w.add_string(key, value)
    if not ck.repo_id:
        # A local folder: `--reference auto` finds it here while its fingerprint still matches.
        w.add_string(SOURCE_PATH_KEY, str(ck.folder.resolve()))
    w.add_string("neoxq.source.format", ck.format)
    w.add_string("neoxq.source.dtype", str(plan.args.weights_dtype or ""))
    lic = _license(ck.folder)
    if lic:
        w.add_license(lic)
    w.add_string("neoxq.converter_version", __version__)
    w.add_string("neoxq.quant_type", plan.outtype.value)
    w.add_uint32("neoxq.tokenizer.n_tokens", plan.vocab.n_real)


def source_keys(ck: Checkpoint) -> dict[str, str]:
    """The metadata that identifies a file's source: repo, revision, commit, weights fingerprint."""
    keys = {"neoxq.source.revision": ck.revision or "", "neoxq.source.commit": ck.commit or "", FINGERPRINT_KEY: ck.fingerprint()}
    if ck.repo_id:
        keys["neoxq.source.repo"] = ck.repo_id
    return keys


def _license(folder: Path) -> str | None:
    """The licence in a hub model card's metadata (huggingface_hub's own parser), when there is one."""
    from huggingface_hub import ModelCard

    card = folder / "README.md"
    if not card.is_file() or not card.read_bytes().startswith(b"---"):
        return None  # no metadata block (huggingface_hub would log a warning saying so)
    try:
        lic = ModelCard.load(card).data.license
    except Exception:  # noqa: BLE001 - a malformed card is no licence, never a failed conversion
        return None
    return lic if isinstance(lic, str) and lic else None


def convert(
    src: str | Checkpoint,
    outtype: QuantType | str = QuantType.F16,
    output: Path | str | None = None,
    revision: str | None = None,
    force: bool = False,
    out_dir: Path | str | None = None,
) -> Path:
    """Convert a GPT-NeoX checkpoint (folder, hub id, or an opened Checkpoint) to one GGUF file."""
    outtype = QuantType.parse(outtype) if isinstance(outtype, str) else outtype
    ckpt = src if isinstance(src, Checkpoint) else open_checkpoint(src, revision)
    plan = plan_conversion(ckpt, outtype)
    path = output_in(output, Path(out_dir or ".") / default_output_name(ckpt, outtype))
    return write_gguf(path, ARCH, _metadata(plan), plan.tensors, _produce(plan), force=force, inputs=ckpt.weight_files)
