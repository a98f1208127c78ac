"""The one output-path policy: regular files only, links followed, never the input,
one writer per file at a time; and `-o FOLDER` means a file in it."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from neoxq.core.atomic import atomic_output, check_output
from neoxq.core.errors import OutputError

from .helpers import assert_one_line_error, run_cli


def test_only_regular_files_and_never_an_input(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OutputError, match="is a FIFO"):
        check_output(fifo, force=True)
    with pytest.raises(OutputError, match="character device"):  # refused before anything is opened
        check_output(Path(os.devnull), force=True)
    with pytest.raises(OutputError, match="is a folder.*inside it"):
        check_output(tmp_path, force=True)
    src = tmp_path / "in.gguf"
    src.write_text("x")
    os.link(src, tmp_path / "hard.gguf")
    for target in (src, tmp_path / "hard.gguf"):  # the same file under another name is still the input
        with pytest.raises(OutputError, match="input"):
            check_output(target, force=True, inputs=[src])
    check_output(tmp_path / "other.gguf", force=False, inputs=[src])  # negative control: a new name passes
    check_output(src, force=True, inputs=[tmp_path / "missing"])


def test_a_link_is_followed_not_replaced(tmp_path):
    target = tmp_path / "real.txt"
    link = tmp_path / "link.txt"
    link.symlink_to(target)
    with atomic_output(link) as tmp:
        tmp.write_text("new")
    assert link.is_symlink() and target.read_text() == "new"


def test_one_writer_at_a_time_and_stale_locks_taken_over(tmp_path):
    out = tmp_path / "o.txt"
    with atomic_output(out, force=True) as tmp:
        tmp.write_text("first")
        with pytest.raises(OutputError, match="being written by another neoxq run"):
            with atomic_output(out, force=True):
                pass
    assert out.read_text() == "first" and not list(tmp_path.glob(".*.lock"))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    (tmp_path / ".o.txt.lock").write_text(dead)
    with atomic_output(out, force=True) as tmp:
        tmp.write_text("second")
    assert out.read_text() == "second" and not list(tmp_path.glob(".*.lock"))


def test_quantize_output_policy_from_the_cli(ckpt, tmp_path):
    from neoxq.convert.converter import convert

    f16 = convert(str(ckpt), "f16", output=tmp_path / "m-F16.gguf")
    digest = hashlib.sha256(f16.read_bytes()).hexdigest()
    assert_one_line_error(run_cli("quantize", f16, "--type", "Q8_0", "-o", f16, "--force"), "input")
    assert hashlib.sha256(f16.read_bytes()).hexdigest() == digest
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert_one_line_error(run_cli("quantize", f16, "--type", "Q8_0", "-o", fifo, "--force"), "FIFO")
    assert fifo.is_fifo()
    folder = tmp_path / "out"
    folder.mkdir()
    proc = run_cli("quantize", f16, "--type", "Q8_0", "-o", folder, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in folder.iterdir()] == [p.name for p in folder.glob("*-Q8_0.gguf")] != []
    # Two writers of one file started together: exactly one succeeds, whichever order they run in.
    same = tmp_path / "same.gguf"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "neoxq", "quantize", str(f16), "--type", t, "-o", str(same), "--quiet"], stderr=subprocess.PIPE, text=True
        )
        for t in ("Q8_0", "Q4_0")
    ]
    codes = [p.wait(timeout=300) for p in procs]
    assert sorted(codes) == [0, 1], [p.stderr.read() for p in procs]
    assert not list(tmp_path.glob(".*.partial")) and not list(tmp_path.glob(".*.lock"))
