"""transformers' GPTNeoXForCausalLM in fp32: the independent reference every score is checked
against (and the activations behind an imatrix). torch is imported only when used."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from neoxq.core.errors import require_convert_extra
from neoxq.core.progress import Progress


def load_reference(folder: Path | str):
    """The model in fp32, eval mode, eager attention, with no progress bars on the terminal."""
    try:
        import torch
        import transformers
        from transformers import GPTNeoXForCausalLM
    except ImportError as exc:
        raise require_convert_extra(exc) from exc
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    return GPTNeoXForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


class HFReference:
    """The checkpoint under transformers in fp32, scoring the same windows as llama.cpp does.

    Satisfies neoxq.runtime.score.Reference (duck-typed: convert never imports runtime)."""

    def __init__(self, ckpt):
        self.ckpt = ckpt
        self.description = "transformers GPTNeoXForCausalLM, fp32"

    def identity(self) -> str:
        """The commit for hub checkpoints; for local folders the weights' names, sizes and mtimes."""
        if self.ckpt.commit:
            return f"hf:{self.ckpt.repo_id}@{self.ckpt.commit}"
        return f"hf:{self.ckpt.folder.resolve()}:{self.ckpt.fingerprint()}"

    def log_probs(self, w) -> Iterator[tuple[int, np.ndarray]]:
        import torch

        model = load_reference(self.ckpt.folder)
        pos = list(w.scored_positions)
        with torch.no_grad(), Progress("reference (transformers)", w.tokens_scored, "tokens") as progress:
            for c in range(w.n_chunks):
                logits = model(torch.tensor([w.chunk(c)])).logits[0, pos].double()
                yield c, torch.log_softmax(logits, -1).numpy()
                progress.update(len(pos))
