"""Fetch a hub checkpoint (repo id + revision) into the standard Hugging Face cache.

With HF_HUB_OFFLINE=1 huggingface_hub answers from the cache alone.
"""

from __future__ import annotations

import re
from pathlib import Path

from neoxq.core.errors import SourceError, require_convert_extra

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Small files first; the weights are fetched in one format only (safetensors preferred).
META_PATTERNS = ["config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "README.md"]
SAFETENSORS_PATTERNS = ["*.safetensors", "model.safetensors.index.json"]
BIN_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]


def looks_like_repo_id(src: str) -> bool:
    return bool(REPO_ID.match(src))


def fetch(repo_id: str, revision: str | None) -> tuple[Path, str | None]:
    """Download (or find in the cache) what conversion needs; return (snapshot folder, commit)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as exc:
        raise require_convert_extra(exc) from exc
    rev = revision or "main"
    try:
        folder = Path(snapshot_download(repo_id, revision=rev, allow_patterns=META_PATTERNS + SAFETENSORS_PATTERNS))
        if not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(repo_id, revision=rev, allow_patterns=META_PATTERNS + BIN_PATTERNS))
    except RevisionNotFoundError as exc:
        raise SourceError(f"{repo_id} has no revision {rev!r}; check the branch/tag name (Pythia: step0 … step143000)") from exc
    except RepositoryNotFoundError as exc:
        raise SourceError(f"hub repo {repo_id!r} not found; check the name, or log in with `hf auth login` if it is gated") from exc
    except LocalEntryNotFoundError as exc:
        raise SourceError(
            f"{repo_id}@{rev} is not in the local cache and the hub cannot be reached; "
            "connect once without HF_HUB_OFFLINE=1, or pass a local folder"
        ) from exc
    # The snapshot folder is named by the commit hash it holds.
    return folder, folder.name if re.fullmatch(r"[0-9a-f]{40}", folder.name) else None
