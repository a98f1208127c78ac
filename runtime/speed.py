"""Prompt-processing and generation speed, timed so that the figure means something: one
warm-up, then the median of several timed runs, with their spread; a busy machine (load average
above the cores, or runs spreading more than 20%) makes the figures `reliable: false`."""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass

from neoxq.core.machine import default_threads

from .model import NeoxModel

MAX_SPREAD = 0.20


@dataclass
class Speed:
    pp_tps: float
    tg_tps: float
    pp_spread: float  # (max − min) / median over the timed runs
    tg_spread: float
    runs: int
    load_avg: float | None
    reliable: bool
    why: str  # empty when reliable

    def as_json(self) -> dict:
        return asdict(self)


def _generation_tps(model: NeoxModel, prompt: list[int], n: int) -> float:
    """Greedy decoding of n tokens, one llama_decode each (what a user's generation does)."""
    logits = model.eval_logits(prompt, [len(prompt) - 1])
    t0 = time.perf_counter()
    tok, pos = int(logits[0].argmax()), len(prompt)
    for _ in range(n):
        view = next(model.iter_logits([tok], start=pos))
        tok, pos = int(view[0].argmax()), pos + 1
    return n / (time.perf_counter() - t0)


def measure(model: NeoxModel, ids: list[int], prompt_tokens: int = 128, gen_tokens: int = 32, runs: int = 3) -> Speed:
    prompt = ids[: min(prompt_tokens, model.n_ctx)]
    gen_prompt = prompt[:16]
    gen_tokens = max(1, min(gen_tokens, model.n_ctx - len(gen_prompt) - 1))
    model.eval_logits(prompt, [len(prompt) - 1])  # warm-up: caches, thread pool, pages
    pp, tg = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        model.eval_logits(prompt, [len(prompt) - 1])
        pp.append(len(prompt) / (time.perf_counter() - t0))
        tg.append(_generation_tps(model, gen_prompt, gen_tokens))
    return _summarize(pp, tg)


def _summarize(pp: list[float], tg: list[float]) -> Speed:
    def spread(xs):
        return (max(xs) - min(xs)) / statistics.median(xs)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    why = []
    if load is not None and load > default_threads():
        why.append(f"load average {load:.1f} above {default_threads()} cores")
    worst = max(spread(pp), spread(tg))
    if worst > MAX_SPREAD:
        why.append(f"runs spread {100 * worst:.0f}% (> {100 * MAX_SPREAD:.0f}%)")
    return Speed(statistics.median(pp), statistics.median(tg), spread(pp), spread(tg), len(pp), load, not why, "; ".join(why))
