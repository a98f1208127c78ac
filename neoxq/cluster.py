"""Ray for the work neoxq spreads over machines: one place that starts a local Ray or joins a
cluster (saying in one line why it cannot), sizes a task to a node and pins its threads. A sweep
runs one revision per task (neoxq.sweep); a report's `--optimize` types run one type per task here.

A task takes a whole node's cores unless told otherwise, and pins torch to them, so its arithmetic
runs on as many threads as the same work run locally: the numbers are the local run's."""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from neoxq.build import Built, build_optimized
from neoxq.core.errors import UsageError
from neoxq.core.machine import init_process
from neoxq.core.progress import is_quiet, set_quiet
from neoxq.core.qtypes import QuantType

INSTALL = "pip install 'neoxq[sweep]'"


@dataclass(frozen=True)
class Nodes:
    """The largest live node's resources: a task runs on one node, so it may ask for no more."""

    cpus: int
    memory: int  # bytes; 0 when Ray does not say


def check_reachable(address: str) -> None:
    """Ray keeps retrying an address that does not answer; say so in one line within seconds."""
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port or 6379)), timeout=5).close()
    except (OSError, ValueError) as exc:
        raise UsageError(
            f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}); start one with `ray start --head`, "
            "or pass --ray without --ray-address for a local one"
        ) from exc


@contextlib.contextmanager
def ray_session(address: str):
    """Ray started locally (`address` "local") or joined at `address`, with neoxq's and Hugging
    Face's environment passed to the tasks; yields (ray, Nodes) and shuts Ray down after."""
    try:
        import ray
    except ImportError as exc:
        raise UsageError(f"--ray needs the ray package; install it with: {INSTALL}") from exc
    env = {k: v for k, v in os.environ.items() if k.startswith(("HF_", "NEOXQ_"))}
    target = None if address == "local" else address
    if target and target != "auto":
        check_reachable(target)
    try:
        ray.init(address=target, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env}, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise UsageError(
            f"cannot reach the Ray cluster at {address} ({str(exc).splitlines()[0][:120]}); start one with "
            "`ray start --head`, or pass --ray without --ray-address for a local one"
        ) from exc
    try:
        alive = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        nodes = Nodes(int(max((n.get("CPU", 1) for n in alive), default=1)), int(max((n.get("memory", 0) for n in alive), default=0)))
        yield ray, nodes
    finally:
        ray.shutdown()


def set_up_worker(threads: int) -> None:
    """A task's process set up as the CLI sets up its own (neoxq.core.machine.init_process), on
    `threads` cores (llama.cpp's and torch's thread counts follow this process's affinity)."""
    init_process()
    if threads and hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, cores[: max(1, threads)])
    try:
        import torch

        torch.set_num_threads(max(1, threads))
    except ImportError:
        pass


def _optimize_one(ckpt, base: Built, qtype: QuantType, mix: bool, out_dir: str, calib: str, kw: dict, threads: int, quiet: bool) -> Built:
    set_quiet(quiet)
    set_up_worker(threads)
    return build_optimized(ckpt, base, [qtype], Path(out_dir), calib, mix=mix, **kw)[qtype]


def optimize_on_ray(
    ckpt, base: Built, types: list[QuantType], out_dir: Path, calib: str, address: str, mixes=(False,), on_step=None, **kw
) -> list[Built]:
    """build_optimized's files for every type and each of `mixes` (False: <T>-opt, True:
    <T>-opt-mix), in that order: the first here and every other one a Ray task of one Ray session.
    The first makes the calibration pass, which the tasks read from neoxq's cache (a shared
    NEOXQ_CACHE folder on a cluster; a node without it makes the pass again, to the same bytes). The
    same files as made one after another."""
    jobs = [(t, mix) for mix in mixes for t in types if not t.is_float]
    if not jobs:
        return []
    first = build_optimized(ckpt, base, [jobs[0][0]], out_dir, calib, mix=jobs[0][1], on_step=on_step, **kw)[jobs[0][0]]
    made = {jobs[0]: first}
    if len(jobs) > 1:
        with ray_session(address) as (ray, nodes):
            task = ray.remote(num_cpus=nodes.cpus, max_retries=3)(_optimize_one)
            pending = {task.remote(ckpt, base, t, mix, str(out_dir), calib, kw, nodes.cpus, is_quiet()): (t, mix) for t, mix in jobs[1:]}
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                made[pending.pop(done[0])] = built = ray.get(done[0])
                if on_step:
                    on_step(built)
    return [made[j] for j in jobs]
