"""Memory preflight: estimate a heavy command's peak before any work starts, and refuse in one line
what cannot fit, naming the estimate, what is available and the option that makes it fit.

The estimates are deliberately simple sums of what dominates (scripts/bench_reference.py checks them
against the peaks it sees): the llama.cpp model (its file), its KV cache and logits buffer, the
converter's largest tensor, the transformers reference's plan.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from neoxq.convert.neox import GPTNeoXArgs
from neoxq.core.errors import UsageError
from neoxq.core.gguf_info import GGUFInfo
from neoxq.core.machine import available_memory
from neoxq.core.sizes import CHUNK_BYTES, HEAD_TOKENS, WINDOWS_PER_PASS, format_bytes

BASE = 150 << 20  # Python, numpy, llama-cpp-python, gguf imported


def llama_bytes(info: GGUFInfo, n_ctx: int, n_batch: int = 512) -> int:
    """What llama.cpp holds for this file (llama_estimate)."""
    layers = int(info.metadata.get(f"{info.arch}.block_count", 0))
    hidden = int(info.metadata.get(f"{info.arch}.embedding_length", 0))
    return llama_estimate(sum(t.n_bytes for t in info.tensors), layers, hidden, info.n_vocab or 50304, n_ctx, n_batch)


def llama_estimate(weight_bytes: int, layers: int, hidden: int, vocab: int, n_ctx: int, n_batch: int) -> int:
    """The one estimate of a llama.cpp model's memory: weights + KV cache (f16 K and V per layer) +
    logits and compute buffers + the libraries."""
    kv = 2 * layers * n_ctx * hidden * 2
    compute = n_batch * vocab * 4 * 2 + n_batch * hidden * 4 * 16
    return weight_bytes + kv + compute + BASE


def convert_bytes(ckpt) -> int:
    """The converter streams: its peak is the largest tensor in the source dtype, in float32 and
    encoded, on top of the libraries."""
    a = GPTNeoXArgs.from_config(ckpt.config)
    return BASE + a.vocab_size * a.hidden_size * (ckpt.bytes_per_param + 4 + 2)


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


@dataclass
class OptimizePlan:
    """--optimize's peaks: its first pass in memory or streamed (one fp32 layer at a time), and its
    layer-by-layer rounding pass; `streamed` says which first pass fits the budget."""

    first_in_memory: int
    first_streamed: int
    sequential: int
    streamed: bool = False

    @property
    def peak(self) -> int:
        return max(self.first_streamed if self.streamed else self.first_in_memory, self.sequential)


def optimize_plan(args, ctx: int, windows: int, budget: int | None = None, first_pass: str = "auto", bf16: bool = False) -> OptimizePlan:
    """--optimize's peak, the largest of its phases (float32 = 4 bytes, float64 = 8).
    1. fp32 pass, in memory: the model, its activations and gradients for one window (forward +
       backward for the embedding's Fisher), the Fisher matrix (h², float64), every layer's QKV
       output Fisher per head (float32). Streamed: one fp32 layer (read twice), every layer's input
       for one window, the output matrix, one window's logits, the same Fisher matrices.
    2. Layer by layer (neoxq.convert.calibrate): collecting, in the fp32 layer's one pass and then
       at the MLP down projection (f inputs): the layers, hidden states of every window, one window
       group's activations and hooked inputs, the stage's moments (Σ x xᵀ [in, in] and Σ y xᵀ
       [out, in], float64);
       rounding: the fp32 layer and its input let go; one [in, in] float64 work matrix (the
       Cholesky factors), the target and the values (float32 [out, in]), the row chunk's copies.
    3. The output matrix: both final streams, the fp32 output matrix, a chunk of float64 logits, its
       moments ([vocab, h]), work matrix, target, values and row chunks."""
    h, f, n, v = args.hidden_size, args.intermediate_size, args.num_hidden_layers, args.vocab_size
    layer = 4 * (4 * h * h + 2 * h * f)
    one_window = 4 * ctx * (n * (12 * h + 2 * f) + 6 * v)  # activations, logits, softmax and their gradients
    qkv_fisher = 4 * n * 9 * h * h // args.num_attention_heads  # every layer's per-head QKV output Fisher, float32
    # in bfloat16 (OptimizeOptions.fisher_bf16) the backward keeps every matmul's bfloat16 weights
    # (streamed: one layer's)
    in_memory = (6 if bf16 else 4) * args.param_count() + one_window + 8 * h * h + qkv_fisher
    streamed = layer * (3 if bf16 else 2) // 2 + 4 * ctx * (n * h + 12 * h + 2 * f + 6 * v) + 4 * v * h + 8 * h * h + qkv_fisher
    hidden = 4 * windows * ctx * h
    tokens = WINDOWS_PER_PASS * ctx
    group = 4 * tokens * (4 * h + 2 * f + 3 * args.num_attention_heads * ctx) + 8 * tokens * 2 * (f + h)
    moments = 8 * (f * f + h * f) + 8 * 2 * h * h  # the MLP down's, the attention output's alongside
    # the layer's one fp32 pass: both layers, fp32 input and output, quantized input, the fp32
    # outputs of attention-output and MLP-down kept for the second stage, the first stage's moments
    # (Σ y xᵀ of QKV and MLP up, Σ x xᵀ of their common input); then without the fp32 layer
    collect = max(2 * layer + 5 * hidden + group + 8 * (h * h + 3 * h * h + f * h), layer + 4 * hidden + group + moments)
    collect += 2 * h * f if bf16 else 0  # autocast's bfloat16 copy of the weight being multiplied (no cache)
    rounding = layer + 2 * hidden + moments + 8 * f * f + 8 * h * f + 6 * CHUNK_BYTES
    head = 2 * hidden + 4 * v * h + 8 * HEAD_TOKENS * v * 2 + 8 * (2 * h * h + v * h) + 8 * v * h + 6 * CHUNK_BYTES
    sequential = int(SEQUENTIAL_SLACK * max(collect, rounding, head))
    plan = OptimizePlan(BASE + TORCH + in_memory, BASE + TORCH + streamed, BASE + TORCH + sequential)
    # auto: streamed when the fp32 model's pass does not fit the budget (as the reference decides)
    plan.streamed = first_pass == "streamed" or (first_pass == "auto" and budget is not None and plan.first_in_memory > budget)
    return plan


# What the sums above miss (allocator slack, the rounding's smaller temporaries), checked against
# the peak of scripts/bench_optimize_scale.py (docs/benchmarks.md).
SEQUENTIAL_SLACK = 1.05

# torch and transformers imported, beyond BASE.
TORCH = 300 << 20
