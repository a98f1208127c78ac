"""Where neoxq keeps what it reuses: $NEOXQ_CACHE, else ~/.cache/neoxq (read when asked, never at import)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("NEOXQ_CACHE", Path.home() / ".cache" / "neoxq"))
