"""Per-token scores on disk: one compressed `.npz` per scored file, beside report.json, for a user's
own analysis and for `neoxq compare` without rescoring.

Arrays (one row per scored token, in window order): `targets` (int32 token ids), `lp` and `lq`
(float32 log-probs of the target under the reference and the model), `kld` (float32), `same_top`
(bool), `model_top` / `ref_top` (int32 most likely tokens); `per_window` (int). Read with
`allow_pickle=False`: a file from elsewhere can hold nothing but arrays.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from .atomic import atomic_output
from .errors import CorruptFileError, UsageError
from .imatrix_io import file_sha256
from .stats import TokenScores

ARRAYS = ("targets", "lp", "lq", "kld", "same_top", "model_top", "ref_top")


def save_scores(path: Path | str, s: TokenScores) -> dict:
    """Write the scores (atomically); return {"file": name, "sha256": …, "tokens": n}."""
    path = Path(path)
    arrays = {
        "targets": s.targets,
        "lp": np.asarray(s.lp, np.float32),
        "lq": np.asarray(s.lq, np.float32),
        "kld": np.asarray(s.kld, np.float32),
        "same_top": np.asarray(s.same_top, bool),
        "model_top": s.model_top,
        "ref_top": s.ref_top,
        "per_window": np.int64(s.per_window),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, force=True, lock=False) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **{k: v for k, v in arrays.items() if v is not None})
    return {"file": path.name, "sha256": file_sha256(path), "tokens": s.n}


def load_scores(path: Path | str) -> TokenScores:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such file; pass a GGUF file or a per-token .npz written by `neoxq report`")
    try:
        with np.load(path, allow_pickle=False) as z:
            got = {k: z[k] for k in z.files}
        per_window = int(got.pop("per_window"))
        return TokenScores(
            kld=got["kld"].astype(np.float64),
            lq=got["lq"].astype(np.float64),
            lp=got["lp"].astype(np.float64),
            same_top=got["same_top"].astype(bool),
            per_window=per_window,
            **{k: got.get(k) for k in ("targets", "model_top", "ref_top")},
        )
    except (KeyError, ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise CorruptFileError(
            f"{path} is not a per-token score file written by neoxq ({exc}); rescore with `neoxq report` or pass the GGUF files"
        ) from exc
