"""Open a GPT-NeoX GGUF with llama-cpp-python: CPU threads, GPU offload when the build has it,
context and batch sizes; and evaluate token windows asking logits only where they are needed."""

from __future__ import annotations

import ctypes
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from neoxq.errors import CorruptFileError, UsageError

from neoxq.gguf_info import GGUFInfo, read_info
from neoxq.machine import default_threads


def gpu_offload_supported() -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


@dataclass
class RuntimeOptions:
    n_ctx: int | None = None  # None: the model's training context
    n_batch: int = 512
    n_threads: int | None = None  # None: every core this process may use
    n_gpu_layers: int | None = None  # None: all layers on the GPU when offload is supported, else 0
    seed: int = 0


class NeoxModel:
    """A loaded GGUF. `eval_logits` runs tokens through llama.cpp's batch API (one sequence)."""

    def __init__(self, path: Path | str, options: RuntimeOptions | None = None):
        self.info: GGUFInfo = read_info(path)
        self.options = o = options or RuntimeOptions()
        train_ctx = self.info.context_length or 2048
        n_ctx = o.n_ctx or train_ctx
        if n_ctx > train_ctx:
            raise UsageError(f"context {n_ctx} exceeds the model's training context {train_ctx}; pass --ctx {train_ctx} or less")
        n_gpu = o.n_gpu_layers if o.n_gpu_layers is not None else (-1 if gpu_offload_supported() else 0)
        from llama_cpp import Llama

        threads = o.n_threads or default_threads()
        try:
            self.llm = Llama(model_path=str(self.info.path), n_ctx=n_ctx, n_batch=min(o.n_batch, n_ctx),
                             n_ubatch=min(o.n_batch, n_ctx), n_threads=threads, n_threads_batch=threads,
                             n_gpu_layers=n_gpu, seed=o.seed, logits_all=False, verbose=False)
        except ValueError as exc:
            raise CorruptFileError(f"llama.cpp could not load {self.info.path} ({exc}); re-create the file with `neoxq convert`") from exc
        self.n_ctx = n_ctx
        self.n_gpu_layers = n_gpu
        self.n_vocab = self.llm.n_vocab()

    # Tokenisation ---------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        """Token ids as the GPT-NeoX HF tokenizer gives them: NFC first (llama.cpp skips it), no BOS,
        and special tokens written in the text (<|endoftext|>) recognised, as HF's tokenizer does."""
        return self.llm.tokenize(unicodedata.normalize("NFC", text).encode("utf-8"), add_bos=False, special=True)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.llm.detokenize(list(ids)).decode("utf-8", errors="replace")

    # Evaluation -----------------------------------------------------------------------------
    def eval_logits(self, ids: Sequence[int], want: Iterable[int] | None = None) -> np.ndarray:
        """Logits (float32, [len(want), n_vocab]) at positions `want` (default: all) of one window.

        The window starts from an empty KV cache; only the wanted positions produce logits.
        """
        import llama_cpp

        n = len(ids)
        if n > self.n_ctx:
            raise UsageError(f"{n} tokens do not fit the context of {self.n_ctx}")
        wanted = np.zeros(n, dtype=bool)
        wanted[list(want) if want is not None else slice(None)] = True
        ctx = self.llm.ctx
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        n_batch = min(self.options.n_batch, self.n_ctx)
        batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        out = np.empty((int(wanted.sum()), self.n_vocab), dtype=np.float32)
        filled = 0
        try:
            for start in range(0, n, n_batch):
                chunk = ids[start:start + n_batch]
                batch.n_tokens = len(chunk)
                for i, tok in enumerate(chunk):
                    batch.token[i] = tok
                    batch.pos[i] = start + i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = bool(wanted[start + i])
                rc = llama_cpp.llama_decode(ctx, batch)
                if rc != 0:
                    raise RuntimeError(f"llama_decode failed with code {rc}")
                k = int(wanted[start:start + len(chunk)].sum())
                if k:
                    ptr = llama_cpp.llama_get_logits(ctx)
                    out[filled:filled + k] = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(k, self.n_vocab))
                    filled += k
        finally:
            llama_cpp.llama_batch_free(batch)
        return out

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.close()
            self.llm = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
