#!/usr/bin/env python3
"""lm-eval scoring time: `neoxq eval` with the choices after one context batched (the default)
against `--unbatched` (each request alone), on a multiple-choice task, in one run.

The task is written here from held-out text in the shape of HellaSwag: a context of 60-120 tokens
and four endings of 8-30 words, one of them the real continuation. Each path is the whole command
(`neoxq eval FILE --tasks bench_mc --limit N`, model load and lm-eval included) in a child
process, taken in turn, median of --repeats; the accuracies must be identical. `--before REV` adds
the same command run by neoxq as it was at git revision REV (benchlib.package_at), the baseline
"today's time" of a change.

    .venv/bin/python scripts/bench_eval.py [--model 31m] [--type Q4_K_M] [--limit 200] [--repeats 3] [--before REV] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

PY = sys.executable
YAML = """task: bench_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def write_task(text: str, docs: int, folder: Path) -> Path:
    """`docs` questions: a context of 40-80 words, its real next 8-30 words and three spans from elsewhere."""
    rng = random.Random(0)
    words = text.split()
    items = []
    for _ in range(docs):
        at, n_ctx = rng.randrange(len(words) - 200), rng.randrange(40, 80)
        lengths = [rng.randrange(8, 30) for _ in range(4)]
        real = " " + " ".join(words[at + n_ctx : at + n_ctx + lengths[0]])
        others = [" " + " ".join(words[(j := rng.randrange(len(words) - 40)) : j + n]) for n in lengths[1:]]
        order = rng.sample(range(4), 4)
        choices = [real, *others]
        items.append({"context": " ".join(words[at : at + n_ctx]), "choices": [choices[k] for k in order], "label": order.index(0)})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench_mc.jsonl").write_text("\n".join(json.dumps(x) for x in items))
    (folder / "bench_mc.yaml").write_text(YAML.format(data=folder / "bench_mc.jsonl"))
    return folder


def run_eval(path: Path, tasks: Path, limit: int, flags: list[str], out: Path, package: Path | None = None) -> dict:
    neoxq = [PY, "-c", benchlib.BEFORE, package] if package else [PY, "-m", "neoxq"]
    t0 = time.perf_counter()
    benchlib.run_child([*neoxq, "eval", path, "--tasks", "bench_mc", "--include-path", tasks, "--limit", limit, *flags, "-o", out, "--quiet"])
    seconds = time.perf_counter() - t0
    results = json.loads(out.read_text())["models"][str(path)]["results"]["bench_mc"]
    return {"seconds": seconds, "acc": results["acc,none"], "acc_norm": results["acc_norm,none"]}


def markdown(data: dict) -> str:
    rows = data["rows"]
    base = rows[0]["seconds"]
    out = [f"| path | documents | seconds (median) | runs | acc | acc_norm | vs {rows[0]['path']} |", "|---|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        runs = ", ".join(f"{x:.1f}" for x in r["runs"])
        out.append(
            f"| {r['path']} | {r['documents']} | {r['seconds']:.1f} | {runs} | {r['acc']:.3f} | {r['acc_norm']:.3f} | {r['seconds'] / base:.2f}× |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    benchlib.add_model_args(ap)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--before", help="also run neoxq as it was at this git revision (the baseline row)")
    benchlib.add_record_args(ap)
    a = ap.parse_args()
    if benchlib.printed_earlier(a, markdown):
        return
    f16, path = benchlib.trained_quantized("eval-work", a.model, a.type)
    work = path.parent
    tasks = write_task(benchlib.eval_text().read_text(encoding="utf-8"), a.limit, work / "tasks")
    paths = {"unbatched": (["--unbatched"], None), "batched": (["--batched"], None)}
    if a.before:
        paths = {f"neoxq at {a.before}": ([], benchlib.package_at(a.before)), **paths}
    runs: dict[str, list[dict]] = {name: [] for name in paths}
    for i in range(a.repeats):
        for name, (flags, package) in paths.items():
            runs[name].append(run_eval(path, tasks, a.limit, flags, work / "out.json", package))
            print(f"run {i + 1}: {name:9} {runs[name][-1]['seconds']:.1f} s, acc {runs[name][-1]['acc']:.3f}", flush=True)
    accs = {(r["acc"], r["acc_norm"]) for rs in runs.values() for r in rs}
    if len(accs) != 1:
        raise SystemExit(f"the accuracies differ between the paths: {sorted(accs)}")
    data = benchlib.run_record(sys.argv)
    data["setup"] = {"model": a.model, "type": a.type, "limit": a.limit, "task": "4 choices, contexts of 40-80 words, endings of 8-30 words"}
    for name, rs in runs.items():
        secs = [r["seconds"] for r in rs]
        data["rows"].append(
            {"path": name, "documents": a.limit, "seconds": statistics.median(secs), "runs": secs, "acc": rs[0]["acc"], "acc_norm": rs[0]["acc_norm"]}
        )
    if a.json:
        benchlib.write_record(a.json, data)
    print(markdown(data))


if __name__ == "__main__":
    main()
