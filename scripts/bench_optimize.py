#!/usr/bin/env python3
"""`neoxq quantize --optimize` side by side with llama.cpp's stock files and Intel's AutoRound, in one
run: same model, calibration text, types and scored windows.

Per model and type, the files compared (every one scored against the model's F16 GGUF on held-out
windows the calibration text does not overlap; KLD ± its per-window error; ratios to stock paired on
the same tokens with a 95 % interval):
  stock        llama.cpp's quantizer, no imatrix (types llama.cpp refuses without one, Q2_K_S and
               IQ3_XXS and below: the imatrix file)
  stock+im     llama.cpp's quantizer with an imatrix from the calibration text (`neoxq imatrix`)
  opt          `neoxq quantize --optimize --calib` (imatrix from the same calibration pass)
  mix          `neoxq quantize --mix --calib` (measured per-tensor types, imatrix from the calibration text)
  opt-mix      `neoxq quantize --optimize --mix --calib`: the mix's types, levels optimised
  ar0, ar200   AutoRound `--format gguf:<type> --iters 0|200` on the same calibration text
  ar-alg       AutoRound `--iters 200 --enable_alg_ext` (its stronger algorithm extension)
  ar-best      AutoRound's `auto-round-best` recipe (1000 iterations) on the same samples
               (--ar-modes picks the AutoRound files; default ar0,ar200)
With --other-domain every file is also scored on Python's reference manual (benchlib.manual_text),
a domain neither the model nor the calibration text saw: the `… other` columns.
AutoRound runs in its own venv in the benchmark cache (torch CPU, auto-round, gguf), with three
patches applied here, not in neoxq: its GPT-NeoX converter reads `rotary_pct`, which transformers 5
configs no longer carry; it takes transformers 5's `lm_head` for tied when the checkpoint names it
`embed_out` and drops output.weight; and it refuses a BPE pre-tokenizer it does not know by hash (the
benchmark models' tokenizers are trained here with GPT-NeoX-20B's pre-tokenizer: "olmo" to llama.cpp).
Where AutoRound fails, its exact error is printed.

    .venv/bin/python scripts/bench_optimize.py [--models 31m,demo,70m] [--types Q4_K_M,Q3_K_M,Q2_K_S,Q5_K_M,Q6_K]
                                               [--no-autoround] [--ar-modes ar0,ar200,ar-alg,ar-best] [--other-domain]
                                               [--no-mix] [--remake opt,opt-mix] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
from neoxq.core.qtypes import QuantType  # noqa: E402

PY = sys.executable
CTX = 512
CALIB_CHARS = 60_000
AR_PATCHES = [  # (file under auto_round/, old, new)
    (
        "export/export_to_gguf/conversion/gptneox.py",
        'self.hparams["rotary_pct"]',
        'self.hparams.get("rotary_pct", (self.hparams.get("rope_parameters") or {}).get("partial_rotary_factor", '
        'self.hparams.get("partial_rotary_factor", 1.0)))',
    ),
    (
        "utils/model.py",
        'return tensor_name in index_mapping["weight_map"]',
        'return tensor_name in index_mapping["weight_map"] or (tensor_name == "lm_head.weight" and "embed_out.weight" in index_mapping["weight_map"])',
    ),
    (
        "utils/model.py",
        "return tensor_name in f.keys()\n",
        'return tensor_name in f.keys() or (tensor_name == "lm_head.weight" and "embed_out.weight" in f.keys())\n',
    ),
    (
        "export/export_to_gguf/conversion/base.py",
        'raise NotImplementedError("BPE pre-tokenizer was not recognized - update get_vocab_base_pre()")',
        'res = "olmo"  # neoxq benchmark patch: a BPE trained with GPT-NeoX-20B\'s pre-tokenizer',
    ),
]


def autoround_venv() -> Path:
    """The venv's python, made and patched on first use."""
    venv = benchlib.cache_dir() / "autoround-venv"
    py = venv / "bin" / "python"
    if not (venv / "bin" / "auto-round").is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([py, "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
        subprocess.run([py, "-m", "pip", "install", "-q", "auto-round", "gguf"], check=True)
    site = Path(
        subprocess.run(
            [py, "-c", "import auto_round, os; print(os.path.dirname(auto_round.__file__))"], capture_output=True, text=True, check=True
        ).stdout.strip()
    )
    for rel, old, new in AR_PATCHES:
        f = site / rel
        s = f.read_text()
        if new not in s:
            if old not in s:
                raise SystemExit(f"AutoRound changed: cannot apply the patch to {rel} ({old[:40]}…)")
            f.write_text(s.replace(old, new))
    return venv / "bin" / "auto-round"


def models(names: list[str]) -> dict[str, tuple[Path, str]]:
    """name → (checkpoint, held-out text)."""
    out = {}
    for name in names:
        if name == "demo":
            from neoxq.demo import build_demo_model

            out[name] = build_demo_model(benchlib.cache_dir() / "demo-model")
        else:
            out[name] = (benchlib.trained_50k(shape=None if name == "31m" else name), benchlib.eval_text().read_text(encoding="utf-8"))
    return out


def make_stock(f16: Path, qtype: str, out: Path, imatrix: Path | None) -> dict:
    cmd = [PY, "-m", "neoxq", "quantize", f16, "--type", qtype, "-o", out, "--force", "--quiet"] + (["--imatrix", imatrix] if imatrix else [])
    return benchlib.run_child(cmd)


def neoxq_quantize(f16: Path, qtype: str, out: Path, ckpt: Path, calib: Path, *flags: str, cache: Path | None = None) -> dict:
    """`neoxq quantize` with the calibration text and fp32 checkpoint, in a child process (time, peak
    RSS); cache: neoxq's cache folder for it (NEOXQ_CACHE), so a run starts from nothing reused."""
    argv = [PY, "-m", "neoxq", "quantize", f16, "--type", qtype, "--calib", calib, "--reference", ckpt, "--ctx", CTX, "-o", out]
    return benchlib.run_child([*argv, "--force", "--quiet", *flags], env={"NEOXQ_CACHE": str(cache)} if cache else None)


def make_opt(f16: Path, qtype: str, out: Path, ckpt: Path, calib: Path, mix: bool = False, cache: Path | None = None) -> dict:
    return neoxq_quantize(f16, qtype, out, ckpt, calib, "--optimize", *(["--mix"] if mix else []), cache=cache)


def make_mix(f16: Path, qtype: str, out: Path, ckpt: Path, calib: Path, cache: Path | None = None) -> dict:
    """`--mix --calib`: the importance matrix from the calibration text (the default)."""
    return neoxq_quantize(f16, qtype, out, ckpt, calib, "--mix", cache=cache)


# AutoRound's modes: (its command, its arguments beyond the shared ones)
AR_MODES = {
    "ar0": ("auto-round", ["--iters", 0]),
    "ar200": ("auto-round", ["--iters", 200]),
    "ar-alg": ("auto-round", ["--iters", 200, "--enable_alg_ext"]),
    "ar-best": ("auto-round-best", []),
}


def make_autoround(ar: Path, ckpt: Path, qtype: str, mode: str, calib_jsonl: Path, n: int, work: Path) -> tuple[dict, Path | None]:
    import hashlib

    command, extra = AR_MODES[mode]
    tag = hashlib.sha256(calib_jsonl.read_bytes() + str(ckpt.resolve()).encode()).hexdigest()[:12]
    out_dir = work / f"{mode}-{qtype}-{tag}"  # reused only for the same checkpoint and calibration
    done = sorted(out_dir.rglob("*.gguf"))
    if done and (out_dir / "run.json").is_file():
        return json.loads((out_dir / "run.json").read_text()), done[-1]
    r = benchlib.run_child(
        [
            ar.parent / command,
            *extra,
            "--model",
            ckpt,
            "--format",
            f"gguf:{qtype.lower()}",
            "--dataset",
            calib_jsonl,
            "--seqlen",
            CTX,
            "--nsamples",
            n,
            "--device",
            "cpu",
            "--output_dir",
            out_dir,
        ],
        check=False,
    )
    files = sorted(out_dir.rglob("*.gguf"))
    if r["rc"] or not files:
        err = [line for line in (r["stderr"] + r["stdout"]).splitlines() if line.strip()][-3:]
        print(f"    AutoRound {mode} {qtype} failed (rc {r['rc']}): " + " | ".join(err))
        return r, None
    (out_dir / "run.json").write_text(json.dumps({"wall_s": r["wall_s"], "peak_rss_MiB": r["peak_rss_MiB"], "rc": 0}))
    return r, files[-1]


def score(path: Path, f16: Path, scored: str, cache: Path):
    from neoxq.runtime.model import NeoxModel, RuntimeOptions
    from neoxq.runtime.score import GGUFReference, kld

    with NeoxModel(path, RuntimeOptions(n_ctx=CTX, n_batch=CTX)) as m:
        return kld(m, GGUFReference(f16), scored, CTX, cache_dir=cache)


def _made(out: Path, make, again: bool) -> dict:
    """Make the file (its wall time and peak RSS kept beside it), or reuse it and its record."""
    record = out.with_name(out.name + ".run.json")
    if not again and out.is_file() and record.is_file():
        return json.loads(record.read_text())
    r = make(out)
    record.write_text(json.dumps({"wall_s": r["wall_s"], "peak_rss_MiB": r["peak_rss_MiB"]}))
    return r


@dataclass
class Setup:
    """What one run measures, per model."""

    types: list[str]
    ar_modes: list[str]  # AutoRound files (AR_MODES' names); empty: none
    mix: bool = True
    remake: set[str] | None = None  # remake these files, reuse the others (None: remake every file)
    other_domain: bool = False  # also score on the reference manual


def bench_model(name: str, ckpt: Path, heldout: str, setup: Setup) -> list[dict]:
    work = benchlib.cache_dir() / "optimize-work" / name
    work.mkdir(parents=True, exist_ok=True)
    calib, scored = heldout[:CALIB_CHARS], heldout[CALIB_CHARS + 20_000 :]
    (work / "calib.txt").write_text(calib, encoding="utf-8")
    chunk = max(len(calib) // 24, 1)
    with open(work / "calib.jsonl", "w", encoding="utf-8") as f:
        for i in range(0, len(calib), chunk):
            f.write(json.dumps({"text": calib[i : i + chunk]}) + "\n")
    f16 = benchlib.convert_f16(ckpt, work)
    im = work / "calib.imatrix"
    if not im.is_file():
        benchlib.run_child([PY, "-m", "neoxq", "imatrix", ckpt, "--text", work / "calib.txt", "--ctx", CTX, "--include-output", "-o", im])
    ar = autoround_venv() if setup.ar_modes else None
    # neoxq's own cache for this run, empty at its start: the first opt file of the model makes the
    # calibration pass and the mix sensitivities, the later ones reuse them, as in one user's session
    cache = work / "neoxq-cache"
    shutil.rmtree(cache, ignore_errors=True)
    other = benchlib.manual_text()[-120_000:] if setup.other_domain else None
    rows = []
    for qtype in setup.types:
        print(f"\n{name} {qtype}:")
        recipes = {
            "stock": (f"{qtype}.gguf", lambda o: make_stock(f16, qtype, o, im if QuantType(qtype).needs_imatrix else None)),
            "stock+im": (f"{qtype}-im.gguf", lambda o: make_stock(f16, qtype, o, im)),
            "opt": (f"{qtype}-opt.gguf", lambda o: make_opt(f16, qtype, o, ckpt, work / "calib.txt", cache=cache)),
        }
        if setup.mix:
            recipes.update(
                {
                    "mix": (f"{qtype}-mix.gguf", lambda o: make_mix(f16, qtype, o, ckpt, work / "calib.txt", cache=cache)),
                    "opt-mix": (f"{qtype}-opt-mix.gguf", lambda o: make_opt(f16, qtype, o, ckpt, work / "calib.txt", mix=True, cache=cache)),
                }
            )
        made, paths = {}, {}
        for kind, (fname, make) in recipes.items():
            paths[kind] = work / fname
            made[kind] = _made(paths[kind], make, setup.remake is None or kind in setup.remake)
        for mode in setup.ar_modes:
            made[mode], p = make_autoround(ar, ckpt, qtype, mode, work / "calib.jsonl", 24, work)
            if p:
                paths[mode] = p
        scores = {k: score(p, f16, scored, work / "cache") for k, p in paths.items()}
        others = {k: score(p, f16, other, work / "cache-other") for k, p in paths.items()} if other else {}
        for k in scores:
            rows.append(_row(name, qtype, k, paths[k], made[k], scores, others))
            print(_line(rows[-1]))
    return rows


def _row(name: str, qtype: str, k: str, path: Path, made: dict, scores: dict, others: dict) -> dict:
    """One file's row: its KLD and its paired ratios to stock (and, for opt, to stock + imatrix, to
    AutoRound 200 and to AutoRound's best mode here; for opt-mix, to the mix), on the training
    domain and, when scored there, on the other domain."""
    from neoxq.core.stats import compare

    def ratio(to: str, where: dict) -> dict | None:
        return compare(where[k].tokens, where[to].tokens)["kld"] if to in where and to != k else None

    ar = [m for m in AR_MODES if m in scores]
    best_ar = min(ar, key=lambda m: scores[m].kld_mean) if ar else None
    s = scores[k]
    return {
        "model": name,
        "type": qtype,
        "file": k,
        "size_bytes": path.stat().st_size,
        "kld": s.kld_mean,
        "kld_se_window": s.stats["kld"]["se_window"],
        "top1": s.top1,
        "seconds": made["wall_s"],
        "peak_rss_MiB": made["peak_rss_MiB"],
        "vs_stock": ratio("stock", scores),
        "vs_ar200": ratio("ar200", scores) if k == "opt" else None,
        "best_ar": best_ar,
        "vs_best_ar": ratio(best_ar, scores) if k == "opt" and best_ar else None,
        "vs_mix": ratio("mix", scores) if k == "opt-mix" else None,
        "vs_stock_im": ratio("stock+im", scores) if k in ("opt", "opt-mix") else None,
        "kld_other": others[k].kld_mean if others else None,
        "vs_stock_other": ratio("stock", others) if others else None,
        "vs_stock_im_other": ratio("stock+im", others) if others and k in ("opt", "opt-mix") else None,
        "vs_best_ar_other": ratio(best_ar, others) if others and k == "opt" and best_ar else None,
    }


def _line(r: dict) -> str:
    vs = r["vs_stock"]
    rel = f"{vs['ratio']:.3f}× [{vs['ci95'][0]:.3f}, {vs['ci95'][1]:.3f}]" if vs else "1 (baseline)"
    ar_s = "".join(
        f"  vs {name} {x['ratio']:.3f}× [{x['ci95'][0]:.3f}, {x['ci95'][1]:.3f}] {x['verdict']}"
        for name, x in (("ar200", r["vs_ar200"]), ("mix", r.get("vs_mix")))
        if x
    )
    from neoxq.render import value_pm

    return (
        f"  {r['file']:<9} {r['size_bytes'] / 1e6:8.3f} MB  KLD {value_pm(r['kld'], r['kld_se_window']):<22}  vs stock {rel:<26} "
        f"top-1 {100 * r['top1']:.2f} %  {r['seconds']:6.1f} s  {r['peak_rss_MiB']:6.0f} MiB{ar_s}"
    )


def markdown(data: dict | list) -> str:
    """docs/benchmarks.md's table per model: KLD of stock, then every file's ratio to stock, and opt's
    ratio to stock + imatrix and AutoRound 200 (opt-mix's to the mix), each with its paired 95 %
    interval; a column no row of the model has is left out. `data`: a run record
    (benchlib.run_record) or an older run's bare list of rows."""
    rows = data["rows"] if isinstance(data, dict) else data
    ratio = benchlib.ratio_cell

    def opt_time(by):
        return f"{by['opt']['seconds']:.0f} / {by['ar200']['seconds']:.0f}" if "opt" in by and "ar200" in by else "–"

    def best_ar(by, key="vs_best_ar"):
        x = by.get("opt", {})
        return f"{ratio(x.get(key))} ({x['best_ar']})" if x.get(key) else "–"

    files = ("stock+im", "mix", *AR_MODES, "opt", "opt-mix")
    columns = [(f, lambda by, f=f: ratio(by[f]["vs_stock"]) if f in by else "–") for f in files]
    columns += [
        ("opt vs stock+im", lambda by: ratio(by.get("opt", {}).get("vs_stock_im"))),
        ("opt vs AutoRound 200", lambda by: ratio(by.get("opt", {}).get("vs_ar200"))),
        ("opt vs AutoRound's best here", best_ar),
        ("opt-mix vs mix", lambda by: ratio(by.get("opt-mix", {}).get("vs_mix"))),
        ("opt s / AR200 s", opt_time),
    ]
    columns += [(f"{f}, other domain", lambda by, f=f: ratio(by[f].get("vs_stock_other")) if f in by else "–") for f in files]
    columns += [
        ("opt vs stock+im, other domain", lambda by: ratio(by.get("opt", {}).get("vs_stock_im_other"))),
        ("opt vs AutoRound's best, other domain", lambda by: best_ar(by, "vs_best_ar_other")),
    ]
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        groups = [
            {r["file"]: r for r in rows if r["model"] == model and r["type"] == t}
            for t in dict.fromkeys(r["type"] for r in rows if r["model"] == model)
        ]
        cells = [[cell(by) for _, cell in columns] for by in groups]
        keep = [i for i in range(len(columns)) if any(row[i] != "–" for row in cells)]
        out += [
            f"\n{model}:\n",
            "| type | stock KLD | " + " | ".join(columns[i][0] for i in keep) + " |",
            "|---|---:|" + "---:|" * len(keep),
        ]
        for by, row in zip(groups, cells):
            out.append(f"| {by['stock']['type']} | {by['stock']['kld']:.3g} | " + " | ".join(row[i] for i in keep) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="31m,demo,70m")
    ap.add_argument("--types", default="Q4_K_M,Q3_K_M,Q2_K_S,Q5_K_M,Q6_K")
    ap.add_argument("--no-autoround", action="store_true")
    ap.add_argument("--ar-modes", default="ar0,ar200", help=f"AutoRound files to make: some of {', '.join(AR_MODES)}")
    ap.add_argument("--other-domain", action="store_true", help="also score every file on Python's reference manual")
    ap.add_argument("--remake", help="rebuild only these files (e.g. opt,opt-mix) and reuse the others this benchmark made before")
    ap.add_argument("--no-mix", action="store_true", help="skip the mix and opt-mix files (each measures ~60 sensitivity probes)")
    benchlib.add_record_args(ap)
    a = ap.parse_args()
    if benchlib.printed_earlier(a, markdown):
        return
    modes = [] if a.no_autoround else a.ar_modes.split(",")
    unknown = set(modes) - set(AR_MODES)
    if unknown:
        raise SystemExit(f"--ar-modes: {', '.join(sorted(unknown))} unknown; pass some of {', '.join(AR_MODES)}")
    setup = Setup(a.types.split(","), modes, not a.no_mix, set(a.remake.split(",")) if a.remake else None, a.other_domain)
    t0 = time.time()
    data = benchlib.run_record(sys.argv)
    for name, (ckpt, heldout) in models(a.models.split(",")).items():
        data["rows"] += bench_model(name, ckpt, heldout, setup)
        if a.json:
            benchlib.write_record(a.json, data)
    print(markdown(data))
    print(f"\n{len(data['rows'])} files scored in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    from neoxq.core.machine import init_process

    init_process()  # as the CLI does: before llama.cpp loads
    main()
