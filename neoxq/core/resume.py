"""A long job's work file and progress, kept where a killed run finds them again.

The folder is named by a hash of every input that made the work, so a rerun resumes only the same
job. The JSON state is written after the work file is flushed to disk, by rename, so a state on disk
never claims more than the file holds. A tensor changed in place keeps its former bytes
(`Originals`) until its layer is recorded as finished, so a run killed inside a layer puts the
layer back before redoing it: the redo starts from the bytes an uninterrupted run started from.
The owner removes the folder when the job finishes, fails or is interrupted (Ctrl-C, SIGTERM);
only a process killed outright (SIGKILL, the OOM killer, power loss) leaves it, and that is what
it is for.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from .cache import OWNER_FILE, mark_used, trim
from .cache_key import changed, key


class ResumeState:
    def __init__(self, folder: Path, inputs: dict):
        self.folder = Path(folder) / key("optimize-job", inputs)
        self.inputs = inputs
        self.file = self.folder / "work.gguf"
        self._state = self.folder / "state.json"
        self.originals = Originals(self.folder / "originals")

    def load(self) -> dict | None:
        """The saved progress of this very job, or None (nothing saved, or saved by another job)."""
        try:
            state = json.loads(self._state.read_text())
        except (OSError, ValueError):
            return None
        if changed(state.get("inputs"), self.inputs) or not self.file.is_file():
            return None
        self._own()
        mark_used(self._state)
        return state

    def start(self) -> Path:
        """A fresh work folder (anything older there removed); returns the work file's path."""
        self.clear()
        self.folder.mkdir(parents=True)
        self._own()
        trim(keep=(self.folder,))
        return self.file

    def _own(self) -> None:
        """The pid working in the folder: `neoxq cache prune` leaves a live run's work alone."""
        (self.folder / OWNER_FILE).write_text(str(os.getpid()))

    def save(self, progress: dict) -> None:
        with open(self.file, "rb+") as fh:
            os.fsync(fh.fileno())
        tmp = self._state.with_suffix(".tmp")
        tmp.write_text(json.dumps({"inputs": self.inputs, **progress}, default=str))
        os.replace(tmp, self._state)

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class Originals:
    """The bytes the work file's tensors held before the job changed them in place, one npz per
    tensor (arrays `weight` and, where it has one, `bias`), written by rename before the change.
    The first bytes kept stand: a redo of a layer changes tensors it had changed already."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def keep(self, name: str, **arrays: np.ndarray) -> None:
        path = self.folder / f"{name}.npz"
        if path.exists():
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{name}.tmp"
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def kept(self) -> dict[str, dict[str, np.ndarray]]:
        out = {}
        for path in sorted(self.folder.glob("*.npz")):
            with np.load(path, allow_pickle=False) as z:
                out[path.name.removesuffix(".npz")] = {k: z[k] for k in z.files}
        return out

    def forget(self) -> None:
        """Once the layers that changed them are recorded as finished."""
        shutil.rmtree(self.folder, ignore_errors=True)
