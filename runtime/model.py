"""Open a GPT-NeoX GGUF with llama-cpp-python: CPU threads, GPU offload when the build has it,
context and batch sizes; and evaluate token windows asking logits only where they are needed."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from llama_cpp import Llama

from neoxq.core.errors import CorruptFileError, UsageError
from neoxq.core.gguf_info import GGUFInfo, read_info
from neoxq.core.machine import check_threads, default_threads

from . import capi


def gpu_offload_supported() -> bool:
    return capi.supports_gpu_offload()


def resolve_flash_attn(setting: str) -> bool:
    """auto: on, as llama.cpp's own auto resolves it wherever the device has the op (every CPU, and
    CUDA): on the CPU it is faster too, and llama-perplexity runs with it; on/off force it."""
    if setting not in ("auto", "on", "off"):
        raise UsageError(f"--flash-attn {setting!r}: use auto, on or off")
    return setting != "off"


@dataclass
class RuntimeOptions:
    n_ctx: int | None = None  # None: the model's training context
    n_batch: int = 512
    n_threads: int | None = None  # None: every core this process may use
    n_gpu_layers: int | None = None  # None: all layers on the GPU when offload is supported, else 0
    seed: int = 0
    vocab_only: bool = False  # tokenizer only: no weights, no context (tokenising costs no memory)
    flash_attn: str = "auto"  # auto | on | off
    # Weight repacking (llama.cpp's CPU "extra buffer types") keeps a second, interleaved copy of the
    # weights. Off for scoring: prompts are processed faster and the peak is lower without it. None
    # keeps llama.cpp's default, which `run` and `serve` use (generation is faster with it), except
    # where the build uses AMX kernels (capi.amx_kernels: they crash there). docs/benchmarks.md.
    repack: bool | None = False
    # Sequences decoded together (the server's --parallel): each has its own n_ctx cells, in its own
    # KV stream (llama.cpp's non-unified cache), so attention never spans another sequence's cells.
    n_seq: int = 1
    # One KV pool of n_ctx cells that all n_seq sequences share, so a prefix's cells can belong to
    # several of them (lm-eval's choices after one context); attention still sees only a
    # sequence's own cells.
    kv_unified: bool = False


def runtime_options(ctx, threads, gpu_layers, batch: int = 512, flash_attn: str = "auto", device: str = "auto", repack: bool | None = False):
    """The flags every model-loading command shares (--ctx, --threads, -ngl, --flash-attn, --device),
    as RuntimeOptions; --device is the policy: cpu → no layers offloaded, gpu → all of them, auto →
    llama.cpp's own choice (all on a GPU build)."""
    if device not in ("auto", "cpu", "gpu"):
        raise UsageError(f"--device {device!r}: use auto, gpu or cpu")
    check_threads(threads)
    if device == "cpu":
        if gpu_layers not in (None, 0):
            raise UsageError("--device cpu and --n-gpu-layers > 0 contradict each other; pass one")
        gpu_layers = 0
    elif device == "gpu" and gpu_layers is None:
        gpu_layers = -1
    return RuntimeOptions(n_ctx=ctx, n_batch=batch, n_threads=threads, n_gpu_layers=gpu_layers, flash_attn=flash_attn, repack=repack)


class NeoxModel:
    """A loaded GGUF. `eval_logits` runs tokens through llama.cpp's batch API (one sequence)."""

    def __init__(self, path: Path | str, options: RuntimeOptions | None = None, info: GGUFInfo | None = None):
        self.info: GGUFInfo = info or read_info(path)
        self.options = o = options or RuntimeOptions()
        train_ctx = self.info.context_length or 2048
        n_ctx = o.n_ctx or train_ctx
        if n_ctx > train_ctx:
            raise UsageError(f"context {n_ctx} exceeds the model's training context {train_ctx}; pass --ctx {train_ctx} or less")
        n_gpu = o.n_gpu_layers if o.n_gpu_layers is not None else (-1 if gpu_offload_supported() else 0)

        threads = o.n_threads or default_threads()
        self.n_batch = max(min(o.n_batch, n_ctx), o.n_seq)  # a step of every sequence fits one batch
        self.flash_attn = resolve_flash_attn(o.flash_attn)
        repack = o.repack if o.repack is not None else (False if capi.amx_kernels() else None)
        extra = {} if repack is None else {"use_extra_bufts": repack}
        streams = {"n_seq_max": o.n_seq, "kv_unified": o.kv_unified} if o.n_seq > 1 else {}
        with capi.captured_errors() as errors, capi.llama_defaults(model=extra, context=streams):
            try:
                # n_gpu_layers 0 means the CPU: llama.cpp would otherwise still offload the heavy ops
                # of a CUDA build (op_offload), so the "CPU" run would use the GPU.
                self.llm = Llama(
                    model_path=str(self.info.path),
                    n_ctx=n_ctx if o.kv_unified else n_ctx * o.n_seq,
                    n_batch=self.n_batch,
                    n_ubatch=self.n_batch,
                    n_threads=threads,
                    n_threads_batch=threads,
                    n_gpu_layers=n_gpu,
                    seed=o.seed,
                    logits_all=False,
                    vocab_only=o.vocab_only,
                    flash_attn=self.flash_attn,
                    op_offload=n_gpu != 0,
                    verbose=False,
                )
            except ValueError as exc:
                detail = capi.error_text(errors) or str(exc)
                raise CorruptFileError(f"llama.cpp could not load {self.info.path} ({detail}); re-create the file with `neoxq convert`") from exc
        self.n_ctx = n_ctx
        self.n_gpu_layers = n_gpu
        self.n_vocab = self.llm.n_vocab()
        self._decoder = None if o.vocab_only else capi.WindowDecoder(self.llm.ctx, self.n_batch, self.n_vocab, o.n_seq)

    @property
    def decoder(self) -> capi.WindowDecoder:
        """The context's one llama_batch; one thread at a time decodes through it."""
        return self._decoder

    # Tokenisation ---------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        """Token ids as the GPT-NeoX HF tokenizer gives them: NFC first (llama.cpp skips it), no BOS,
        and special tokens written in the text (<|endoftext|>) recognised, as HF's tokenizer does."""
        return self.llm.tokenize(unicodedata.normalize("NFC", text).encode("utf-8"), add_bos=False, special=True)

    def prompt_ids(self, text: str) -> list[int]:
        """A prompt's tokens; an empty prompt starts after the start-of-text token (GPT-NeoX's
        <|endoftext|>, which separates its training documents), as HF's generate does with no input.
        A prompt that leaves no room in the context is refused in one line."""
        ids = self.tokenize(text) or [self.llm.token_bos() if self.llm.token_bos() >= 0 else self.llm.token_eos()]
        if len(ids) >= self.n_ctx:
            raise UsageError(
                f"the prompt has {len(ids)} tokens and the context holds {self.n_ctx}; "
                f"pass a shorter prompt or a larger --ctx (up to the model's {self.info.context_length or 2048})"
            )
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.llm.detokenize(list(ids)).decode("utf-8", errors="replace")

    # Evaluation -----------------------------------------------------------------------------
    def eval_logits(self, ids: Sequence[int], want: Iterable[int] | None = None) -> np.ndarray:
        """Logits (float32, [len(want), n_vocab], a copy) at positions `want` (default: all) of one
        window, decoded from an empty KV cache."""
        rows = [view.copy() for view in self.iter_logits(ids, want)]
        return np.concatenate(rows) if rows else np.empty((0, self.n_vocab), dtype=np.float32)

    def iter_logits(self, ids: Sequence[int], want: Iterable[int] | None = None, start: int = 0):
        """Per batch, a view of llama.cpp's logits at the wanted positions of that batch: valid only
        until the next decode, so callers reduce it (log-sum-exp, argmax) before asking for more.

        start = 0 begins a new window (empty KV cache); start > 0 continues the cached one there."""
        n = len(ids)
        if start + n > self.n_ctx:
            raise UsageError(f"{start + n} tokens do not fit the context of {self.n_ctx}")
        arr = np.asarray(ids, dtype=np.int32)
        wanted = np.zeros(n, dtype=np.int8)
        wanted[list(want) if want is not None else slice(None)] = 1
        if start == 0:
            self._decoder.clear()
        for b in range(0, n, self.n_batch):
            stop = min(b + self.n_batch, n)
            view = self._decoder.decode(arr[b:stop], start + b, wanted[b:stop])
            if len(view):
                yield view

    def close(self) -> None:
        decoder = getattr(self, "_decoder", None)
        if decoder is not None:
            decoder.close()
            self._decoder = None
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.close()
            self.llm = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
