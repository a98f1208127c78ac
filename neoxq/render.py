"""Render a quality report: report.json is the source of truth; the terminal table, Markdown and
PNG come from it. Lives beside the report code; matplotlib is needed only for the PNG."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np

from neoxq.compare import VARIANT_SUFFIXES, stock_of
from neoxq.core.atomic import atomic_output
from neoxq.core.report_row import ReportRow, best_at_each_size, rows_of
from neoxq.core.scores_io import load_scores
from neoxq.tables import render as draw

COLUMNS = [
    ("type", "type", "{}"),
    ("size MB", "size_bytes", "{:.2f}"),
    ("bpw", "bpw", "{:.2f}"),
    ("ppl", "ppl", "{:.3f}"),
    ("Δppl % ± se", "dppl_pct", "{:+.2f}"),
    ("KLD mean ± se", "kld_mean", "{:.5f}"),
    ("KLD p99", "kld_p99", "{:.4f}"),
    ("top-1 %", "top1", "{:.2f}"),
    ("vs stock: KLD ratio [95 %]", "vs_stock", ""),
    ("pp tok/s", "pp_tps", "{:.0f}"),
    ("tg tok/s", "tg_tps", "{:.1f}"),
]
# The ± beside a value: its standard error from per-window means (see neoxq.core.stats).
WITH_SE = {"dppl_pct": ("dppl_pct_se_window",), "kld_mean": ("kld_mean_se_window",)}


def _vs_stock(v: dict) -> str:
    k = v["kld"]
    return f"{k['ratio']:.3f}× [{k['ci95'][0]:.3f}, {k['ci95'][1]:.3f}] {k['verdict']}"


def _cell(row: ReportRow, key: str, fmt: str) -> str:
    v = getattr(row, key)
    if v is None:
        return "-"
    if key == "vs_stock":
        return _vs_stock(v)
    if key in ("pp_tps", "tg_tps") and not row.speed_reliable:
        return "busy"
    if key == "size_bytes":
        v = v / 1e6
    if key == "top1":
        v = 100 * v
    se = getattr(row, WITH_SE[key][0]) if key in WITH_SE else None
    if se is not None:
        return value_pm(v, se, signed=key == "dppl_pct")
    return fmt.format(v)


def value_pm(value: float, se: float, signed: bool = False, max_decimals: int = 7) -> str:
    """`value ± se` with the error to two significant digits and the value to the same place."""
    sign = "+" if signed else ""
    d = 2 if se <= 0 or not math.isfinite(se) else max(1 - math.floor(math.log10(se)), 2)
    if d > max_decimals:  # too small for fixed decimals (an F16 file's KLD)
        return f"{value:{sign}.2e} ± {se:.1e}"
    return f"{value:{sign}.{d}f} ± {se:.{d}f}"


def _columns(rows: list[ReportRow]) -> list:
    """The vs-stock column only when some row has a stock row to compare with."""
    has_vs = any(r.vs_stock is not None for r in rows)
    return [c for c in COLUMNS if c[1] != "vs_stock" or has_vs]


def table(report: dict) -> str:
    """The report's rows for the terminal (neoxq.tables)."""
    rows = rows_of(report)
    cols = _columns(rows)
    return draw([(h, "right" if i else "left") for i, (h, _, _) in enumerate(cols)], [[_cell(r, k, f) for _, k, f in cols] for r in rows])


def results_table(report: dict, leave_out: tuple[str, ...] = ()) -> list[str]:
    """report.md's table (Markdown lines): one row per file, values with their window errors."""
    rows = rows_of(report)
    cols = [c for c in _columns(rows) if c[1] not in leave_out]
    out = ["| " + " | ".join(h for h, _, _ in cols) + " |", "|---|" + "---:|" * (len(cols) - 1)]
    return out + ["| " + " | ".join(_cell(r, k, f) for _, k, f in cols) + " |" for r in rows]


def variant_gain(report: dict, suffix: str = "-opt") -> str | None:
    """One line: how the `<TYPE>{suffix}` rows' KLD compares with stock's at the same size, as the
    range of their paired ratios; None when the report has no such rows."""
    ratios = [(r.type, r.vs_stock["kld"]) for r in rows_of(report) if r.type.endswith(suffix) and r.vs_stock]
    if not ratios:
        return None
    low, high = min(ratios, key=lambda x: x[1]["ratio"]), max(ratios, key=lambda x: x[1]["ratio"])
    better = sum(k["verdict"] == "better" for _, k in ratios)
    return (
        f"{suffix[1:]} files: KLD {low[1]['ratio']:.3g}× ({low[0]}) to {high[1]['ratio']:.3g}× ({high[0]}) of stock's at the same size; "
        f"lower beyond the paired 95 % interval in {better} of {len(ratios)} types"
    )


def best_files_md(report: dict) -> list[str]:
    """The best file at or under each stock file's size, when the report holds other files too."""
    pairs = best_at_each_size(rows_of(report))
    if not any(best is not stock for stock, best in pairs):
        return []
    out = [
        "",
        "Best file at or under each stock file's size (tensor bits per weight; lowest mean KLD):",
        "",
        "| stock | its KLD | best file | its bpw | its KLD | ratio of mean KLD (same tokens) |",
    ]
    out.append("|---|---:|---|---:|---:|---:|")
    for stock, best in pairs:
        out.append(
            f"| {stock.type} | {stock.kld_mean:.3g} | {best.type} | {best.bpw:.2f} | {best.kld_mean:.3g} | "
            f"{best.kld_mean / stock.kld_mean if stock.kld_mean else float('nan'):.3g}× |"
        )
    return out


def se_note(report: dict) -> str:
    """One line: which error is which, and how far apart they are on this text."""
    rows = rows_of(report)
    f = [r.kld_mean_se_window / r.kld_mean_se for r in rows if r.kld_mean_se and r.kld_mean_se_window is not None]
    spread = f" (here {min(f):.1f}–{max(f):.1f}× the per-token ones)" if f else ""
    return (
        "± is the standard error from the means of the scored windows: the tokens of one window share their "
        "context, so their errors are correlated and llama-perplexity's per-token errors (`se` in report.json, "
        f"every token taken as independent) are too small; the window errors are larger{spread}."
        + (
            " The vs-stock column is a paired test on the same tokens: the ratio of mean KLDs with its 95 % interval "
            "(per-window errors) and whether the file is better, worse or not distinguishable."
            if any(r.vs_stock is not None for r in rows)
            else ""
        )
    )


TAIL_NOTE_ABOVE = 0.01  # mean mass outside the reference tables' top tokens above which report.md warns


def _tail_note(report: dict) -> list[str]:
    tails = [r.stats["reference_tables"] for r in rows_of(report) if "reference_tables" in (r.stats or {})]
    if not tails or max(t["mass_outside_mean"] for t in tails) <= TAIL_NOTE_ABOVE:
        return []
    t = max(tails, key=lambda t: t["mass_outside_mean"])
    return [
        "",
        f"Note: the reference's top {t['top_k']} tokens per position leave {100 * t['mass_outside_mean']:.1f} % of its "
        "probability outside them on this text (a broad model); the KLD merges that rest into one outcome and reads low "
        "(by how much: docs/benchmarks.md, scripts/bench_stats.py). Ratios between files on the same tokens are "
        "affected far less. For exact values set NEOXQ_REFERENCE_TOP_K to the vocabulary size (tables then take "
        "~8 bytes × vocabulary per scored token).",
    ]


def _md_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "↵").replace("`", "'")


def _most_hurt_md(mh: dict | None) -> list[str]:
    if not mh:
        return []
    out = [
        "",
        f"## The {len(mh['tokens'])} tokens {mh['type']} hurt most",
        "",
        "| # | KLD | context → target | p ref. | p model | ref. top | model top |",
        "|---:|---:|---|---:|---:|---|---|",
    ]
    for i, t in enumerate(mh["tokens"], 1):
        out.append(
            f"| {i} | {t['kld']:.3f} | …{_md_escape(t['context'])} → **{_md_escape(t['target'])}** | "
            f"{t['p_reference']:.3f} | {t['p_model']:.3f} | `{_md_escape(t['reference_top'] or '')}` | "
            f"`{_md_escape(t['model_top'] or '')}` |"
        )
    return out


def _tasks_md(rows: list[ReportRow]) -> list[str]:
    """The lm-eval metrics per row, when the report ran tasks."""
    task_cols = sorted({(t, k) for r in rows for t, ms in (r.tasks or {}).items() for k in ms})
    if not task_cols:
        return []
    out = ["", "| type | " + " | ".join(f"{t}: {k}" for t, k in task_cols) + " |", "|---|" + "---:|" * len(task_cols)]
    for r in rows:
        out.append(f"| {r.type} | " + " | ".join(f"{(r.tasks or {}).get(t, {}).get(k, float('nan')):.4f}" for t, k in task_cols) + " |")
    return out


def markdown(report: dict) -> str:
    src, text, ref = report["source"], report["text"], report["reference"]
    out = [f"# Quantization report: {src['name']}", ""]
    out.append(
        f"- Source: `{src.get('repo') or src['path']}`"
        + (f" @ `{src['revision']}`" if src.get("revision") else "")
        + (f" (commit `{src['commit']}`)" if src.get("commit") else "")
    )
    out.append(
        f"- Evaluation text: `{text['file']}`, sha256 `{text['sha256']}`; {text['tokens_scored']} tokens scored, "
        f"context {text['ctx']} (second half of each window, as llama-perplexity)"
    )
    if report.get("imatrix"):
        im = report["imatrix"]
        out.append(f"- Importance matrix: `{im['file']}` (sha256 `{im['sha256'][:16]}…`), calibration: {im['calibration']}")
    out.append(f"- Reference: {ref['kind']}, perplexity {ref['ppl']:.3f} ± {ref['ppl_se']:.3f}" + (f" (why: {ref['why']})" if ref.get("why") else ""))
    v = report["versions"]
    out.append("- Versions: " + ", ".join(f"{k} {v[k]}" for k in sorted(v)))
    out.append(f"- Machine: {report['machine']['processor']}, {report['machine']['cores']} threads, {report['machine']['platform']}")
    out += ["", *results_table(report), "", se_note(report)] + _tail_note(report) + best_files_md(report)
    out += _tasks_md(rows_of(report))
    busy = [r for r in rows_of(report) if not r.speed_reliable]
    if busy:
        out += [
            "",
            "Speed columns marked *busy* were timed while the machine was busy ("
            + "; ".join(sorted({r.speed["why"] for r in busy}))
            + "); their figures are in report.json "
            "but are not reliable.",
        ]
    out += [
        "",
        "Columns: size and bits/weight of the file; perplexity on the text; Δppl relative to the "
        "reference (paired, same tokens); KL divergence of the token distributions from the reference (mean and 99th "
        "percentile); how often the most likely token agrees with the reference; prompt and generation "
        "speed (tokens/s) on this machine, the median of 3 runs after a warm-up.",
        "",
    ]
    if report.get("plot"):
        out.append(f"![size vs quality]({report['plot']})")
    if report.get("cdf_plot"):
        out += ["", f"![KLD distributions]({report['cdf_plot']})"]
    out += _most_hurt_md(report.get("most_hurt"))
    return "\n".join(out) + "\n"


def kld_text(st: dict) -> str:
    """The statistics as llama-perplexity --kl-divergence prints them; [± …] is the per-window error."""

    def est(e, scale=1.0, fmt="{:10.6f}"):
        return (
            f"{fmt.format(scale * e['value'])} ± {fmt.format(scale * e['se']).strip()}  [± {fmt.format(scale * e['se_window']).strip()} per window]"
        )

    k, dp = st["kld"], st["dp"]
    lines = [
        "====== Perplexity statistics ======",
        f"Mean PPL(Q)                   : {est(st['ppl'])}",
        f"Mean PPL(base)                : {est(st['ppl_base'])}",
        f"Cor(ln(PPL(Q)), ln(PPL(base))): {100 * st['cor_ln_ppl']:6.2f}%  [{100 * st['cor_ln_ppl_window']:.2f}% of window means]",
        f"Mean ln(PPL(Q)/PPL(base))     : {est(st['ln_ppl_ratio'])}",
        f"Mean PPL(Q)/PPL(base)         : {est(st['ppl_ratio'])}",
        f"Mean PPL(Q)-PPL(base)         : {est(st['ppl_diff'])}",
        "",
        "====== KL divergence statistics ======",
        f"Mean    KLD: {est(k)}",
        f"Maximum KLD: {k['max']:10.6f}",
    ]
    lines += [f"{q:<5}   KLD: {k['p' + q[:-1]]:10.6f}" for q in ("99.9%", "99%", "95%", "90%")]
    lines += [f"Median  KLD: {k['median']:10.6f}"] + [f"{q:<5}   KLD: {k['p' + q[:-1]]:10.6f}" for q in ("10%", "5%", "1%", "0.1%")]
    lines += [
        f"Minimum KLD: {k['min']:10.6f}",
        "",
        "====== Token probability statistics ======",
        f"Mean    Δp: {est(dp, 100, '{:6.3f}')} %",
        f"Maximum Δp: {100 * dp['max']:6.3f}%",
    ]
    lines += [f"{q:<5}   Δp: {100 * dp['p' + q[:-1]]:6.3f}%" for q in ("99.9%", "99%", "95%", "90%", "75%")]
    lines += [f"Median  Δp: {100 * dp['median']:6.3f}%"]
    lines += [f"{q:<5}   Δp: {100 * dp['p' + q[:-1]]:6.3f}%" for q in ("25%", "10%", "5%", "1%", "0.1%")]
    lines += [
        f"Minimum Δp: {100 * dp['min']:6.3f}%",
        f"RMS Δp    : {est(st['rms_dp'], 100, '{:6.3f}')} %",
        f"Same top p: {est(st['same_top'], 100, '{:6.3f}')} %",
        f"({st['tokens']} tokens in {st['windows']} windows; ± per token as llama-perplexity, [± per window] from window means)",
    ]
    return "\n".join(lines)


def has_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _series(rows: list[ReportRow]) -> dict[str, list[ReportRow]]:
    """Rows grouped as they are drawn: stock types, each kind of variant (-mix, -opt, -opt-mix), and
    the files given with --add."""
    names = {"": "stock", "-mix": "sensitivity mix", "-opt": "optimised rounding", "-opt-mix": "optimised + mix"}
    out: dict[str, list[ReportRow]] = {}
    for r in rows:
        suffix = next((s for s in VARIANT_SUFFIXES if stock_of(r.type) and r.type.endswith(s)), "")
        out.setdefault("files given with --add" if r.added else names[suffix], []).append(r)
    return out


def plot(report: dict, path: Path) -> Path | None:
    """Bits per weight vs Δppl and vs KLD (log), one series per kind of file (stock, mix, opt,
    opt-mix: the frontier each reaches), each type labelled, with 95 % error bars (per-window
    errors). Needs matplotlib (installed with neoxq[convert])."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in rows_of(report) if r.kld_mean is not None and r.bpw is not None]
    series = _series(rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "dppl_pct", "Δ perplexity vs reference (%)"), (axes[1], "kld_mean", "mean KL divergence vs reference")):
        for (name, rs), style in zip(series.items(), ("o-", "s--", "^-.", "d:", "x")):
            rs = sorted(rs, key=lambda r: r.size_bytes)
            xs = [r.bpw for r in rs]
            ys = [max(getattr(r, key), 1e-6) if key == "kld_mean" else getattr(r, key) for r in rs]
            err = [1.96 * (getattr(r, WITH_SE[key][0]) or 0.0) for r in rs]
            if key == "kld_mean":  # a log axis: clip the lower bar above 0
                err = [[min(e, 0.999 * y) for e, y in zip(err, ys)], err]
            ax.errorbar(xs, ys, yerr=err, fmt=style, capsize=3, label=name)
            for x, y, r in zip(xs, ys, rs):
                ax.annotate(r.type, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if key == "kld_mean":
            ax.set_yscale("log")
        if len(series) > 1:
            ax.legend(fontsize=8)
        ax.set_xlabel("bits per weight")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"{report['source']['name']}: size vs quality ({report['text']['tokens_scored']} tokens, ctx {report['text']['ctx']}; "
        "bars: 95 % from per-window errors)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path


def cdf_plot(report: dict, folder: Path, path: Path) -> Path | None:
    """Each row's per-token KLD distribution as a CDF on a log axis, from its per-token file."""
    rows = [r for r in rows_of(report) if r.tokens]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in sorted(rows, key=lambda r: -r.kld_mean):
        kl = np.sort(np.maximum(load_scores(folder / r.tokens["file"]).kld, 1e-9))
        ax.plot(kl, np.arange(1, len(kl) + 1) / len(kl), "--" if stock_of(r.type) else "-", label=r.type, lw=1.2)
    ax.set_xscale("log")
    ax.set_xlabel("per-token KL divergence vs reference (log; values below 1e-9 drawn at 1e-9)")
    ax.set_ylabel("share of scored tokens ≤ x")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.suptitle(f"{report['source']['name']}: KLD distribution per file ({report['text']['tokens_scored']} tokens)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path


def render(report_json: Path) -> tuple[Path, Path | None]:
    """report.json → report.md (+ report.png and report-kld-cdf.png beside it)."""
    return render_report(json.loads(Path(report_json).read_text()), Path(report_json).parent)


def render_report(report: dict, folder: Path) -> tuple[Path, Path | None]:
    """A report's Markdown and plots into `folder` (the report writes report.json after them, so a
    report.json on disk always has its renderings beside it)."""
    report = dict(report)
    png, cdf = folder / "report.png", folder / "report-kld-cdf.png"
    made = has_matplotlib()
    report["plot"] = report["cdf_plot"] = None
    if made:
        with atomic_output(png, force=True) as tmp:
            plot(report, tmp)
        report["plot"] = png.name
        if any(r.tokens for r in rows_of(report)):
            with atomic_output(cdf, force=True) as tmp:
                report["cdf_plot"] = cdf.name if cdf_plot(report, folder, tmp) else None
    md = folder / "report.md"
    with atomic_output(md, force=True) as tmp:
        tmp.write_text(markdown(report))
    return md, png if made else None


# Sweeps -------------------------------------------------------------------------------------------


def _sweep_series(data: dict) -> dict[str, list[tuple[int, ReportRow, dict]]]:
    """type → [(step, row, revision)] over revisions with a step, in step order."""
    out: dict[str, list] = {}
    for rev in sorted((r for r in data["revisions"] if r["step"] is not None), key=lambda r: r["step"]):
        for row in rows_of(rev):
            out.setdefault(row.type, []).append((rev["step"], row, rev))
    return out


def sweep_markdown(data: dict) -> str:
    out = [
        f"# Quantization across training: {data['repo']}",
        "",
        f"- Text sha256 `{data['text']['sha256']}`, {data['text']['tokens_scored']} tokens scored, context {data['text']['ctx']}",
        "- Each revision scored against its own fp32 transformers reference on the same windows; revisions whose "
        "weights equal an earlier one's (same sha256) are marked and not recomputed.",
        "",
    ]
    dups = [r for r in data["revisions"] if r["duplicate_of"]]
    if dups:
        out += ["Duplicates: " + ", ".join(f"`{r['revision']}` = `{r['duplicate_of']}`" for r in dups), ""]
    for qtype, points in _sweep_series(data).items():
        out += [f"## {qtype}", "", "| step | revision | ref. ppl | KLD mean ± se | Δppl % ± se | top-1 % |", "|---:|---|---:|---:|---:|---:|"]
        for step, row, rev in points:
            ref = rev["reference"] or {}
            dup = f" (= {rev['duplicate_of']})" if rev["duplicate_of"] else ""
            out.append(
                f"| {step} | {rev['revision']}{dup} | {ref.get('ppl', 0):.3f} | {_cell(row, 'kld_mean', '{:.5f}')} | "
                f"{_cell(row, 'dppl_pct', '{:+.2f}')} | {100 * row.top1:.2f} |"
            )
        out.append("")
    out.append("± is the standard error from per-window means (the tokens of one window are correlated); sweep.png draws 95 % bands from it.")
    return "\n".join(out) + "\n"


def sweep_plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = _sweep_series(data)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for qtype, points in series.items():
        xs = [max(s, 1) for s, _, _ in points]  # step 0 drawn at 1 on the log axis
        for ax, key, floor in ((axes[0], "kld_mean", 1e-7), (axes[1], "dppl_pct", None)):
            ys = np.array([getattr(r, key) if floor is None else max(getattr(r, key), floor) for _, r, _ in points])
            err = np.array([1.96 * (getattr(r, WITH_SE[key][0]) or 0.0) for _, r, _ in points])
            (line,) = ax.plot(xs, ys, "o-", label=qtype)
            lo = ys - err if floor is None else np.maximum(ys - err, floor)
            ax.fill_between(xs, lo, ys + err, color=line.get_color(), alpha=0.2, lw=0)
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
