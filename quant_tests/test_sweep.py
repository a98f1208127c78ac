"""neoxq sweep: an offline hub cache in huggingface_hub's own layout, built from one
briefly trained run with checkpoints saved along the way and a duplicate branch; run locally,
interrupted and resumed, and on a real local Ray cluster with identical numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from .helpers import assert_one_line_error, run_cli

REPO = "neoxq-test/tiny-run"
STEPS = [0, 20, 60, 150]


@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory, texts):
    from neoxq.convert.hubcache import write_snapshot
    from neoxq.convert.tiny import TinySpec, build_training_run

    root = tmp_path_factory.mktemp("run")
    spec = TinySpec(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512, scale=1.0, vocab_pad=0, max_position_embeddings=256
    )
    saved = build_training_run(root, spec, texts["train"][:200_000], STEPS)
    cache = root / "hub"
    for step, folder in saved.items():
        commit = write_snapshot(cache, REPO, f"step{step}", folder)
    write_snapshot(cache, REPO, "main", saved[STEPS[-1]], commit=commit)  # as on the hub: main = the last step
    return cache


@pytest.fixture()
def offline(hub_cache, monkeypatch, tmp_path):
    from neoxq.demo import local_hub_cache

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    with local_hub_cache(hub_cache):  # everything it sets is put back after the test
        yield {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache), "HF_HOME": str(tmp_path / "hfhome")}


@pytest.fixture()
def eval_file(texts, tmp_path):
    p = tmp_path / "eval.txt"
    p.write_text(texts["eval"][:24000])
    return p


def _sweep_argv(text, out, *extra, revisions="step0..step150,main", types="Q8_0,Q2_K") -> list[str]:
    """`neoxq sweep` over the test repo's revisions as local_sweep runs it (so its numbers compare)."""
    common = ["--ctx", "64", "--imatrix", "none", "-o", str(out)]
    return [sys.executable, "-m", "neoxq", "sweep", REPO, "--revisions", revisions, "--text", str(text), "--types", types, *common, *extra]


def _opts(**kw):
    from neoxq.sweep import SweepOptions

    return SweepOptions(**{"types": "Q8_0,Q2_K", "ctx": 64, "imatrix": None, **kw})


def test_refs_spec_and_identity(offline):
    from neoxq.core.errors import UsageError
    from neoxq.convert.hub import identify, list_refs, parse_spec

    refs = list_refs(REPO)
    assert set(refs) == {f"step{s}" for s in STEPS} | {"main"}
    assert parse_spec("step0..step60", refs, REPO) == ["step0", "step20", "step60"]
    assert parse_spec("step0..step150/2,main", refs, REPO) == ["step0", "step60", "main"]
    assert identify(REPO, "main").weights_sha256 == identify(REPO, "step150").weights_sha256 != identify(REPO, "step60").weights_sha256
    with pytest.raises(UsageError, match="step19.*nearest: step20"):
        parse_spec("step19", refs, REPO)
    with pytest.raises(UsageError, match="matches no branch.*step0"):
        parse_spec("step200..step900", refs, REPO)
    for spec, why in (("step0..step60/0", "K = 1 or more"), ("step0..step60/-2", "K = 1 or more"), ("step60..step0", "lower step first")):
        with pytest.raises(UsageError, match=why):
            parse_spec(spec, refs, REPO)


@pytest.fixture(scope="module")
def local_sweep(hub_cache, texts, tmp_path_factory):
    """The sweep run once in this process (module-scoped: the slow part)."""

    from neoxq.demo import local_hub_cache
    from neoxq.sweep import run_sweep

    out = tmp_path_factory.mktemp("sweep")
    text = out / "eval.txt"
    text.write_text(texts["eval"][:24000])
    with local_hub_cache(hub_cache):  # for the tests that use this sweep; put back after the module
        path = run_sweep(REPO, "step0..step150,main", text, out / "s", _opts())
        yield json.loads(path.read_text()), out / "s", text


@pytest.mark.slow
def test_sweep_json_duplicates_and_trend(local_sweep):
    data, out, _ = local_sweep
    revs = {r["revision"]: r for r in data["revisions"]}
    assert list(revs) == ["step0", "step20", "step60", "step150", "main"]
    assert revs["main"]["duplicate_of"] == "step150" and revs["main"]["results"] == revs["step150"]["results"]
    assert not (out / "main").exists()  # never recomputed
    for r in data["revisions"]:
        assert r["commit"] and len(r["weights_sha256"]) == 64 and [x["type"] for x in r["results"]] == ["Q8_0", "Q2_K"]
    ppl = [revs[f"step{s}"]["reference"]["ppl"] for s in STEPS]
    assert ppl[0] > 2 * ppl[-1]  # training really changed the model
    assert data["text"]["tokens_scored"] > 1000 and (out / "sweep.md").is_file() and (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    for r in data["revisions"]:  # uncertainty per revision, drawn as bands
        assert all(x["kld_mean_se_window"] > 0 and x["dppl_pct_se_window"] > 0 for x in r["results"])
    row = revs["step150"]["results"][1]
    from neoxq.render import value_pm

    assert value_pm(row["kld_mean"], row["kld_mean_se_window"]) in (out / "sweep.md").read_text()
    assert not list(out.rglob("*.gguf"))  # scratch files deleted without --keep-files


@pytest.mark.slow
def test_sweep_resumes_only_what_is_missing(local_sweep):
    from neoxq.sweep import run_sweep

    data, out, text = local_sweep
    stamps = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("step*/report.json")}
    (out / "step20" / "report.json").unlink()  # as if interrupted while step20 was in flight
    again = json.loads(run_sweep(REPO, "step0..step150,main", text, out, _opts()).read_text())
    for rev, stamp in stamps.items():
        assert ((out / rev / "report.json").stat().st_mtime_ns == stamp) == (rev != "step20"), rev
    assert again["revisions"] == data["revisions"]


@pytest.mark.slow
def test_sweep_rerun_with_a_changed_option_reruns_each_report_and_reuses_its_rows(local_sweep):
    """A rerun with an option that used to be ignored (--max-memory here) is no
    longer served the old report.json: every revision's report reruns (its report records the new
    inputs), and its rows are reused because their own inputs (file sha256, text, reference) are
    unchanged, although the sweep had deleted and now remakes the files. Counted, not timed."""
    from neoxq.sweep import run_sweep

    data, out, text = local_sweep
    again = json.loads(run_sweep(REPO, "step0..step150,main", text, out, _opts(max_memory=8 << 30)).read_text())
    for rev in ("step0", "step20", "step60", "step150"):
        report = json.loads((out / rev / "report.json").read_text())
        assert report["inputs"]["max_memory"] == 8 << 30 and report["reuse"]["rows_scored"] == 0, (rev, report["reuse"])
        assert report["reuse"]["files_made"] == 2  # both scored files, deleted after the first run, made again
    assert again["revisions"] == data["revisions"]


@pytest.mark.slow
def test_sweep_optimizes_each_revision_locally_and_as_ray_tasks_alike(offline, eval_file, tmp_path):
    """`sweep --optimize`: every revision gets its <TYPE>-opt rows beside stock's, its types sharing
    one calibration pass (one cache entry per revision's weights); the same sweep as Ray tasks on a
    local Ray (`--ray`) gives the very same numbers. (A plain sweep of every revision, duplicates
    included, on a Ray cluster is the node-loss test below.)"""
    pytest.importorskip("ray")
    env = {**offline, "NEOXQ_CACHE": str(tmp_path / "cache")}
    argv = _sweep_argv(eval_file, tmp_path / "local", "--optimize", "--quiet", revisions="step60,step150", types="Q4_K_M,Q2_K")
    proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **env}, timeout=900)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "local" / "sweep.json").read_text())
    assert data["types"] == ["Q4_K_M", "Q2_K", "opt"]
    for rev in data["revisions"]:
        rows = {r["type"]: r for r in rev["results"]}
        assert list(rows) == ["Q4_K_M", "Q2_K", "Q4_K_M-opt", "Q2_K-opt"], rev["revision"]
        assert all(rows[f"{t}-opt"]["kld_mean"] < rows[t]["kld_mean"] for t in ("Q4_K_M", "Q2_K"))
    assert len(list((tmp_path / "cache" / "calibration").glob("*.npz"))) == 2  # one pass per revision, not per type
    assert "## Q2_K-opt" in (tmp_path / "local" / "sweep.md").read_text()
    argv = _sweep_argv(eval_file, tmp_path / "ray", "--optimize", "--ray", "--quiet", revisions="step60,step150", types="Q4_K_M,Q2_K")
    proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **env}, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "ray" / "sweep.json").read_text())["revisions"] == data["revisions"]


@pytest.mark.slow
def test_sweep_survives_losing_a_ray_worker_node(local_sweep, offline, tmp_path):
    """A two-node Ray cluster on this machine (ray.cluster_utils.Cluster, one CPU
    per node, so two revisions run at once, one on each). The worker node is removed once a
    revision is in flight; its task is retried on the head (Ray's task retries) and the sweep ends
    with the local run's numbers."""
    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    import signal

    data, _, text = local_sweep
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # Ray's Cluster installs its own
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        worker = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        out = tmp_path / "ray"
        argv = _sweep_argv(text, out, "--quiet", "--ray-address", cluster.address)
        proc = subprocess.Popen(argv, env={**os.environ, **offline}, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 600
        while not any((out / r).is_dir() for r in ("step0", "step20", "step60", "step150")) and proc.poll() is None:
            assert time.time() < deadline
            time.sleep(0.2)  # polling for the first revision folder (a state), not waiting a fixed time
        cluster.remove_node(worker)
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err
        assert json.loads((out / "sweep.json").read_text())["revisions"] == data["revisions"]
    finally:
        cluster.shutdown()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


@pytest.mark.slow
def test_sweep_driver_killed_then_rerun_resumes(local_sweep, offline, tmp_path):
    """The driver SIGKILLed once its first revision is finished (its report.json
    written: a state, polled); the rerun reuses that revision (not rerun: its report.json untouched)
    and ends with the uninterrupted run's numbers."""
    import signal

    data, _, text = local_sweep
    out = tmp_path / "killed"
    args = _sweep_argv(text, out, "--quiet")
    proc = subprocess.Popen(args, env={**os.environ, **offline}, start_new_session=True, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while not (out / "step0" / "report.json").is_file() and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.2)  # polling for the first finished revision (a state)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = (out / "step0" / "report.json").stat().st_mtime_ns
    assert not (out / "step150" / "report.json").exists()  # killed before the end
    again = subprocess.run(args, env={**os.environ, **offline}, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr
    assert (out / "step0" / "report.json").stat().st_mtime_ns == first  # resumed, not redone
    assert json.loads((out / "sweep.json").read_text())["revisions"] == data["revisions"]


def _on_a_terminal(argv, env, timeout=900) -> tuple[int, str]:
    """Run argv with stdin/stdout/stderr on a pty (progress bars draw only for a terminal); its exit
    code and everything it wrote."""
    import pty
    import select

    pid, fd = pty.fork()
    if pid == 0:
        os.environ.update(env)
        os.execv(argv[0], argv)
    out, end = b"", time.time() + timeout
    while time.time() < end:
        if select.select([fd], [], [], 1)[0]:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), out.decode("utf-8", "replace")


@pytest.mark.slow
def test_quiet_reaches_every_worker(offline, eval_file, tmp_path):
    """`sweep --workers 2 --quiet` on a terminal draws no progress bar and no
    status line, in the driver or in either worker process. Negative control: without --quiet the
    same sweep on the same terminal draws them."""

    short = tmp_path / "short.txt"  # what is drawn is the question, not the scores
    short.write_text(eval_file.read_text()[:4000])

    def argv(out, *extra):
        return _sweep_argv(short, out, "--workers", "2", *extra, revisions="step0,step20", types="Q8_0")

    rc, quiet = _on_a_terminal(argv(tmp_path / "q", "--quiet"), offline)
    assert rc == 0, quiet
    assert "━" not in quiet and "%" not in quiet and quiet.strip() == ""
    rc, loud = _on_a_terminal(argv(tmp_path / "l"), offline)
    assert rc == 0 and "━" in loud, loud[-2000:]


@pytest.mark.slow
def test_sweep_bad_input(offline, eval_file, tmp_path):
    base = ("sweep", REPO, "--text", eval_file, "--types", "Q8_0", "--ctx", "64", "--imatrix", "none", "-o", tmp_path / "o")
    assert_one_line_error(run_cli(*base, "--revisions", ",,,", env=offline), "names no revision")
    assert not (tmp_path / "o").exists()  # refused before the sweep's folder is made
    assert_one_line_error(run_cli(*base, "--revisions", "step7", env=offline), "step7", "nearest")
    assert_one_line_error(run_cli(*base, "--revisions", "step500..step900", env=offline), "matches no branch")
    assert_one_line_error(run_cli(*base, "--revisions", "step0", "--ray-address", "127.0.0.1:1", env=offline, timeout=300), "ray cluster")
    # keywords read alike in any case: NONE is none (the negative control of the line above: this one runs)
    proc = run_cli(*[a if a != "none" else "NONE" for a in base], "--revisions", "step0", env=offline)
    assert proc.returncode == 0 and (tmp_path / "o" / "sweep.json").is_file(), proc.stderr
    short = tmp_path / "short.txt"
    short.write_text("too short")
    args = [a if a != eval_file else short for a in base]
    assert_one_line_error(run_cli(*args, "--revisions", "step0", env=offline), "two windows")


@pytest.mark.slow
def test_sweep_evict_and_keep_files(hub_cache, eval_file, tmp_path):
    """--evict removes each finished revision from the HF cache; --keep-files keeps its GGUFs."""
    import shutil

    cache = tmp_path / "hub"
    shutil.copytree(hub_cache, cache, symlinks=True)
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hfhome")}
    snapshots = cache / f"models--{REPO.replace('/', '--')}" / "snapshots"
    before = {p.name for p in snapshots.iterdir()}
    commit = (cache / f"models--{REPO.replace('/', '--')}" / "refs" / "step20").read_text()
    proc = run_cli(
        "sweep",
        REPO,
        "--revisions",
        "step20",
        "--text",
        eval_file,
        "--types",
        "Q8_0",
        "--ctx",
        "64",
        "--imatrix",
        "none",
        "--evict",
        "--keep-files",
        "-o",
        tmp_path / "o",
        "--quiet",
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in snapshots.iterdir()} == before - {commit}
    assert list((tmp_path / "o" / "step20").glob("*.gguf"))


def test_local_hub_cache_puts_everything_back(tmp_path):
    """Pointing huggingface_hub at a local cache leaks nothing into later tests."""
    import os

    from huggingface_hub import constants

    from neoxq.demo import local_hub_cache

    before = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("HF_HUB_CACHE"), constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE)
    with local_hub_cache(tmp_path):
        assert constants.HF_HUB_OFFLINE and constants.HF_HUB_CACHE == str(tmp_path) == os.environ["HF_HUB_CACHE"]
    assert (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("HF_HUB_CACHE"), constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE) == before
