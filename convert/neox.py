"""GPT-NeoX specifics: config.json → hyperparameters, HF tensor names → GGUF names, QKV layout."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

import gguf
import numpy as np

from neoxq.core.errors import CorruptFileError, UnsupportedModelError

SUPPORTED_ARCHITECTURES = ("GPTNeoXForCausalLM",)

# Buffers that real Pythia .bin files carry; recomputed by llama.cpp, so skipped on purpose.
# Anything else the mapping does not know is an error, never silently dropped.
IGNORED_TENSORS = (
    re.compile(r"^gpt_neox\.layers\.\d+\.attention\.bias$"),
    re.compile(r"^gpt_neox\.layers\.\d+\.attention\.masked_bias$"),
    re.compile(r"^(gpt_neox\.)?(layers\.\d+\.attention\.)?rotary_emb\.inv_freq$"),
)


POSITIVE_INTS = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size", "max_position_embeddings")


@dataclass
class GPTNeoXArgs:
    """config.json fields, named as its keys; both transformers 4.x (Pythia hub) and 5.x styles."""

    hidden_size: int
    num_attention_heads: int
    num_hidden_layers: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = True
    tie_word_embeddings: bool = False
    hidden_act: str = "gelu"
    attention_bias: bool = True
    architectures: list[str] | None = None
    model_type: str | None = None
    # transformers 4.x (the hub's Pythia configs)
    rotary_pct: float | None = None
    rotary_emb_base: float | None = None
    torch_dtype: str | None = None
    rope_scaling: dict | None = None
    # transformers 5.x
    rope_parameters: dict | None = None
    rope_theta: float | None = None
    partial_rotary_factor: float | None = None
    dtype: str | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    # Derived in __post_init__ from whichever config style was given.
    rotary_fraction: float = field(init=False)
    rope_base: float = field(init=False)
    head_dim: int = field(init=False)
    n_rot: int = field(init=False)
    weights_dtype: str | None = field(init=False)

    def __post_init__(self):
        self._validate()
        rope = self.rope_parameters or {}
        rope_type = rope.get("rope_type") or (self.rope_scaling or {}).get("type") or (self.rope_scaling or {}).get("rope_type")
        if rope_type not in (None, "default"):
            raise UnsupportedModelError(f"rope scaling {rope_type!r} is not supported for GPT-NeoX; convert a checkpoint without rope scaling")
        self.rotary_fraction = _number(
            "partial_rotary_factor", _first(rope.get("partial_rotary_factor"), self.partial_rotary_factor, self.rotary_pct, 1.0)
        )
        self.rope_base = _number("rope_theta", _first(rope.get("rope_theta"), self.rope_theta, self.rotary_emb_base, 10000.0))
        if not 0 < self.rotary_fraction <= 1:
            raise CorruptFileError(
                f"config.json: the rotary fraction must be in (0, 1], got {self.rotary_fraction}; fix rotary_pct/partial_rotary_factor"
            )
        if self.hidden_size % self.num_attention_heads:
            raise CorruptFileError(
                f"config.json: hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}; the config is invalid"
            )
        self.head_dim = self.hidden_size // self.num_attention_heads
        self.n_rot = int(self.head_dim * self.rotary_fraction)
        self.weights_dtype = self.dtype or self.torch_dtype
        if not isinstance(self.hidden_act, str) or self.hidden_act not in ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh"):
            raise UnsupportedModelError(f"activation {self.hidden_act!r} is not supported (llama.cpp's gptneox uses GELU)")

    def _validate(self) -> None:
        """One line naming the first bad field: sizes are positive integers, eps a positive number."""
        for name in POSITIVE_INTS:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise CorruptFileError(f"config.json: {name} must be a positive integer, got {v!r}; fix or re-download the config")
        if not isinstance(self.layer_norm_eps, (int, float)) or isinstance(self.layer_norm_eps, bool) or self.layer_norm_eps <= 0:
            raise CorruptFileError(
                f"config.json: layer_norm_eps must be a positive number, got {self.layer_norm_eps!r}; fix or re-download the config"
            )
        for name in ("rotary_pct", "partial_rotary_factor", "rotary_emb_base", "rope_theta"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool)):
                raise CorruptFileError(f"config.json: {name} must be a number, got {v!r}; fix or re-download the config")
        for name in ("rope_parameters", "rope_scaling"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), dict):
                raise CorruptFileError(f"config.json: {name} must be an object, got {getattr(self, name)!r}; fix or re-download the config")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "GPTNeoXArgs":
        if not isinstance(config, dict):
            raise CorruptFileError("config.json is not a JSON object; re-download the checkpoint's config")
        archs = config.get("architectures") or []
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise CorruptFileError(f"config.json: architectures must be a list of names, got {archs!r}; fix or re-download the config")
        if config.get("model_type") != "gpt_neox" and not set(archs) & set(SUPPORTED_ARCHITECTURES):
            got = ", ".join(archs) or config.get("model_type") or "unknown"
            raise UnsupportedModelError(
                f"architecture {got} is not supported; neoxq converts {', '.join(SUPPORTED_ARCHITECTURES)} (model_type gpt_neox: Pythia, GPT-NeoX-20B)"
            )
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        missing = [n for n in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size") if n not in config]
        if missing:
            raise CorruptFileError(f"config.json lacks {', '.join(missing)}; re-download the checkpoint's config")
        return cls(**{k: v for k, v in config.items() if k in names})

    def layer_params(self) -> int:
        """One layer's parameters: two norms, QKV, attention output, the MLP (weights and biases)."""
        h, f = self.hidden_size, self.intermediate_size
        return 4 * h + (3 * h * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h)

    def param_count(self) -> int:
        """Parameters as the checkpoint stores them (untied output counted), for the size label."""
        h, v = self.hidden_size, self.vocab_size
        return v * h * (1 if self.tie_word_embeddings else 2) + self.num_hidden_layers * self.layer_params() + 2 * h


def tensor_name_map(n_layers: int):
    """gguf-py's own table of HF → GGUF names for GPT-NeoX: names as data, not string surgery."""
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPTNEOX, n_layers)


def required_tensors(args: GPTNeoXArgs) -> dict[str, tuple[int, ...]]:
    """Every tensor llama.cpp's gptneox loader requires, with its shape (numpy order). Names come
    from gguf-py's TENSOR_NAMES; only the shapes are GPT-NeoX knowledge."""
    T = gguf.MODEL_TENSOR
    h, f, v = args.hidden_size, args.intermediate_size, args.vocab_size
    shapes = {
        T.TOKEN_EMBD: {"weight": (v, h)},
        T.OUTPUT_NORM: {"weight": (h,), "bias": (h,)},
        T.OUTPUT: {"weight": (v, h)},
        T.ATTN_NORM: {"weight": (h,), "bias": (h,)},
        T.ATTN_QKV: {"weight": (3 * h, h), "bias": (3 * h,)},
        T.ATTN_OUT: {"weight": (h, h), "bias": (h,)},
        T.FFN_NORM: {"weight": (h,), "bias": (h,)},
        T.FFN_UP: {"weight": (f, h), "bias": (f,)},
        T.FFN_DOWN: {"weight": (h, f), "bias": (h,)},
    }
    assert set(shapes) <= set(gguf.MODEL_TENSORS[gguf.MODEL_ARCH.GPTNEOX])
    out = {}
    for kind, parts in shapes.items():
        pattern = gguf.TENSOR_NAMES[kind]
        for i in range(args.num_hidden_layers) if "{bid}" in pattern else [None]:
            for suffix, shape in parts.items():
                out[f"{pattern.format(bid=i)}.{suffix}"] = shape
    return out


def is_ignored(name: str) -> bool:
    return any(p.match(name) for p in IGNORED_TENSORS)


def gguf_name(name: str, name_map) -> str | None:
    return name_map.get_name(name, try_suffixes=(".weight", ".bias"))


def deinterleave_qkv(arr: np.ndarray, args: GPTNeoXArgs) -> np.ndarray:
    """HF stores QKV per head as [head, (q|k|v), head_dim]; llama.cpp wants [q-all | k-all | v-all]."""
    h, nh, hd = args.hidden_size, args.num_attention_heads, args.head_dim
    if arr.ndim == 2:
        return arr.reshape(nh, 3, hd, h).transpose(1, 0, 2, 3).reshape(3 * h, h)
    return arr.reshape(nh, 3, hd).transpose(1, 0, 2).reshape(3 * h)


def size_label(args: GPTNeoXArgs) -> str:
    return gguf.size_label(args.param_count(), 0, 0, 0)


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CorruptFileError(f"config.json: {name} must be a number, got {value!r}; fix or re-download the config")
    return float(value)


def _first(*values):
    return next(v for v in values if v is not None)


def interleave_qkv(arr: np.ndarray, args: GPTNeoXArgs) -> np.ndarray:
    """deinterleave_qkv's inverse: llama.cpp's [q-all | k-all | v-all] rows back to HF's per-head order."""
    h, nh, hd = args.hidden_size, args.num_attention_heads, args.head_dim
    rest = arr.shape[1:]
    return arr.reshape(3, nh, hd, *rest).swapaxes(0, 1).reshape(3 * h, *rest)
