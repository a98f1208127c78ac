"""An OpenAI-compatible completions server over neoxq's runtime, on 127.0.0.1 unless told otherwise.

What clients that score text rely on, done right: prompts tokenised as the GPT-NeoX tokenizer does
(NFC, no BOS); `echo` + `logprobs` with `max_tokens: 0` returns the prompt's token log-probs without
generating (computed in one pass, first token null as OpenAI does); `max_tokens` is clamped to the
context left (`finish_reason: "length"`), a prompt that does not fit is a 400. One model, one request
at a time, waiting requests queued (a full queue is a 503 with Retry-After); SIGTERM stops a running
generation at the next token and the server within seconds; a client that disconnects stops its
generation at the next token (or, queued, before it starts); `stream: true` sends server-sent events
as OpenAI does, under the same queue, cancellation and shutdown rules; `--api-key` requires a bearer token.
Requests are validated in completion_request.py: every OpenAI parameter honoured or refused by name.
"""

import asyncio
import dataclasses
import json
import socket
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from neoxq.core.errors import MissingExtraError, UsageError
from neoxq.core.gguf_info import read_info
from neoxq.core.progress import info

from .generate import completion_steps, pieces
from .model import NeoxModel, RuntimeOptions
from .score import log_softmax

if TYPE_CHECKING:
    from .completion_request import Request

MAX_QUEUE = 64
_BUSY = object()  # Engine.run's answer when the queue is full


class _Either:
    """Set when any of the events is: a generation ends when its client leaves or the server stops."""

    def __init__(self, *events: threading.Event):
        self.events = events

    def is_set(self) -> bool:
        return any(e.is_set() for e in self.events)


class Engine:
    """The model behind the server: one worker thread, a bounded queue, a stop flag per token."""

    def __init__(self, path: Path, options: RuntimeOptions):
        self.model = NeoxModel(path, options)
        self.name = Path(path).stem
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="neoxq-engine")
        self.waiting = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.generated = 0  # tokens generated, all requests
        self.cancelled = 0  # requests stopped or skipped because their client left

    def submit(self, fn, *args):
        """`fn(*args)` queued for the model's one worker thread: its future, or _BUSY when the queue is full."""
        with self.lock:
            if self.waiting >= MAX_QUEUE:
                return _BUSY
            self.waiting += 1
        fut = asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        fut.add_done_callback(lambda _: self._left())
        return fut

    def _left(self) -> None:
        with self.lock:
            self.waiting -= 1

    async def run(self, fn, *args):
        fut = self.submit(fn, *args)
        return _BUSY if fut is _BUSY else await fut

    def logprobs(self, ids: list[int], start: int, k: int) -> dict:
        """OpenAI-style log-probs of ids[start:] given what precedes them (ids[0] has none)."""
        m = self.model
        want = list(range(max(start - 1, 0), len(ids) - 1))
        lp = log_softmax(m.eval_logits(ids, want)) if want else np.zeros((0, m.n_vocab))
        tokens = [m.detokenize([t]) for t in ids[start:]]
        token_lp = ([None] if start == 0 else []) + [float(lp[i, ids[p + 1]]) for i, p in enumerate(want)]
        top = ([None] if start == 0 else []) + [{m.detokenize([int(j)]): float(row[j]) for j in np.argsort(-row)[:k]} for row in lp] if k else None
        offsets, pos = [], 0
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {"tokens": tokens, "token_logprobs": token_lp, "top_logprobs": top, "text_offset": offsets}

    def complete(self, req: "Request", ids: list[int], cancel: threading.Event) -> dict | None:
        """The completion of req's prompt, already tokenised as `ids`; None when its client left
        (a queued request whose client is gone never starts)."""
        if cancel.is_set():
            self.cancelled += 1
            return None
        for c in completion_steps(self.model, ids, req.sampling, _Either(cancel, self.stopping), req.logits_processor()):
            pass
        self.generated += len(c.ids)
        gen, text, finish = c.ids, c.text, c.finish
        if cancel.is_set():
            self.cancelled += 1
            return None
        logprobs = None
        if req.logprobs is not None:
            start = (0 if req.prompt else len(ids)) if req.echo else len(ids)  # an empty prompt's start token is not echoed
            logprobs = self.logprobs(ids + gen, start, req.logprobs)
        return {"text": (req.prompt if req.echo else "") + text, "logprobs": logprobs, "finish_reason": finish, "usage": _usage(ids, gen)}

    def stream(self, req: "Request", ids: list[int], cancel: threading.Event, emit) -> None:
        """The completion of req's prompt as pieces, each passed to `emit` as it can be shown (the
        echoed prompt first), the last with its finish_reason and the usage; then `emit(None)`.
        Log-probs come from the logits each token was sampled from (before any logit_bias)."""
        try:
            if cancel.is_set():
                self.cancelled += 1
                return
            offset = 0
            if req.echo:
                lp = self.logprobs(ids, 0 if req.prompt else len(ids), req.logprobs) if req.logprobs is not None else None
                emit({"text": req.prompt, "logprobs": lp, "finish_reason": None})
                offset = len(req.prompt)
            seen = [] if req.logprobs is not None else None
            steps = completion_steps(self.model, ids, req.sampling, _Either(cancel, self.stopping), req.logits_processor(seen))
            for piece, new, c in pieces(steps, req.sampling.stop):
                lp = None
                if seen is not None:
                    lp = self._step_logprobs(new, seen[: len(new)], offset, req.logprobs)
                    del seen[: len(new)]
                emit({"text": piece, "logprobs": lp, "finish_reason": c.finish, "usage": _usage(ids, c.ids) if c.finish else None})
                offset += len(piece)
            self.generated += len(c.ids)
            if cancel.is_set():
                self.cancelled += 1
        finally:
            emit(None)

    def _step_logprobs(self, new: list[int], rows: list[np.ndarray], offset: int, k: int) -> dict:
        m = self.model
        tokens, token_lp, top, offsets = [], [], [], []
        for tok, row in zip(new, rows):
            lp = log_softmax(row[None, :])[0]
            tokens.append(m.detokenize([tok]))
            token_lp.append(float(lp[tok]))
            top.append({m.detokenize([int(j)]): float(lp[j]) for j in np.argsort(-lp)[:k]} if k else None)
            offsets.append(offset)
            offset += len(tokens[-1])
        return {"tokens": tokens, "token_logprobs": token_lp, "top_logprobs": top if k else None, "text_offset": offsets}


def _usage(ids: list[int], gen: list[int]) -> dict:
    return {"prompt_tokens": len(ids), "completion_tokens": len(gen), "total_tokens": len(ids) + len(gen)}


def build_app(model: Path | str, options: RuntimeOptions | None = None, api_key: str | None = None):
    """The server's app for `model` loaded with `options` (weights repacked as llama.cpp does by
    default, which decodes faster)."""
    found = read_info(model)  # one clear error for a missing/corrupt/non-NeoX file, before the server starts
    try:
        from fastapi import FastAPI, Request

        from .completion_request import parse_request
    except ImportError as exc:
        raise MissingExtraError(f"the server needs extra packages ({exc.name} is missing); install them with: pip install 'neoxq[server]'") from exc
    engine = Engine(found.path, dataclasses.replace(options or RuntimeOptions(), repack=None))
    app = FastAPI(title="neoxq", docs_url=None, redoc_url=None)
    app.state.engine = engine
    if api_key:
        app.add_middleware(_BearerKey, key=api_key)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(engine, found)]}

    @app.get("/health")
    async def health():
        """Counters a client or a test can read: requests waiting, tokens generated, generations
        cancelled because their client left."""
        return {"status": "ok", "waiting": engine.waiting, "generated_tokens": engine.generated, "cancelled": engine.cancelled}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _completions(engine, request, parse_request)

    return app


def _model_card(engine: Engine, found) -> dict:
    """The one model: OpenAI's fields, and what the file is (type, context, size)."""
    return {
        "id": engine.name,
        "object": "model",
        "owned_by": "neoxq",
        "created": int(found.path.stat().st_mtime),
        "type": found.metadata.get("neoxq.quant_type") or (found.quant_type.value if found.quant_type else None),
        "context_length": engine.model.n_ctx,
        "n_ctx_train": found.context_length,
        "size_bytes": found.path.stat().st_size,
    }


async def _completions(engine: Engine, request, parse_request):
    """POST /v1/completions: a 400 for a bad body, a stream or one answer, a 503 when the queue is
    full, a 499 when the client left before its answer."""
    try:
        req = parse_request(await request.json(), engine.model.n_vocab)
        ids = engine.model.prompt_ids(req.prompt)
    except (ValueError, RecursionError) as exc:  # the body is not JSON (or nested past Python's recursion limit)
        return _error(400, f"the request body is not JSON ({type(exc).__name__}: {str(exc)[:80]})")
    except UsageError as exc:
        return _error(400, str(exc))
    if req.stream:
        return _stream(engine, req, ids)
    cancel = threading.Event()
    watcher = asyncio.ensure_future(_set_on_disconnect(request, cancel))
    try:
        out = await engine.run(engine.complete, req, ids, cancel)
    finally:
        watcher.cancel()
    if out is _BUSY:
        return _error(503, "the server is busy: too many requests waiting; retry shortly", "server_busy", {"Retry-After": "2"})
    if out is None:  # the client left; nobody reads this
        return _error(499, "client closed the request", "cancelled")
    choice = {"index": 0, "text": out["text"], "logprobs": out["logprobs"], "finish_reason": out["finish_reason"]}
    return {
        "id": f"cmpl-{uuid.uuid4().hex[:24]}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": engine.name,
        "choices": [choice],
        "usage": out["usage"],
    }


def _stream(engine: Engine, req: "Request", ids: list[int]):
    """`stream: true`: server-sent events as OpenAI's API sends them (a `data:` line per chunk, then
    `data: [DONE]`). A client that leaves cancels this response (Starlette listens for the
    disconnect), which stops the generation at its next token."""
    from fastapi.responses import StreamingResponse

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()
    fut = engine.submit(engine.stream, req, ids, cancel, lambda item: loop.call_soon_threadsafe(queue.put_nowait, item))
    if fut is _BUSY:
        return _error(503, "the server is busy: too many requests waiting; retry shortly", "server_busy", {"Retry-After": "2"})
    head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()), "model": engine.name}

    def event(choices: list, usage=None) -> str:
        extra = {"usage": usage} if req.include_usage else {}
        return f"data: {json.dumps({**head, 'choices': choices, **extra})}\n\n"

    async def events():
        try:
            usage = None
            while (item := await queue.get()) is not None:
                usage = item.pop("usage", None) or usage
                yield event([{"index": 0, **item}])
            await fut  # the worker's exception, if any, ends the stream here
            if req.include_usage and usage:
                yield event([], usage)
            yield "data: [DONE]\n\n"
        finally:
            cancel.set()  # ended early (the client left): the generation stops at its next token

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _error(status: int, message: str, kind: str = "invalid_request_error", headers=None):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status, headers=headers)


async def _set_on_disconnect(request, cancel: threading.Event) -> None:
    """Set `cancel` the moment the client's connection closes (the ASGI server sends
    http.disconnect), so the engine stops at its next token instead of finishing for nobody."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            cancel.set()
            return


class _BearerKey:
    """`--api-key`: every request needs `Authorization: Bearer KEY`. A plain ASGI middleware (not
    FastAPI's http middleware, which wraps the request's receive channel and hides disconnects)."""

    def __init__(self, app, key: str):
        self.app, self.want = app, f"Bearer {key}".encode("latin-1")

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and dict(scope["headers"]).get(b"authorization") != self.want:
            await _error(401, "missing or wrong API key (Authorization: Bearer …)", "authentication_error")(scope, receive, send)
            return
        await self.app(scope, receive, send)


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound before anything else so a port in use or a host that does not
    resolve is one line (uvicorn would log its own and exit 3)."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise UsageError(f"--host {host}: cannot resolve it ({exc.strerror}); pass an address such as 127.0.0.1") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port} ({exc.strerror}); pass --port with a free port or another --host") from None
    return sock


def serve(model: Path | str, host: str = "127.0.0.1", port: int = 8000, options: RuntimeOptions | None = None, api_key: str | None = None) -> None:
    import uvicorn

    sock = listen(host, port)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"warning: serving on {host} without --api-key: anyone who can reach this port can use the model", file=sys.stderr)
    app = build_app(model, options, api_key)
    info(f"serving {model} on http://{host}:{port}/v1 (Ctrl-C or SIGTERM stops it)")

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            app.state.engine.stopping.set()  # a running generation ends at its next token
            super().handle_exit(sig, frame)

    Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3)).run(sockets=[sock])
