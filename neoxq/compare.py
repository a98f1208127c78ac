"""Paired comparisons of files scored on the same tokens, and the tokens quantization hurt most.

- `neoxq compare A B --reference R --text FILE`: both files scored against one reference on the
  same windows (or their per-token .npz files read back), then `core.stats.compare`.
- In a report, every variant row (`<T>-mix`, `<T>-opt`, `<T>-opt-mix`) is compared with its stock
  row `<T>` the same way (`vs_stock` in report.json).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from neoxq.core.errors import UsageError
from neoxq.core.gguf_info import read_info
from neoxq.core.scores_io import load_scores
from neoxq.core.stats import TokenScores, compare
from neoxq.core.textfile import read_text, text_sha256
from neoxq.core.report_row import ReportRow
from neoxq.reference import open_reference
from neoxq.runtime.model import NeoxModel, RuntimeOptions
from neoxq.runtime.score import kld

VARIANT_SUFFIXES = ("-opt-mix", "-opt", "-mix")  # longest first: "Q4_K_M-opt-mix" → stock "Q4_K_M"


def stock_of(label: str) -> str | None:
    """The stock row a variant row is compared with, or None for a stock row."""
    for suffix in VARIANT_SUFFIXES:
        if label.endswith(suffix):
            return label[: -len(suffix)]
    return None


def compare_rows(rows: list[ReportRow], folder: Path) -> None:
    """Set `vs_stock` (paired KLD and perplexity ratios with 95 % intervals) on every variant row
    whose stock row was scored in the same report; the per-token files are read back from `folder`.
    A file given with --add is named as its maker named it: no stock row is its own."""
    by_type = {r.type: r for r in rows if not r.added}
    for r in rows:
        stock = None if r.added else by_type.get(stock_of(r.type) or "")
        if stock is not None:
            a, b = (load_scores(folder / x.tokens["file"]) for x in (r, stock))
            r.vs_stock = {"stock": stock.type, **compare(a, b)}


def _scores(path: Path, reference, text: str, ctx: int, cache_dir, runtime) -> TokenScores:
    if path.suffix == ".npz":
        return load_scores(path)

    with NeoxModel(path, runtime) as m:
        return kld(m, reference, text, ctx, cache_dir=cache_dir).tokens


def compare_files(
    a: Path,
    b: Path,
    reference: str | None = None,
    text_file: Path | None = None,
    ctx: int = 512,
    cache_dir=None,
    runtime=None,
    revision: str | None = None,
    max_memory: int | None = None,
) -> dict:
    """Score A and B on the same tokens against one reference (GGUF files) or read their per-token
    .npz files; return the paired statistics of A against B."""
    paths = [Path(a), Path(b)]
    need = [p for p in paths if p.suffix != ".npz"]
    ref, text = None, ""
    if need:
        if reference is None or text_file is None:
            raise UsageError("comparing GGUF files scores them: pass --reference (an F16 GGUF or the checkpoint) and --text")
        text = read_text(text_file)
        runtime = runtime or RuntimeOptions(n_ctx=ctx, n_batch=ctx)
        ref = open_reference(reference, revision, runtime, max_memory=max_memory, model_info=read_info(need[0]))
    sa, sb = (_scores(p, ref, text, ctx, cache_dir, runtime) for p in paths)
    out = {"a": str(paths[0]), "b": str(paths[1]), **compare(sa, sb)}
    if need:
        out.update({"reference": ref.description, "text_sha256": text_sha256(text), "ctx": ctx})
    return out


def most_hurt(s: TokenScores, windows, detokenize, n: int = 20, context_tokens: int = 12) -> list[dict]:
    """The n tokens with the largest KLD: where they are, the text before them, the target, both
    models' most likely tokens and the target's probability under each."""
    order = np.argsort(-np.asarray(s.kld), kind="stable")[:n]
    out = []
    for i in order:
        c, j = divmod(int(i), windows.per_window)
        pos = windows.first + j  # the logits at this position predict the token after it
        chunk = windows.chunk(c)
        out.append(
            {
                "window": c,
                "position": pos + 1,
                "kld": float(s.kld[i]),
                "context": detokenize(chunk[max(0, pos + 1 - context_tokens) : pos + 1]),
                "target": detokenize([chunk[pos + 1]]),
                "p_reference": float(np.exp(s.lp[i])),
                "p_model": float(np.exp(s.lq[i])),
                "reference_top": detokenize([int(s.ref_top[i])]) if s.ref_top is not None else None,
                "model_top": detokenize([int(s.model_top[i])]) if s.model_top is not None else None,
            }
        )
    return out
