"""The fp32 checkpoint behind a GGUF file, the calibration text (the user's files, or the
checkpoint's own sample), and the importance matrix computed from them: what `--mix` and
`--optimize` both start from."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from neoxq import __version__
from neoxq.convert.checkpoint import open_checkpoint
from neoxq.convert.imatrix import compute_imatrix, second_moments
from neoxq.core import cache_key
from neoxq.core.atomic import atomic_output
from neoxq.core.cache import cache_root, mark_used, trim
from neoxq.core.calibration_stats import CalibrationStats
from neoxq.core.errors import OutputError
from neoxq.core.gguf_info import GGUFInfo
from neoxq.core.imatrix_io import write_imatrix
from neoxq.core.progress import info as say
from neoxq.core.textfile import read_text, text_sha256
from neoxq.reference import check_checkpoint_belongs, source_of
from neoxq.self_calibration import self_calibration


@dataclass(frozen=True)
class CalibrationText:
    text: str
    source: str  # where it came from, recorded in the file's provenance

    @property
    def sha256(self) -> str:
        return text_sha256(self.text)


def read_calibration(files) -> CalibrationText:
    """Several --calib files, read in the order given and joined by a blank line."""
    files = [Path(f) for f in files]
    text = "\n\n".join(read_text(f, "--calib") for f in files)
    return CalibrationText(text, "given: " + ", ".join(f.name for f in files))


def checkpoint_calibration(ckpt, ctx: int, max_memory: int | None = None) -> CalibrationText:
    """The checkpoint's own sampled text (neoxq.self_calibration)."""
    own = self_calibration(ckpt, ctx, max_memory=max_memory)
    return CalibrationText(own.text, own.describe())


def calibration_text(src: GGUFInfo, files, reference: str | None, ctx: int, max_memory: int | None = None) -> CalibrationText:
    """The --calib files when given; else text sampled from the checkpoint `src` was converted from."""
    if files:
        return read_calibration(files)
    return checkpoint_calibration(reference_checkpoint(src, reference), ctx, max_memory)


def reference_checkpoint(src: GGUFInfo, reference: str | None, revision: str | None = None):
    """The fp32 checkpoint the calibration activations come from: --reference, else the hub source
    recorded in the file; it must be the checkpoint the file was converted from (fingerprint)."""
    if reference is None:
        reference, revision = source_of(src, "the checkpoint folder it was converted from")
    ckpt = open_checkpoint(str(reference), revision)
    check_checkpoint_belongs(ckpt, src)
    return ckpt


def calibration_label(calib: str) -> str:
    """How an importance matrix names the calibration text it was computed from."""
    return f"calibration sha256:{text_sha256(calib)[:16]}"


def calibration_imatrix(src: GGUFInfo, calib: str, folder: Path, reference: str | None = None, revision: str | None = None, ctx: int = 512) -> Path:
    """An importance matrix from the calibration text (the fp32 checkpoint the file was converted
    from; --reference or the recorded hub source), written into `folder`: what --mix uses when no
    --imatrix is named (docs/method.md, the --mix section)."""
    ckpt = reference_checkpoint(src, reference, revision)
    im = compute_imatrix(ckpt, calib, ctx=min(ctx, src.context_length or ctx), include_output=True, dataset_name=calibration_label(calib))
    return write_imatrix(Path(folder) / "calibration.imatrix", im, force=True)


def optimize_statistics(ckpt, calib: str, ctx: int, streamed: bool, bf16: bool, device: str = "cpu") -> CalibrationStats:
    """--optimize's first pass over the calibration windows (second_moments with the output's
    inputs and the Fisher): made once for a checkpoint, calibration text, window and precision, and
    read back from the cache after, so every type of a report, a sweep or a re-run shares it. The
    entry is reused only when every input that made it is the same (neoxq.core.cache_key); its
    arrays are an npz read without pickle, its JSON written last, so a half-written entry is never
    taken for one."""
    inputs = {
        "reference": ckpt.fingerprint(),
        "reference_name": ckpt.name,
        "calibration": text_sha256(calib),
        "ctx": ctx,
        "streamed": streamed,  # the same sums to float rounding, not to the bit
        "bf16": bool(bf16),
        "device": device,  # like streamed: a GPU's sums are the CPU's to float rounding
        "neoxq": __version__,
    }
    folder = cache_root() / "calibration"
    key = cache_key.key("calibration", inputs)
    meta_path, arrays_path = folder / f"{key}.json", folder / f"{key}.npz"
    cached = _read_statistics(meta_path, arrays_path, inputs)
    if cached is not None:
        return cached
    stats = second_moments(ckpt, calib, ctx, include_output=True, fisher=True, streamed=streamed, bf16=bf16, device=device)
    try:
        _write_statistics(stats, inputs, meta_path, arrays_path)
    except (OSError, OutputError) as exc:  # a cache that cannot be written costs the next run the pass, not this one
        say(f"note: the calibration statistics were not cached ({exc}); the run goes on")
    return stats


def _write_statistics(stats: CalibrationStats, inputs: dict, meta_path: Path, arrays_path: Path) -> None:
    arrays, meta = stats.to_arrays()
    meta_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(arrays_path, force=True, lock=False) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    with atomic_output(meta_path, force=True, lock=False) as tmp:
        tmp.write_text(json.dumps({"inputs": inputs, **meta}), encoding="utf-8")
    trim(keep=(meta_path, arrays_path))


def _read_statistics(meta_path: Path, arrays_path: Path, inputs: dict) -> CalibrationStats | None:
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if cache_key.changed(meta.get("inputs"), inputs):
            return None
        with np.load(arrays_path, allow_pickle=False) as z:
            stats = CalibrationStats.from_arrays({k: z[k] for k in z.files}, meta)
    except (OSError, ValueError, KeyError):
        return None  # absent, or not an entry this code wrote: made again
    mark_used(meta_path)
    return stats
