"""Locate a checkpoint's files, read its config, and open its weights lazily, one tensor at a time.

Formats: model.safetensors, sharded safetensors + index, pytorch_model.bin, sharded .bin + index.
Tensors come out as numpy arrays. Safetensors are read with safetensors' numpy API, so converting
them needs no torch (bf16, which numpy lacks, is widened to float32 from the raw bytes). Pickle
(.bin) files load only through torch.load(weights_only=True); anything that would run code is
refused.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from neoxq.core.errors import CorruptFileError, SourceError, UnsafeCheckpointError, UsageError, require_convert_extra

from . import hub
from .neox import GPTNeoXArgs

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


@dataclass
class Checkpoint:
    folder: Path
    config: dict[str, Any]
    weight_files: list[Path]
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    _shapes: dict[str, tuple[tuple[int, ...], str, Path]] = field(default_factory=dict, repr=False)

    @property
    def format(self) -> str:
        return "safetensors" if self.weight_files[0].suffix == ".safetensors" else "bin"

    @property
    def name(self) -> str:
        return self.repo_id.split("/")[-1] if self.repo_id else self.folder.resolve().name

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.weight_files)

    @property
    def bytes_per_param(self) -> int:
        """Bytes per stored parameter (2 for fp16/bf16, 4 for fp32), from the files' size and the
        config's parameter count."""
        return max(self.size_bytes // max(GPTNeoXArgs.from_config(self.config).param_count(), 1), 2)

    def tensor_names(self) -> list[str]:
        self._scan()
        return list(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        self._scan()
        return self._shapes[name][0]

    def dtype(self, name: str) -> str:
        self._scan()
        return self._shapes[name][1]

    def file_index(self, name: str) -> int:
        self._scan()
        return self.weight_files.index(self._shapes[name][2])

    def fingerprint(self) -> str:
        """Identity of the weights without reading them: names, sizes and mtimes (a hub snapshot's
        files are links to blobs named by their sha256, so there the blob names are used)."""
        parts = []
        for p in self.weight_files:
            target = p.resolve()
            blob = target.name if p.is_symlink() and target.parent.name == "blobs" else None
            st = p.stat()
            parts.append(f"{p.name}:{blob or f'{st.st_size}:{st.st_mtime_ns}'}")
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]

    def read(self, name: str):
        """One tensor as a numpy array."""
        return next(iter(self.iter_tensors([name])))[1]

    def iter_tensors(self, names: list[str]) -> Iterator[tuple[str, Any]]:
        """Yield (name, numpy array) in the order given.

        Safetensors shards are reopened per tensor: the memory map of a shard is dropped after each
        tensor, so resident memory follows the largest tensor, not the shard. A pickle shard is
        opened once for its run of consecutive names (reopening would re-parse the pickle).
        """
        self._scan()
        reader, reader_path = None, None
        for n in names:
            path = self._shapes[n][2]
            if reader is None or reader_path != path or path.suffix == ".safetensors":
                reader, reader_path = _open_weights(path), path
            yield n, reader.get(n)
        reader = None

    def _scan(self) -> None:
        """Read every shard's header (shapes and dtypes only, never the data)."""
        if self._shapes:
            return
        for path in self.weight_files:
            with _open_weights(path) as reader:
                for n, shape, dtype in reader.headers():
                    if n in self._shapes:
                        raise CorruptFileError(
                            f"tensor {n} appears in two shards ({self._shapes[n][2].name}, {path.name}); re-download the checkpoint"
                        )
                    self._shapes[n] = (shape, dtype, path)
        if not self._shapes:
            raise CorruptFileError(f"{self.weight_files[0]} holds no tensors; re-download the checkpoint")


def open_checkpoint(src: str, revision: str | None = None) -> Checkpoint:
    """A local folder, or a hub repo id (with `--revision` or `id@revision`)."""
    path = Path(src).expanduser()
    repo_id = commit = None
    if not path.exists():
        repo, _, at_rev = src.partition("@")
        if not hub.looks_like_repo_id(repo):
            raise SourceError(f"{src}: no such folder, and not a hub repo id like EleutherAI/pythia-70m")
        if at_rev and revision and at_rev != revision:
            raise SourceError(f"two revisions given ({at_rev!r} in the name, {revision!r} by --revision); pass one")
        revision = revision or at_rev or None
        repo_id = repo
        path, commit = hub.fetch(repo, revision)
    elif not path.is_dir():
        raise SourceError(f"{src} is a file; pass the checkpoint's folder (with config.json and the weights)")
    elif revision:
        raise UsageError(
            f"--revision {revision} picks a hub branch, but {src} is a local folder (one version); "
            "drop --revision, or pass the hub repo id (e.g. EleutherAI/pythia-70m)"
        )
    config = read_config(path)
    return Checkpoint(folder=path, config=config, weight_files=find_weight_files(path), repo_id=repo_id, revision=revision, commit=commit)


def read_config(folder: Path) -> dict[str, Any]:
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise SourceError(f"{folder} has no config.json; pass the folder of a Hugging Face checkpoint")
    return parse_config(cfg.read_bytes(), cfg)


def parse_config(raw: bytes, where: Path) -> dict[str, Any]:
    """config.json's bytes as the dict GPTNeoXArgs reads (what the fuzzer feeds); one line when broken."""
    try:
        return json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise CorruptFileError(f"{where} is not valid JSON ({type(exc).__name__}); re-download the checkpoint") from exc


def find_weight_files(folder: Path) -> list[Path]:
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index = folder / index_name
        if index.is_file():
            return _files_from_index(index)
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return [folder / single]
    raise SourceError(f"{folder} has no weights (model.safetensors, pytorch_model.bin, or a sharded index); download them or pass the right folder")


def _files_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CorruptFileError(f"{index} is not a valid shard index; re-download it") from exc
    files = list(dict.fromkeys(weight_map.values()))
    for f in files:
        if not (index.parent / f).is_file():
            raise CorruptFileError(f"{index.name} names shard {f}, which is missing; download it or re-download the checkpoint")
    return [index.parent / f for f in files]


class _Reader:
    """Opened per shard; `with` drops the handle (and so its memory map) on leaving."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.__dict__.clear()


class _SafetensorsReader(_Reader):
    def __init__(self, path: Path):
        try:
            from safetensors import safe_open
        except ImportError as exc:
            raise require_convert_extra(exc) from exc
        self.path = path
        try:
            self._f = safe_open(str(path), framework="numpy")
        except Exception as exc:  # safetensors raises its own SafetensorError for bad headers/sizes
            raise CorruptFileError(
                f"{path.name} is not a valid safetensors file ({_short(exc)}); it is truncated or corrupt, re-download it"
            ) from exc

    def headers(self) -> Iterator[tuple[str, tuple[int, ...], str]]:
        for n in self._f.keys():
            sl = self._f.get_slice(n)
            yield n, tuple(sl.get_shape()), str(sl.get_dtype())

    def get(self, name: str):
        """A memory map of the tensor's bytes (no copy: the writer copies page cache to page cache;
        the map is released with the array), bf16 widened to float32; other dtypes via safetensors."""
        try:
            dtype = self._f.get_slice(name).get_dtype()
            if dtype in _MAPPED:
                return _mapped(self.path, name, dtype)
            return self._f.get_tensor(name)
        except Exception as exc:
            raise CorruptFileError(f"cannot read {name} from {self.path.name} ({_short(exc)}); re-download it") from exc


class _BinReader(_Reader):
    """A .bin pickle, loaded with weights_only=True (memory-mapped when the zip format allows)."""

    def __init__(self, path: Path):
        try:
            import torch
        except ImportError as exc:
            raise require_convert_extra(exc) from exc
        self.path = path
        try:
            try:
                self._sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                # Legacy (non-zip) pickles cannot be memory-mapped.
                self._sd = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UnsafeCheckpointError(
                f"{path.name} is a pickle that would run code or build non-tensor objects when loaded; "
                "refused. Use a safetensors checkpoint, or convert this one yourself if you trust its source"
            ) from exc
        except (EOFError, RuntimeError, ValueError, OSError) as exc:
            raise CorruptFileError(
                f"{path.name} cannot be read as a PyTorch checkpoint ({_short(exc)}); it is truncated or corrupt, re-download it"
            ) from exc
        if not isinstance(self._sd, dict):
            raise CorruptFileError(f"{path.name} does not hold a state dict; pass a model checkpoint")

    def headers(self):
        for n, t in self._sd.items():
            yield n, tuple(t.shape), str(t.dtype).replace("torch.", "")

    def get(self, name: str):
        import torch

        t = self._sd[name]
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


_MAPPED = {"F16": "<f2", "F32": "<f4", "BF16": "<u2"}


def _mapped(path: Path, name: str, dtype: str):
    """The tensor located through the safetensors header (8-byte length, JSON with data_offsets),
    memory-mapped; bf16 becomes float32 (the upper half of each float32), as numpy has no bf16."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        entry = json.loads(f.read(n))[name]
    begin, end = entry["data_offsets"]
    shape = tuple(entry["shape"])
    if end == begin:
        return np.zeros(shape, dtype=_MAPPED[dtype])
    arr = np.memmap(path, dtype=_MAPPED[dtype], mode="r", offset=8 + n + begin, shape=shape)
    return (arr.astype(np.uint32) << 16).view(np.float32) if dtype == "BF16" else arr


def _open_weights(path: Path):
    return _SafetensorsReader(path) if path.suffix == ".safetensors" else _BinReader(path)


def _short(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
