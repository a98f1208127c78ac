"""The Hugging Face hub through huggingface_hub: fetch a checkpoint (repo id + revision) into the
standard cache, and know a repo's revisions: branches, commits and each weight file's sha256 (the
hub's refs and LFS hashes online, the cache's refs and blob names offline).

With HF_HUB_OFFLINE=1 huggingface_hub answers from the cache alone.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from neoxq.core.errors import SourceError, UsageError, require_convert_extra

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
            f"{repo_id}@{rev} is not in the local cache and the hub cannot be reached; connect once without HF_HUB_OFFLINE=1, or pass a local folder"
        ) from exc
    # The snapshot folder is named by the commit hash it holds.
    return folder, folder.name if re.fullmatch(r"[0-9a-f]{40}", folder.name) else None


# Revisions --------------------------------------------------------------------------------------
STEP = re.compile(r"^step(\d+)$")
WEIGHTS = re.compile(r"^(model.*\.safetensors|pytorch_model.*\.bin)$")


@dataclass
class RevisionId:
    revision: str
    commit: str
    weights_sha256: str  # over every weight file's own sha256, in name order
    weights_bytes: int = 0


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _cached_repo(repo_id: str):
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        repos = scan_cache_dir().repos
    except CacheNotFound:  # no cache folder at all: the same answer as a cache without this repo
        repos = ()
    for repo in repos:
        if repo.repo_id == repo_id and repo.repo_type == "model":
            return repo
    raise SourceError(
        f"{repo_id} is not in the local Hugging Face cache and the hub cannot be reached (HF_HUB_OFFLINE=1); "
        "download it once online, or point HF_HUB_CACHE at a cache that has it"
    )


def list_refs(repo_id: str) -> list[str]:
    """Branches and tags: the cache's refs offline, the hub's online."""
    try:
        import huggingface_hub  # noqa: F401
    except ImportError as exc:
        raise require_convert_extra(exc) from exc
    if _offline():
        return sorted({r for rev in _cached_repo(repo_id).revisions for r in rev.refs})
    from huggingface_hub import list_repo_refs

    refs = list_repo_refs(repo_id)
    return sorted({b.name for b in refs.branches} | {t.name for t in refs.tags})


def identify(repo_id: str, revision: str) -> RevisionId:
    """The revision's commit and a hash over its weight files' sha256 (LFS on the hub; in the cache
    the blobs are named by it), so that identical weights under two branches are recognised."""
    if _offline():
        for rev in _cached_repo(repo_id).revisions:
            if revision in rev.refs or rev.commit_hash == revision:
                files = [f for f in rev.files if WEIGHTS.match(f.file_name)]
                shas = sorted((f.file_name, f.blob_path.name) for f in files)
                return RevisionId(revision, rev.commit_hash, _combine(shas), sum(f.size_on_disk for f in files))
        raise SourceError(f"{repo_id}@{revision} is not in the local cache; connect once without HF_HUB_OFFLINE=1")
    from huggingface_hub import HfApi

    info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    files = [s for s in info.siblings if WEIGHTS.match(s.rfilename)]
    shas = sorted((s.rfilename, s.lfs.sha256 if s.lfs else (s.blob_id or "")) for s in files)
    return RevisionId(revision, info.sha, _combine(shas), sum(s.size or 0 for s in files))


def _combine(pairs: list[tuple[str, str]]) -> str:
    return hashlib.sha256("|".join(f"{n}:{h}" for n, h in pairs).encode()).hexdigest()


# EleutherAI's Pythia repos: `main` is the final checkpoint, step143000 (their model cards).
PYTHIA_PREFIX, PYTHIA_MAIN_STEP = "EleutherAI/pythia", 143000


def step_of(revision: str, repo_id: str | None = None) -> int | None:
    """The training step a branch names: `stepN` → N; `main` of a Pythia repo → 143000."""
    m = STEP.match(revision)
    if m:
        return int(m.group(1))
    return PYTHIA_MAIN_STEP if revision == "main" and (repo_id or "").startswith(PYTHIA_PREFIX) else None


def spec_parts(spec: str) -> list[str]:
    """The comma-separated parts of a --revisions spec; an empty selection is refused, before any
    revision is looked up."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise UsageError(f"--revisions {spec!r} names no revision; write names or ranges, e.g. --revisions step1000..step143000/8,main")
    return parts


def parse_spec(spec: str, refs: list[str], repo_id: str) -> list[str]:
    """`step0,step1000..step5000/2,main`: names, inclusive step ranges of existing branches, thinned
    by /K. Unknown names and empty ranges are one line each, with what does exist."""
    out: list[str] = []
    steps = sorted((step_of(r), r) for r in refs if STEP.match(r))
    for part in spec_parts(spec):
        m = re.fullmatch(r"step(\d+)\.\.step(\d+)(?:/(-?\d+))?", part)
        if m:
            a, b, k = int(m.group(1)), int(m.group(2)), int(m.group(3) or 1)
            if k < 1:
                raise UsageError(f"{part}: /{k} would take every {k}th branch; write /K with K = 1 or more (step0..step5000/2 takes every other)")
            if a > b:
                raise UsageError(f"{part}: the range runs backwards; write the lower step first (step{b}..step{a})")
            found = [r for s, r in steps if a <= s <= b]
            if not found:
                have = ", ".join(r for _, r in steps[:12]) + (" …" if len(steps) > 12 else "")
                raise UsageError(f"{part} matches no branch of {repo_id}; its step branches: {have or 'none'}")
            out += found[::k]
        elif part in refs or re.fullmatch(r"[0-9a-f]{40}", part):
            out.append(part)
        else:
            raise UsageError(f"{repo_id} has no revision {part!r}; nearest: {', '.join(_nearest(part, refs, steps)) or 'none'}")
    return list(dict.fromkeys(out))


def _nearest(name: str, refs: list[str], steps: list[tuple[int, str]]) -> list[str]:
    s = step_of(name, PYTHIA_PREFIX)  # a misspelt `main` is near the last step
    if s is not None and steps:
        return [r for _, r in sorted(steps, key=lambda x: abs(x[0] - s))[:3]]

    return difflib.get_close_matches(name, refs, n=3, cutoff=0.3)
