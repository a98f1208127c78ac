"""Sequential calibration: the fp32 checkpoint and its quantized copy run side by side, layer by
layer, so that each matmul is rounded on the inputs the already-rounded layers before it produce,
against the fp32 model's output (neoxq.core.gptq: asymmetric target).

Layer-major, with transformers' own GPT-NeoX modules (as the streamed reference): all calibration
windows' hidden states of both models go through layer 1, then 2 …; each layer is read from the
checkpoint in fp32 and released, so the peak is one layer (twice) plus two hidden-state tensors.
In a layer, the matmuls reading the layer's input (attention QKV, MLP up) are rounded first, then
those reading their outputs (attention output, MLP down), on inputs the rounded first stage gives;
the output matrix last, on the final norm of the quantized stream. The rounding itself is a
callback (`requantize`), so this module knows nothing of files or block formats.
"""

from __future__ import annotations

import copy
from typing import Callable

import numpy as np

from neoxq.core.gptq import Moments
from neoxq.core.progress import Progress

LAYER_MODULES = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
STAGES = (("attention.query_key_value", "mlp.dense_h_to_4h"), ("attention.dense", "mlp.dense_4h_to_h"))
WINDOWS_PER_PASS = 4  # bounds eager attention's ctx × ctx scores; the result does not depend on it

# requantize(gguf name, moments) → the rounded weight and its new bias (GGUF layout), for the layers after it
Requantize = Callable[[str, Moments], tuple[np.ndarray, np.ndarray | None]]


def sequential_calibration(ckpt, windows: np.ndarray, embedding_q: np.ndarray, requantize: Requantize,
                           with_head: bool = True, start_layer: int = 0, restore: Callable | None = None,
                           on_layer: Callable[[int], None] | None = None) -> None:
    """Round every layer matmul (and the output matrix) in order through `requantize`.
    windows: int [n, ctx] token ids; embedding_q: the quantized token embedding [vocab, hidden].
    Resuming: layers below `start_layer` are not rounded again; restore(gguf name) gives their
    rounded weight and bias as written, and both models are run through them. on_layer(k) is called
    when layers 0 … k − 1 are done."""
    import torch

    from .neox import GPTNeoXArgs, gguf_name, tensor_name_map
    from .reference import head_name, layer_inputs, load_final_norm, load_layer, neox_config

    config, args = neox_config(ckpt), GPTNeoXArgs.from_config(ckpt.config)
    names, gguf_names = set(ckpt.tensor_names()), tensor_name_map(args.num_hidden_layers)
    ids = np.asarray(windows)
    h_f = torch.from_numpy(np.ascontiguousarray(ckpt.read("gpt_neox.embed_in.weight")[ids], dtype=np.float32))
    h_q = torch.from_numpy(np.ascontiguousarray(embedding_q[ids], dtype=np.float32))
    extra = layer_inputs(config, h_f[:1])
    per_layer = sum(len(s) for s in STAGES)
    steps = (args.num_hidden_layers - start_layer) * per_layer + int(with_head)
    with torch.no_grad(), Progress("rounding (sequential)", steps, "matmuls") as bar:
        for i in range(args.num_hidden_layers):
            layer_f = load_layer(ckpt, config, i, names)
            layer_q = copy.deepcopy(layer_f)
            gname = {mod: gguf_name(f"gpt_neox.layers.{i}.{mod}.weight", gguf_names) for stage in STAGES for mod in stage}
            if i < start_layer:
                for mod, name in gname.items():
                    _assign(layer_q.get_submodule(mod), *restore(name), args, qkv=mod == STAGES[0][0])
                h_f, h_q = _run(layer_f, h_f, extra), _run(layer_q, h_q, extra)
                continue
            for k, stage in enumerate(STAGES):
                moms, out = _moments(layer_f, layer_q, h_f, h_q, stage, extra, keep_output=k == 0)
                if k == 0:
                    out_f = out  # the fp32 layer's output: its weights never change
                for mod in stage:
                    q, bq = requantize(gname[mod], moms[mod])
                    _assign(layer_q.get_submodule(mod), q, bq, args, qkv=mod == STAGES[0][0])
                    bar.update(1, note=gname[mod])
            h_f, h_q = out_f, _run(layer_q, h_q, extra)
            del layer_f, layer_q
            if on_layer:
                on_layer(i + 1)
        if with_head:
            norm = load_final_norm(ckpt, config)
            mom = _pair_moments(norm(h_f).reshape(-1, h_f.shape[-1]), norm(h_q).reshape(-1, h_q.shape[-1]))
            requantize("output.weight", mom)
            bar.update(1, note=head_name(names))


def _run(layer, h, extra):
    return _batched(lambda x: layer(x, **extra), h)


def _batched(fn, h):
    import torch

    return torch.cat([fn(h[a:a + WINDOWS_PER_PASS]) for a in range(0, len(h), WINDOWS_PER_PASS)])


def _moments(layer_f, layer_q, h_f, h_q, stage, extra, keep_output: bool):
    """Each stage matmul's Moments (inputs of both models, captured by hooks), and the fp32 layer's
    output when asked (it never changes, so one pass serves both)."""
    seen: dict[str, dict] = {mod: {} for mod in stage}
    acc: dict[str, Moments] = {}
    handles = []
    for tag, layer in (("f", layer_f), ("q", layer_q)):
        for mod in stage:
            def hook(module, inputs, mod=mod, tag=tag):
                seen[mod][tag] = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            handles.append(layer.get_submodule(mod).register_forward_pre_hook(hook))
    outs = []
    try:
        for a in range(0, len(h_f), WINDOWS_PER_PASS):
            out = layer_f(h_f[a:a + WINDOWS_PER_PASS], **extra)
            if keep_output:
                outs.append(out)
            layer_q(h_q[a:a + WINDOWS_PER_PASS], **extra)
            for mod in stage:
                m = _pair_moments(seen[mod]["f"], seen[mod]["q"])
                acc[mod] = m if mod not in acc else _add(acc[mod], m)
    finally:
        for h in handles:
            h.remove()
    import torch

    return acc, (torch.cat(outs) if keep_output else None)


def _pair_moments(xf, xq) -> Moments:
    xf, xq = xf.double(), xq.double()
    return Moments((xq.T @ xq).numpy(), (xf.T @ xf).numpy(), (xf.T @ xq).numpy(), xq.sum(0).numpy(), xf.sum(0).numpy(), len(xq))


def _add(a: Moments, b: Moments) -> Moments:
    return Moments(a.hq + b.hq, a.hf + b.hf, a.cross + b.cross, a.sum_q + b.sum_q, a.sum_f + b.sum_f, a.n + b.n)


def _assign(module, q: np.ndarray, bias: np.ndarray | None, args, qkv: bool) -> None:
    """Put a rounded weight (GGUF layout) and its bias into the quantized model's module."""
    import torch

    from .neox import interleave_qkv

    def hf(x):
        return torch.from_numpy(np.ascontiguousarray(interleave_qkv(x, args) if qkv else x, dtype=np.float32))

    module.weight.copy_(hf(q))
    if bias is not None:
        module.bias.copy_(hf(bias))


def streamed_moments(ckpt, windows: np.ndarray, include_output: bool, full: bool, embedding_fisher: bool,
                     gen) -> tuple[dict, dict]:
    """second_moments' sums and counts with one fp32 layer in memory at a time (a model larger than
    the memory budget): each window goes forward layer by layer (the matmuls' inputs summed by hooks,
    every layer's input kept), through the head to the sampled labels' log-likelihood, and back
    layer by layer — each layer read again and its forward recomputed under autograd — to the
    gradient at the embedding. The same sums as the in-memory pass (tests: to float rounding)."""
    import torch

    from .neox import GPTNeoXArgs, gguf_name, tensor_name_map
    from .reference import head_name, layer_inputs, load_final_norm, load_layer, neox_config

    config, args = neox_config(ckpt), GPTNeoXArgs.from_config(ckpt.config)
    names, gguf_names = set(ckpt.tensor_names()), tensor_name_map(args.num_hidden_layers)
    sums: dict = {}
    counts: dict = {}

    def add(name, x):
        accumulate(sums, counts, name, x, full)

    head = torch.from_numpy(np.array(ckpt.read(head_name(names)), dtype=np.float32)) if embedding_fisher else None
    with Progress("calibration (streamed)", len(windows), "windows") as bar:
        for ids in np.asarray(windows):
            h = torch.from_numpy(np.ascontiguousarray(ckpt.read("gpt_neox.embed_in.weight")[ids[None]], dtype=np.float32))
            extra, kept = layer_inputs(config, h), []
            with torch.no_grad():
                for i in range(args.num_hidden_layers):
                    layer = load_layer(ckpt, config, i, names)
                    handles = [layer.get_submodule(m).register_forward_pre_hook(
                        lambda mod, inp, n=gguf_name(f"gpt_neox.layers.{i}.{m}.weight", gguf_names): add(n, inp[0]))
                        for m in LAYER_MODULES]
                    kept.append(h)
                    h = layer(h, **extra)
                    for hd in handles:
                        hd.remove()
            norm = load_final_norm(ckpt, config)
            if include_output:
                with torch.no_grad():
                    add("output.weight", norm(h))
            if embedding_fisher:
                g = _head_gradient(norm, head, h, gen)
                for i in reversed(range(args.num_hidden_layers)):
                    x = kept[i].requires_grad_(True)
                    (g,) = torch.autograd.grad(load_layer(ckpt, config, i, names)(x, **extra), x, grad_outputs=g)
                accumulate(sums, counts, "token_embd.weight", g[0], full=True)
            bar.update(1)
    return sums, counts


def _head_gradient(norm, head, h, gen):
    """d log p(next tokens sampled from the model) / d (last layer's output), as in-memory."""
    import torch

    h = h.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(sampled_log_likelihood(torch.nn.functional.linear(norm(h), head)[0], gen), h)
    return g


def sampled_log_likelihood(logits, gen):
    """Σ log p of next tokens sampled from the model's own distribution (logits [ctx, vocab]): its
    gradients' outer products estimate the Fisher information (cross-position terms vanish)."""
    import torch

    logits = logits.float()
    with torch.no_grad():
        sampled = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)[:, 0]
    return torch.log_softmax(logits, -1).gather(1, sampled[:, None]).sum()


def accumulate(sums: dict, counts: dict, name: str, x, full: bool) -> None:
    """Add Σ x xᵀ (full) or Σ x² per column of x's rows, in float64, and their number."""
    x = x.detach().reshape(-1, x.shape[-1]).double()
    add = x.T @ x if full else (x ** 2).sum(0)
    sums[name] = sums[name] + add if name in sums else add
    counts[name] = counts.get(name, 0) + x.shape[0]
