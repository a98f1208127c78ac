"""Compute an importance matrix from a checkpoint with transformers: for every matmul weight
(attn_qkv, attn_output, ffn_up, ffn_down, optionally output) the sum of squared input activations
per input column over the calibration text, and the token count; llama.cpp divides the two."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from neoxq.core.atomic import check_output
from neoxq.core.calibration_stats import CalibrationStats
from neoxq.core.errors import UsageError, require_convert_extra
from neoxq.core.imatrix_io import IMatrix, write_imatrix
from neoxq.core.progress import Progress
from neoxq.core.textfile import read_text

from .calibrate import ATTENTION, LAYER_MODULES, QKV, CalibrationSums, autocast_bf16, bf16_matmuls, sampled_log_likelihood, streamed_moments

# The matmuls of a layer whose inputs are collected (their GGUF names come from gguf-py's map; the
# input columns are the same in both layouts: the QKV de-interleave permutes rows only).
from .checkpoint import Checkpoint, open_checkpoint
from .neox import GPTNeoXArgs, gguf_name, tensor_name_map
from .reference import load_reference


def compute_imatrix(src, text: str, ctx: int = 512, revision: str | None = None, include_output: bool = False, dataset_name: str = "text") -> IMatrix:
    ckpt = src if isinstance(src, Checkpoint) else open_checkpoint(src, revision)
    stats = second_moments(ckpt, text, ctx, revision, include_output, full=False)
    return IMatrix(
        {k: v.astype(np.float32) for k, v in stats.sums.items()},
        {k: float(v) for k, v in stats.counts.items()},
        datasets=[dataset_name],
        chunk_count=stats.windows,
        chunk_size=ctx,
        source_fingerprint=ckpt.fingerprint(),
    )


def imatrix_from_stats(stats: CalibrationStats, ctx: int, dataset_name: str, fingerprint: str | None = None) -> IMatrix:
    """The importance matrix is the diagonal of the second moments (full [in, in] matrices or their
    diagonals), so one calibration pass serves both."""
    sums, counts = stats.importance_sums()
    return IMatrix(
        {k: v.astype(np.float32) for k, v in sums.items()},
        {k: float(v) for k, v in counts.items()},
        datasets=[dataset_name],
        chunk_count=stats.windows,
        chunk_size=ctx,
        source_fingerprint=fingerprint,
    )


def second_moments(
    src,
    text: str,
    ctx: int = 512,
    revision: str | None = None,
    include_output: bool = False,
    full: bool = False,
    fisher: bool = False,
    streamed: bool = False,
    bf16: bool = False,
    device: str = "cpu",
) -> CalibrationStats:
    """Per matmul weight (GGUF name): Σ x² per input column (full=False) or Σ x xᵀ (full=True,
    [in, in]: the layer's Hessian up to a factor), float64, and the tokens counted, over
    non-overlapping windows of `ctx` tokens of the text, with the fp32 model.

    fisher: also Σ g gᵀ of the gradients g of the windows'
    log-likelihood with respect to each input position's embedding, the next tokens sampled from the
    model itself (so cross-position terms vanish in expectation): the Fisher information of the
    model's output distribution in the embedding's space. The embedding is a lookup, with no input
    activations; a rounding error δ of one of its rows costs ½ δᵀ F δ of KL divergence where it is
    used, which is what its levels are then chosen against; the same Fisher in each attention QKV
    matmul's output space, per head (the head's q, k, v in that order): how an error in one head's
    queries, keys and values moves the output together; and each matmul's inputs' largest
    magnitude per channel (neoxq.core.equalize).

    streamed: one layer in memory at a time (neoxq.convert.calibrate.streamed_moments), for a model
    whose fp32 weights do not fit the memory budget; the same sums.

    bf16: the Fisher windows' forward and backward under torch's bfloat16 autocast (matmuls in
    bfloat16, calibrate.native_bf16), their hooked sums included: the Fisher is an estimate from
    sampled tokens whose own spread is far above bfloat16's rounding (docs/method.md).

    device: the torch device the model and its sums run on (neoxq.accelerator); the sampled
    tokens are drawn on the host's seeded generator either way."""
    try:
        import torch
    except ImportError as exc:
        raise require_convert_extra(exc) from exc
    ckpt = src if isinstance(src, Checkpoint) else open_checkpoint(src, revision)
    windows = calibration_windows(ckpt, text, ctx)
    gen = torch.Generator().manual_seed(0)  # the sampled next tokens: the same on every run
    if streamed:
        return streamed_moments(ckpt, windows, include_output, full, fisher, gen, bf16, device)
    return _in_memory_pass(ckpt, windows, include_output, full, fisher, gen, bf16, device)


def _in_memory_pass(ckpt, windows, include_output: bool, full: bool, fisher: bool, gen, bf16: bool, device: str = "cpu") -> CalibrationStats:
    """second_moments with the whole fp32 model loaded: hooks sum each matmul's inputs as the
    windows pass, and with `fisher` each window's backward pass gives the gradients."""
    import torch

    args = GPTNeoXArgs.from_config(ckpt.config)
    model = load_reference(ckpt.folder, ATTENTION if fisher else "eager").to(device)  # the optimiser's pass: fused attention
    if fisher and bf16:  # only the Fisher windows run under autocast
        bf16_matmuls(model)
    acc = CalibrationSums(full, fisher)
    handles = _input_hooks(model, args, acc, include_output)
    progress = Progress("calibration" if full else "imatrix", len(windows), "chunks")
    qkv_names = [gguf_name(f"gpt_neox.layers.{i}.{QKV}.weight", tensor_name_map(args.num_hidden_layers)) for i in range(args.num_hidden_layers)]
    try:
        for ids in windows:
            window = torch.tensor(ids[None], device=device)
            if fisher:
                with autocast_bf16(bf16, window.device.type):
                    emb, qkv = _output_gradients(model, window, gen)
                acc.add_embedding_gradient(emb)
                for name, g in zip(qkv_names, qkv):
                    acc.add_head_gradient(name, g, args.num_attention_heads)
            else:
                with torch.no_grad():
                    model(window)
            progress.update(1)
    finally:
        progress.close()
        for h in handles:
            h.remove()
    return acc.stats(len(windows))


def _input_hooks(model, args, acc: CalibrationSums, include_output: bool) -> list:
    """Forward pre-hooks that hand every layer matmul's inputs (and the output matrix's, when
    asked) to `acc` under their GGUF names; the caller removes them."""
    names = tensor_name_map(args.num_hidden_layers)

    def hook(name):
        return lambda module, inputs: acc.add_input(name, inputs[0])

    handles = []
    for i, layer in enumerate(model.gpt_neox.layers):
        for mod_name in LAYER_MODULES:
            target = gguf_name(f"gpt_neox.layers.{i}.{mod_name}.weight", names)
            handles.append(layer.get_submodule(mod_name).register_forward_pre_hook(hook(target)))
    if include_output:
        handles.append(model.get_output_embeddings().register_forward_pre_hook(hook("output.weight")))
    return handles


def calibration_windows(ckpt, text: str, ctx: int):
    """int64 [n, ctx]: the text's tokens in non-overlapping windows (the tail shorter than one dropped)."""
    from tokenizers import Tokenizer

    limit = GPTNeoXArgs.from_config(ckpt.config).max_position_embeddings
    if ctx > limit:
        raise UsageError(f"--ctx {ctx} exceeds the model's context {limit}; pass a smaller --ctx")
    ids = Tokenizer.from_file(str(ckpt.folder / "tokenizer.json")).encode(text).ids
    if len(ids) < ctx:
        raise UsageError(f"the calibration text has {len(ids)} tokens, fewer than one window of {ctx}; pass a longer --text or a smaller --ctx")
    n = len(ids) // ctx
    return np.asarray(ids[: n * ctx], dtype=np.int64).reshape(n, ctx)


def _output_gradients(model, window, gen):
    """d log p(sampled next tokens) / d (embedding at each position) [ctx, hidden] float64, and
    / d (each layer's attention QKV output) [ctx, 3·hidden], from one backward pass (the layers'
    input hooks run in its forward as usual). Only these gradients are asked for: autograd then skips
    every weight's gradient (each Linear's x^T g, the 50k-row embedding's and output matrix's), about
    half of what `.backward()` computed; the QKV outputs lie on its way to the embedding."""
    import torch

    held = {"qkv": []}

    def keep(module, inputs, output):
        held["e"] = output

    handles = [model.gpt_neox.embed_in.register_forward_hook(keep)]
    handles += [layer.get_submodule(QKV).register_forward_hook(lambda m, i, o: held["qkv"].append(o)) for layer in model.gpt_neox.layers]
    try:
        loss = sampled_log_likelihood(model(window).logits[0], gen)
        grad, *qkv = torch.autograd.grad(loss, [held["e"], *held["qkv"]])
    finally:
        for h in handles:
            h.remove()
    return grad[0].detach().double(), [g[0].detach() for g in qkv]


def make_imatrix(
    src: str,
    text_file: Path | str,
    output: Path | str,
    ctx: int = 512,
    revision: str | None = None,
    include_output: bool = False,
    force: bool = False,
) -> Path:
    check_output(Path(output), force, inputs=[text_file])
    text = read_text(text_file)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    name = f"{Path(text_file).name} sha256:{digest}"
    im = compute_imatrix(src, text, ctx, revision, include_output, dataset_name=name)
    return write_imatrix(output, im, force)
