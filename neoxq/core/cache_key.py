"""The one rule for reusing anything neoxq made: an artifact records the inputs that made it, and
is reused only when every one of them is the same now.

Inputs are a flat-ish dict of JSON values (numbers, strings, lists; a file enters as its sha256, a
text as its sha256, options as given). `key()` names a cache entry by them (reference tables, mix
sensitivities, --optimize work); `changed()` says which inputs differ from what an artifact
recorded (report rows, whole reports, the sweep's revisions, built GGUFs whose metadata holds their
inputs), so a rerun recomputes exactly what they touch and reuses the rest.
"""

from __future__ import annotations

import hashlib
import json

KEY_VERSION = 1  # of this scheme: raising it invalidates every key


def canonical(inputs: dict) -> dict:
    """The inputs as JSON gives them back (tuples → lists, paths → strings), so a recorded copy
    compares equal to a fresh one."""
    return json.loads(json.dumps(inputs, sort_keys=True, default=str))


def key(kind: str, inputs: dict, length: int = 24) -> str:
    """A short, stable name for an artifact of `kind` made from `inputs`."""
    text = json.dumps({"kind": kind, "version": KEY_VERSION, "inputs": canonical(inputs)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def _blank(v):
    return None if v in ("", None) else v  # gguf-py does not write empty strings: missing and "" are one value


def changed(recorded: dict | None, inputs: dict) -> list[str]:
    """The names of the inputs whose recorded value differs (every name when nothing was recorded)."""
    if not isinstance(recorded, dict):
        return sorted(inputs)
    rec, now = canonical(recorded), canonical(inputs)
    return sorted(k for k in now if _blank(rec.get(k)) != _blank(now[k]))
