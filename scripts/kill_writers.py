#!/usr/bin/env python
"""Every writer killed with SIGKILL at random points: convert, quantize, imatrix,
quantize --mix (with its sensitivity and reference caches), report and sweep.

For each writer: one clean run gives the reference result and its duration T. Then, at each of
--points random moments in (0, T), the command is started again and its whole process group
SIGKILLed. After each kill the output must be the previous valid artifact (odd points start with
one in place, written by the run before) or nothing (even points start without), never a partial
file; then the command is rerun to completion and must give the reference result exactly (files
byte for byte; a report's or sweep's numbers, its speed and timing fields aside) with no `.partial`
or `.lock` file left. Caches (reference tables, mix sensitivities) are shared across all points, so
a cache entry a kill cut short would show up as a different result.

    python scripts/kill_writers.py [--points 20] [--only convert,quantize] [--seed 0] [--json OUT]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = "neoxq-test/tiny-run"


@dataclass
class Writer:
    name: str
    argv: list[str]
    output: Path  # a file, or the folder a report/sweep writes
    kind: str  # "file" | "report" | "sweep"


def build(d: Path) -> tuple[list[Writer], dict]:
    """A tiny random checkpoint, a hub cache of a two-step training run, texts; the writers."""
    from neoxq.convert.converter import convert
    from neoxq.convert.hubcache import write_snapshot
    from neoxq.convert.tiny import TinySpec, build_random, build_training_run, stdlib_text

    corpus = stdlib_text(80_000)
    # small shapes: each kill point reruns the writer, so its run time is the script's
    spec = TinySpec(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, scale=1.0, vocab_pad=0, max_position_embeddings=128
    )
    ck = build_random(d / "ckpt", spec, corpus)
    f16 = convert(str(ck), "f16", output=d / "in-F16.gguf")
    # convert and quantize finish in a blink on that: a wider model, so kills land while they write
    wide = TinySpec(
        hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=2048, scale=1.0, vocab_pad=0, max_position_embeddings=128
    )
    big = build_random(d / "big", wide, corpus)
    big_f16 = convert(str(big), "f16", output=d / "big-F16.gguf")
    text = d / "t.txt"
    text.write_text(corpus[:24_000])
    saved = build_training_run(d / "run", spec, corpus[:60_000], [0, 10])
    for step, folder in saved.items():
        write_snapshot(d / "hub", REPO, f"step{step}", folder)
    out = d / "out"
    env = {"NEOXQ_CACHE": str(d / "cache"), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(d / "hub"), "HF_HOME": str(d / "hfhome")}
    q = ["--quiet", "--force"]
    writers = [
        Writer("convert", ["convert", str(big), "-o", str(out / "c-F16.gguf"), *q], out / "c-F16.gguf", "file"),
        Writer("quantize", ["quantize", str(big_f16), "--type", "Q4_K_M", "-o", str(out / "q.gguf"), *q], out / "q.gguf", "file"),
        Writer("imatrix", ["imatrix", str(ck), "--text", str(text), "--ctx", "64", "-o", str(out / "m.imatrix"), *q], out / "m.imatrix", "file"),
        Writer(
            "mix",
            [
                "quantize",
                str(f16),
                "--type",
                "Q4_K_M",
                "--mix",
                "--calib",
                str(text),
                "--imatrix",
                "none",
                "--ctx",
                "64",
                "-o",
                str(out / "mix.gguf"),
                *q,
            ],
            out / "mix.gguf",
            "file",
        ),
        Writer(
            "report",
            ["report", str(ck), "--text", str(text), "--ctx", "64", "--types", "F16,Q4_0", "--imatrix", "none", "-o", str(out / "rep"), "--quiet"],
            out / "rep",
            "report",
        ),
        Writer(
            "sweep",
            [
                "sweep",
                REPO,
                "--revisions",
                "step0,step10",
                "--text",
                str(text),
                "--ctx",
                "64",
                "--types",
                "Q8_0",
                "--imatrix",
                "none",
                "-o",
                str(out / "sw"),
                "--quiet",
            ],
            out / "sw",
            "sweep",
        ),
    ]
    naive = out / "naive.bin"  # the negative control: a writer that writes in place, not through a temporary file
    code = f"import time; f = open({str(naive)!r}, 'wb'); f.write(b'x' * 1000); f.flush(); time.sleep(1.0); f.write(b'y' * 1000)"
    writers.append(Writer("canary", ["-c", code], naive, "file"))
    return writers, env


def digest(w: Writer):
    """What must be identical: a file's bytes; a report's numbers; a sweep's numbers per revision
    (not speed or time fields)."""
    if w.kind == "file":
        return hashlib.sha256(w.output.read_bytes()).hexdigest() if w.output.exists() else None
    path = w.output / ("report.json" if w.kind == "report" else "sweep.json")
    if not path.exists():
        return None
    data = json.loads(path.read_text())  # a partial JSON would raise here: a finding
    keep = ("type", "sha256", "ppl", "kld_mean", "kld_p99", "top1", "dppl_pct")

    def rows(rs):
        return hashlib.sha256(json.dumps([{k: r.get(k) for k in keep} for r in rs], sort_keys=True).encode()).hexdigest()

    if w.kind == "report":
        return rows(data["results"])
    return {rev["revision"]: rows(rev["results"]) for rev in data["revisions"]}


def acceptable(w: Writer, after, ref, had: bool) -> bool:
    """After a kill: the previous artifact, or (starting without one) nothing or the complete one. A
    sweep writes sweep.json after each revision, so there a valid file holding some of the
    revisions, each with the complete run's numbers, is the state a kill may leave."""
    if after == ref or (after is None and not had):
        return True
    return w.kind == "sweep" and isinstance(after, dict) and all(ref.get(k) == v for k, v in after.items())


def debris(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name.endswith((".partial", ".lock")))


def start(w: Writer, env: dict, cwd: Path) -> subprocess.Popen:
    cmd = [sys.executable, *w.argv] if w.name == "canary" else [sys.executable, "-m", "neoxq", *w.argv]
    return subprocess.Popen(cmd, env={**os.environ, **env}, cwd=cwd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def complete(w: Writer, env: dict, cwd: Path) -> float:
    t0 = time.perf_counter()
    p = start(w, env, cwd)
    _, err = p.communicate(timeout=1800)
    if p.returncode != 0:
        raise SystemExit(f"{w.name}: the clean run failed: {err.decode()[-400:]}")
    return time.perf_counter() - t0


def remove(w: Writer) -> None:
    if w.output.is_dir():
        shutil.rmtree(w.output)
    else:
        w.output.unlink(missing_ok=True)


def check_writer(w: Writer, env: dict, d: Path, points: int, rng: random.Random) -> dict:
    remove(w)
    seconds = complete(w, env, d)
    ref = digest(w)
    problems, killed_at, mid_write = [], [], 0
    for k in range(points):
        had = k % 2 == 1  # odd points: the previous artifact is in place
        if not had:
            remove(w)
        at = rng.uniform(0.02, 1.0) * seconds
        p = start(w, env, d)
        time.sleep(at)
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # it finished first: also a valid state
        p.wait()
        killed_at.append(round(at, 2))
        mid_write += bool(debris(w.output.parent if w.kind == "file" else w.output))  # a temporary file in place: killed while writing
        try:
            after = digest(w)
        except (ValueError, KeyError) as exc:
            problems.append(f"point {k} ({at:.2f} s): unreadable output after the kill ({exc})")
            after = "unreadable"
        if not acceptable(w, after, ref, had):
            problems.append(
                f"point {k} ({at:.2f} s): after the kill the output is neither {'the previous artifact' if had else 'absent nor complete'}"
            )
        complete(w, env, d)
        if digest(w) != ref:
            problems.append(f"point {k} ({at:.2f} s): the rerun differs from the clean run")
        left = debris(w.output.parent if w.kind == "file" else w.output)
        if left:
            problems.append(f"point {k} ({at:.2f} s): the rerun left {left}")
    return {
        "writer": w.name,
        "seconds": round(seconds, 1),
        "points": points,
        "killed_at_s": killed_at,
        "killed_mid_write": mid_write,
        "problems": problems,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=20)
    ap.add_argument("--only", help="comma-separated writers (convert, quantize, imatrix, mix, report, sweep; canary: the negative control)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    results = []
    with tempfile.TemporaryDirectory(prefix="neoxq-kill-") as tmp:
        d = Path(tmp)
        writers, env = build(d)
        (d / "out").mkdir()
        wanted = set(a.only.split(",")) if a.only else None
        for w in writers:
            if (wanted and w.name not in wanted) or (w.name == "canary" and not (wanted and "canary" in wanted)):
                continue
            r = check_writer(w, env, d, a.points, rng)
            results.append(r)
            print(
                f"{w.name:9} clean run {r['seconds']:6.1f} s, {r['points']} SIGKILLs ({r['killed_mid_write']} while a temporary file was open): "
                + ("all clean" if not r["problems"] else "\n  " + "\n  ".join(r["problems"])),
                flush=True,
            )
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    return 1 if any(r["problems"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
