"""The transformers fp32 reference on the same windows. torch is imported only when called."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from neoxq.errors import require_convert_extra
from neoxq.progress import Progress


def hf_logprobs(src: str, w, quiet: bool = True) -> Iterator[tuple[int, np.ndarray]]:
    try:
        import torch

        from convert.checkpoint import open_checkpoint
        from convert.hf import load_reference
    except ImportError as exc:
        raise require_convert_extra(exc) from exc

    ckpt = open_checkpoint(src)
    model = load_reference(ckpt.folder)
    progress = Progress("reference (transformers)", w.tokens_scored, "tokens", quiet=quiet)
    pos = list(w.scored_positions)
    with torch.no_grad():
        for c in range(w.n_chunks):
            logits = model(torch.tensor([w.chunk(c)])).logits[0, pos].double()
            yield c, torch.log_softmax(logits, -1).numpy()
            progress.update(len(pos))
    progress.close()
