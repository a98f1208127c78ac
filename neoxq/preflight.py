"""Memory preflight: estimate a heavy command's peak before any work starts, and refuse in one line
what cannot fit, naming the estimate, what is available and the option that makes it fit.

The estimates are deliberately simple sums of what dominates (checked against measured peaks by
scripts/bench_reference.py): the llama.cpp model (its file), its KV cache and logits buffer, the
converter's largest tensor, the transformers reference's plan.
"""

from __future__ import annotations

import os

from neoxq.core.errors import UsageError
from neoxq.core.gguf_info import GGUFInfo
from neoxq.core.machine import available_memory
from neoxq.core.sizes import format_bytes

BASE = 150 << 20  # Python, numpy, llama-cpp-python, gguf imported


def llama_bytes(info: GGUFInfo, n_ctx: int, n_batch: int = 512) -> int:
    """Weights (the file's tensors) + KV cache (f16 K and V per layer) + logits and compute buffers."""
    layers = int(info.metadata.get(f"{info.arch}.block_count", 0))
    hidden = int(info.metadata.get(f"{info.arch}.embedding_length", 0))
    kv = 2 * layers * n_ctx * hidden * 2
    compute = n_batch * (info.n_vocab or 50304) * 4 * 2 + n_batch * hidden * 4 * 16
    return sum(t.n_bytes for t in info.tensors) + kv + compute + BASE


def convert_bytes(ckpt) -> int:
    """The converter streams: its peak is the largest tensor in the source dtype, in float32 and
    encoded, on top of the libraries."""
    from neoxq.convert.neox import GPTNeoXArgs

    a = GPTNeoXArgs.from_config(ckpt.config)
    largest = a.vocab_size * a.hidden_size
    src = max(ckpt.size_bytes // max(a.param_count(), 1), 2)
    return BASE + largest * (src + 4 + 2)


def quantize_bytes(info: GGUFInfo) -> int:
    """llama.cpp's quantizer holds one tensor in float32 plus its quantized copy (the input is mapped)."""
    largest = max((t.n_elements for t in info.tensors), default=0)
    return BASE + largest * (4 + 4)


def check(what: str, need: int, fix: str, available: int | None = None) -> None:
    """Refuse when `need` exceeds the memory available (NEOXQ_SKIP_PREFLIGHT=1 skips the check)."""
    if os.environ.get("NEOXQ_SKIP_PREFLIGHT") == "1":
        return
    avail = available_memory() if available is None else available
    if need > avail:
        raise UsageError(f"{what} needs about {format_bytes(need)} of memory but {format_bytes(avail)} is available; {fix}")


def optimize_bytes(args, ctx: int, windows: int) -> int:
    """--optimize's peak, the larger of its two passes.
    1. fp32 pass: the model in memory, its activations and gradients for one window (forward +
       backward for the embedding's Fisher), the embedding's float64 Fisher matrix (h²).
    2. sequential pass (layer by layer): two copies of one fp32 layer, both models' hidden states for
       every calibration window, one stage's float64 moments (three [in, in] matrices per matmul; the
       MLP's down projection, f inputs, dominates), one window group's layer activations.
    Either way the largest tensor (the output matrix) while it is rounded: about seven [rows, cols]
    float64 arrays alive at once (its target, the augmented copies, grids, values, errors)."""
    h, f, n = args.hidden_size, args.intermediate_size, args.num_hidden_layers
    activations = 4 * ctx * (n * (12 * h + 2 * f) + 6 * args.vocab_size)  # logits, softmax, their gradients
    full = 4 * args.param_count() + activations + 8 * h * h
    layer = 4 * (4 * h * h + 2 * h * f)
    hidden = 2 * 4 * windows * ctx * h
    stage = 8 * 3 * (h * h + f * f)
    sequential = 2 * layer + 2 * hidden + stage + 4 * ctx * 4 * (4 * h + 2 * f + 3 * args.num_attention_heads * ctx)
    rounding = 56 * args.vocab_size * h
    return BASE + TORCH + max(full, sequential) + rounding


# torch and transformers imported, beyond BASE. --optimize's peak RSS, measured (/usr/bin/time) with
# 32 calibration windows of 512: 1.50 GB on the 31M model, 2.65 GB on the 70m shape; this sum gives
# 2.0 and 2.9 GB.
TORCH = 300 << 20
