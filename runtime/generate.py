"""Streaming completion (Pythia is a plain language model: completion, not chat)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

from .model import NeoxModel


@dataclass
class SamplingOptions:
    max_tokens: int = 128
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def generation_tps(self) -> float:
        return (self.generated_tokens - 1) / self.generation_seconds if self.generation_seconds and self.generated_tokens > 1 else 0.0

    def line(self) -> str:
        return (f"prompt: {self.prompt_tokens} tokens, {self.prompt_tps:.1f} tok/s | "
                f"generation: {self.generated_tokens} tokens, {self.generation_tps:.1f} tok/s")


def generate(model: NeoxModel, prompt: str | list[int], opts: SamplingOptions, stats: GenerationStats | None = None) -> Iterator[str]:
    """Yield text pieces as they are sampled from `prompt` (text, or token ids as they are); fill
    `stats` with prompt/generation speed."""
    ids = model.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(ids)
    if opts.seed is not None:
        model.llm.set_seed(opts.seed)
    model.llm.reset()
    t0 = time.perf_counter()
    t_first = None
    for chunk in model.llm.create_completion(
        ids, max_tokens=opts.max_tokens, temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p,
        min_p=opts.min_p, repeat_penalty=opts.repeat_penalty, stop=opts.stop or None, stream=True,
        seed=opts.seed,
    ):
        choice = chunk["choices"][0]
        if choice.get("finish_reason") and not choice["text"]:
            break  # the closing chunk carries no token
        now = time.perf_counter()
        if t_first is None:
            t_first = now
            stats.prompt_seconds = now - t0
        stats.generated_tokens += 1
        stats.generation_seconds = now - t_first
        yield choice["text"]
