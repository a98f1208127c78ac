"""Every raw llama.cpp C-API call neoxq makes, in one module (the role of llama-cpp-python's
`_internals.py`): the log callback, window decoding through `llama_batch`/`llama_decode`, logits,
and `llama_model_quantize` with its key/value, tensor-type and imatrix arrays.

Everything else in neoxq calls these functions (or llama-cpp-python's high-level `Llama`), never
the ctypes bindings directly.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import sys
import threading
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Iterator

import llama_cpp
import llama_cpp.llama_cpp as lib
import numpy as np

from neoxq.core.errors import LlamaError
from neoxq.core.ggml_types import BY_NAME
from neoxq.core.gguf_layout import override_key, override_value
from neoxq.core.machine import process_initialised


class LogLevel(IntEnum):
    """ggml.h's enum ggml_log_level (llama-cpp-python's own comment lists older values)."""

    NONE = 0
    DEBUG = 1
    INFO = 2
    WARN = 3
    ERROR = 4
    CONT = 5  # continues the previous line, at the previous line's level


class _Log:
    """neoxq's llama.cpp log callback: silent unless NEOXQ_LLAMA_LOG=1 (read when it is installed,
    never at import); errors are collected while a `captured_errors()` block is open, so a failure
    can be explained in our own words."""

    def __init__(self):
        self.last = LogLevel.NONE
        self.captures: list[tuple[LogLevel, list[str]]] = []  # open blocks: (lowest level kept, lines)
        self.echo = False
        self.callback = llama_cpp.llama_log_callback(self._on_log)  # kept alive: C holds the pointer

    def _on_log(self, level: int, text: bytes, _user) -> None:
        lvl = self.last if level == LogLevel.CONT else LogLevel(level) if level in LogLevel._value2member_map_ else LogLevel.INFO
        self.last = lvl
        msg = text.decode("utf-8", errors="replace")
        for least, lines in self.captures:
            if lvl >= least:
                lines.append(msg)
        if self.echo:
            print(msg, end="", file=sys.stderr, flush=True)

    def install(self) -> None:
        self.echo = os.environ.get("NEOXQ_LLAMA_LOG") == "1"
        llama_cpp.llama_log_set(self.callback, ctypes.c_void_p(0))


_LOG = _Log()  # made at import, installed only by a call: importing neoxq leaves llama.cpp's log as it was
_process_wide = False  # installed for the rest of the process (after init_process)


def current_log_callback() -> tuple[object, ctypes.c_void_p]:
    """llama.cpp's log callback and user data as they are now (to restore them later)."""
    cb, user = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(cb), ctypes.byref(user))
    return cb, user


@contextlib.contextmanager
def captured_errors(level: LogLevel = LogLevel.ERROR) -> Iterator[list[str]]:
    """Yield the list that llama.cpp's log lines at `level` or above (default: errors) are appended
    to during the block.

    In a process that called neoxq.core.machine.init_process() (the CLI does, first), neoxq's
    callback is installed for the rest of the process, so llama.cpp never prints past our one-line
    errors. Elsewhere (a library user, lm-eval, a notebook) it is installed for the outermost block
    only and the caller's callback is put back afterwards."""
    global _process_wide
    restore = None
    if not _process_wide and not _LOG.captures:  # the outermost block installs ours
        if process_initialised():
            _process_wide = True
        else:
            restore = current_log_callback()
        _LOG.install()
    lines: list[str] = []
    entry = (level, lines)
    _LOG.captures.append(entry)
    try:
        yield lines
    finally:
        _LOG.captures.remove(entry)
        if restore is not None:
            llama_cpp.llama_log_set(*restore)


def error_text(lines: list[str], limit: int = 300) -> str:
    return " ".join(e.strip() for e in lines if e.strip())[-limit:]


def supports_gpu_offload() -> bool:
    return bool(llama_cpp.llama_supports_gpu_offload())


def system_info() -> str:
    return llama_cpp.llama_print_system_info().decode("utf-8", errors="replace")


def amx_kernels() -> bool:
    """Whether this llama.cpp build's CPU backend uses Intel AMX (a native build on Sapphire Rapids
    or later): its AMX buffer type for k-quant weights crashes the first decode there (SIGSEGV or
    SIGILL in ggml_backend_amx_mul_mat, reported on llama.cpp's tracker; every k-quant file,
    F16 unaffected)."""
    return "AMX_INT8 = 1" in system_info()


# Decoding -----------------------------------------------------------------------------------------


class WindowDecoder:
    """Decodes tokens through one llama_batch, asking logits only at wanted positions: one window of
    one sequence (`decode`), or one token of each of several sequences (`decode_steps`).

    The llama_batch is allocated once and filled through numpy views of its arrays (no per-token
    Python loop for a window). Logits come back as views of llama.cpp's buffer, valid until the next
    decode.
    """

    def __init__(self, ctx, n_batch: int, n_vocab: int, n_seq: int = 1):
        self.ctx, self.n_batch, self.n_vocab, self.n_seq = ctx, n_batch, n_vocab, n_seq
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, n_seq)
        b = self.batch
        self._token = np.ctypeslib.as_array(b.token, shape=(n_batch,))
        self._pos = np.ctypeslib.as_array(b.pos, shape=(n_batch,))
        self._n_seq = np.ctypeslib.as_array(b.n_seq_id, shape=(n_batch,))
        self._logits = np.ctypeslib.as_array(ctypes.cast(b.logits, ctypes.POINTER(ctypes.c_int8)), shape=(n_batch,))
        self._seq_slots = [b.seq_id[i] for i in range(n_batch)]
        self._seqs = np.zeros(n_batch, dtype=np.int32)  # what each slot's seq_id holds now
        for slot in self._seq_slots:
            slot[0] = 0
        self._n_seq[:] = 1

    def clear(self) -> None:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)

    def forget(self, seq: int) -> None:
        """Free every KV cell of sequence `seq`."""
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self.ctx), seq, -1, -1)

    def _set_seqs(self, seqs: np.ndarray) -> None:
        changed = np.flatnonzero((self._seqs[: len(seqs)] != seqs) | (self._n_seq[: len(seqs)] != 1))
        for i in changed:
            self._seq_slots[i][0] = int(seqs[i])
        self._n_seq[changed] = 1
        self._seqs[: len(seqs)] = seqs

    def decode_shared(self, prefix: np.ndarray, tails: list[np.ndarray]) -> np.ndarray:
        """Decode, from an empty cache and in one batch, a prefix that sequences 0…k-1 share (its
        cells belong to all of them, which needs a context with a unified KV cache) and each
        sequence's own tail after it. Returns the logits (a view, valid until the next decode): row
        0 at the prefix's last position, then each tail's positions, tail after tail."""
        n_p, k = len(prefix), len(tails)
        total = n_p + sum(len(t) for t in tails)
        if total > self.n_batch or k > self.n_seq:
            raise LlamaError(f"{total} tokens of {k} sequences do not fit a batch of {self.n_batch} tokens and {self.n_seq} sequences")
        self.clear()
        self._set_seqs(np.concatenate([np.zeros(n_p, dtype=np.int32)] + [np.full(len(t), s, dtype=np.int32) for s, t in enumerate(tails)]))
        for i in range(n_p):  # the prefix belongs to every sequence
            for s in range(k):
                self._seq_slots[i][s] = s
        self._n_seq[:n_p] = k
        positions = np.concatenate([np.arange(n_p)] + [np.arange(n_p, n_p + len(t)) for t in tails])
        wanted = np.zeros(total, dtype=np.int8)
        wanted[n_p - 1 :] = 1
        self._run(np.concatenate([prefix, *tails]).astype(np.int32), positions, wanted)
        ptr = llama_cpp.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(total - n_p + 1, self.n_vocab))

    def decode(self, ids: np.ndarray, start: int, wanted: np.ndarray, seq: int = 0) -> np.ndarray:
        """Decode `ids` of sequence `seq` at positions start…; return the logits rows of the wanted
        ones (a view)."""
        n = len(ids)
        self._set_seqs(np.full(n, seq, dtype=np.int32))
        self._run(ids, np.arange(start, start + n), wanted)
        k = int(wanted.sum())
        if not k:
            return np.empty((0, self.n_vocab), dtype=np.float32)
        ptr = llama_cpp.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(k, self.n_vocab))

    def decode_steps(self, tokens: np.ndarray, positions: np.ndarray, seqs: np.ndarray) -> None:
        """Decode one token per sequence (token i of sequence seqs[i] at positions[i]), logits at
        every one: read row i with `row(i)` or sample it with `Sampler.sample(ctx, i)`."""
        self._set_seqs(seqs)
        self._run(tokens, positions, np.ones(len(tokens), dtype=np.int8))

    def row(self, i: int) -> np.ndarray:
        """The logits of batch slot i of the last decode (a view)."""
        ptr = llama_cpp.llama_get_logits_ith(self.ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def _run(self, ids: np.ndarray, positions: np.ndarray, wanted: np.ndarray) -> None:
        n = len(ids)
        self._token[:n] = ids
        self._pos[:n] = positions
        self._logits[:n] = wanted
        self.batch.n_tokens = n
        rc = llama_cpp.llama_decode(self.ctx, self.batch)
        if rc != 0:
            # llama.h: 1 = no KV slot for the batch, 2 = aborted, < 0 = error.
            raise LlamaError(
                f"llama.cpp could not decode a batch of {n} tokens at position {int(positions[0])} (llama_decode returned {rc}); "
                "try a smaller --ctx, or check the model file with `neoxq convert` again"
            )

    def close(self) -> None:
        if self.batch is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None


PENALTY_LAST_N = 64  # llama-cpp-python's Llama.last_n_tokens_size: the window the penalties look at


@dataclass(frozen=True)
class SamplerSettings:
    """What one sequence samples with (llama.cpp's sampler parameters)."""

    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repeat_penalty: float
    frequency_penalty: float
    presence_penalty: float
    seed: int
    logit_bias: tuple[tuple[int, float], ...] = ()


class Sampler:
    """One sequence's llama.cpp sampler chain, built as llama-cpp-python's `Llama.generate` builds
    its own (logit bias, penalties, then greedy, or top-k, typical, top-p, min-p, temperature and a
    seeded draw), so a sequence samples what it would sample alone. `sample` draws from a batch
    slot's logits and records the token for the penalties; the prompt is not recorded, as there."""

    def __init__(self, n_vocab: int, s: SamplerSettings):
        self.chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        parts = []
        if s.logit_bias:
            arr = (llama_cpp.llama_logit_bias * len(s.logit_bias))(*[llama_cpp.llama_logit_bias(t, b) for t, b in s.logit_bias])
            parts.append(llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(s.logit_bias), arr))
        parts.append(llama_cpp.llama_sampler_init_penalties(n_vocab, PENALTY_LAST_N, s.repeat_penalty, s.frequency_penalty, s.presence_penalty))
        if s.temperature == 0.0:
            parts.append(llama_cpp.llama_sampler_init_greedy())
        else:
            parts += [
                llama_cpp.llama_sampler_init_top_k(s.top_k),
                llama_cpp.llama_sampler_init_typical(1.0, 1),
                llama_cpp.llama_sampler_init_top_p(s.top_p, 1),
                llama_cpp.llama_sampler_init_min_p(s.min_p, 1),
                llama_cpp.llama_sampler_init_temp(s.temperature),
                llama_cpp.llama_sampler_init_dist(s.seed),
            ]
        for part in parts:  # the chain owns its parts from here on
            llama_cpp.llama_sampler_chain_add(self.chain, part)

    def sample(self, ctx, i: int) -> int:
        return int(llama_cpp.llama_sampler_sample(self.chain, ctx, i))

    def close(self) -> None:
        if self.chain is not None:
            llama_cpp.llama_sampler_free(self.chain)
            self.chain = None


# Quantization -------------------------------------------------------------------------------------


@dataclass
class QuantizeCall:
    """What one `llama_model_quantize` call needs, in Python terms."""

    ftype: int
    nthread: int
    kv: dict[str, str] = field(default_factory=dict)  # string metadata written into the output
    imatrix: dict[str, np.ndarray] = field(default_factory=dict)  # tensor name → per-column values
    tensor_types: dict[str, str] = field(default_factory=dict)  # tensor name → ggml type name (Q4_K, F16, …)
    dry_run: bool = False


def _kv_array(kv: dict[str, str]):
    arr = (llama_cpp.llama_model_kv_override * (len(kv) + 1))()
    for i, (k, v) in enumerate(kv.items()):
        arr[i].key = override_key(k)
        arr[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
        arr[i].value.val_str = override_value(v)
    arr[len(kv)].key = b""  # an empty key ends the list
    return arr


def _imatrix_array(values: dict[str, np.ndarray]):
    """llama_model_imatrix_data[] ending with a null name; the buffers are returned to be kept alive."""
    names = sorted(values)
    keep = []
    arr = (llama_cpp.llama_model_imatrix_data * (len(names) + 1))()
    for i, name in enumerate(names):
        vals = np.ascontiguousarray(values[name], dtype=np.float32)
        keep.append((name.encode(), vals))
        arr[i].name = keep[-1][0]
        arr[i].data = vals.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = vals.size
    arr[len(names)].name = None
    return arr, keep


def _tensor_type_array(types: dict[str, str]):
    """llama_model_tensor_override[]: one anchored pattern per tensor name (llama.cpp matches them as
    ECMAScript regexes, first match wins), ending with a null pattern."""
    keep = [f"^{re.escape(name)}$".encode() for name in types]
    arr = (llama_cpp.llama_model_tensor_override * (len(types) + 1))()
    for i, (pattern, type_name) in enumerate(zip(keep, types.values())):
        arr[i].pattern = pattern
        arr[i].type = BY_NAME[type_name][0]
    arr[len(types)].pattern = None
    return arr, keep


def quantize(inp: str, out: str, call: QuantizeCall) -> tuple[int, list[str]]:
    """Run llama.cpp's quantizer; return (return code, llama.cpp's error lines)."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = call.nthread
    params.ftype = call.ftype
    params.dry_run = call.dry_run
    keep = [_kv_array(call.kv)]
    params.kv_overrides = ctypes.cast(keep[0], ctypes.POINTER(llama_cpp.llama_model_kv_override))
    if call.imatrix:
        arr, bufs = _imatrix_array(call.imatrix)
        keep += [arr, bufs]
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    if call.tensor_types:
        arr, bufs = _tensor_type_array(call.tensor_types)
        keep += [arr, bufs]
        params.tt_overrides = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    with captured_errors() as errors:
        rc = llama_cpp.llama_model_quantize(inp.encode(), out.encode(), ctypes.byref(params))
    del keep
    return rc, errors


def quantize_dry_run(inp: str, call: QuantizeCall) -> tuple[int, list[str], dict[str, str]]:
    """llama.cpp's quantizer with `dry_run`: nothing is written; returns (return code, error lines,
    tensor name → the ggml type it would write), read from its per-tensor log lines."""
    with captured_errors(LogLevel.INFO) as lines:
        rc, errors = quantize(inp, "", QuantizeCall(**{**call.__dict__, "dry_run": True}))
    return rc, errors, _planned_types(lines)


def _planned_types(lines: list[str]) -> dict[str, str]:
    """llama-quant.cpp logs one line per tensor, `[  i/  n] NAME - [shape], type = SRC, size = A MiB`
    followed by ` -> B MiB (NEW)` when it changes the type (pieces may arrive as separate log calls)."""
    upper = {name.upper(): name for name in BY_NAME}
    out = {}
    for m in re.finditer(r"\[\s*\d+/\s*\d+\]\s+(\S+)\s+-\s+\[[^\]]*\],\s+type\s*=\s*(\w+)([^\[]*)", "".join(lines)):
        name, src, rest = m.groups()
        new = re.search(r"->\s*[\d.]+\s*MiB\s*\((\w+)\)", rest)
        out[name] = upper[(new.group(1) if new else src).upper()]
    return out


# ggml's own quantizers, for measuring what a type does to one tensor -------------------------------


class _TypeTraits(ctypes.Structure):
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)
_ggml = None


def _bundled_lib(name: str) -> ctypes.CDLL:
    """One of the ggml libraries llama-cpp-python ships beside libllama (already loaded by it)."""
    return ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / name))


def _libggml():
    """libggml-base, already loaded by llama-cpp-python as a dependency of libllama."""
    global _ggml
    if _ggml is None:
        lib = _bundled_lib("libggml-base.so")
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [
            ctypes.c_int,
            ctypes.POINTER(ctypes.c_float),
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.POINTER(ctypes.c_float),
        ]
        lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
        lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
        lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
        _ggml = lib
    return _ggml


def quantize_rows(rows: np.ndarray, ggml_type: int, imatrix: np.ndarray | None = None) -> np.ndarray:
    """`rows` (float32, [n, k]) through ggml's quantizer for `ggml_type` (llama.cpp's own per-block
    search, with the importance weights when given): the raw blocks, uint8 [n, bytes per row].
    A type whose quantizer asserts an imatrix (ggml_quantize_requires_imatrix) is refused without
    one here, as a ValueError, not an abort of the process."""
    lib = _libggml()
    if imatrix is None and lib.ggml_quantize_requires_imatrix(ggml_type):
        raise ValueError(f"ggml type {ggml_type} cannot be quantized without importance weights")
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    n, k = rows.shape
    traits = lib.ggml_get_type_traits(ggml_type).contents
    packed = np.empty((n, (k // traits.blck_size) * traits.type_size), dtype=np.uint8)
    im = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32).ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    lib.ggml_quantize_chunk(ggml_type, rows.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), packed.ctypes.data, 0, n, k, im)
    return packed


def dequantize(packed: np.ndarray, ggml_type: int, n_elements: int) -> np.ndarray:
    """ggml's own dequantize (the type's to_float) of raw blocks: float32 [n_elements]."""
    traits = _libggml().ggml_get_type_traits(ggml_type).contents
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    out = np.empty(n_elements, dtype=np.float32)
    _TO_FLOAT(traits.to_float)(packed.ctypes.data, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), n_elements)
    return out


def quantize_dequantize(rows: np.ndarray, ggml_type: int, imatrix: np.ndarray | None = None) -> np.ndarray:
    """`rows` (float32, [n, k]) through ggml's quantizer for `ggml_type` and back to float32: what
    llama.cpp's quantizer would store for this tensor, as numbers."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    return dequantize(quantize_rows(rows, ggml_type, imatrix), ggml_type, rows.size).reshape(rows.shape)


# ggml's fused exp-and-sum, for log-sum-exp over logits rows -------------------------------------

_softmax_f32 = None


def _exp_sum_fn():
    """ggml_vec_soft_max_f32(n, y, x, shift): y = exp(x − shift) with ggml's SIMD exp, returning
    Σ y in double, in one pass over a row (what llama.cpp's own soft_max op runs). False where the
    CPU backend does not export it (then numpy does the same in three passes)."""
    global _softmax_f32
    if _softmax_f32 is None:
        try:
            fn = _bundled_lib("libggml-cpu.so").ggml_vec_soft_max_f32
        except (OSError, AttributeError):
            _softmax_f32 = False
        else:
            fn.restype = ctypes.c_double
            fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float]
            _softmax_f32 = fn
    return _softmax_f32


def exp_sums(rows: np.ndarray, shifts: np.ndarray, scratch: np.ndarray, out: np.ndarray) -> bool:
    """out[i] = Σ_j exp(rows[i, j] − shifts[i]) for C-contiguous float32 rows; `scratch` holds one
    row (it receives the exps, and stays in cache). ctypes releases the GIL, so threads given
    disjoint rows run in parallel. Returns False when ggml's function is unavailable."""
    fn = _exp_sum_fn()
    if not fn or not rows.flags.c_contiguous or rows.dtype != np.float32:
        return False
    n, v = rows.shape
    base, stride, y = rows.ctypes.data, rows.strides[0], scratch.ctypes.data
    for i in range(n):
        out[i] = fn(v, y, base + i * stride, float(shifts[i]))
    return True


# Devices ------------------------------------------------------------------------------------------

DEVICE_TYPES = {0: "CPU", 1: "GPU", 2: "integrated GPU", 3: "accelerator"}


def devices() -> list[dict]:
    """ggml's backend devices: name, description, kind, free and total memory in bytes."""
    ggml = _bundled_lib("libggml.so")
    base = _libggml()
    ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    for fn in (base.ggml_backend_dev_name, base.ggml_backend_dev_description):
        fn.restype, fn.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
    base.ggml_backend_dev_type.restype, base.ggml_backend_dev_type.argtypes = ctypes.c_int, [ctypes.c_void_p]
    base.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)]
    out = []
    for i in range(ggml.ggml_backend_dev_count()):
        dev = ggml.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        base.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        out.append(
            {
                "name": base.ggml_backend_dev_name(dev).decode(),
                "description": base.ggml_backend_dev_description(dev).decode(),
                "type": DEVICE_TYPES.get(base.ggml_backend_dev_type(dev), "other"),
                "free_bytes": free.value,
                "total_bytes": total.value,
            }
        )
    return out


_DEFAULTS_LOCK = threading.Lock()  # one model load at a time may see patched defaults


@contextlib.contextmanager
def llama_defaults(model: dict | None = None, context: dict | None = None) -> Iterator[None]:
    """Load a model with some llama_model_params / llama_context_params fields changed:
    llama-cpp-python's `Llama` starts from llama_model_default_params() and
    llama_context_default_params() and exposes no argument for e.g. `use_extra_bufts` or
    `n_seq_max`. The functions are patched module-wide, so loads in other threads wait for the
    block to end (every neoxq model load goes through here) rather than pick up this load's fields."""
    with _DEFAULTS_LOCK:
        originals = {"llama_model_default_params": lib.llama_model_default_params, "llama_context_default_params": lib.llama_context_default_params}

        def patch(name: str, fields: dict):
            def patched():
                params = originals[name]()
                for k, v in fields.items():
                    setattr(params, k, v)
                return params

            setattr(lib, name, patched)

        patch("llama_model_default_params", model or {})
        patch("llama_context_default_params", context or {})
        try:
            yield
        finally:
            for name, fn in originals.items():
                setattr(lib, name, fn)
