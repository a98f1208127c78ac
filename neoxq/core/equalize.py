"""Channel equalisation through the layer norms (SmoothQuant: Xiao et al., 2023), in a form every
llama.cpp runs unchanged.

llama.cpp's CPU kernels for k-quant weights (Q2_K … Q6_K) quantize each matmul's input to Q8_K
first (ggml-cpu.c's type_traits_cpu: vec_dot_type = GGML_TYPE_Q8_K): one scale per 256 values of a
token's vector, so one large channel coarsens every other channel's step. Where the layer inputs
have outlier channels, that rounding of the activations can be most of a file's KL divergence,
which no choice of weight levels reaches (docs/method.md, "The equalisation").

A LayerNorm's output channel i can be divided by s_i (its weight and bias, F32 tensors in the file)
and the matmuls reading it multiplied by s_i on input column i: the same function in exact
arithmetic, with the activations' large channels moved into the weights, which are quantized per
16 or 32 inputs and with an importance matrix. s_i = max|x_i|^α / max|W_:,i|^(1−α) with SmoothQuant's
default α = 0.5, normalised to a geometric mean of 1. GPT-NeoX has three such pairs per model
shape: each layer's attention norm → QKV, its MLP norm → MLP up (parallel residual: two norms
of one stream), and the final norm → the output matrix. The attention output and MLP down read no
norm (MLP down reads GELU's output, which does not commute with a scale).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ALPHA = 0.5  # SmoothQuant's default migration strength (the paper's, for OPT and BLOOM); not tuned here


@dataclass(frozen=True)
class NormPair:
    norm: str  # the GGUF LayerNorm prefix: <norm>.weight and <norm>.bias are divided by s
    matmul: str  # the GGUF matmul whose input columns are multiplied by s


def norm_pairs(n_layers: int) -> list[NormPair]:
    """Every LayerNorm → matmul pair of a GPT-NeoX model, by GGUF names."""
    pairs = []
    for i in range(n_layers):
        pairs += [NormPair(f"blk.{i}.attn_norm", f"blk.{i}.attn_qkv.weight"), NormPair(f"blk.{i}.ffn_norm", f"blk.{i}.ffn_up.weight")]
    return [*pairs, NormPair("output_norm", "output.weight")]


def scales(act_absmax: np.ndarray, weight_absmax: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """s per channel from the calibration inputs' and the weight columns' largest magnitudes. A
    channel that never fires (or a dead column) keeps s = 1."""
    x = np.asarray(act_absmax, np.float64)
    w = np.asarray(weight_absmax, np.float64)
    live = (x > 0) & (w > 0)
    s = np.ones(len(x))
    s[live] = x[live] ** alpha / w[live] ** (1 - alpha)
    if live.any():
        s[live] /= np.exp(np.mean(np.log(s[live])))
    return s
