"""Where neoxq keeps what it reuses, what each entry is, and how the folder stays bounded.

The root is $NEOXQ_CACHE, else ~/.cache/neoxq (read when asked, never at import). Its kinds:
`reference/` (reference log-prob tables), `mix/` (tensor sensitivities for --mix, and the reference
tables of their calibration windows), `optimize/` (a killed --optimize run's work, to resume),
`calibration/` (--optimize's first-pass statistics, which every type made from the same checkpoint,
text and window shares).
Anything else under the root (the benchmarks' `bench/`, say) is not neoxq's to prune.

An entry is a key's files (`<key>.json`, `<key>.*.npy`, `sensitivity-<key>.json`) or a folder. A
reader marks the entry it reuses (its mtime), so "least recently used" means used, not made. After
each new entry the cache is trimmed to NEOXQ_CACHE_MAX_SIZE (default DEFAULT_MAX_BYTES), least
recently used first; entries a live process is working in are never removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import _alive
from .errors import UsageError
from .progress import info
from .sizes import format_bytes, parse_size

KINDS = {
    "reference": "reference log-prob tables",
    "mix": "--mix sensitivities",
    "optimize": "--optimize work, to resume",
    "calibration": "--optimize's calibration statistics, shared by every type",
}
# A whole wikitext-2 reference table at Pythia's vocabulary is about 1 GB (runtime/reference_cache.py):
# the default keeps a dozen of them, or one 6.9B --optimize work file beside a few.
DEFAULT_MAX_BYTES = 20 * 10**9
OWNER_FILE = "owner.pid"  # in a folder entry: the pid working in it
_SCRATCH = re.compile(r"^neoxq-\w+-(\d+)-")  # a running step's scratch folder: neoxq-<what>-<pid>-<random>


def cache_root() -> Path:
    return Path(os.environ.get("NEOXQ_CACHE", Path.home() / ".cache" / "neoxq"))


def max_cache_bytes() -> int | None:
    """NEOXQ_CACHE_MAX_SIZE (a size, or 0/none for no cap), read when the cache is trimmed."""
    text = os.environ.get("NEOXQ_CACHE_MAX_SIZE")
    if text is None:
        return DEFAULT_MAX_BYTES
    if text.strip().lower() in ("0", "none", "off"):
        return None
    return parse_size(text, "NEOXQ_CACHE_MAX_SIZE")


def mark_used(path: Path) -> None:
    """Record that a cache entry was reused (its least-recently-used age starts again)."""
    with contextlib.suppress(OSError):
        os.utime(path)


def scratch_prefix(what: str) -> str:
    """The name prefix of a scratch folder made inside a cache kind (tempfile.mkdtemp's prefix):
    carries the pid, so pruning leaves a live run's scratch alone."""
    return f"neoxq-{what}-{os.getpid()}-"


@dataclass
class CacheEntry:
    kind: str
    key: str
    paths: list[Path] = field(default_factory=list)
    size: int = 0
    last_used: float = 0.0
    what: str = ""
    in_use: bool = False

    def as_json(self) -> dict:
        return {
            "kind": self.kind,
            "key": self.key,
            "size_bytes": self.size,
            "last_used": self.last_used,
            "what": self.what,
            "in_use": self.in_use,
            "paths": [str(p) for p in self.paths],
        }


def entries(root: Path | None = None) -> list[CacheEntry]:
    """Every entry of every kind, least recently used first."""
    root = Path(root) if root else cache_root()
    found: list[CacheEntry] = []
    for kind in KINDS:
        folder = root / kind
        if not folder.is_dir():
            continue
        by_key: dict[str, CacheEntry] = {}
        for p in sorted(folder.iterdir()):
            if p.name.startswith("."):
                continue  # a writer's .partial or .lock: atomic_output's to sweep
            key = p.name if p.is_dir() else p.name.split(".")[0]
            e = by_key.setdefault(key, CacheEntry(kind, key))
            e.paths.append(p)
            size, mtime = _usage(p)
            e.size, e.last_used = e.size + size, max(e.last_used, mtime)
        for e in by_key.values():
            e.in_use = _in_use(e)
            e.what = _describe(e)
        found += by_key.values()
    return sorted(found, key=lambda e: e.last_used)


def _usage(p: Path) -> tuple[int, float]:
    try:
        if not p.is_dir():
            st = p.stat()
            return st.st_size, st.st_mtime
        size, mtime = 0, 0.0  # a folder's own mtime is not a use; its files' are
        for dirpath, _, files in os.walk(p):
            for f in files:
                with contextlib.suppress(OSError):
                    st = os.stat(os.path.join(dirpath, f))
                    size, mtime = size + st.st_size, max(mtime, st.st_mtime)
        return size, mtime or p.stat().st_mtime
    except OSError:
        return 0, 0.0


def _in_use(e: CacheEntry) -> bool:
    for p in e.paths:
        m = _SCRATCH.match(p.name)
        pid = int(m.group(1)) if m else None
        if pid is None and p.is_dir():
            with contextlib.suppress(OSError, ValueError):
                pid = int((p / OWNER_FILE).read_text().strip())
        if pid is not None and (pid == os.getpid() or _alive(pid)):
            return True
    return False


def _describe(e: CacheEntry) -> str:
    """What made the entry, from the JSON it keeps (never unpickled: plain JSON only)."""
    if _SCRATCH.match(e.key):
        return "scratch of a running step" if e.in_use else "scratch left by a killed run"
    meta = next((p for p in e.paths if p.suffix == ".json"), None)
    if e.kind == "optimize":
        meta = e.paths[0] / "state.json" if e.paths and e.paths[0].is_dir() else None
    try:
        data = json.loads(meta.read_text()) if meta else {}
    except (OSError, ValueError):
        data = {}
    if e.kind == "optimize":
        inputs = data.get("inputs") or {}
        src = (inputs.get("source") or ["?"])[0]
        return (
            f"--optimize {inputs.get('type', '?')} of {Path(src).name}: {data.get('layers_done', 0)} layers done"
            if data
            else "--optimize work (no progress saved)"
        )
    if e.kind == "calibration" and "inputs" in data:
        return f"calibration statistics of {data['inputs'].get('reference_name', '?')}: {data.get('windows')} windows of {data['inputs'].get('ctx')}"
    if "tensors" in data:
        return f"mix sensitivities: {len(data['tensors'])} tensors, {data.get('probes', '?')} probes"
    if "reference" in data:
        return f"reference table: {data['reference']}, ctx {data.get('ctx')}, {data.get('tokens_scored')} tokens, top {data.get('top_k')}"
    return "unrecognised (no metadata)"


def remove(e: CacheEntry) -> None:
    for p in e.paths:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def prune(
    root: Path | None = None, older_than: float | None = None, max_bytes: int | None = None, keep: tuple[Path, ...] = (), dry_run: bool = False
) -> list[CacheEntry]:
    """Remove entries unused for `older_than` seconds, then the least recently used until the rest
    fit `max_bytes`; never an entry in use or one holding a path in `keep`. Returns what went."""
    now = time.time()
    keep_set = {Path(p).resolve() for p in keep}
    live = [e for e in entries(root) if not e.in_use and not any(p.resolve() in keep_set for p in e.paths)]
    gone = [e for e in live if older_than is not None and now - e.last_used > older_than]
    if max_bytes is not None:
        total = sum(e.size for e in entries(root)) - sum(e.size for e in gone)
        for e in live:
            if total <= max_bytes:
                break
            if e not in gone:
                gone.append(e)
                total -= e.size
    if not dry_run:
        for e in gone:
            remove(e)
    return gone


def trim(keep: tuple[Path, ...] = ()) -> list[CacheEntry]:
    """After a new entry: the cache back under its cap, least recently used first (the new entry kept)."""
    root = cache_root().resolve()
    if keep and not any(Path(p).resolve().is_relative_to(root) for p in keep):
        return []  # written elsewhere (a report's own cache folder): not this cache's to trim
    cap = max_cache_bytes()
    gone = prune(max_bytes=cap, keep=keep) if cap is not None else []
    if gone:
        info(
            f"cache: removed {len(gone)} least recently used entries ({format_bytes(sum(e.size for e in gone))}) "
            f"to stay under {format_bytes(cap)} (NEOXQ_CACHE_MAX_SIZE; `neoxq cache list` shows what is kept)"
        )
    return gone


_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str, option: str = "--older-than") -> float:
    """`30d`, `12h`, `90m`, `2w`, `45s` → seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", str(text).lower())
    if not m:
        raise UsageError(f"{option} {text!r} is not an age; write it like 30d, 12h, 90m or 2w")
    return float(m.group(1)) * _AGE_UNITS[m.group(2)]
