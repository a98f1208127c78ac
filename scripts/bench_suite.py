#!/usr/bin/env python3
"""The test suite's time on a fresh clone, as a newcomer meets it: `make venv` (pip's cache as this
machine has it), `make lint`, `make test` and `make test-fast`, each timed in a clone of HEAD,
with pytest's own counts and its fifteen slowest tests (`make test` prints them).

    .venv/bin/python scripts/bench_suite.py --json docs/bench/suite.json

Run it on an otherwise idle machine: the suite uses every core, and so does anything beside it.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ("venv", "lint", "test", "test-fast")
SUMMARY = re.compile(r"=+ (?P<body>.*?) in (?P<secs>[\d.]+)s")
SLOW = re.compile(r"^(?P<secs>[\d.]+)s (?P<phase>call|setup|teardown)\s+(?P<test>\S+)$", re.M)


def pytest_summary(output: str) -> dict:
    """pytest's last summary line as counts ({"passed": 606, "skipped": 2, …}) and its own clock."""
    found = SUMMARY.findall(output)
    if not found:
        return {}
    body, secs = found[-1]
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", body)}
    return {"counts": counts, "pytest_s": float(secs)}


def slowest(output: str) -> list[dict]:
    return [{"test": m["test"], "phase": m["phase"], "seconds": float(m["secs"])} for m in SLOW.finditer(output)]


def timed_make(clone: Path, target: str) -> tuple[dict, str]:
    start = time.monotonic()
    proc = subprocess.run(["make", target], cwd=clone, capture_output=True, text=True)
    row = {"target": target, "seconds": round(time.monotonic() - start, 1), "exit": proc.returncode}
    return row | pytest_summary(proc.stdout), proc.stdout + proc.stderr


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)} m {seconds % 60:.0f} s" if seconds >= 60 else f"{seconds:.1f} s"


def markdown(data: dict) -> str:
    lines = ["| `make` target | exit | wall time | pytest's clock | tests |", "|---|---:|---:|---:|---|"]
    for r in data["rows"]:
        counts = ", ".join(f"{n} {w}" for w, n in r.get("counts", {}).items()) or "–"
        clock = _clock(r["pytest_s"]) if "pytest_s" in r else "–"
        lines.append(f"| `make {r['target']}` | {r['exit']} | {_clock(r['seconds'])} | {clock} | {counts} |")
    total = sum(r["seconds"] for r in data["rows"] if r["target"] in ("venv", "test"))
    lines += ["", f"`make test` on a fresh clone, its venv included: **{_clock(total)}**.", ""]
    lines += ["The slowest tests in `make test`:", "", "| seconds | phase | test |", "|---:|---|---|"]
    lines += [f"| {s['seconds']:.1f} | {s['phase']} | `{s['test']}` |" for s in data["slowest"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    benchlib.add_record_args(ap)
    a = ap.parse_args()
    if benchlib.printed_earlier(a, markdown):
        return
    data = benchlib.run_record(sys.argv) | {"slowest": []}
    with tempfile.TemporaryDirectory(prefix="neoxq-suite-") as tmp:
        clone = Path(tmp) / "neoxq"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        for target in TARGETS:
            row, output = timed_make(clone, target)
            data["rows"].append(row)
            if target == "test":
                data["slowest"] = slowest(output)
            print(f"make {target}: {row}", file=sys.stderr)
    print(markdown(data))
    if a.json:
        benchlib.write_record(a.json, data)


if __name__ == "__main__":
    main()
