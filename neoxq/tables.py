"""Every table neoxq prints for people, drawn by rich (a dependency for its progress bars already):
quant types, a quantized file's tensors, a report's rows, a sweep, an evaluation. Plain columns (no
box) so a pipe gets text that `grep`/`awk` read; JSON (`--json`, report.json) is the format for
programs."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console
from rich.table import Table

from neoxq.core.qtypes import QuantType
from neoxq.evaluate import metrics
from neoxq.core.report_row import rows_of


def render(columns: list[tuple[str, str]], rows: list[list[str]], title: str | None = None) -> str:
    """Columns (header, "left"|"right") and rows of cells, as text of the columns' own widths."""
    t = Table(box=None, pad_edge=False, show_edge=False, title=title, title_justify="left", header_style="bold")
    for name, justify in columns:
        t.add_column(name, justify=justify, no_wrap=True)
    for r in rows:
        t.add_row(*r)
    out = io.StringIO()
    Console(file=out, width=100_000, color_system=None).print(t)  # as wide as the cells: never wrapped
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines())


def types_table() -> str:
    rows = [[t.value, f"{t.nominal_bpw:.2f}", "required" if t.needs_imatrix else "optional" if not t.is_float else "-"] for t in QuantType]
    return render([("type", "left"), ("bpw", "right"), ("imatrix", "left")], rows)


def quant_result_table(result) -> str:
    """A quantized file's tensors (type, shape, bytes, llama.cpp's fallbacks), then its size line."""
    rows = [[t["name"], t["type"], "x".join(map(str, t["shape"])), str(t["bytes"]), t["note"]] for t in result.tensors]
    out = [
        render([("tensor", "left"), ("type", "left"), ("shape", "left"), ("bytes", "right"), ("note", "left")], rows),
        f"{result.label}: {result.size_bytes / 1e6:.2f} MB, {result.bpw:.2f} bits/weight, {result.seconds:.1f} s",
    ]
    mix = result.extra.get("mix")
    if mix:
        stock = f" vs stock {mix['stock_predicted_kld']:.5f}" if mix.get("stock_predicted_kld") else ""
        out.append(
            f"mix: budget {mix['target_bytes'] / 1e6:.2f} MB (stock {mix['base']} {mix['stock_bytes'] / 1e6:.2f} MB); "
            f"predicted KLD {mix['predicted_kld']:.5f}{stock}; {mix['probes']} probes"
        )
    return "\n".join(out)


def sweep_table(data: dict) -> str:
    """KLD per revision and type, with each revision's reference perplexity."""

    def order(t: str) -> int:
        base = t.split("-")[0]
        return data["types"].index(base) if base in data["types"] else 99

    types = sorted({r.type for rev in data["revisions"] for r in rows_of(rev)}, key=order)
    rows = []
    for rev in data["revisions"]:
        kl = {r.type: r.kld_mean for r in rows_of(rev)}
        ref = rev["reference"]["ppl"] if rev["reference"] else float("nan")
        rows.append(
            [
                rev["revision"],
                "-" if rev["step"] is None else str(rev["step"]),
                f"{ref:.3f}",
                *[f"{kl.get(t, float('nan')):.5f}" for t in types],
                f"= {rev['duplicate_of']}" if rev["duplicate_of"] else "",
            ]
        )
    cols = [("revision", "left"), ("step", "right"), ("ref ppl", "right"), *[(f"KLD {t}", "right") for t in types], ("", "left")]
    return render(cols, rows)


def evaluation_table(combined: dict) -> str:
    """lm-eval's metrics per file."""
    rows = [(m, d["type"], metrics({"results": d["results"]})) for m, d in combined["models"].items()]
    cols = sorted({(t, k) for _, _, ms in rows for t, v in ms.items() for k in v})
    body = [[Path(m).name, ty, *[f"{ms.get(t, {}).get(k, float('nan')):.4f}" for t, k in cols]] for m, ty, ms in rows]
    return render([("file", "left"), ("type", "left"), *[(f"{t}:{k}", "right") for t, k in cols]], body)
