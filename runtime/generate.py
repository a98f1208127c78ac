"""Streaming completion (Pythia is a plain language model: completion, not chat)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from neoxq.core.errors import UsageError
from neoxq.core.numbers import check_number

from .model import NeoxModel

# Each sampling setting's accepted values (low, high, integer), the one statement of them: `run`'s
# options and the server's request fields are both checked here.
SAMPLING_LIMITS = {
    "max_tokens": (0, None, True),
    "temperature": (0.0, None, False),
    "top_k": (0, None, True),
    "top_p": (0.0, 1.0, False),
    "min_p": (0.0, 1.0, False),
    "repeat_penalty": (0.0, None, False),
    "frequency_penalty": (-2.0, 2.0, False),
    "presence_penalty": (-2.0, 2.0, False),
    "seed": (0, 2**32 - 1, True),
}


@dataclass
class SamplingOptions:
    max_tokens: int = 128
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def checked(self, as_flags: bool = False) -> "SamplingOptions":
        """These options, or one UsageError naming the first bad one as a request field (top_p) or,
        `as_flags`, as `neoxq run`'s option (--top-p: every field is also spelled as a flag)."""

        def spell(name: str) -> str:
            return "--" + name.replace("_", "-") if as_flags else name

        for name, (lo, hi, integer) in SAMPLING_LIMITS.items():
            check_number(getattr(self, name), spell(name), lo, hi, integer)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise UsageError(f"{spell('stop')} strings must be non-empty text (an empty one would stop before the first token)")
        return self


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
        return (
            f"prompt: {self.prompt_tokens} tokens, {self.prompt_tps:.1f} tok/s | "
            f"generation: {self.generated_tokens} tokens, {self.generation_tps:.1f} tok/s"
        )


@dataclass
class Completion:
    """A completion as it grows: its token ids, its text (cut at a stop string), why it ended."""

    ids: list[int] = field(default_factory=list)
    text: str = ""
    finish: str | None = None  # None while growing; then "stop" or "length"


class Growth:
    """A completion growing token by token: its text detokenised incrementally, cut at the first
    stop string, ended at `budget` tokens. `add` returns True when the completion has ended."""

    def __init__(self, model: NeoxModel, stops: list[str], budget: int):
        self.model, self.stops, self.budget = model, stops, budget
        self.c = Completion()
        self._bytes, self._searched = bytearray(), 0
        self._longest = max((len(s) for s in stops), default=0)

    def add(self, tok: int) -> bool:
        c = self.c
        c.ids.append(tok)
        # llama-cpp-python's detokenize is each token's piece in turn (EOS, the only special token
        # that could change that, ends a completion before it is added), so the text grows by this
        # token's bytes alone
        self._bytes += self.model.llm.detokenize([tok])
        c.text = self._bytes.decode("utf-8", errors="replace")
        # a stop string not found before can only end in the new text (or in the last characters
        # of the old, which a completed UTF-8 character may have changed)
        hit = min((i for s in self.stops if (i := c.text.find(s, self._searched)) >= 0), default=None)
        self._searched = max(0, len(c.text) - self._longest - 3)
        if hit is not None:
            c.text, c.finish = c.text[:hit], "stop"
        elif len(c.ids) >= self.budget:
            c.finish = "length"
        return c.finish is not None


def token_budget(model: NeoxModel, n_prompt: int, max_tokens: int) -> int:
    """How many tokens a completion may add: max_tokens clamped to the context left (llama.cpp pads
    its context to 256s, so the clamp is ours)."""
    return min(max_tokens, model.n_ctx - n_prompt)


def completion_steps(model: NeoxModel, ids: list[int], opts: SamplingOptions, cancel=None) -> Iterator[Completion]:
    """The one-sequence sampling loop (`run`): token by token through llama-cpp-python's sampler,
    the same Completion yielded after each token and once more when it ends (at EOS, a stop string,
    max_tokens clamped to the context asked for, or `cancel` being set: checked before every token,
    so a cancelled generation stops within one)."""
    llm = model.llm
    opts.checked()
    growth = Growth(model, opts.stop, token_budget(model, len(ids), opts.max_tokens))
    c = growth.c
    if growth.budget <= 0:
        c.finish = "length"
        yield c
        return
    if opts.seed is not None:
        llm.set_seed(opts.seed)
    llm.reset()
    eos = llm.token_eos()
    for tok in llm.generate(
        ids,
        top_k=opts.top_k,
        top_p=opts.top_p,
        min_p=opts.min_p,
        temp=opts.temperature,
        repeat_penalty=opts.repeat_penalty,
        frequency_penalty=opts.frequency_penalty,
        presence_penalty=opts.presence_penalty,
    ):
        if tok == eos or (cancel is not None and cancel.is_set()):
            c.finish = "stop"
            break
        if growth.add(tok):
            break
        yield c
    c.finish = c.finish or "stop"
    yield c


def _safe_end(text: str, stops: list[str]) -> int:
    """How much of a growing text can be shown: not a trailing partial UTF-8 character (decoded as
    U+FFFD) nor a tail that may still become a stop string."""
    end = len(text.rstrip("\ufffd"))
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[:end].endswith(s[:k]):
                end -= k
                break
    return end


class Shown:
    """How much of a growing completion has been shown: `cut` gives the new text that may be shown
    now and the token ids added since the last piece, or None when nothing can be shown yet (text
    that may still become a stop string or is half a UTF-8 character waits, see _safe_end). Once
    the completion has ended, `cut` always gives its last piece."""

    def __init__(self, stops: list[str]):
        self.stops, self.shown, self.sent = stops, 0, 0

    def cut(self, c: Completion) -> tuple[str, list[int]] | None:
        end = len(c.text) if c.finish else _safe_end(c.text, self.stops)
        if end <= self.shown and not c.finish:
            return None
        out = c.text[self.shown : end], c.ids[self.sent :]
        self.shown, self.sent = max(self.shown, end), len(c.ids)
        return out


def pieces(steps: Iterable[Completion], stops: list[str]) -> Iterator[tuple[str, list[int], Completion]]:
    """A growing completion as it may be shown: (new text, the token ids added since the last piece,
    the completion), whenever text can be shown and once at the end (`c.finish` set)."""
    shown = Shown(stops)
    for c in steps:
        if (piece := shown.cut(c)) is not None:
            yield piece[0], piece[1], c


def generate(model: NeoxModel, prompt: str | list[int], opts: SamplingOptions, stats: GenerationStats | None = None, cancel=None) -> Iterator[str]:
    """Yield text pieces as they are sampled from `prompt` (text, or token ids as they are); fill
    `stats` with prompt/generation speed; stop within one token of `cancel` being set."""
    ids = model.prompt_ids(prompt) if isinstance(prompt, str) else list(prompt)
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(ids)
    t0 = time.perf_counter()
    t_first = None
    for piece, _, c in pieces(completion_steps(model, ids, opts, cancel), opts.stop):
        now = time.perf_counter()
        if c.ids and t_first is None:
            t_first = now
            stats.prompt_seconds = now - t0
        stats.generated_tokens = len(c.ids)
        stats.generation_seconds = now - (t_first or now)
        if piece:
            yield piece
