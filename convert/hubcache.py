"""Write checkpoints into a Hugging Face cache in huggingface_hub's own layout, offline: blobs named
by their hash (sha256 for weights, as LFS does; git's blob sha1 for small files), snapshots/<commit>/
made of relative symlinks to the blobs, and refs/<branch> holding the commit. With HF_HUB_OFFLINE=1
and HF_HUB_CACHE pointing there, huggingface_hub (and so neoxq) reads it like a real hub cache.
Used by `neoxq demo --sweep` and the tests (training checkpoints saved along the way)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

LFS_SUFFIXES = (".safetensors", ".bin")


def _hash(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix in LFS_SUFFIXES:
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def write_snapshot(cache: Path, repo_id: str, branch: str, folder: Path, commit: str | None = None) -> str:
    """Add `folder`'s files as a commit of `repo_id` and point `branch` at it; return the commit."""
    repo = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    blobs = repo / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in Path(folder).iterdir() if p.is_file())
    hashes = {p.name: _hash(p) for p in files}
    commit = commit or hashlib.sha1("|".join(f"{n}:{h}" for n, h in hashes.items()).encode()).hexdigest()
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for p in files:
        blob = blobs / hashes[p.name]
        if not blob.exists():
            os.link(p, blob) if p.stat().st_dev == blobs.stat().st_dev else blob.write_bytes(p.read_bytes())
        link = snap / p.name
        if not link.exists():
            link.symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / branch).write_text(commit)
    return commit
