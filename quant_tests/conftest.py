"""Session-scoped checkpoints built locally (nothing downloaded).

Tiers: every test whose fixtures reach the briefly trained model (`trained`) is marked slow
automatically; `make test-fast` (-m "not slow") runs the rest in well under two minutes.
Shared helpers live in helpers.py.
"""

from __future__ import annotations

# llama.cpp's libraries before numpy and torch, as the CLI loads them: a CUDA build segfaults
# loading a model otherwise (neoxq/runtime/__init__.py).
import neoxq.runtime  # noqa: F401  isort: skip

import dataclasses
import functools
import os
from pathlib import Path

import pytest
from filelock import FileLock

from neoxq.core.machine import environment
from neoxq.demo import demo_spec
from neoxq.convert.tiny import TinySpec, build_random, stdlib_text


# The converter's checkpoint matrix: config styles, residual, rotary, formats, dtypes.
CASES = {
    "hf4-parallel-rot025-safetensors": TinySpec(config_style="hf4", use_parallel_residual=True, rotary_pct=0.25, weights="safetensors"),
    "hf5-sequential-rot1-sharded-tied": TinySpec(
        config_style="hf5", use_parallel_residual=False, rotary_pct=1.0, weights="sharded", tie_word_embeddings=True, seed=1
    ),
    "hf4-bin-fp16": TinySpec(config_style="hf4", weights="bin", dtype="float16", rotary_pct=0.25, seed=2),
    "hf5-sharded-bin-bf16-rot1": TinySpec(
        config_style="hf5", weights="sharded-bin", dtype="bfloat16", rotary_pct=1.0, use_parallel_residual=False, seed=3
    ),
}


@pytest.fixture(scope="session")
def corpus() -> str:
    return stdlib_text(150_000)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, corpus) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    return {name: build_random(root / name, spec, corpus) for name, spec in CASES.items()}


@pytest.fixture(scope="session")
def ckpt(checkpoints) -> Path:
    """The default small checkpoint (Pythia layout: hf4 config, parallel residual, 25% rotary)."""
    return checkpoints["hf4-parallel-rot025-safetensors"]


@pytest.fixture(scope="session")
def sample_ids(ckpt, corpus) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(ckpt / "tokenizer.json")).encode(corpus[5000:9000]).ids[:96]


# A briefly trained model, for tests where quality must mean something. Rows are 256 wide so
# k-/i-quants apply without fallbacks; outlier activation channels as in real LLMs. The demo
# model's widths (one statement of them, in neoxq.demo) in two layers: every sequential step
# (a layer rounded on the rounded layers before it, a resume from a later layer) still happens,
# at half the cost of each of the many passes the suite makes.
TRAINED_SPEC = dataclasses.replace(demo_spec(), num_hidden_layers=2)


@functools.cache
def training_texts() -> dict[str, str]:
    """Training text, then held-out parts: calibration (imatrix) and evaluation never overlap."""
    full = stdlib_text(600_000)
    return {"train": full[:400_000], "eval": full[400_000:440_000], "calib": full[440_000:480_000]}


@pytest.fixture(scope="session")
def texts() -> dict[str, str]:
    return training_texts()


def shared_dir(tmp_path_factory) -> Path:
    """The run's folder all xdist workers see (their own base folders sit inside it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def train_once(root: Path) -> Path:
    """The trained model in `root`, built by the first process that asks (under a lock); the others
    wait and read it."""
    from neoxq.convert.tiny import build_trained

    folder, done = root / "trained" / "tiny-neox", root / "trained" / "complete"
    with FileLock(str(root / "trained.lock")):
        if not done.is_file():
            build_trained(folder, TRAINED_SPEC, training_texts()["train"], steps=200)
            done.touch()
    return folder


@pytest.fixture(scope="session", autouse=True)
def own_cache(tmp_path_factory):
    """neoxq's cache (NEOXQ_CACHE) in the run's own folder, shared by its workers as one machine's
    processes share it, never the user's ~/.cache/neoxq: no entry left by an earlier run or
    another checkout stands in for this code's work, and every run starts as cold as a new
    machine. Tests that need a cache of their own still set one."""
    with environment({"NEOXQ_CACHE": str(shared_dir(tmp_path_factory) / "neoxq-cache")}):
        yield


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    return train_once(shared_dir(tmp_path_factory))


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session):
    """Under xdist the controller trains the shared model on every core before the workers start
    (each worker then has one core, and most test files need the model)."""
    config = session.config
    if os.environ.get("PYTEST_XDIST_WORKER") or not getattr(config.option, "numprocesses", None):
        return
    if "not slow" in (config.option.markexpr or ""):
        return
    train_once(config._tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def trained_f16(trained, tmp_path_factory) -> Path:
    from neoxq.convert.converter import convert

    return convert(str(trained), "f16", out_dir=tmp_path_factory.mktemp("trained_gguf"))


@pytest.fixture(scope="session")
def trained_f32(trained, tmp_path_factory) -> Path:
    from neoxq.convert.converter import convert

    return convert(str(trained), "f32", out_dir=tmp_path_factory.mktemp("f32"))


@pytest.fixture(scope="session")
def trained_imatrix(trained, texts, tmp_path_factory) -> Path:
    from neoxq.convert.imatrix import compute_imatrix
    from neoxq.core.imatrix_io import write_imatrix

    im = compute_imatrix(str(trained), texts["calib"], ctx=128, dataset_name="calib")
    return write_imatrix(tmp_path_factory.mktemp("imatrix") / "tiny.imatrix", im)


def pytest_configure(config):
    """Under xdist each worker runs on cores of its own: llama.cpp's threads spin-wait for each
    other, so two workers whose threads share cores stall each other. Child processes inherit the
    cores, and neoxq's thread defaults (neoxq.core.machine.default_threads) follow them."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    mine = cores[int(worker.removeprefix("gw")) % count :: count] or cores
    os.sched_setaffinity(0, mine)
    # OpenMP counted the cores when it loaded (llama.cpp loads it on import, before this pinning):
    # torch's pool would keep two threads on one core, spinning against each other. Child
    # processes read the variables and the affinity when they start.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(len(mine))
    import torch

    torch.set_num_threads(len(mine))


def pytest_collection_modifyitems(config, items):
    """Anything that needs the trained model (directly or through another fixture) is slow. Files
    are then ordered by their count of slow test functions, most first (stable otherwise): `make test` hands
    whole files to two workers in this order (`--dist loadfile --no-loadscope-reorder`), and
    starting the longest files first lets both workers finish together."""
    for item in items:
        if "trained" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
    slow: dict[str, set[str]] = {}  # file → its slow test functions (a parametrized one counts once)
    for item in items:
        names = slow.setdefault(item.nodeid.split("::")[0], set())
        if item.get_closest_marker("slow"):
            names.add(item.originalname)
    items.sort(key=lambda item: -len(slow[item.nodeid.split("::")[0]]))
