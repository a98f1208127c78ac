"""Perplexity and KL divergence, computed the way llama.cpp's llama-perplexity does.

The text is tokenised once and cut into non-overlapping windows of `ctx` tokens; no BOS is added
(GPT-NeoX has none); in each window the second half is scored: the logits at position j (for
first = ctx/2 ≤ j < ctx-1) predict token j+1. Logits are requested only for those positions.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from neoxq.errors import UsageError
from neoxq.progress import Progress
from neoxq.textfile import text_sha256

from .model import NeoxModel


@dataclass
class Windows:
    ids: list[int]
    ctx: int

    def __post_init__(self):
        if self.ctx < 4:
            raise UsageError(f"--ctx {self.ctx} is too small; use at least 4 (llama.cpp's default is 512)")
        self.n_chunks = len(self.ids) // self.ctx
        if self.n_chunks < 2:
            raise UsageError(f"the text has {len(self.ids)} tokens, fewer than two windows of {self.ctx}; pass a longer text or a smaller --ctx")
        self.first = self.ctx // 2

    @property
    def scored_positions(self) -> range:
        return range(self.first, self.ctx - 1)

    @property
    def tokens_scored(self) -> int:
        return self.n_chunks * len(self.scored_positions)

    def chunk(self, c: int) -> list[int]:
        return self.ids[c * self.ctx:(c + 1) * self.ctx]

    def targets(self, c: int) -> np.ndarray:
        return np.asarray(self.chunk(c)[self.first + 1:self.ctx], dtype=np.int64)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def ppl_with_se(nll: np.ndarray) -> tuple[float, float]:
    """exp(mean NLL) and its standard error, as llama-perplexity reports it (delta method)."""
    mean = float(nll.mean())
    se = float(nll.std(ddof=1) / math.sqrt(len(nll))) if len(nll) > 1 else 0.0
    ppl = math.exp(mean)
    return ppl, ppl * se


@dataclass
class PerplexityResult:
    ppl: float
    ppl_se: float
    tokens_scored: int
    ctx: int
    n_chunks: int
    text_sha256: str
    model: str

    def as_json(self) -> dict:
        return asdict(self)


def model_logprobs(model: NeoxModel, w: Windows, quiet: bool = True, label: str = "scoring") -> Iterator[tuple[int, np.ndarray]]:
    """(chunk, log-probs at the scored positions) for every window."""
    progress = Progress(label, w.tokens_scored, "tokens", quiet=quiet)
    try:
        for c in range(w.n_chunks):
            yield c, log_softmax(model.eval_logits(w.chunk(c), w.scored_positions))
            progress.update(len(w.scored_positions))
    finally:
        progress.close()


def perplexity(model: NeoxModel, text: str, ctx: int = 512, quiet: bool = True) -> PerplexityResult:
    w = Windows(model.tokenize(text), ctx)
    nll = np.concatenate([-lp[np.arange(len(lp)), w.targets(c)] for c, lp in model_logprobs(model, w, quiet)])
    ppl, se = ppl_with_se(nll)
    return PerplexityResult(ppl, se, len(nll), ctx, w.n_chunks, text_sha256(text), str(model.info.path))


# KL divergence against a reference ---------------------------------------------------------------

@dataclass
class KLDResult:
    kld_mean: float
    kld_mean_se: float
    kld_median: float
    kld_p99: float
    kld_max: float
    top1: float
    top1_se: float
    rms_dp: float
    ppl: float
    ppl_se: float
    ppl_ref: float
    ppl_ref_se: float
    dppl: float
    dppl_pct: float
    tokens_scored: int
    ctx: int
    text_sha256: str
    model: str
    reference: str

    def as_json(self) -> dict:
        return asdict(self)


class ReferenceCache:
    """Reference log-probs at the scored positions, stored once as float16 (.npy, memory-mapped) with
    the target ids and a JSON header, so many quant types are compared without re-running it."""

    def __init__(self, folder: Path, key: str):
        self.folder = Path(folder)
        self.npy = self.folder / f"{key}.npy"
        self.meta = self.folder / f"{key}.json"

    def load(self, w: Windows) -> np.ndarray | None:
        if not (self.npy.is_file() and self.meta.is_file()):
            return None
        try:
            meta = json.loads(self.meta.read_text())
            arr = np.load(self.npy, mmap_mode="r")
        except (ValueError, OSError, json.JSONDecodeError):
            return None  # a damaged cache entry is rebuilt, never trusted
        if meta.get("ids_sha256") != _ids_hash(w.ids) or meta.get("ctx") != w.ctx or arr.shape[0] != w.tokens_scored:
            return None
        return arr

    def store(self, w: Windows, produce: Iterator[tuple[int, np.ndarray]], n_vocab: int, describe: dict) -> np.ndarray:
        from neoxq.atomic import atomic_output

        self.folder.mkdir(parents=True, exist_ok=True)
        per = len(w.scored_positions)
        with atomic_output(self.npy, force=True) as tmp:
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(w.tokens_scored, n_vocab))
            for c, lp in produce:
                arr[c * per:(c + 1) * per] = lp.astype(np.float16)
            arr.flush()
            del arr
        self.meta.write_text(json.dumps({"ids_sha256": _ids_hash(w.ids), "ctx": w.ctx, **describe}, indent=1))
        return np.load(self.npy, mmap_mode="r")


def _ids_hash(ids: list[int]) -> str:
    return hashlib.sha256(np.asarray(ids, dtype=np.int32).tobytes()).hexdigest()


def reference_key(reference: str, ctx: int, text: str) -> str:
    """Identity of (reference, ctx, text): a file by path+size+mtime, a checkpoint folder likewise."""
    p = Path(reference)
    stamp = ""
    if p.exists():
        target = p if p.is_file() else p / "config.json"
        st = target.stat()
        stamp = f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    else:
        stamp = reference
    return hashlib.sha256(f"{stamp}|{ctx}|{text_sha256(text)}".encode()).hexdigest()[:24]


def reference_logprobs(reference: str, w: Windows, n_vocab: int, options, cache_dir: Path | None, quiet: bool,
                       key: str) -> np.ndarray:
    cache = ReferenceCache(cache_dir or default_cache_dir(), key)
    cached = cache.load(w)
    if cached is not None:
        return cached
    if Path(reference).is_file():  # a GGUF; a folder or repo id is an HF checkpoint
        with NeoxModel(reference, options) as ref:
            if ref.n_vocab != n_vocab:
                raise UsageError(f"the reference has {ref.n_vocab} tokens, the model {n_vocab}: they are different models")
            return cache.store(w, model_logprobs(ref, w, quiet, "reference"), n_vocab, {"reference": reference})
    from .hf_reference import hf_logprobs

    return cache.store(w, hf_logprobs(reference, w, quiet), n_vocab, {"reference": reference})


def default_cache_dir() -> Path:
    import os

    return Path(os.environ.get("NEOXQ_CACHE", Path.home() / ".cache" / "neoxq")) / "reference"


def kld(model: NeoxModel, reference: str, text: str, ctx: int = 512, cache_dir: Path | None = None,
        quiet: bool = True) -> KLDResult:
    w = Windows(model.tokenize(text), ctx)
    ref = reference_logprobs(reference, w, model.n_vocab, model.options, cache_dir, quiet,
                             reference_key(reference, ctx, text))
    per = len(w.scored_positions)
    kl, agree, dp, nll, nll_ref = [], [], [], [], []
    for c, lq in model_logprobs(model, w, quiet):
        lp = ref[c * per:(c + 1) * per].astype(np.float64)
        lp -= np.log(np.exp(lp).sum(-1, keepdims=True))  # renormalise after float16 storage
        t = w.targets(c)
        rows = np.arange(per)
        kl.append((np.exp(lp) * (lp - lq)).sum(-1))
        agree.append(lp.argmax(-1) == lq.argmax(-1))
        dp.append(np.exp(lq[rows, t]) - np.exp(lp[rows, t]))
        nll.append(-lq[rows, t])
        nll_ref.append(-lp[rows, t])
    kl, agree, dp = np.concatenate(kl), np.concatenate(agree), np.concatenate(dp)
    ppl, ppl_se = ppl_with_se(np.concatenate(nll))
    ppl_ref, ppl_ref_se = ppl_with_se(np.concatenate(nll_ref))
    n = len(kl)
    top1 = float(agree.mean())
    return KLDResult(
        kld_mean=float(kl.mean()), kld_mean_se=float(kl.std(ddof=1) / math.sqrt(n)),
        kld_median=float(np.median(kl)), kld_p99=float(np.percentile(kl, 99)), kld_max=float(kl.max()),
        top1=top1, top1_se=math.sqrt(top1 * (1 - top1) / n), rms_dp=float(np.sqrt((dp ** 2).mean())),
        ppl=ppl, ppl_se=ppl_se, ppl_ref=ppl_ref, ppl_ref_se=ppl_ref_se, dppl=ppl - ppl_ref,
        dppl_pct=100 * (ppl - ppl_ref) / ppl_ref, tokens_scored=n, ctx=ctx, text_sha256=text_sha256(text),
        model=str(model.info.path), reference=reference)
