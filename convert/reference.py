"""transformers' GPTNeoXForCausalLM in fp32: the independent reference every score is checked
against (and the activations behind an imatrix). torch is imported only when used.

Two ways to run it, same numbers:
- in memory: the whole model in fp32 (about 4 bytes per parameter);
- streamed, when that does not fit the memory budget: layer-major, with transformers' own modules.
  All windows (or groups of them) go through the embedding, then layer 1, layer 2 … and the head;
  each layer's weights are read from the checkpoint, upcast to fp32, used and released, so the
  peak is one layer plus the activations, not the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from neoxq.core.errors import UsageError, require_convert_extra
from neoxq.core.progress import Progress
from neoxq.core.sizes import format_bytes

from .neox import GPTNeoXArgs, is_ignored

TORCH_OVERHEAD = 400 << 20  # torch + transformers imported, allocator slack
HEAD_CHUNK = 8192  # vocabulary rows of the output matrix upcast at a time when streaming
# A reference whose fp32 weights are at most this share of the memory available runs in its caller's
# process (HFReference.fits_in_caller): what torch keeps of it afterwards is then too little to
# matter next to the GGUF files scored later, and a child process would cost an interpreter and
# torch's and transformers' imports for each report.
IN_CALLER_SHARE = 1 / 16


def load_reference(folder: Path | str, attention: str = "eager"):
    """The model in fp32, eval mode, eager attention (or another transformers implementation), with
    no progress bars on the terminal."""
    try:
        import torch
        import transformers
        from transformers import GPTNeoXForCausalLM
    except ImportError as exc:
        raise require_convert_extra(exc) from exc
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    return GPTNeoXForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=attention).eval()


@dataclass
class ReferencePlan:
    mode: str  # "memory" | "streamed"
    group: int  # windows per pass when streamed
    peak_bytes: int  # estimated
    why: str


def _sizes(ckpt) -> dict:
    a = GPTNeoXArgs.from_config(ckpt.config)
    return {"args": a, "layer": a.layer_params(), "embed": a.vocab_size * a.hidden_size, "params": a.param_count(), "src": ckpt.bytes_per_param}


def activation_bytes(args, ctx: int, windows: int) -> int:
    """A pass over `windows` windows peaks either inside a layer (hidden state, residual, the MLP's
    4h, eager attention's scores and their softmax: heads × ctx × ctx) or at the head (the scored
    positions' float32 logits for every window, then one window's float64 log-softmax and its copy).
    Checked against the peaks scripts/bench_reference.py records."""
    h, f, heads, v = args.hidden_size, args.intermediate_size, args.num_attention_heads, args.vocab_size
    layer = windows * ctx * (4 * h + 2 * f + 3 * heads * ctx) * 4
    head = windows * (ctx // 2) * v * 4 + (ctx // 2) * v * 8 * 2
    return max(layer, head)


def plan_reference(ckpt, ctx: int, n_windows: int, max_memory: int | None, mode: str = "auto") -> ReferencePlan:
    """In memory when the fp32 model fits `max_memory`, streamed otherwise (or when asked); refuse,
    in one line, a budget below one streamed layer."""
    s = _sizes(ckpt)
    # from_pretrained maps the checkpoint while it builds the fp32 model: both are resident for a while
    in_memory = s["params"] * (4 + s["src"]) + TORCH_OVERHEAD + activation_bytes(s["args"], ctx, 1)
    if mode == "memory" or (mode == "auto" and (max_memory is None or in_memory <= max_memory)):
        why = "the fp32 model fits the memory budget" if max_memory else "no memory budget given"
        return ReferencePlan("memory", 1, in_memory, why)
    weights = max(s["layer"] * (s["src"] + 4), s["embed"] * s["src"] + HEAD_CHUNK * s["args"].hidden_size * 4)
    fixed = weights + TORCH_OVERHEAD
    per_window = activation_bytes(s["args"], ctx, 2) - activation_bytes(s["args"], ctx, 1)
    first = activation_bytes(s["args"], ctx, 1)
    budget = max_memory if max_memory is not None else fixed + first + per_window * n_windows
    if budget < fixed + first:
        raise UsageError(
            f"the streamed fp32 reference needs at least {format_bytes(fixed + first)} (one layer and one window) "
            f"but its memory budget is {format_bytes(budget)}; free memory or pass --max-memory "
            f"{format_bytes(fixed + first)} or more (report and sweep also take --reference f16)"
        )
    group = int(min(n_windows, 1 + max(0, (budget - fixed - first) // max(per_window, 1))))
    why = (
        f"the fp32 model needs {format_bytes(in_memory)}, above the budget of {format_bytes(budget)}" if mode == "auto" else "streaming was asked for"
    )
    return ReferencePlan("streamed", group, fixed + activation_bytes(s["args"], ctx, group), why)


class HFReference:
    """The checkpoint under transformers in fp32, scoring the same windows as llama.cpp does.

    Satisfies neoxq.runtime.score.Reference (duck-typed: convert never imports runtime).
    `max_memory` bounds what the reference holds; `mode` is auto | memory | streamed."""

    def __init__(self, ckpt, max_memory: int | None = None, mode: str = "auto"):
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError as exc:
            raise require_convert_extra(exc) from exc
        self.ckpt, self.max_memory, self.mode = ckpt, max_memory, mode
        self.plan: ReferencePlan | None = None
        self.description = "transformers GPTNeoXForCausalLM, fp32"

    def identity(self) -> str:
        """The commit for hub checkpoints; for local folders the weights' names, sizes and mtimes.
        (Not the mode: in memory and streamed give the same numbers.)"""
        if self.ckpt.commit:
            return f"hf:{self.ckpt.repo_id}@{self.ckpt.commit}"
        return f"hf:{self.ckpt.folder.resolve()}:{self.ckpt.fingerprint()}"

    def fits_in_caller(self, available: int) -> bool:
        """Whether the caller may run this reference in its own process rather than a child's; see
        IN_CALLER_SHARE."""
        budget = min(available, self.max_memory) if self.max_memory else available
        return _sizes(self.ckpt)["params"] * 4 <= budget * IN_CALLER_SHARE

    def prepare(self, ctx: int, n_windows: int) -> ReferencePlan:
        self.plan = plan_reference(self.ckpt, ctx, n_windows, self.max_memory, self.mode)
        mode = "in memory" if self.plan.mode == "memory" else f"streamed layer by layer, {self.plan.group} window(s) per pass"
        self.description = f"transformers GPTNeoXForCausalLM, fp32, {mode}"
        return self.plan

    def log_probs(self, w) -> Iterator[tuple[int, np.ndarray]]:
        plan = self.plan or self.prepare(w.ctx, w.n_chunks)
        with Progress("reference (transformers)", w.tokens_scored, "tokens") as progress:
            source = self._in_memory(w) if plan.mode == "memory" else _streamed(self.ckpt, w, plan.group)
            for c, lp in source:
                yield c, lp
                progress.update(w.per_window)

    def _in_memory(self, w) -> Iterator[tuple[int, np.ndarray]]:
        import torch

        model = load_reference(self.ckpt.folder)
        pos = list(w.scored_positions)
        with torch.no_grad():
            for c in range(w.n_chunks):
                logits = model(torch.tensor([w.chunk(c)])).logits[0, pos].double()
                yield c, torch.log_softmax(logits, -1).numpy()


def _tensors(ckpt, names: list[str]) -> dict:
    """Checkpoint tensors as fp32 torch tensors (each upcast only when read)."""
    import torch

    return {n: torch.from_numpy(np.array(a, dtype=np.float32)) for n, a in ckpt.iter_tensors(names)}  # a copy: maps are read-only


def _module(cls_factory, state: dict, prefix: str):
    """A transformers module built on the meta device, then given these weights (no copy)."""
    import torch

    with torch.device("meta"):
        mod = cls_factory()
    mod.load_state_dict({k[len(prefix) :]: v for k, v in state.items()}, assign=True)
    return mod.eval()


def neox_config(ckpt, attention: str = "eager"):
    """transformers' config of the checkpoint, with eager attention (the scores as llama.cpp computes
    them) or the implementation named."""
    from transformers import GPTNeoXConfig

    config = GPTNeoXConfig.from_pretrained(ckpt.folder)
    config._attn_implementation = attention
    return config


def head_name(names: set[str]) -> str:
    """The output matrix's checkpoint name (the input embedding when tied)."""
    for name in ("embed_out.weight", "lm_head.weight"):
        if name in names:
            return name
    return "gpt_neox.embed_in.weight"


def load_layer(ckpt, config, i: int, names: set[str]):
    """Layer i as transformers' GPTNeoXLayer, its weights read from the checkpoint in fp32."""
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXLayer

    prefix = f"gpt_neox.layers.{i}."
    state = _tensors(ckpt, sorted(n for n in names if n.startswith(prefix) and not _is_buffer(n)))
    return _module(lambda: GPTNeoXLayer(config, i), state, prefix)


def load_final_norm(ckpt, config):
    import torch

    state = _tensors(ckpt, ["gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias"])
    return _module(lambda: torch.nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps), state, "gpt_neox.final_layer_norm.")


def layer_inputs(config, h) -> dict:
    """What every layer takes besides the hidden states [windows, ctx, hidden]: the causal mask,
    positions and rotary embeddings, as GPTNeoXModel.forward builds them."""
    import torch
    from transformers.masking_utils import create_causal_mask
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding

    position_ids = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
    mask = create_causal_mask(config=config, inputs_embeds=h, attention_mask=None, cache=None, position_ids=position_ids)
    rotary = GPTNeoXRotaryEmbedding(config).to(h.device)
    return {"attention_mask": mask, "position_ids": position_ids, "position_embeddings": rotary(h, position_ids=position_ids)}


def _streamed(ckpt, w, group: int) -> Iterator[tuple[int, np.ndarray]]:
    """Layer-major evaluation with transformers' own GPT-NeoX modules, `group` windows per pass."""
    import torch

    config = neox_config(ckpt)
    names = set(ckpt.tensor_names())
    pos = list(w.scored_positions)
    with torch.no_grad():
        for start in range(0, w.n_chunks, group):
            chunks = list(range(start, min(start + group, w.n_chunks)))
            ids = torch.tensor([w.chunk(c) for c in chunks])
            emb = ckpt.read("gpt_neox.embed_in.weight")
            h = torch.from_numpy(np.ascontiguousarray(emb[ids.numpy()], dtype=np.float32))
            del emb
            extra = layer_inputs(config, h)
            for i in range(config.num_hidden_layers):
                layer = load_layer(ckpt, config, i, names)
                h = layer(h, **extra)
                del layer
            h = load_final_norm(ckpt, config)(h[:, pos])
            logits = _head(ckpt, head_name(names), h)
            for j, c in enumerate(chunks):
                yield c, torch.log_softmax(logits[j].double(), -1).numpy()


def _head(ckpt, name: str, h):
    """The output matrix applied in blocks of vocabulary rows (each block upcast to fp32 alone):
    the same products as transformers' bias-free lm_head, without holding it in fp32."""
    import torch

    weight = ckpt.read(name)
    out = torch.empty(h.shape[0], h.shape[1], weight.shape[0])
    for a in range(0, weight.shape[0], HEAD_CHUNK):
        block = torch.from_numpy(np.array(weight[a : a + HEAD_CHUNK], dtype=np.float32))  # a copy: maps are read-only
        out[..., a : a + HEAD_CHUNK] = torch.nn.functional.linear(h, block)
    return out


def _is_buffer(name: str) -> bool:
    return is_ignored(name)
