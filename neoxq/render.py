"""Render a quality report: report.json is the source of truth; the terminal table, Markdown and
PNG come from it. Lives beside the report code; matplotlib is needed only for the PNG."""

from __future__ import annotations

import json
from pathlib import Path

COLUMNS = [
    ("type", "type", "{}"), ("size MB", "size_bytes", "{:.2f}"), ("bpw", "bpw", "{:.2f}"),
    ("ppl", "ppl", "{:.3f}"), ("± se", "ppl_se", "{:.3f}"), ("Δppl %", "dppl_pct", "{:+.2f}"),
    ("KLD mean", "kld_mean", "{:.5f}"), ("KLD p99", "kld_p99", "{:.4f}"), ("top-1 %", "top1", "{:.2f}"),
    ("pp tok/s", "pp_tps", "{:.0f}"), ("tg tok/s", "tg_tps", "{:.1f}"),
]


def _cell(row: dict, key: str, fmt: str) -> str:
    v = row.get(key)
    if v is None:
        return "-"
    if key in ("pp_tps", "tg_tps") and not row.get("speed", {}).get("reliable", True):
        return "busy"
    if key == "size_bytes":
        v = v / 1e6
    if key == "top1":
        v = 100 * v
    return fmt.format(v)


def table(report: dict) -> str:
    """A fixed-width table for the terminal."""
    rows = [[h for h, _, _ in COLUMNS]] + [[_cell(r, k, f) for _, k, f in COLUMNS] for r in report["results"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(report: dict) -> str:
    src, text, ref = report["source"], report["text"], report["reference"]
    out = [f"# Quantization report: {src['name']}", ""]
    out.append(f"- Source: `{src.get('repo') or src['path']}`" + (f" @ `{src['revision']}`" if src.get("revision") else "")
               + (f" (commit `{src['commit']}`)" if src.get("commit") else ""))
    out.append(f"- Evaluation text: `{text['file']}`, sha256 `{text['sha256']}`; {text['tokens_scored']} tokens scored, "
               f"context {text['ctx']} (second half of each window, as llama-perplexity)")
    if report.get("imatrix"):
        im = report["imatrix"]
        out.append(f"- Importance matrix: `{im['file']}` (sha256 `{im['sha256'][:16]}…`), calibration: {im['calibration']}")
    out.append(f"- Reference: {ref['kind']}, perplexity {ref['ppl']:.3f} ± {ref['ppl_se']:.3f}"
               + (f" (why: {ref['why']})" if ref.get("why") else ""))
    v = report["versions"]
    out.append("- Versions: " + ", ".join(f"{k} {v[k]}" for k in sorted(v)))
    out.append(f"- Machine: {report['machine']['processor']}, {report['machine']['cores']} threads, {report['machine']['platform']}")
    out += ["", "| " + " | ".join(h for h, _, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in report["results"]:
        out.append("| " + " | ".join(_cell(r, k, f) for _, k, f in COLUMNS) + " |")
    task_cols = sorted({(t, k) for r in report["results"] for t, ms in r.get("tasks", {}).items() for k in ms})
    if task_cols:
        out += ["", "| type | " + " | ".join(f"{t}: {k}" for t, k in task_cols) + " |", "|---|" + "---:|" * len(task_cols)]
        for r in report["results"]:
            out.append(f"| {r['type']} | " + " | ".join(f"{r.get('tasks', {}).get(t, {}).get(k, float('nan')):.4f}" for t, k in task_cols) + " |")
    busy = [r for r in report["results"] if not r.get("speed", {}).get("reliable", True)]
    if busy:
        out += ["", "Speed columns marked *busy* were measured while the machine was busy ("
                + "; ".join(sorted({r["speed"]["why"] for r in busy})) + "); their figures are in report.json "
                "but are not reliable."]
    out += ["", "Columns: size and bits/weight of the file; perplexity ± standard error on the text; Δppl relative to "
            "the fp32 reference; KL divergence of the token distributions from the reference (mean and 99th "
            "percentile); how often the most likely token agrees with the reference; prompt and generation "
            "speed (tokens/s) on this machine, the median of 3 runs after a warm-up.", ""]
    if report.get("plot"):
        out.append(f"![size vs quality]({report['plot']})")
    return "\n".join(out) + "\n"


def has_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def plot(report: dict, path: Path) -> Path | None:
    """Size vs Δppl and vs KLD, each type labelled. Needs matplotlib (installed with neoxq[convert])."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in report["results"] if r.get("kld_mean") is not None]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    series = {"stock": [r for r in rows if not r["type"].endswith("-mix")], "measured mix": [r for r in rows if r["type"].endswith("-mix")]}
    for ax, key, label in ((axes[0], "dppl_pct", "Δ perplexity vs fp32 (%)"), (axes[1], "kld_mean", "mean KL divergence vs fp32")):
        for (name, rs), style in zip(series.items(), ("o-", "s--")):
            rs = sorted(rs, key=lambda r: r["size_bytes"])
            if not rs:
                continue
            xs = [r["size_bytes"] / 1e6 for r in rs]
            ys = [max(r[key], 1e-6) if key == "kld_mean" else r[key] for r in rs]
            ax.plot(xs, ys, style, label=name)
            for x, y, r in zip(xs, ys, rs):
                ax.annotate(r["type"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if key == "kld_mean":
            ax.set_yscale("log")
        if series["measured mix"]:
            ax.legend(fontsize=8)
        ax.set_xlabel("file size (MB)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{report['source']['name']}: size vs quality ({report['text']['tokens_scored']} tokens, ctx {report['text']['ctx']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path


def render(report_json: Path) -> tuple[Path, Path | None]:
    """report.json → report.md (+ report.png beside it)."""
    report = json.loads(Path(report_json).read_text())
    folder = Path(report_json).parent
    from neoxq.core.atomic import atomic_output

    png = folder / "report.png"
    made = has_matplotlib()
    if made:
        with atomic_output(png, force=True) as tmp:
            plot(report, tmp)
    report["plot"] = png.name if made else None
    md = folder / "report.md"
    with atomic_output(md, force=True) as tmp:
        tmp.write_text(markdown(report))
    return md, png if made else None


# Sweeps -------------------------------------------------------------------------------------------

def _sweep_series(data: dict) -> dict[str, list[tuple[int, dict]]]:
    """type → [(step, row)] over revisions with a step, in step order."""
    out: dict[str, list] = {}
    for rev in sorted((r for r in data["revisions"] if r["step"] is not None), key=lambda r: r["step"]):
        for row in rev["results"]:
            out.setdefault(row["type"], []).append((rev["step"], row, rev))
    return out


def sweep_markdown(data: dict) -> str:
    out = [f"# Quantization across training: {data['repo']}", "",
           f"- Text sha256 `{data['text']['sha256']}`, {data['text']['tokens_scored']} tokens scored, context {data['text']['ctx']}",
           "- Each revision scored against its own fp32 transformers reference on the same windows; revisions whose "
           "weights equal an earlier one's (same sha256) are marked and not recomputed.", ""]
    dups = [r for r in data["revisions"] if r["duplicate_of"]]
    if dups:
        out += ["Duplicates: " + ", ".join(f"`{r['revision']}` = `{r['duplicate_of']}`" for r in dups), ""]
    for qtype, points in _sweep_series(data).items():
        out += [f"## {qtype}", "", "| step | revision | ref. ppl | KLD mean | Δppl % | top-1 % |", "|---:|---|---:|---:|---:|---:|"]
        for step, row, rev in points:
            ref = rev["reference"] or {}
            dup = f" (= {rev['duplicate_of']})" if rev["duplicate_of"] else ""
            out.append(f"| {step} | {rev['revision']}{dup} | {ref.get('ppl', 0):.3f} | {row['kld_mean']:.5f} | {row['dppl_pct']:+.2f} | {100 * row['top1']:.2f} |")
        out.append("")
    return "\n".join(out) + "\n"


def sweep_plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = _sweep_series(data)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for qtype, points in series.items():
        xs = [max(s, 1) for s, _, _ in points]  # step 0 drawn at 1 on the log axis
        axes[0].plot(xs, [max(r["kld_mean"], 1e-7) for _, r, _ in points], "o-", label=qtype)
        axes[1].plot(xs, [r["dppl_pct"] for _, r, _ in points], "o-", label=qtype)
    first = next(iter(series.values()), [])
    axes[2].plot([max(s, 1) for s, _, _ in first], [rev["reference"]["ppl"] for _, _, rev in first], "o-", color="k")
    for ax, label in zip(axes, ("mean KL divergence vs fp32", "Δ perplexity vs fp32 (%)", "fp32 reference perplexity")):
        ax.set_xscale("log")
        ax.set_xlabel("training step (0 shown at 1)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    axes[2].set_yscale("log")
    fig.suptitle(f"{data['repo']}: quantization quality across training ({data['text']['tokens_scored']} tokens, ctx {data['text']['ctx']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def render_sweep(sweep_json: Path) -> tuple[Path, Path | None]:
    from neoxq.core.atomic import atomic_output

    data = json.loads(Path(sweep_json).read_text())
    folder = Path(sweep_json).parent
    md, png = folder / "sweep.md", folder / "sweep.png"
    with atomic_output(md, force=True) as tmp:
        tmp.write_text(sweep_markdown(data))
    if not has_matplotlib():
        return md, None
    with atomic_output(png, force=True) as tmp:
        sweep_plot(data, tmp)
    return md, png
