"""The cache: `neoxq cache list|prune`, what each entry is, least-recently-used
eviction under a size cap, and nothing a live run is working in ever removed. Fast: a cache built
by hand in neoxq's own layout, and real reference tables from a stand-in reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from .helpers import assert_one_line_error, run_cli


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _file(path, size: int, age_s: float = 0.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_bytes(b"\0" * size)
    when = time.time() - age_s
    os.utime(path, (when, when))
    return path


@pytest.fixture()
def root(tmp_path, monkeypatch):
    """reference/ (a 3-day-old table and a 1-hour-old one), mix/ (sensitivities; a live and a dead
    scratch folder), optimize/ (a live job and a killed one), bench/ (not neoxq's to prune)."""
    r = tmp_path / "cache"
    monkeypatch.setenv("NEOXQ_CACHE", str(r))
    monkeypatch.delenv("NEOXQ_CACHE_MAX_SIZE", raising=False)
    day = 86400
    for key, age in (("old", 3 * day), ("new", 3600)):
        (r / "reference").mkdir(parents=True, exist_ok=True)
        (r / "reference" / f"{key}.json").write_text(json.dumps({"reference": f"ref {key}", "ctx": 64, "top_k": 8, "tokens_scored": 10}))
        _file(r / "reference" / f"{key}.json", 0, age)
        for a in ("top_idx", "top_lp"):
            _file(r / "reference" / f"{key}.{a}.npy", 1000, age)
    (r / "mix").mkdir()
    (r / "mix" / "sensitivity-abc.json").write_text(json.dumps({"probes": 4, "tensors": {"a": {}, "b": {}}}))
    _file(r / "mix" / "sensitivity-abc.json", 0, 1.5 * day)
    _file(r / "mix" / f"neoxq-mix-{os.getpid()}-x1" / "model-00001-of-00002.gguf", 500, 5 * day)
    _file(r / "mix" / f"neoxq-mix-{_dead_pid()}-x2" / "model-00001-of-00002.gguf", 500, 5 * day)
    _file(r / "mix" / ".sensitivity-zzz.json.123.partial", 10)  # a writer's: never an entry
    for key, pid in (("live", os.getpid()), ("killed", _dead_pid())):
        job = r / "optimize" / key
        job.mkdir(parents=True)
        (job / "owner.pid").write_text(str(pid))
        (job / "state.json").write_text(json.dumps({"inputs": {"type": "Q4_K_M", "source": ["/m/model-F16.gguf", 1, 2]}, "layers_done": 3}))
        _file(job / "work.gguf", 4000, 10 * day)
        for f in ("state.json", "owner.pid"):
            _file(job / f, 0, 10 * day)
    _file(r / "bench" / "big.gguf", 10**5, 30 * day)
    return r


def _listed(root):
    proc = run_cli("cache", "list", "--json")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["root"] == str(root)
    return {e["key"]: e for e in got["entries"]}


def test_cache_list_names_every_entry_and_what_made_it(root):
    e = _listed(root)
    assert set(e) == {
        "old",
        "new",
        "sensitivity-abc",
        f"neoxq-mix-{os.getpid()}-x1",
        *[k for k in e if k.startswith("neoxq-mix-") and k.endswith("x2")],
        "live",
        "killed",
    }
    assert e["old"]["size_bytes"] == 2000 + len((root / "reference" / "old.json").read_bytes()) and e["old"]["kind"] == "reference"
    assert e["old"]["what"].startswith("reference table: ref old, ctx 64")
    assert e["sensitivity-abc"]["what"] == "mix sensitivities: 2 tensors, 4 probes"
    assert e["live"]["in_use"] and not e["killed"]["in_use"] and "Q4_K_M of model-F16.gguf: 3 layers done" in e["killed"]["what"]
    assert e[f"neoxq-mix-{os.getpid()}-x1"]["in_use"]
    assert [k for k, v in e.items() if v["what"] == "scratch left by a killed run"] != []
    order = list(e)
    assert order.index("killed") < order.index("old") < order.index("sensitivity-abc") < order.index("new")  # least recently used first
    table = run_cli("cache", "list")
    assert table.returncode == 0 and "reference" in table.stdout


def test_prune_older_than_max_size_and_all_never_touch_live_work(root):
    before = _listed(root)
    dry = json.loads(run_cli("cache", "prune", "--older-than", "2d", "--dry-run", "--json").stdout)
    assert {x["key"] for x in dry["removed"]} == {"old", "killed", *[k for k in before if k.endswith("x2")]} and dry["dry_run"]
    assert _listed(root).keys() == before.keys()  # a dry run removes nothing
    proc = run_cli("cache", "prune", "--older-than", "2d", "--quiet")
    assert proc.returncode == 0 and proc.stdout == ""
    after = _listed(root)
    assert set(before) - set(after) == {x["key"] for x in dry["removed"]}
    assert not (root / "reference" / "old.top_lp.npy").exists() and not (root / "optimize" / "killed").exists()
    # --max-size: least recently used first, until the rest fit
    sizes = {k: v["size_bytes"] for k, v in after.items()}
    cap = sizes["new"] + sizes["live"] + sizes[f"neoxq-mix-{os.getpid()}-x1"]
    gone = json.loads(run_cli("cache", "prune", "--max-size", f"{cap}B", "--json").stdout)["removed"]
    assert [x["key"] for x in gone] == ["sensitivity-abc"]
    left = json.loads(run_cli("cache", "prune", "--all", "--json").stdout)["removed"]
    assert [x["key"] for x in left] == ["new"]
    assert set(_listed(root)) == {"live", f"neoxq-mix-{os.getpid()}-x1"}  # live work is never removed
    assert (root / "bench" / "big.gguf").exists() and (root / "mix" / ".sensitivity-zzz.json.123.partial").exists()


def test_prune_bad_input_is_one_line(root):
    assert_one_line_error(run_cli("cache", "prune"), "--older-than", "--all")
    assert_one_line_error(run_cli("cache", "prune", "--older-than", "3 fortnights"), "--older-than", "30d")
    assert_one_line_error(run_cli("cache", "prune", "--max-size", "lots"), "--max-size")


class _Reference:
    """A stand-in reference: what ReferenceCache asks of one (identity, description, log-probs)."""

    description = "stand-in"

    def __init__(self, name: str):
        self.name = name

    def identity(self) -> str:
        return self.name

    def log_probs(self, w):
        rng = np.random.default_rng(len(self.name))
        for c in range(w.n_chunks):
            x = rng.normal(size=(w.per_window, 64))
            yield c, x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_new_entries_trim_the_cache_least_recently_used_first(tmp_path, monkeypatch):
    """Under NEOXQ_CACHE_MAX_SIZE, each new reference table evicts the least recently *used* (a load
    marks use): after A, B and a reuse of A, adding C removes B and keeps A and C (counted by the
    entries left). Negative control: without the reuse, A goes first."""
    from neoxq.core.cache import entries
    from neoxq.runtime.reference_cache import ReferenceCache, reference_tables
    from neoxq.runtime.score import Windows

    w = Windows([i % 64 for i in range(256)], 64)
    monkeypatch.setenv("NEOXQ_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("NEOXQ_CACHE_MAX_SIZE", "0")

    def add(name):
        reference_tables(_Reference(name), w, 64, k=8)
        for f in (tmp_path / "c" / "reference").iterdir():  # everything so far an hour older: the next use is strictly later
            st = f.stat()
            os.utime(f, (st.st_atime - 3600, st.st_mtime - 3600))

    add("A")
    one = sum(e.size for e in entries())
    monkeypatch.setenv("NEOXQ_CACHE_MAX_SIZE", f"{int(2.5 * one)}B")
    add("B")
    add("A")  # reused (loaded), not rebuilt
    assert len(entries()) == 2
    add("C")
    descr = {e.key for e in entries()}
    keys = {name: ReferenceCache(tmp_path / "c" / "reference", _Reference(name), w, 8).meta.stem for name in "ABCD"}
    assert descr == {keys["A"], keys["C"]}
    add("D")  # without a reuse: A is now the least recently used
    assert {e.key for e in entries()} == {keys["C"], keys["D"]}


class _Checkpoint:
    name = "stand-in"

    def fingerprint(self) -> str:
        return "f" * 16


def _statistics(seed: int):
    from neoxq.core.calibration_stats import CalibrationStats

    r = np.random.default_rng(seed)
    return CalibrationStats(
        sums={"blk.0.attn_qkv.weight": r.random(8), "output.weight": r.random(8)},
        counts={"blk.0.attn_qkv.weight": 64, "output.weight": 64},
        windows=2,
        embedding_fisher=r.random((8, 8)),
        embedding_tokens=64,
        head_fisher={"blk.0.attn_qkv.weight": r.random((2, 3, 3)).astype(np.float32)},
        absmax={"blk.0.attn_qkv.weight": r.random(8)},
    )


def test_optimize_statistics_are_made_once_and_reused_only_for_the_same_inputs(tmp_path, monkeypatch):
    """--optimize's first pass is cached: the same checkpoint, text, window and precision read it
    back exactly (every type of a report shares one pass); another text, window or precision, or an
    entry whose JSON is damaged, makes it again (the negative controls)."""
    import neoxq.calibration as calibration

    monkeypatch.setenv("NEOXQ_CACHE", str(tmp_path))
    made = []
    monkeypatch.setattr(calibration, "second_moments", lambda *a, **k: made.append(a) or _statistics(len(made)))

    def stats(text="calibration text", ctx=128, bf16=False):
        return calibration.optimize_statistics(_Checkpoint(), text, ctx, streamed=False, bf16=bf16)

    first = stats()
    again = stats()
    assert len(made) == 1
    a, b = first.to_arrays(), again.to_arrays()
    assert a[1] == b[1] and a[0].keys() == b[0].keys() and all(np.array_equal(a[0][k], b[0][k]) for k in a[0])
    assert b[0]["head_fisher:blk.0.attn_qkv.weight"].dtype == np.float32
    stats(text="another text")
    stats(ctx=64)
    stats(bf16=True)
    assert len(made) == 4
    from neoxq.core.cache import entries

    listed = [e.what for e in entries(tmp_path) if e.kind == "calibration"]
    assert len(listed) == 4 and all(w.startswith("calibration statistics of stand-in: 2 windows of") for w in listed), listed
    for p in (tmp_path / "calibration").glob("*.json"):
        p.write_text("{not json")
    stats()
    assert len(made) == 5


def test_optimize_statistics_survive_a_cache_that_cannot_be_written(tmp_path, monkeypatch):
    """A cache folder that cannot be made costs the next run the pass, never this run its result."""
    import neoxq.calibration as calibration

    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("NEOXQ_CACHE", str(tmp_path / "not-a-folder"))
    made = []
    monkeypatch.setattr(calibration, "second_moments", lambda *a, **k: made.append(a) or _statistics(len(made)))
    for _ in range(2):
        stats = calibration.optimize_statistics(_Checkpoint(), "text", 64, streamed=False, bf16=False)
        assert stats.windows == 2
    assert len(made) == 2  # nothing could be kept, so nothing was reused
