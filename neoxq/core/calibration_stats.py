"""What one fp32 pass over calibration windows collects, each kind of statistic in its own field
(GGUF tensor names as keys): the layer inputs' second moments (the importance matrix's sums, or the
full Gram matrices), the token embedding's Fisher information, each attention head's Fisher in its
QKV output space, and the largest input magnitude per channel."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

EMBEDDING = "token_embd.weight"


@dataclass
class CalibrationStats:
    # per matmul weight: Σ x² per input column, or Σ x xᵀ [in, in] (a full pass); float64
    sums: dict[str, np.ndarray]
    counts: dict[str, int]  # per matmul weight: the input rows (tokens) summed
    windows: int  # calibration windows passed
    # Σ g gᵀ of the log-likelihood's gradients at the embedding's output [hidden, hidden]: an error
    # δ of an embedding row costs ½ δᵀ F δ of KL divergence where the row is used
    embedding_fisher: np.ndarray | None = None
    embedding_tokens: int = 0
    # per attn_qkv weight: Σ g gᵀ per head of the gradients at its output, float32 [heads, 3·hd, 3·hd]
    head_fisher: dict[str, np.ndarray] = field(default_factory=dict)
    # per matmul weight: max |x| per input channel (neoxq.core.equalize)
    absmax: dict[str, np.ndarray] = field(default_factory=dict)

    def importance_sums(self) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        """The importance matrix's sums and counts: each matmul's input Σ x² per column, and for the
        token embedding (a lookup, with no inputs) its Fisher's diagonal."""
        sums = {k: np.diagonal(v) if v.ndim == 2 else v for k, v in self.sums.items()}
        counts = dict(self.counts)
        if self.embedding_fisher is not None:
            sums[EMBEDDING], counts[EMBEDDING] = np.diagonal(self.embedding_fisher), self.embedding_tokens
        return sums, counts

    def to_arrays(self) -> tuple[dict[str, np.ndarray], dict]:
        """Every array under a `<field>:<tensor>` name (np.savez's input: no pickle) and the rest as
        JSON values; from_arrays inverts it exactly."""
        arrays = {f"{kind}:{name}": v for kind, d in self._named().items() for name, v in d.items()}
        if self.embedding_fisher is not None:
            arrays["embedding_fisher"] = self.embedding_fisher
        return arrays, {"counts": self.counts, "windows": self.windows, "embedding_tokens": self.embedding_tokens}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], meta: dict) -> CalibrationStats:
        def part(kind: str) -> dict[str, np.ndarray]:
            return {k.split(":", 1)[1]: np.asarray(arrays[k]) for k in arrays if k.startswith(kind + ":")}

        emb = np.asarray(arrays["embedding_fisher"]) if "embedding_fisher" in arrays else None
        counts = {k: int(v) for k, v in meta["counts"].items()}
        return cls(part("sums"), counts, int(meta["windows"]), emb, int(meta["embedding_tokens"]), part("head_fisher"), part("absmax"))

    def _named(self) -> dict[str, dict[str, np.ndarray]]:
        return {"sums": self.sums, "head_fisher": self.head_fisher, "absmax": self.absmax}

    def mean_embedding_fisher(self) -> np.ndarray:
        return self.embedding_fisher / max(self.embedding_tokens, 1)
