"""The one rule for output file names: `<name>[-<revision>]-<TYPE>.gguf`.

`main` is left out (it is the default branch, and Pythia's `main` is `step143000`). The type in the
name is for people only: neoxq reads types from GGUF metadata, never from names.
"""

from __future__ import annotations


def gguf_name(name: str, revision: str | None, label: str) -> str:
    rev = f"-{revision}" if revision and revision != "main" else ""
    return f"{name}{rev}-{label}.gguf"
