"""Seeded mutation fuzzing: corrupted GGUF and imatrix files through info, run, quantize,
perplexity and the imatrix reader, and mutated config.json through convert. Every case must end
with exit code 0 or 1, at most two stderr lines, no traceback and no hang. 30 cases run in the fast
tier; the full 240 are marked slow."""

from __future__ import annotations

import json
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from .cli_forks import CliForks

KINDS = ("header", "kv", "tensor_table", "huge_count", "truncate")
COMMANDS = ("info", "run", "quantize", "perplexity", "imatrix")


def mutate(data: bytes, kind: str, rng: random.Random, table_end: int) -> bytes:
    b = bytearray(data)
    if kind == "header":
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(4, 24)] = rng.randrange(256)
    elif kind == "kv":
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(24, max(25, table_end // 2))] = rng.randrange(256)
    elif kind == "tensor_table":
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(table_end // 2, table_end)] = rng.randrange(256)
    elif kind == "huge_count":
        at = rng.choice([8, 16] + [rng.randrange(24, table_end - 8) for _ in range(3)])
        b[at : at + 8] = struct.pack("<Q", rng.choice([2**63 - 1, 2**32 + 1, 2**40, 10**12]))
    else:
        del b[rng.randrange(0, len(b)) :]
    return bytes(b)


def _table_end(path: Path) -> int:
    from neoxq.core.gguf_info import read_info

    return read_info(path, require_arch=None).data_offset


@pytest.fixture(scope="module")
def seeds(ckpt, tmp_path_factory, corpus):
    from neoxq.convert.converter import convert
    from neoxq.core.imatrix_io import IMatrix, write_imatrix
    from neoxq.core.gguf_info import read_info

    d = tmp_path_factory.mktemp("fuzz")
    f16 = convert(str(ckpt), "f16", output=d / "seed.gguf")
    cols = {t.name: t.shape[-1] for t in read_info(f16).tensors if len(t.shape) == 2 and "blk." in t.name}
    import numpy as np

    im = write_imatrix(d / "seed.imatrix", IMatrix({n: np.ones(c, np.float32) for n, c in cols.items()}, {n: 1.0 for n in cols}, ["x"], 1, 16))
    (d / "text.txt").write_text(corpus[:3000])
    return d, f16, im


def _case(i: int, seeds, tmp: Path) -> tuple[list, str]:
    d, f16, im = seeds
    rng = random.Random(1000 + i)
    kind, command = KINDS[i % len(KINDS)], COMMANDS[(i // len(KINDS)) % len(COMMANDS)]
    target = im if command == "imatrix" else f16
    bad = tmp / f"case{i}{target.suffix}"
    bad.write_bytes(mutate(target.read_bytes(), kind, rng, _table_end(target)))
    args = {
        "info": ["info", bad],
        "run": ["run", bad, "-p", "x", "-n", "1", "--ctx", "32"],
        "quantize": ["quantize", bad, "--type", "Q8_0", "-o", tmp / f"out{i}.gguf"],
        "perplexity": ["perplexity", bad, "--text", d / "text.txt", "--ctx", "16"],
        "imatrix": ["quantize", f16, "--type", "Q4_0", "--imatrix", bad, "-o", tmp / f"out{i}.gguf"],
    }[command]
    return args, f"{command}/{kind}"


@pytest.fixture(scope="module")
def forks():
    """Each case in a new process of its own (a crash or a hang is the case's alone), forked from a
    server that imported the CLI once."""
    server = CliForks()
    yield server
    server.close()


def _check(forks: CliForks, args, label: str) -> None:
    try:
        proc = forks.run(args, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{label}: hung for 60 s")
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode in (0, 1), f"{label}: exit {proc.returncode}\n{proc.stderr[-1500:]}"
    assert len(lines) <= 2 and "Traceback" not in proc.stderr, f"{label}: {proc.stderr[-1500:]}"


@pytest.mark.parametrize("i", range(30))
def test_fuzz_fast(i, seeds, forks, tmp_path):
    _check(forks, *_case(i, seeds, tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("i", range(30, 240))
def test_fuzz_full(i, seeds, forks, tmp_path):
    _check(forks, *_case(i, seeds, tmp_path))


CONFIG_MUTATIONS = [
    {"hidden_size": -64},
    {"hidden_size": "64"},
    {"hidden_size": 0},
    {"num_attention_heads": 0},
    {"num_attention_heads": 7},
    {"num_hidden_layers": -1},
    {"num_hidden_layers": 1.5},
    {"num_hidden_layers": 99},
    {"intermediate_size": None},
    {"vocab_size": 3},
    {"vocab_size": [1]},
    {"rotary_pct": 2},
    {"rotary_pct": "x"},
    {"rotary_emb_base": None, "rope_parameters": 5},
    {"layer_norm_eps": "tiny"},
    {"architectures": "GPTNeoXForCausalLM"},
    {"architectures": [3]},
    {"model_type": None, "architectures": None},
    {"hidden_act": 7},
    {"use_parallel_residual": "yes"},
    {"max_position_embeddings": -1},
    {"rope_scaling": {"type": "linear"}},
]


@pytest.mark.parametrize("mutation", CONFIG_MUTATIONS, ids=lambda m: ",".join(m))
def test_mutated_config_through_convert(mutation, ckpt, forks, tmp_path):
    bad = tmp_path / "ck"
    shutil.copytree(ckpt, bad)
    cfg = json.loads((bad / "config.json").read_text()) | mutation
    (bad / "config.json").write_text(json.dumps(cfg))
    _check(forks, ["convert", bad, "-o", tmp_path / "x.gguf"], f"config {mutation}")
    assert not list(tmp_path.glob(".*.partial"))


@pytest.mark.parametrize("text", ["", "{", "[1, 2]", "null", '{"hidden_size": 64}'])
def test_garbage_config_json(text, ckpt, forks, tmp_path):
    bad = tmp_path / "ck"
    shutil.copytree(ckpt, bad)
    (bad / "config.json").write_text(text)
    _check(forks, ["convert", bad, "-o", tmp_path / "x.gguf"], f"config {text!r}")


@pytest.mark.parametrize("target", ["gguf", "imatrix", "config", "request"])
def test_coverage_guided_fuzzing_short_run(target, tmp_path):
    """A short atheris run of each parser from the committed seed corpus finds
    nothing (the recorded million-execution runs are in docs/reliability.md)."""
    pytest.importorskip("atheris")
    from .helpers import REPO

    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "fuzz.py"), target, "--runs", "3000", "--findings", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3,000 executions" in proc.stdout and "no finding" in proc.stdout and not list(tmp_path.iterdir())


def test_fuzzing_reports_a_planted_bug(tmp_path):
    """Negative control: a target with a planted uncaught error is a finding, its input kept."""
    pytest.importorskip("atheris")
    from .helpers import REPO

    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "fuzz.py"), "canary", "--runs", "100", "--findings", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1 and "FINDING" in proc.stdout
    assert [p.read_bytes()[:5] for p in tmp_path.iterdir()] == [b"neoxq"]


def test_a_forked_case_fails_on_a_traceback_and_on_a_hang(seeds, forks, tmp_path):
    """Negative controls of the cases' check: a traceback (--debug's, on a broken file) fails a case,
    and a call past its time is killed and reported, not waited for."""
    d, f16, _ = seeds
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(20))
    with pytest.raises(AssertionError, match="Traceback"):
        _check(forks, ["--debug", "info", bad], "debug")
    with pytest.raises(subprocess.TimeoutExpired):
        forks.run(["perplexity", f16, "--text", d / "text.txt", "--ctx", "16"], timeout=0.01)
    _check(forks, ["info", f16], "the server still answers")
