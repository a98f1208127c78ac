"""transformers' GPTNeoXForCausalLM in fp32: the independent reference (and imatrix's activations)."""

from __future__ import annotations

from pathlib import Path

from neoxq.errors import require_convert_extra


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
