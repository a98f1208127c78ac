"""`neoxq report`: JSON schema, calibration never scored, per-type perplexity thresholds, resume,
bad input."""

from __future__ import annotations

import json

import pytest

from neoxq.report import ReportOptions, run_report, split_for_calibration
from neoxq.core.textfile import text_sha256

from .helpers import assert_one_line_error, run_cli

TYPES = "F16,Q8_0,Q6_K,Q4_K_M,Q2_K"
# Δppl vs the fp32 reference (%) allowed per type, set from measurement on this fixture with the
# auto imatrix (demo run: Q8_0 +0.01, Q6_K +0.15, Q4_K_M +0.07, Q2_K +1.6; ppl ± 1.1%); the
# thresholds sit ~3 standard errors of the difference above those.
DPPL_MAX = {"F16": 0.05, "Q8_0": 0.3, "Q6_K": 1.0, "Q4_K_M": 1.5, "Q2_K": 5.0}
ROW_KEYS = {"type", "size_bytes", "bpw", "ppl", "ppl_se", "dppl_pct", "kld_mean", "kld_p99", "top1", "pp_tps", "tg_tps"}


@pytest.fixture(scope="module")
def report_text(texts, tmp_path_factory):
    path = tmp_path_factory.mktemp("rt") / "eval.txt"
    path.write_text(texts["eval"][:36000])
    return path


@pytest.fixture(scope="module")
def report(trained, report_text, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "r"
    rj = run_report(str(trained), report_text, out, ReportOptions(types=TYPES, ctx=128))
    return json.loads(rj.read_text()), out


def test_report_schema_and_files(report, report_text):
    data, out = report
    from neoxq.core.report_row import REPORT_SCHEMA, rows_of

    assert {"source", "text", "machine", "versions", "results", "reference", "imatrix"} <= set(data)
    assert data["schema"] == REPORT_SCHEMA
    assert [r.as_json() for r in rows_of(data)] == data["results"]  # every field of a row is a ReportRow field
    assert data["text"]["sha256"] == text_sha256(report_text.read_text())
    assert data["text"]["ctx"] == 128 and data["text"]["tokens_scored"] > 1000
    for v in ("llama-cpp-python", "gguf", "transformers", "torch"):
        assert v in data["versions"]
    assert [r["type"] for r in data["results"]] == TYPES.split(",")
    for r in data["results"]:
        assert ROW_KEYS <= set(r), r
        assert r["ppl_se"] > 0 and 0 < r["top1"] <= 1 and r["pp_tps"] > 0 and r["tg_tps"] > 0
        assert ("convert_s" in r) or ("quantize_s" in r)
    md = (out / "report.md").read_text()
    assert "| Q4_K_M |" in md and "±" in md and data["text"]["sha256"] in md
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    sizes = [r["size_bytes"] for r in data["results"]]
    assert sizes == sorted(sizes, reverse=True)


def test_calibration_part_is_never_scored(report, report_text):
    data, _ = report
    calib, rest = split_for_calibration(report_text.read_text())
    assert data["text"]["scored_sha256"] == text_sha256(rest) != data["text"]["sha256"]
    assert data["text"]["calibration_excluded"] and "not scored" in data["imatrix"]["calibration"]
    assert calib + rest == report_text.read_text()


def test_without_a_text_the_checkpoint_s_own_sample_is_scored(trained, tmp_path, monkeypatch):
    """`neoxq report CKPT` with no --text: the checkpoint's own seeded sample, four times the
    calibration windows; its first quarter calibrates the imatrix and is never scored, and the
    sample is not --optimize's default calibration text (another seed)."""
    from neoxq.convert.checkpoint import open_checkpoint
    from neoxq.report import evaluation_sample
    from neoxq.self_calibration import self_calibration

    monkeypatch.setenv("NEOXQ_CACHE", str(tmp_path / "cache"))  # shared with the child: the sample is made once
    r = run_cli("report", trained, "--types", "Q8_0", "--ctx", "64", "-o", tmp_path / "r", "--quiet")
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    assert "own sample" in data["text"]["file"] and "seed 1" in data["text"]["file"]
    assert data["text"]["calibration_excluded"] and data["text"]["tokens_scored"] > 0
    ckpt = open_checkpoint(str(trained))
    text, _ = evaluation_sample(ckpt, 64)
    assert data["text"]["sha256"] == text_sha256(text)
    assert data["text"]["scored_sha256"] == text_sha256(split_for_calibration(text)[1])
    assert self_calibration(ckpt, 64).text[:2000] not in text  # --optimize's default calibration is another sample


def test_quantized_vs_fp16_perplexity_thresholds(report):
    data, _ = report
    rows = {r["type"]: r for r in data["results"]}
    for t, limit in DPPL_MAX.items():
        assert rows[t]["dppl_pct"] < limit, (t, rows[t]["dppl_pct"])
    # The thresholds bite: Q2_K measurably worse than Q8_0, KLD ordered by bits.
    assert rows["Q2_K"]["dppl_pct"] > rows["Q8_0"]["dppl_pct"] + 0.3
    klds = [rows[t]["kld_mean"] for t in ("Q8_0", "Q6_K", "Q4_K_M", "Q2_K")]
    assert klds == sorted(klds)


def test_interrupted_report_resumes(trained, report_text, tmp_path, monkeypatch):
    import neoxq.runtime.quantize as cq

    out = tmp_path / "r"
    real = cq.quantize
    calls = []

    def flaky(*a, **k):
        calls.append(a[1])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(cq, "quantize", flaky)
    opts = ReportOptions(types="F16,Q8_0,Q4_0,Q2_K", ctx=128, imatrix=None)
    with pytest.raises(KeyboardInterrupt):
        run_report(str(trained), report_text, out, opts)
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("*.gguf")}
    assert "tiny-neox-F16.gguf" in first and not (out / "report.json").exists()
    assert not list(out.glob(".*.partial"))
    monkeypatch.setattr(cq, "quantize", real)
    run_report(str(trained), report_text, out, opts)
    for name, stamp in first.items():
        assert (out / name).stat().st_mtime_ns == stamp, f"{name} was rebuilt"
    assert (out / "report.json").is_file()


def test_report_bad_input(trained, report_text, tmp_path):
    assert_one_line_error(run_cli("report", trained, "--text", report_text, "--types", "Q4_K_M,Q7_X", "-o", tmp_path / "a"), "Q7_X")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert_one_line_error(run_cli("report", trained, "--text", empty, "-o", tmp_path / "b"), "empty")
    short = tmp_path / "short.txt"
    short.write_text("a short text that cannot fill two windows " * 3)
    assert_one_line_error(run_cli("report", trained, "--text", short, "--ctx", "128", "-o", tmp_path / "c"), "two windows")
    assert_one_line_error(run_cli("report", trained, "--text", report_text, "-o", "/proc/neoxq-report"), "report folder")


def test_report_statistics_token_files_and_most_hurt(report):
    """Every row carries llama-perplexity's figures with per-window errors, computed from a per-token
    file listed with its sha256 (recomputing from that file gives the same); the worst type's most-hurt
    tokens are listed with their context."""
    import numpy as np

    from neoxq.core.imatrix_io import file_sha256
    from neoxq.core.scores_io import load_scores
    from neoxq.core.stats import summarize
    from neoxq.render import value_pm

    data, out = report
    for r in data["results"]:
        st = r["stats"]
        for key in ("ppl", "ppl_base", "ln_ppl_ratio", "ppl_ratio", "ppl_diff", "kld", "dp", "rms_dp", "same_top"):
            assert {"value", "se", "se_window"} <= set(st[key]), key
        assert {"max", "p99.9", "p99", "p95", "p90", "median", "p10", "p5", "p1", "p0.1", "min"} <= set(st["kld"])
        assert {"p75", "p25"} <= set(st["dp"]) and -1 <= st["cor_ln_ppl"] <= 1
        tok = out / r["tokens"]["file"]
        assert file_sha256(tok) == r["tokens"]["sha256"] and r["tokens"]["tokens"] == data["text"]["tokens_scored"]
        again = summarize(load_scores(tok))
        assert again["kld"]["value"] == pytest.approx(r["kld_mean"], rel=1e-5)
        assert again["kld"]["se_window"] == pytest.approx(r["kld_mean_se_window"], rel=1e-4)
        assert r["dppl_pct"] == pytest.approx(100 * (st["ppl_ratio"]["value"] - 1), rel=1e-9, abs=1e-12)
        assert r["kld_mean_se_window"] > 0 and r["dppl_pct_se_window"] > 0
    worst = max((r for r in data["results"] if r["type"] != "F16"), key=lambda r: r["kld_mean"])
    mh = data["most_hurt"]
    assert mh["type"] == worst["type"] == "Q2_K" and len(mh["tokens"]) == 20
    kl = load_scores(out / worst["tokens"]["file"]).kld
    assert [t["kld"] for t in mh["tokens"]] == pytest.approx(np.sort(kl)[::-1][:20].tolist(), rel=1e-6)
    assert all(t["context"] and t["target"] and t["model_top"] is not None for t in mh["tokens"])
    md = (out / "report.md").read_text()
    assert "tokens Q2_K hurt most" in md and "means of the scored windows" in md
    assert value_pm(worst["kld_mean"], worst["kld_mean_se_window"]) in md
    assert (out / "report-kld-cdf.png").read_bytes()[:4] == b"\x89PNG" and "report-kld-cdf.png" in md


# Publishing ----------------------------------------------------------------


class FakeHub:
    """Stands in for huggingface_hub.HfApi: records the calls publish makes (the one untested part
    is HfApi itself, which needs the network)."""

    def __init__(self, exists=False):
        self.exists, self.calls = exists, []

    def repo_exists(self, repo_id):
        return self.exists

    def create_repo(self, repo_id, private, exist_ok):
        self.calls.append(("create_repo", repo_id, private))

    def create_branch(self, repo_id, branch, exist_ok):
        self.calls.append(("create_branch", branch))

    def create_commit(self, repo_id, operations, revision, commit_message):
        self.calls.append(("commit", revision, {op.path_in_repo: op for op in operations}))


def test_publish_dry_run_card_and_modelfiles(report, tmp_path):
    """--dry-run writes exactly the upload: the measured files (hard links, same bytes), report.json
    and plots, a card whose YAML huggingface_hub parses back to what neoxq set and whose table is the
    report's, and a Modelfile per file with the file's context and end-of-text token."""
    from huggingface_hub import ModelCard

    from neoxq.core.imatrix_io import file_sha256
    from neoxq.render import results_table

    data, out = report
    dest = tmp_path / "pub"
    proc = run_cli("publish", out, "me/tiny-GGUF", "--dry-run", dest, "--ollama")
    assert proc.returncode == 0, proc.stderr
    files = {p.name for p in dest.iterdir()}
    ggufs = {r["file"] for r in data["results"]}
    assert files == ggufs | {"report.json", "README.md", data["imatrix"]["file"]} | {
        p for p in ("report.png", "report-kld-cdf.png") if (out / p).exists()
    } | {f"{g[:-5]}.Modelfile" for g in ggufs}
    assert all(file_sha256(dest / r["file"]) == r["sha256"] for r in data["results"])
    card = ModelCard.load(dest / "README.md")
    meta = card.data.to_dict()
    assert meta["library_name"] == "gguf" and meta["quantized_by"] == "neoxq" and set(meta["tags"]) == {"gguf", "gpt-neox", "pythia", "quantized"}
    assert "base_model" not in meta  # a local checkpoint: no hub id to name
    assert "\n".join(results_table(data, leave_out=("pp_tps", "tg_tps"))) in card.text
    assert data["text"]["sha256"] in card.text and "ollama create" in card.text and "Llama.from_pretrained" in card.text
    from neoxq.core.gguf_info import read_info

    last = data["results"][-1]["file"]
    mf = (dest / f"{last[:-5]}.Modelfile").read_text().splitlines()
    n_ctx = read_info(out / last).context_length
    assert mf[0] == f"FROM ./{last}" and mf[1] == f"PARAMETER num_ctx {n_ctx}" and mf[2] == 'PARAMETER stop "<|endoftext|>"'
    # the same folder again is refused without --force
    assert_one_line_error(run_cli("publish", out, "me/tiny-GGUF", "--dry-run", dest), "not empty", "--force")


def test_publish_card_names_the_hub_source(report):
    """A report of a hub checkpoint names it as base_model with its revision and licence."""
    from huggingface_hub import ModelCard

    from neoxq.publish import PublishOptions, model_card

    data, out = report
    hub = {**data, "source": {**data["source"], "repo": "EleutherAI/pythia-160m", "revision": "step3000", "commit": "abc"}}
    meta = ModelCard(model_card(hub, out, PublishOptions("me/p-GGUF"))).data.to_dict()
    assert meta["base_model"] == "EleutherAI/pythia-160m" and meta["base_model_relation"] == "quantized"
    assert meta["base_model_revision"] == "step3000"


def test_publish_uploads_one_commit_and_refuses_bad_folders(report, tmp_path):
    """Up to the hub call: one commit with every file, an existing repo refused without --force, no
    token refused in one line; a modified or missing file refused naming it (sha256 against report.json)."""
    import shutil

    from neoxq.core.errors import UsageError
    from neoxq.publish import PublishOptions, publish

    data, out = report
    hub = FakeHub()
    branches = publish(out, PublishOptions("me/tiny-GGUF", private=True), api=hub)
    assert hub.calls[0] == ("create_repo", "me/tiny-GGUF", True)
    kind, revision, ops = hub.calls[1]
    assert kind == "commit" and revision == "main" and set(ops) == set(branches["main"]) and len(hub.calls) == 2
    with pytest.raises(UsageError, match="exists on the hub"):
        publish(out, PublishOptions("me/tiny-GGUF"), api=FakeHub(exists=True))
    publish(out, PublishOptions("me/tiny-GGUF", force=True, revision="v1"), api=(h := FakeHub(exists=True)))
    assert [c[:2] for c in h.calls] == [("create_repo", "me/tiny-GGUF"), ("create_branch", "v1"), ("commit", "v1")]
    assert_one_line_error(run_cli("publish", out, "me/tiny-GGUF", env={"HF_TOKEN": "", "HF_HOME": str(tmp_path / "nohome")}), "token", "--dry-run")
    assert_one_line_error(run_cli("publish", out, "not a repo id", "--dry-run", tmp_path / "x"), "OWNER/NAME")
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    victim = bad / data["results"][1]["file"]
    raw = bytearray(victim.read_bytes())
    raw[-1] ^= 1
    victim.write_bytes(bytes(raw))
    assert_one_line_error(run_cli("publish", bad, "me/x", "--dry-run", tmp_path / "d1"), victim.name, "sha256")
    victim.unlink()
    assert_one_line_error(run_cli("publish", bad, "me/x", "--dry-run", tmp_path / "d2"), victim.name, "missing")
    assert_one_line_error(run_cli("publish", tmp_path, "me/x", "--dry-run", tmp_path / "d3"), "report.json")
    assert not any((tmp_path / d).exists() for d in ("d1", "d2", "d3", "x"))


def test_publish_sweep_is_a_branch_per_revision(report, tmp_path):
    """A sweep folder: one branch per revision holding that revision's files and card, a duplicate
    revision skipped, and main with the sweep's card."""
    import shutil

    from huggingface_hub import ModelCard

    data, out = report
    sweep = tmp_path / "s"
    revs = []
    for step in (10, 20):
        shutil.copytree(out, sweep / f"step{step}")
        revs.append({"revision": f"step{step}", "step": step, "duplicate_of": None, "results": data["results"], "reference": data["reference"]})
    revs.append({"revision": "main", "step": 20, "duplicate_of": "step20", "results": data["results"], "reference": data["reference"]})
    (sweep / "sweep.json").write_text(json.dumps({"repo": "EleutherAI/tiny", "text": {**data["text"]}, "revisions": revs}))
    dest = tmp_path / "pub"
    proc = run_cli("publish", sweep, "me/tiny-sweep", "--dry-run", dest)
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in dest.iterdir()} == {"step10", "step20", "main"}
    assert {p.name for p in (dest / "main").iterdir()} == {"sweep.json", "README.md"}
    assert ModelCard.load(dest / "main" / "README.md").data.to_dict()["base_model"] == "EleutherAI/tiny"
    assert {r["file"] for r in data["results"]} <= {p.name for p in (dest / "step10").iterdir()}
    assert "Branch `step20`" in (dest / "step20" / "README.md").read_text()
    assert_one_line_error(run_cli("publish", sweep, "me/tiny-sweep", "--dry-run", tmp_path / "p2", "--revision", "x"), "--revision")


def test_added_files_are_scored_beside_the_others(report, trained, report_text, ckpt, tmp_path):
    """--add: a file made elsewhere (here llama.cpp's Q5_0 of the report's F16, renamed) gets its
    row, labelled by its name, marked added, never taken for a stock row nor published; every other
    row is reused. A file of another model is refused in one line before any work (negative
    control: the shape check is not vacuous)."""
    import shutil

    from neoxq.convert.converter import convert
    from neoxq.core.report_row import best_at_each_size, rows_of
    from neoxq.publish import load_report
    from neoxq.render import _series
    from neoxq.runtime.quantize import quantize

    out = shutil.copytree(report[1], tmp_path / "r")
    extra = quantize(out / "tiny-neox-F16.gguf", "Q5_0", output=tmp_path / "other-run.gguf").path
    rj = run_report(str(trained), report_text, out, ReportOptions(types=TYPES, ctx=128, add=(str(extra),)))
    r = json.loads(rj.read_text())
    rows = {x.type: x for x in rows_of(r)}
    assert rows["other-run"].added and rows["other-run"].file == str(extra) and rows["other-run"].kld_mean > 0
    assert r["reuse"]["rows_scored"] == 1 and r["inputs"]["add"]
    assert all(stock.type != "other-run" for stock, _ in best_at_each_size(rows_of(r)))
    assert _series(rows_of(r))["files given with --add"] == [rows["other-run"]]
    assert "other-run" not in {x.type for x in rows_of(load_report(out)) if not x.added}
    other = convert(str(ckpt), "f16", output=tmp_path / "another-model.gguf")
    proc = run_cli("report", trained, "--text", report_text, "--types", "F16", "--add", other, "-o", tmp_path / "x")
    assert_one_line_error(proc, "--add", "not this checkpoint's")
    assert not (tmp_path / "x").exists()


def test_a_large_reference_runs_in_a_child_with_the_same_numbers(ckpt, corpus, tmp_path, monkeypatch):
    """A transformers reference too large to share its caller's process (HFReference.fits_in_caller)
    runs in a child process, a small one in the caller's: the same tables either way. Counted: the
    child path really ran (a pool was asked for the work), and the small one made no child."""
    import neoxq.report as R
    from neoxq.convert.checkpoint import open_checkpoint
    from neoxq.convert.reference import HFReference

    ref = HFReference(open_checkpoint(str(ckpt)))
    assert ref.fits_in_caller(1 << 40) and not ref.fits_in_caller(1 << 20)
    text = tmp_path / "t.txt"
    text.write_text(corpus[:6000])
    submitted = []

    class Counting(R.ProcessPoolExecutor):
        def submit(self, fn, *args, **kw):
            submitted.append(fn.__name__)
            return super().submit(fn, *args, **kw)

    monkeypatch.setattr(R, "ProcessPoolExecutor", Counting)
    opts = ReportOptions(types="Q8_0", ctx=64, imatrix=None)
    here = json.loads(run_report(str(ckpt), text, tmp_path / "here", opts).read_text())
    assert submitted == []
    monkeypatch.setattr(R, "available_memory", lambda: 1 << 20)  # the same checkpoint on a tiny machine
    child = json.loads(run_report(str(ckpt), text, tmp_path / "child", opts).read_text())
    assert submitted == ["_tables_in_child"]
    assert [r["kld_mean"] for r in child["results"]] == [r["kld_mean"] for r in here["results"]]
