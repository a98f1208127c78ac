"""The classes of ordinary mistakes: each is one line naming the problem and the fix, and
nonsense numbers are refused by the one rule in neoxq.core.numbers."""

from __future__ import annotations

import json
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
        (["--temp", "nan"], "--temperature"),
        (["--top-p", "nan"], "--top-p"),
        (["--repeat-penalty", "inf"], "--repeat-penalty"),
        (["--threads", "1000"], "--threads"),
        (["--stop", ""], "stop"),
        (["-f", long, "-p", "hi"], "--prompt-file"),
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
    assert_one_line_error(
        run_cli(
            "quantize", small, "--type", "Q4_0", "--mix", "--calib", calib, "--target-size", "5TB", "--imatrix", "none", "-o", tmp_path / "x.gguf"
        ),
        "nothing to choose",
    )
    assert_one_line_error(
        run_cli("quantize", small, "--type", "Q4_0", "--mix", "--calib", calib, "--target-bpw", "nan", "-o", tmp_path / "x.gguf"), "--target-bpw"
    )
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert_one_line_error(run_cli("perplexity", small, "--text", empty), "--text", "empty")
    assert_one_line_error(run_cli("kld", small, "--reference", small, "--text", calib, "--max-memory", "1KB"), "drop --max-memory")
    assert not list(tmp_path.glob("*.gguf"))


def test_mistakes_found_before_work_leave_nothing(ckpt, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello world")
    assert_one_line_error(run_cli("report", ckpt, "--text", text, "-o", tmp_path / "rep"), "fewer than two windows")
    assert_one_line_error(run_cli("report", ckpt, "--text", text, "-o", tmp_path / "rep", "--imatrix", "sometimes"), "auto, none")
    assert not (tmp_path / "rep").exists()  # the report folder is made only once the checks pass
    assert_one_line_error(run_cli("convert", ckpt, "--revision", "step1000", "-o", tmp_path / "x.gguf"), "local folder", "drop --revision")
    assert not (tmp_path / "x.gguf").exists()
    # contradicting options: a quantized base for --quant is refused before the checkpoint is read
    out = tmp_path / "types"
    assert_one_line_error(run_cli("convert", ckpt, "--outtype", "q8_0", "--quant", "Q4_K_M", "-o", out), "--outtype q8_0", "--outtype f32, f16, bf16")
    assert not out.exists() or not any(out.iterdir())
    # the negative control: a float base with the same --quant is accepted
    out.mkdir(exist_ok=True)
    proc = run_cli("convert", ckpt, "--outtype", "f32", "--quant", "Q4_0", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert {p.name.rsplit("-", 1)[-1] for p in out.glob("*.gguf")} == {"F32.gguf", "Q4_0.gguf"}


def test_option_keywords_have_one_parser():
    """auto, none, hf and f16 read alike in every case, wherever the option is taken; a file is
    refused where only keywords make sense."""
    from neoxq.core.choices import imatrix_choice, reference_choice
    from neoxq.core.errors import UsageError

    assert imatrix_choice("NONE") is None and imatrix_choice(" Auto ") == "auto" and imatrix_choice(None) == "auto"
    assert imatrix_choice("my.imatrix") == "my.imatrix" and imatrix_choice(None, default=None) is None
    assert reference_choice("HF") == "hf" and reference_choice("F16", paths=False) == "f16" and reference_choice("Some/Repo") == "Some/Repo"
    with pytest.raises(UsageError, match="auto"):
        imatrix_choice("my.imatrix", files=False)
    with pytest.raises(UsageError, match="auto, hf or f16"):
        reference_choice("model.gguf", paths=False)


def test_hostile_script_runs_clean():
    """scripts/hostile.py on a slice of its cases (docs/reliability.md's count comes from the whole run)."""
    import subprocess
    import sys

    from .helpers import REPO

    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "hostile.py"), "--only", "info"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "6 of 6 cases clean" in proc.stdout, proc.stdout + proc.stderr


def test_a_reference_or_imatrix_of_another_model_is_refused(ckpt, small, corpus, tmp_path):
    """A twin has the same shapes and vocabulary, other weights; only the source
    fingerprint tells them apart (negative control: the model's own imatrix and reference pass)."""
    from neoxq.convert.converter import convert
    from neoxq.convert.tiny import TinySpec, build_random

    twin = build_random(tmp_path / "twin", TinySpec(config_style="hf4", use_parallel_residual=True, rotary_pct=0.25, seed=7), corpus)
    twin_f16 = convert(str(twin), "f16", output=tmp_path / "twin-F16.gguf")
    text = tmp_path / "t.txt"
    text.write_text(corpus[:6000])
    for src, name in ((twin, "twin.imatrix"), (ckpt, "own.imatrix")):
        assert run_cli("imatrix", src, "--text", text, "-o", tmp_path / name, "--ctx", "64").returncode == 0
    assert_one_line_error(
        run_cli("quantize", small, "--type", "Q4_0", "--imatrix", tmp_path / "twin.imatrix", "-o", tmp_path / "q.gguf"),
        "another model",
        "fingerprints",
    )
    proc = run_cli("quantize", small, "--type", "Q4_0", "--imatrix", tmp_path / "own.imatrix", "-o", tmp_path / "q.gguf")
    assert proc.returncode == 0, proc.stderr
    for ref in (twin_f16, twin):
        assert_one_line_error(run_cli("kld", tmp_path / "q.gguf", "--reference", ref, "--text", text, "--ctx", "64"), "does not belong")
    proc = run_cli("kld", tmp_path / "q.gguf", "--reference", small, "--text", text, "--ctx", "64", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["kld_mean"] > 0, proc.stderr


def test_nan_weights_are_named_not_scored(small, corpus, tmp_path):
    import numpy as np

    from neoxq.core.gguf_info import read_info

    info = read_info(small)
    t = next(t for t in info.tensors if t.name == "blk.0.attn_qkv.weight")
    bad = tmp_path / "nan.gguf"
    data = bytearray(small.read_bytes())
    at = info.data_offset + t.offset
    data[at : at + t.n_bytes] = np.full(t.n_bytes // 2, np.nan, np.float16).tobytes()
    bad.write_bytes(bytes(data))
    text = tmp_path / "t.txt"
    text.write_text(corpus[:20000])
    assert_one_line_error(run_cli("perplexity", bad, "--text", text, "--ctx", "64"), "non-finite", "NaN")
    assert run_cli("perplexity", small, "--text", text, "--ctx", "64").returncode == 0  # negative control


def _advice(proc) -> str:
    """The command a one-line error tells the user to run (between backticks)."""
    import re

    line = proc.stderr.strip().splitlines()[-1]
    m = re.search(r"`(neoxq [^`]+)`", line)
    assert m, line
    return m.group(1)


def test_following_the_advice_works(ckpt, small, corpus, tmp_path):
    """Advice in a message must work when followed; each case runs what the line says."""
    import shlex

    text = tmp_path / "calibration.txt"
    text.write_text(corpus[:8000])
    out = tmp_path / "q.gguf"
    # an IQ type without an importance matrix → the `neoxq imatrix …` it names, then --imatrix
    proc = run_cli("quantize", small, "--type", "IQ2_XXS", "-o", out)
    cmd = shlex.split(_advice(proc).replace("CHECKPOINT", str(ckpt)))[1:]
    assert run_cli(*cmd, "--ctx", "64", cwd=tmp_path).returncode == 0
    assert run_cli("quantize", small, "--type", "IQ2_XXS", "--imatrix", tmp_path / "model.imatrix", "-o", out).returncode == 0
    # a float type given to quantize → the convert command it names
    proc = run_cli("quantize", small, "--type", "F16", "-o", tmp_path / "f.gguf")
    cmd = shlex.split(_advice(proc))[1:]
    assert cmd[:2] == ["convert", "--outtype"]
    assert run_cli(cmd[0], ckpt, *cmd[1:], "-o", tmp_path / "f.gguf").returncode == 0
    # an existing output → --force; too many threads → the largest number it names
    assert "--force" in run_cli("quantize", small, "--type", "Q4_0", "-o", out).stderr
    assert run_cli("quantize", small, "--type", "Q4_0", "-o", out, "--force").returncode == 0
    proc = run_cli("run", small, "-p", "hi", "-n", "1", "--threads", "1000")
    most = proc.stderr.strip().rsplit(" ", 1)[-1]
    assert run_cli("run", small, "-p", "hi", "-n", "1", "--threads", most).returncode == 0
    # --max-memory without --optimize → "drop it"
    assert "drop it" in run_cli("quantize", small, "--type", "Q4_0", "-o", out, "--force", "--max-memory", "8GB").stderr
