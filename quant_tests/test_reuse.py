"""One cache key for everything reused: a report rerun with one option changed
recomputes exactly what that option touches and reuses the rest, counted in report.json's
`reuse` (files made or reused, rows scored or reused), never timed. Each case starts from a copy of
one finished report."""

from __future__ import annotations

import json
import shutil

import pytest

from neoxq.report import ReportOptions, run_report

from .test_eval import tasks_dir  # noqa: F401 - the lm-eval task fixture, for the --tasks case

BASE = {"types": "F16,Q4_K_M", "ctx": 128, "imatrix": "auto"}


@pytest.fixture(scope="module")
def eval_text(texts, tmp_path_factory):
    p = tmp_path_factory.mktemp("reuse-text") / "eval.txt"
    p.write_text(texts["eval"][:24000])
    return p


@pytest.fixture(scope="module")
def base_report(trained, eval_text, tmp_path_factory):
    out = tmp_path_factory.mktemp("reuse") / "r"
    rj = run_report(str(trained), eval_text, out, ReportOptions(**BASE))
    return json.loads(rj.read_text()), out


def _rerun(base_report, trained, text, tmp_path, **change):
    data, out = base_report
    copy = tmp_path / "r"
    copy.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(out, copy)
    rj = run_report(str(trained), text, copy, ReportOptions(**{**BASE, **change}))
    return data, json.loads(rj.read_text())


def _rows(report):
    return {r["type"]: r for r in report["results"]}


# option → (files made, rows scored, the types whose numbers must be the base report's)
CASES = {
    "nothing": ({}, 0, 0, {"F16", "Q4_K_M"}),
    "types": ({"types": "F16,Q4_K_M,Q2_K"}, 1, 1, {"F16", "Q4_K_M"}),
    "reference": ({"reference": "f16"}, 0, 2, set()),
    "ctx": ({"ctx": 64}, 1, 2, set()),  # the imatrix is computed in windows of ctx: Q4_K_M is remade
    "imatrix": ({"imatrix": None}, 1, 2, set()),  # no calibration part: the whole text is scored
    "max_memory": ({"max_memory": 8 << 30}, 0, 0, {"F16", "Q4_K_M"}),  # the reference's mode only, same numbers
    "speed": ({"speed_tokens": 8}, 0, 2, set()),
    "mix": ({"mix": True}, 1, 1, {"F16", "Q4_K_M"}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_changed_option_recomputes_only_what_it_touches(name, base_report, trained, eval_text, tmp_path):
    change, made, scored, same = CASES[name]
    data, again = _rerun(base_report, trained, eval_text, tmp_path, **change)
    assert again["reuse"]["files_made"] == made and again["reuse"]["rows_scored"] == scored, again["reuse"]
    assert again["reuse"]["rows_reused"] == len(again["results"]) - scored
    before, after = _rows(data), _rows(again)
    for t in same:  # reused: the very numbers
        assert after[t]["kld_mean"] == before[t]["kld_mean"] and after[t]["ppl"] == before[t]["ppl"], t
    if name != "nothing":
        assert again["inputs"] != data["inputs"]  # the sweep reruns such a revision's report
    if name in ("reference", "ctx", "imatrix"):  # negative control: what changed really moved the numbers
        assert after["Q4_K_M"]["kld_mean"] != before["Q4_K_M"]["kld_mean"]


def test_a_changed_text_and_tasks(base_report, trained, texts, eval_text, tasks_dir, tmp_path):  # noqa: F811
    """Another text: every row rescored and the quantized file remade (its imatrix comes from the
    text's calibration part), the F16 file reused. --tasks: rows rescored with the task metrics,
    every file reused."""
    other = tmp_path / "other.txt"
    other.write_text(texts["eval"][2000:26000])
    _, again = _rerun(base_report, trained, other, tmp_path / "a")
    assert again["reuse"] == {"files_reused": 1, "files_made": 1, "rows_reused": 0, "rows_scored": 2}
    assert _rows(again)["F16"]["file_reused"] and not _rows(again)["Q4_K_M"]["file_reused"]
    _, tasked = _rerun(base_report, trained, eval_text, tmp_path / "b", tasks="neoxq_mc", include_path=str(tasks_dir))
    assert tasked["reuse"] == {"files_reused": 2, "files_made": 0, "rows_reused": 0, "rows_scored": 2}
    assert all("neoxq_mc" in r["tasks"] for r in tasked["results"])
