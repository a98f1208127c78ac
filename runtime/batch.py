"""Continuous batching: up to `n_seq` sequences decode together, one llama_decode per step.

A request (a `Job`) joins at the next step. Its prompt is decoded alone, in its own sequence (its
own seq_id and KV cells), so its first token comes from the logits it would get alone; from then on
it adds one token to the shared step batch, sampled by its own sampler chain (capi.Sampler) from
its own row of logits. A sequence that ends, or whose client leaves, frees its cells and its
seq_id at once, and the next waiting request takes them. Everything that touches llama.cpp runs
on the one batching thread; other threads only submit jobs and receive pieces.

A request's tokens equal what it gets alone with the same seed wherever llama.cpp computes each
row of a batch independently of the others, which its CPU kernels do when weights are not
repacked (the server loads them so): tested token for token in quant_tests/test_serve.py.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import capi
from .generate import Growth, SamplingOptions, Shown, token_budget
from .model import NeoxModel, RuntimeOptions
from .score import log_softmax


@dataclass
class TokenLogprob:
    """One token as OpenAI's log-probs show it: its text, its log-probability given what precedes
    it (None for a text's first token), and the `k` most likely alternatives."""

    token: str
    logprob: float | None
    top: dict[str, float] | None


@dataclass
class Piece:
    """What a job emits: new text that may be shown, the log-probs of the tokens it adds (when
    asked for), and, on the last piece, why the completion ended. `prompt` marks the piece that
    carries the echoed prompt's log-probs, emitted before any generated text."""

    text: str
    logprobs: list[TokenLogprob] | None = None
    finish: str | None = None
    completion_tokens: int = 0
    prompt: bool = False


@dataclass
class Job:
    """One request to the batcher. `emit` receives Pieces, then None when the job is over (after a
    last Piece with `finish` set, or without one when its client left), or an exception raised on
    its behalf. `score_from`: score the prompt's tokens from this index on (echo with log-probs)."""

    ids: list[int]
    sampling: SamplingOptions
    emit: Callable[[Piece | BaseException | None], None]
    cancel: threading.Event = field(default_factory=threading.Event)
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # alternatives per token; None: no log-probs at all
    score_from: int | None = None
    stream: bool = True  # False: one Piece when the completion ends (no wake-up of the client per token)
    over: bool = False  # set once `emit(None)` has been sent


@dataclass
class _Live:
    """A job that holds a sequence: its sampler, its growing text, what has been shown."""

    job: Job
    seq: int
    sampler: capi.Sampler
    growth: Growth
    shown: Shown
    entries: list[TokenLogprob] = field(default_factory=list)  # log-probs not yet emitted
    last: int = -1  # the token sampled last, decoded at the next step

    @property
    def position(self) -> int:
        return len(self.job.ids) + len(self.growth.c.ids) - 1


class Batcher:
    """The batching thread over one model, whose context holds `options.n_seq` sequences.
    `submit` queues a job (False when `capacity` jobs are already in flight); `stopping` ends every
    running job at its next token (SIGTERM); `close` stops the thread.

    The thread loads the model itself: llama.cpp's CPU backend computes on an OpenMP pool that
    belongs to the thread that starts it, and a second pool left spinning by another thread (the
    load's) takes a core from every decode."""

    def __init__(self, path, options: RuntimeOptions, capacity: int):
        self.n_seq, self.capacity = options.n_seq, capacity
        self.pending: collections.deque[Job] = collections.deque()
        self.live: list[_Live] = []
        self.cond = threading.Condition()
        self.stopping = threading.Event()
        self.in_flight = 0  # submitted and not yet over: queued or decoding
        self.generated = 0  # tokens generated, all jobs
        self.cancelled = 0  # jobs stopped or skipped because their client left
        self.peak = 0  # the most sequences one step has decoded together
        self._closed = False
        loaded: list = []
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(path, options, loaded, ready), name="neoxq-batch", daemon=True)
        self._thread.start()
        ready.wait()
        if isinstance(loaded[0], BaseException):
            raise loaded[0]
        self.model: NeoxModel = loaded[0]

    def submit(self, job: Job) -> bool:
        with self.cond:
            if self.in_flight >= self.capacity:
                return False
            self.in_flight += 1
            self.pending.append(job)
            self.cond.notify()
        return True

    def close(self) -> None:
        with self.cond:
            self._closed = True
            self.cond.notify()
        self._thread.join(timeout=30)

    # The batching thread ---------------------------------------------------------------------
    def _run(self, path, options: RuntimeOptions, loaded: list, ready: threading.Event) -> None:
        try:
            loaded.append(self._load(path, options))
        except BaseException as exc:  # noqa: BLE001 - raised again by the constructor
            loaded.append(exc)
            return
        finally:
            ready.set()
        self._loop()

    def _load(self, path, options: RuntimeOptions) -> NeoxModel:
        model = NeoxModel(path, options)
        self.model, self.decoder, self.eos = model, model.decoder, model.llm.token_eos()
        self.free = list(range(self.n_seq))[::-1]
        return model

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not (self.pending or self.live or self._closed):
                    self.cond.wait()
                if self._closed:
                    break
                gone = [j for j in self.pending if j.cancel.is_set()]  # queued, and their clients left
                for job in gone:
                    self.pending.remove(job)
                joining = [self.pending.popleft() for _ in range(min(len(self.free), len(self.pending)))]
            for job in gone:
                self._over(job, cancelled=True)
            for job in joining:
                self._guarded([job], self._join, job)
            if self.live:
                self._guarded([x.job for x in self.live], self._step)
        for x in list(self.live):
            self._end(x)
        while self.pending:  # never started: their clients are told the job is over
            self._over(self.pending.popleft())
        self.model.close()

    def _guarded(self, jobs: list[Job], fn, *args) -> None:
        """fn(*args); an exception ends the jobs it concerns (each is told), never the thread."""
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - handed to the jobs' clients
            for x in [x for x in self.live if x.job in jobs]:
                self._release(x)
            for job in jobs:
                if not job.over:
                    job.emit(exc)
                    self._over(job)

    def _join(self, job: Job) -> None:
        """Start a job in a free sequence: decode its prompt alone, score it when asked, sample its
        first token."""
        if job.cancel.is_set():
            self._over(job, cancelled=True)
            return
        s = job.sampling
        seed = s.seed if s.seed is not None else self.model.options.seed
        settings = capi.SamplerSettings(
            s.temperature, s.top_k, s.top_p, s.min_p, s.repeat_penalty, s.frequency_penalty, s.presence_penalty, seed, tuple(job.logit_bias.items())
        )
        growth = Growth(self.model, s.stop, token_budget(self.model, len(job.ids), s.max_tokens))
        self.free.sort(reverse=True)
        x = _Live(job, self.free.pop(), capi.Sampler(self.model.n_vocab, settings), growth, Shown(s.stop))
        self.live.append(x)
        row = self._prefill(x)
        if x.growth.budget <= 0 or self.stopping.is_set():
            x.growth.c.finish = "length" if x.growth.budget <= 0 else "stop"
            self._show(x)
            return
        self._take(x, x.sampler.sample(self.model.llm.ctx, -1), row)  # -1: the last batch's last row

    def _prefill(self, x: _Live) -> np.ndarray | None:
        """Decode x's prompt in its sequence, in batches; emit the prompt's log-probs when asked.
        Returns the last position's logits when log-probs are asked for."""
        job, n, nb = x.job, len(x.job.ids), self.decoder.n_batch
        ids = np.asarray(job.ids, dtype=np.int32)
        wanted = np.zeros(n, dtype=np.int8)
        wanted[-1] = 1
        first = None if job.score_from is None or job.score_from >= n else job.score_from
        entries = [TokenLogprob(self.model.detokenize([int(ids[0])]), None, None)] if first == 0 else []
        if first is not None:
            wanted[max(first - 1, 0) : n - 1] = 1
        last = None
        for b in range(0, n, nb):
            stop = min(b + nb, n)
            rows = self.decoder.decode(ids[b:stop], b, wanted[b:stop], x.seq)
            positions = np.flatnonzero(wanted[b:stop]) + b
            for row, p in zip(rows, positions):
                if p < n - 1 and first is not None:
                    entries.append(self._entry(int(ids[p + 1]), row, job.logprobs))
            last = rows[-1].copy() if job.logprobs is not None and stop == n else last
        if first is not None:
            job.emit(Piece("", entries, prompt=True))
        return last

    def _step(self) -> None:
        """One token for every live sequence, in one decode. llama.cpp computes a step in one pass
        only over runs of consecutive seq_ids in increasing order (a KV stream per sequence), so
        the batch is ordered by seq_id and new requests take the lowest free one."""
        live = sorted(self.live, key=lambda x: x.seq)
        self.peak = max(self.peak, len(live))
        tokens = np.array([x.last for x in live], dtype=np.int32)
        positions = np.array([x.position for x in live], dtype=np.int32)
        self.decoder.decode_steps(tokens, positions, np.array([x.seq for x in live], dtype=np.int32))
        ctx = self.model.llm.ctx
        for i, x in enumerate(live):
            row = self.decoder.row(i) if x.job.logprobs is not None else None
            self._take(x, x.sampler.sample(ctx, i), row)

    def _take(self, x: _Live, tok: int, row: np.ndarray | None) -> None:
        """A sampled token: ends the job (its client left, EOS, SIGTERM) or grows its text."""
        if x.job.cancel.is_set():
            self._end(x, cancelled=True)
            return
        if tok == self.eos or self.stopping.is_set():
            x.growth.c.finish = "stop"
        else:
            if row is not None:
                x.entries.append(self._entry(tok, row, x.job.logprobs))
            x.growth.add(tok)
            x.last = tok
        self._show(x)

    def _show(self, x: _Live) -> None:
        c = x.growth.c
        if not (c.finish or x.job.stream):
            return
        piece = x.shown.cut(c)
        if piece is not None:
            text, new = piece
            entries = None
            if x.job.logprobs is not None:
                entries, x.entries = x.entries[: len(new)], x.entries[len(new) :]
            x.job.emit(Piece(text, entries, c.finish, len(c.ids)))
        if c.finish:
            self._end(x)

    def _entry(self, tok: int, row: np.ndarray, k: int) -> TokenLogprob:
        m = self.model
        lp = log_softmax(row[None, :])[0]
        top = {m.detokenize([int(j)]): float(lp[j]) for j in np.argsort(-lp)[:k]} if k else None
        return TokenLogprob(m.detokenize([tok]), float(lp[tok]), top)

    def _release(self, x: _Live) -> None:
        """Free x's sequence: its KV cells, its sampler, its seq_id."""
        self.live.remove(x)
        self.decoder.forget(x.seq)
        x.sampler.close()
        self.free.append(x.seq)
        self.generated += len(x.growth.c.ids)

    def _end(self, x: _Live, cancelled: bool = False) -> None:
        self._release(x)
        self._over(x.job, cancelled)

    def _over(self, job: Job, cancelled: bool = False) -> None:
        self.cancelled += cancelled
        job.over = True
        job.emit(None)
        with self.cond:
            self.in_flight -= 1
