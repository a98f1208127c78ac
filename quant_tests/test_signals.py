"""Interrupted, terminated, out of space: real subprocesses and real signals; the
file-size limit (RLIMIT_FSIZE, which Python answers with EFBIG instead of SIGXFSZ) stands in for a
full disk without root."""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
import time

import pytest

from .helpers import assert_one_line_error


@pytest.fixture(scope="module")
def small_gguf(ckpt, tmp_path_factory):
    from neoxq.convert.converter import convert

    return convert(str(ckpt), "f16", output=tmp_path_factory.mktemp("sig") / "small-F16.gguf")


def _start(*args, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "neoxq", *map(str, args)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw
    )


@pytest.mark.parametrize("sig,code,word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_signal_while_waiting_exits_with_its_code(small_gguf, sig, code, word):
    proc = _start("run", small_gguf, "-i", "-n", "2", "--ctx", "64")
    proc.stdin.write("first\n")
    proc.stdin.flush()
    # loaded and answered the first line: now waiting for the next. Its speeds line on stderr comes
    # after the completion's last token (a completion may itself hold a newline, so stdout's first
    # line is no sign that it is finished).
    assert "generation:" in proc.stderr.readline()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert err.strip().splitlines()[-1] == word and "Traceback" not in err


def test_help_and_usage_codes_reach_the_shell():
    assert subprocess.run([sys.executable, "-m", "neoxq", "convert", "--help"], capture_output=True).returncode == 0
    assert subprocess.run([sys.executable, "-m", "neoxq", "--version"], capture_output=True).returncode == 0


def _fsize_limit(nbytes):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))

    return apply


def test_convert_over_file_size_limit(ckpt, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "neoxq", "convert", ckpt, "-o", tmp_path / "x.gguf"],
        capture_output=True,
        text=True,
        preexec_fn=_fsize_limit(100_000),
        timeout=300,
    )
    assert_one_line_error(proc, "x.gguf", "file-size limit")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.partial"))


def test_quantize_over_file_size_limit(small_gguf, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "neoxq", "quantize", small_gguf, "--type", "Q8_0", "-o", tmp_path / "q.gguf"],
        capture_output=True,
        text=True,
        preexec_fn=_fsize_limit(50_000),
        timeout=300,
    )
    assert_one_line_error(proc, "q.gguf", "file-size limit")
    assert "check the input" not in proc.stderr  # a good input is not blamed
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.partial"))


def test_sigterm_mid_report_leaves_nothing_half_written(trained, texts, tmp_path):
    (tmp_path / "t.txt").write_text(texts["eval"][:30000])
    out = tmp_path / "r"
    proc = _start("report", trained, "--text", tmp_path / "t.txt", "--ctx", "128", "--types", "Q8_0,Q4_K_M", "-o", out)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("*.gguf")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert not list(out.rglob(".*.partial")) and not (out / "report.json").exists()


def test_sigkill_at_sampled_points_leaves_nothing_or_the_previous_file():
    """Sampled: convert and quantize SIGKILLed at two random points each leave no
    file or the previous valid one, and the rerun is byte-identical (scripts/kill_writers.py runs
    every writer at 20 points). Negative control, in the same run: a writer that writes in place
    is caught with its half-written file (so the run as a whole fails)."""
    from .helpers import REPO

    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "kill_writers.py"), "--points", "2", "--only", "convert,quantize,canary", "--seed", "1"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line and not line.startswith(" ")}
    assert lines["convert"].endswith("all clean") and lines["quantize"].endswith("all clean"), proc.stdout + proc.stderr
    assert not lines["canary"].endswith("all clean") and "after the kill the output is neither" in proc.stdout, proc.stdout
    assert proc.returncode == 1, proc.stderr
