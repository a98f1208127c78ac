"""`neoxq cache list|prune`: what neoxq keeps under $NEOXQ_CACHE, and removing it (neoxq.core.cache)."""

from __future__ import annotations

import json
import time
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from .options import Json, Quiet

app = typer.Typer(no_args_is_help=True, help="List or prune what neoxq keeps in its cache ($NEOXQ_CACHE, default ~/.cache/neoxq).")


@app.command("list")
def list_(as_json: Json = False):
    """Every cache entry, least recently used first: its kind, size, last use and what made it."""
    from neoxq.core.cache import cache_root, entries

    found = entries()
    if as_json:
        print(json.dumps({"root": str(cache_root()), "entries": [e.as_json() for e in found]}, indent=1))
        return
    _table(found, f"{cache_root()}: {len(found)} entries")


@app.command()
def prune(
    older_than: Annotated[Optional[str], typer.Option("--older-than", help="Remove entries unused this long (30d, 12h, 90m, 2w).")] = None,
    max_size: Annotated[Optional[str], typer.Option("--max-size", help="Then remove the least recently used until the rest fit (5GB).")] = None,
    everything: Annotated[bool, typer.Option("--all", help="Remove every entry not in use.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would be removed.")] = False,
    as_json: Json = False,
    quiet: Quiet = False,
):
    """Remove cache entries (never one a running neoxq is working in)."""
    from neoxq.core.cache import parse_age
    from neoxq.core.cache import prune as prune_cache
    from neoxq.core.errors import UsageError
    from neoxq.core.sizes import format_bytes, parse_size

    if not (older_than or max_size or everything):
        raise UsageError("say what to remove: --older-than AGE, --max-size SIZE or --all (`neoxq cache list` shows the entries)")
    gone = prune_cache(
        older_than=0.0 if everything else (parse_age(older_than) if older_than else None),
        max_bytes=parse_size(max_size, "--max-size") if max_size and not everything else None,
        dry_run=dry_run,
    )
    if as_json:
        print(json.dumps({"dry_run": dry_run, "removed": [e.as_json() for e in gone]}, indent=1))
    elif not quiet:
        _table(gone, f"{'would remove' if dry_run else 'removed'} {len(gone)} entries, {format_bytes(sum(e.size for e in gone))}")


def _table(found, title: str) -> None:
    from neoxq.core.sizes import format_bytes

    t = Table(title=title, title_justify="left")
    for col in ("kind", "key", "size", "last used", "what"):
        t.add_column(col, justify="right" if col == "size" else "left")
    for e in found:
        t.add_row(e.kind, e.key, format_bytes(e.size), _ago(e.last_used), e.what + (" [in use]" if e.in_use else ""))
    Console(soft_wrap=True).print(t)


def _ago(when: float) -> str:
    s = max(0.0, time.time() - when)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s / size:.0f}{unit} ago"
    return f"{s:.0f}s ago"
