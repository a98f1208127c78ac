"""The reference side of a KLD, computed once and stored compactly for every quant type after it.

Per scored token the reference distribution is kept as its top-K tokens (ids and float32 log-probs,
most likely first), the log of the probability left outside them, and the target token's exact
log-prob. KL is then Σ_top p (log p − log q) + p_rest (log p_rest − log q_rest): exact when K covers
the vocabulary, otherwise the tail is merged into one outcome, which can only lower the divergence
by p_rest × KL(tail ‖ tail') — negligible once the top K hold nearly all the mass, as they do for a
trained model. At K = 1024 and Pythia's 50k vocabulary that is 8 KB per token instead of ~100 KB for
full float16 rows (a whole wikitext-2 scoring: ~1 GB instead of ~14 GB).
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from neoxq.core.atomic import atomic_output
from neoxq.core.cache import cache_root, mark_used, trim
from neoxq.core.cache_key import key as inputs_key
from neoxq.core.errors import UsageError

TOP_K = 1024  # the reference's most likely tokens kept per position (the rest merged): NEOXQ_REFERENCE_TOP_K overrides


def top_k() -> int:
    """The table width: NEOXQ_REFERENCE_TOP_K, read when tables are made (never at import)."""
    return int(os.environ.get("NEOXQ_REFERENCE_TOP_K", TOP_K))


ARRAYS = ("top_idx", "top_lp", "rest_lp", "target_lp")


@dataclass
class ReferenceTables:
    top_idx: np.ndarray  # [N, K] int32, most likely first
    top_lp: np.ndarray  # [N, K] float32
    rest_lp: np.ndarray  # [N] float32, log of the mass outside the top K (−inf when none)
    target_lp: np.ndarray  # [N] float32

    def kl_rows(self, sl: slice, top_logits: np.ndarray, shift: np.ndarray, sums: np.ndarray) -> np.ndarray:
        """KL(reference ‖ model) for rows `sl`, given the model's logits at this table's top tokens
        ([rows, K], gathered while the rows were in cache) and, per row, the shift m and
        S = Σ_vocab exp(logit − m) its log-sum-exp came from (log-sum-exp = m + log S).

        With t = logit − m (small float32 numbers near the top), log q = t − log S, so
        Σ p (log p − log q) = Σ p log p − Σ p t + P log S, each sum accumulated in float64 (the KL
        is a small difference of entropies); the mass outside the top is (S − Σ e^t) / S, exact
        where 1 − Σ q would cancel."""
        lp = np.asarray(self.top_lp[sl])
        t = np.subtract(top_logits, shift[:, None].astype(np.float32))
        p = np.exp(lp)
        log_s = np.log(sums)
        kl = np.einsum("ij,ij->i", p, lp, dtype=np.float64) - np.einsum("ij,ij->i", p, t, dtype=np.float64) + log_s * p.sum(-1, dtype=np.float64)
        rest_lp = np.asarray(self.rest_lp[sl], dtype=np.float64)
        has_rest = np.isfinite(rest_lp)
        if has_rest.any():
            q_rest = np.clip((sums - np.exp(t).sum(-1, dtype=np.float64)) / sums, 1e-30, None)
            kl += np.where(has_rest, np.exp(rest_lp) * (rest_lp - np.log(q_rest)), 0.0)
        return kl


def compact(lp: np.ndarray, targets: np.ndarray, k: int = TOP_K) -> dict[str, np.ndarray]:
    """Full-vocabulary log-probs [rows, V] → the stored tables for those rows."""
    lp = np.asarray(lp, dtype=np.float64)
    v = lp.shape[1]
    k = min(k, v)
    idx = np.argpartition(-lp, k - 1, axis=1)[:, :k] if k < v else np.broadcast_to(np.arange(v), lp.shape)
    top = np.take_along_axis(lp, idx, axis=1)
    order = np.argsort(-top, axis=1, kind="stable")
    idx, top = np.take_along_axis(idx, order, axis=1), np.take_along_axis(top, order, axis=1)
    with np.errstate(divide="ignore"):
        rest = np.log(np.clip(np.exp(lp).sum(-1) - np.exp(top).sum(-1), 0.0, None)) if k < v else np.full(len(lp), -np.inf)
    return {
        "top_idx": idx.astype(np.int32),
        "top_lp": top.astype(np.float32),
        "rest_lp": rest.astype(np.float32),
        "target_lp": lp[np.arange(len(lp)), targets].astype(np.float32),
    }


def _ids_hash(ids: list[int]) -> str:
    return hashlib.sha256(np.asarray(ids, dtype=np.int32).tobytes()).hexdigest()


def default_cache_dir() -> Path:
    return cache_root() / "reference"


class ReferenceCache:
    """One entry per (reference identity, token windows, K): four .npy files and a JSON header
    written last, so a half-written entry is never read."""

    def __init__(self, folder: Path, reference, w, k: int):
        self.folder, self.w, self.k = Path(folder), w, k
        key = inputs_key("reference-tables", {"reference": reference.identity(), "ctx": w.ctx, "tokens_sha256": _ids_hash(w.ids), "top_k": k})
        self.meta = self.folder / f"{key}.json"
        self.files = {name: self.folder / f"{key}.{name}.npy" for name in ARRAYS}

    def load(self) -> ReferenceTables | None:
        try:
            meta = json.loads(self.meta.read_text())
            arrays = {n: np.load(p, mmap_mode="r") for n, p in self.files.items()}
        except (OSError, ValueError, json.JSONDecodeError):
            return None  # missing or damaged: rebuilt, never trusted
        if meta.get("tokens_scored") != self.w.tokens_scored or any(len(a) != self.w.tokens_scored for a in arrays.values()):
            return None
        mark_used(self.meta)
        return ReferenceTables(**arrays)

    def store(self, reference, n_vocab: int) -> ReferenceTables:
        self.folder.mkdir(parents=True, exist_ok=True)
        w, k = self.w, min(self.k, n_vocab)
        n, per = w.tokens_scored, w.per_window
        shapes = {"top_idx": ((n, k), np.int32), "top_lp": ((n, k), np.float32), "rest_lp": ((n,), np.float32), "target_lp": ((n,), np.float32)}
        with _atomic_many(self.files.values()) as tmps:
            out = {name: np.lib.format.open_memmap(tmps[i], mode="w+", dtype=dt, shape=shape) for i, (name, (shape, dt)) in enumerate(shapes.items())}
            for c, lp in reference.log_probs(w):
                if lp.shape[1] != n_vocab:
                    raise UsageError(f"the reference has {lp.shape[1]} tokens, the model {n_vocab}: they are different models")
                for name, arr in compact(lp, w.targets(c), k).items():
                    out[name][c * per : (c + 1) * per] = arr
            for arr in out.values():
                arr.flush()
            del out
        with atomic_output(self.meta, force=True, lock=False) as tmp:
            tmp.write_text(json.dumps({"reference": reference.description, "ctx": w.ctx, "top_k": k, "tokens_scored": n}, indent=1))
        trim(keep=(self.meta, *self.files.values()))
        return self.load()


class _atomic_many:
    """atomic_output for several files at once: all renamed into place, or none."""

    def __init__(self, paths):
        self.paths = list(paths)

    def __enter__(self):
        self.stack = ExitStack()
        return [self.stack.enter_context(atomic_output(p, force=True, lock=False)) for p in self.paths]

    def __exit__(self, *exc):
        return self.stack.__exit__(*exc)


def reference_tables(reference, w, n_vocab: int, cache_dir: Path | None = None, k: int | None = None) -> ReferenceTables:
    cache = ReferenceCache(cache_dir or default_cache_dir(), reference, w, k or top_k())
    return cache.load() or cache.store(reference, n_vocab)


def cached_reference_tables(reference, w, cache_dir: Path | None = None, k: int | None = None) -> ReferenceTables | None:
    """reference_tables' entry when it is already stored, without running the reference; else None."""
    return ReferenceCache(cache_dir or default_cache_dir(), reference, w, k or top_k()).load()
