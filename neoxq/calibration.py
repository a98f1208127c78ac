"""The fp32 checkpoint behind a GGUF file, and the importance matrix computed from it on a
calibration text: what `--mix` and `--optimize` both start from."""

from __future__ import annotations

from pathlib import Path

from neoxq.convert.checkpoint import open_checkpoint
from neoxq.convert.imatrix import compute_imatrix
from neoxq.core.gguf_info import GGUFInfo
from neoxq.core.imatrix_io import write_imatrix
from neoxq.core.textfile import text_sha256
from neoxq.reference import check_checkpoint_belongs, source_of


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
    --imatrix is named (docs/method.md, "Measured mixes")."""
    ckpt = reference_checkpoint(src, reference, revision)
    im = compute_imatrix(ckpt, calib, ctx=min(ctx, src.context_length or ctx), include_output=True, dataset_name=calibration_label(calib))
    return write_imatrix(Path(folder) / "calibration.imatrix", im, force=True)
