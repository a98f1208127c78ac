"""Issue 25's classes of ordinary mistakes: each is one line naming the problem and the fix, and
nonsense numbers are refused by the one rule in neoxq.core.numbers."""

from __future__ import annotations

import math

import pytest

from neoxq.core.errors import UsageError
from neoxq.core.numbers import check_number

from .helpers import assert_one_line_error, run_cli


def test_check_number():
    assert check_number(0.5, "x", 0, 1) == 0.5 and check_number(None, "x", 0, 1) is None
    for bad in (math.nan, math.inf, -math.inf, -0.1, 1.1):
        with pytest.raises(UsageError, match=r"^--x .* out of range; pass a number from 0 to 1$"):
            check_number(bad, "--x", 0, 1)
    for bad in ("3", True, 2.5):
        with pytest.raises(UsageError, match="not an integer"):
            check_number(bad, "n", 0, integer=True)


@pytest.fixture(scope="module")
def small(ckpt, tmp_path_factory):
    from neoxq.convert.converter import convert

    return convert(str(ckpt), "f16", output=tmp_path_factory.mktemp("bad") / "m-F16.gguf")


def test_run_mistakes_are_one_line(small, tmp_path):
    long = tmp_path / "long.txt"
    long.write_text("the cat sat on the mat. " * 40)
    cases = [
        (["--temp", "nan"], "--temperature"), (["--top-p", "nan"], "--top-p"), (["--repeat-penalty", "inf"], "--repeat-penalty"),
        (["--threads", "1000"], "--threads"), (["--stop", ""], "stop"), (["-f", long, "-p", "hi"], "--prompt-file"),
        (["-f", tmp_path], "folder"),
    ]
    for extra, needle in cases:
        args = ["run", small, "-n", "2", *extra] + ([] if "-f" in extra else ["-p", "hi"])
        assert_one_line_error(run_cli(*args), needle)
    proc = run_cli("run", small, "-f", long, "--ctx", "16", "-n", "2")
    assert_one_line_error(proc, "16", "--ctx")
    assert proc.stdout == ""  # refused before the prompt is echoed
    # negative controls: an empty prompt generates after <|endoftext|>; -n is clamped to the context
    assert run_cli("run", small, "-p", "", "-n", "2", "--seed", "1").returncode == 0
    proc = run_cli("run", small, "-p", "hi", "--ctx", "16", "-n", "300", "--seed", "1")
    assert proc.returncode == 0 and "generation: " in proc.stderr
    prompt, generated = (int(x.split()[1]) for x in proc.stderr.strip().splitlines()[-1].split("|"))
    assert prompt + generated <= 16


def test_other_mistakes_are_one_line(small, tmp_path):
    calib = tmp_path / "c.txt"
    calib.write_text("x " * 500)
    assert_one_line_error(run_cli("info", tmp_path), "folder")
    assert_one_line_error(run_cli("quantize", small, "--type", "Q4_0", "--mix", "--calib", calib, "--target-size", "5TB",
                                  "--imatrix", "none", "-o", tmp_path / "x.gguf"), "nothing to choose")
    assert_one_line_error(run_cli("quantize", small, "--type", "Q4_0", "--mix", "--calib", calib, "--target-bpw", "nan",
                                  "-o", tmp_path / "x.gguf"), "--target-bpw")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert_one_line_error(run_cli("perplexity", small, "--text", empty), "--text", "empty")
    assert not list(tmp_path.glob("*.gguf"))
