"""An OpenAI-compatible completions server over neoxq's runtime, on 127.0.0.1 unless told otherwise.

What clients that score text rely on, done right: prompts tokenised as the GPT-NeoX tokenizer does
(NFC, no BOS); `echo` + `logprobs` with `max_tokens: 0` returns the prompt's token log-probs without
generating (computed in one pass, first token null as OpenAI does); `max_tokens` is clamped to the
context left (`finish_reason: "length"`), a prompt that does not fit is a 400. One model; up to
--parallel requests decode together in one batch per step (continuous batching, runtime/batch.py),
each as it would alone; further requests wait for a free sequence (a full queue is a 503 with
Retry-After); SIGTERM stops every running generation at its next token and the server within
seconds; a client that disconnects stops its generation at the next token (or, queued, before it
starts); `stream: true` sends server-sent events
as OpenAI does, under the same queue, cancellation and shutdown rules; `--api-key` requires a bearer token.
Requests are validated in completion_request.py: every OpenAI parameter honoured or refused by name.
"""

import asyncio
import contextlib
import dataclasses
import json
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from neoxq.core.errors import MissingExtraError, UsageError
from neoxq.core.gguf_info import read_info
from neoxq.core.machine import default_threads
from neoxq.core.progress import info

from .batch import Batcher, Job, Piece, TokenLogprob
from .model import NeoxModel, RuntimeOptions

if TYPE_CHECKING:
    from .completion_request import Request

MAX_QUEUE = 64  # requests waiting for a sequence, on top of the --parallel ones decoding


def default_parallel() -> int:
    """--parallel's default: one sequence per core, at most 4 (each holds a full --ctx of KV cells)."""
    return max(1, min(4, default_threads()))


MAX_PARALLEL = 256  # llama.cpp's LLAMA_MAX_SEQ


def check_parallel(parallel: int | None) -> int:
    """--parallel as given (default_parallel when None), or one UsageError naming the range."""
    if parallel is None:
        return default_parallel()
    if not 1 <= parallel <= MAX_PARALLEL:
        raise UsageError(f"--parallel {parallel}: pass a number of sequences from 1 to {MAX_PARALLEL} (llama.cpp's limit)")
    return parallel


class Engine:
    """The model behind the server: the batching thread that decodes up to --parallel requests
    together (runtime/batch.py), and the request ↔ job translation."""

    def __init__(self, path: Path, options: RuntimeOptions):
        self.batcher = Batcher(path, options, capacity=options.n_seq + MAX_QUEUE)
        self.model: NeoxModel = self.batcher.model
        self.name = Path(path).stem
        self.stopping = self.batcher.stopping

    def job(self, req: "Request", ids: list[int], cancel: threading.Event, emit) -> Job:
        # echo with log-probs scores the prompt; an empty prompt's start token is not echoed
        score_from = (0 if req.prompt else len(ids)) if req.logprobs is not None and req.echo else None
        return Job(ids, req.sampling, emit, cancel, req.logit_bias, req.logprobs, score_from, stream=req.stream)

    def start(self, req: "Request", ids: list[int], cancel: threading.Event):
        """The request's job, submitted: an asyncio queue that receives its pieces (then None, or an
        exception), or None when the server is full."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        job = self.job(req, ids, cancel, lambda item: loop.call_soon_threadsafe(queue.put_nowait, item))
        return queue if self.batcher.submit(job) else None


async def _pieces(queue: asyncio.Queue):
    """A job's pieces as they arrive; its exception, if any, raised here."""
    while (item := await queue.get()) is not None:
        if isinstance(item, BaseException):
            raise item
        yield item


def _logprobs(entries: list[TokenLogprob], k: int, offset: int = 0) -> dict:
    """OpenAI's log-probs object for these tokens, their text offsets counted from `offset`."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [e.top for e in entries] if k else None,
        "text_offset": offsets,
    }


def _usage(ids: list[int], completion_tokens: int) -> dict:
    return {"prompt_tokens": len(ids), "completion_tokens": completion_tokens, "total_tokens": len(ids) + completion_tokens}


def build_app(model: Path | str, options: RuntimeOptions | None = None, api_key: str | None = None):
    """The server's app for `model` loaded with `options` (weights repacked as llama.cpp does by
    default, which decodes faster)."""
    found = read_info(model)  # one clear error for a missing/corrupt/non-NeoX file, before the server starts
    try:
        from fastapi import FastAPI, Request

        from .completion_request import parse_request
    except ImportError as exc:
        raise MissingExtraError(f"the server needs extra packages ({exc.name} is missing); install them with: pip install 'neoxq[server]'") from exc
    # unrepacked weights: llama.cpp's CPU kernels then compute each row of a batch alone, so a
    # request decoded beside others gets what it gets alone (runtime/batch.py)
    engine = Engine(found.path, dataclasses.replace(options or RuntimeOptions(), repack=False))

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        # the server has stopped taking requests: end the batching thread and free the model
        await asyncio.get_running_loop().run_in_executor(None, engine.batcher.close)

    app = FastAPI(title="neoxq", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.engine = engine
    if api_key:
        app.add_middleware(_BearerKey, key=api_key)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(engine, found)]}

    @app.get("/health")
    async def health():
        """Counters a client or a test can read: requests in flight (waiting or decoding), those
        decoding now and the most ever decoded in one step, tokens generated, generations cancelled
        because their client left."""
        b = engine.batcher
        return {
            "status": "ok",
            "waiting": b.in_flight,
            "decoding": len(b.live),
            "peak_decoding": b.peak,
            "parallel": b.n_seq,
            "generated_tokens": b.generated,
            "cancelled": b.cancelled,
        }

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
        "parallel": engine.batcher.n_seq,
        "n_ctx_train": found.context_length,
        "size_bytes": found.path.stat().st_size,
    }


_BUSY_MESSAGE = "the server is busy: too many requests waiting; retry shortly"


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
    cancel = threading.Event()
    queue = engine.start(req, ids, cancel)
    if queue is None:
        return _error(503, _BUSY_MESSAGE, "server_busy", {"Retry-After": "2"})
    if req.stream:
        return _stream(engine, req, ids, queue, cancel)
    watcher = asyncio.ensure_future(_set_on_disconnect(request, cancel))
    try:
        pieces = [p async for p in _pieces(queue)]
    finally:
        watcher.cancel()
        cancel.set()  # no-op once the job is over; stops it if this handler was cancelled
    if not pieces or pieces[-1].finish is None:  # the client left; nobody reads this
        return _error(499, "client closed the request", "cancelled")
    return {
        "id": f"cmpl-{uuid.uuid4().hex[:24]}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": engine.name,
        "choices": [{"index": 0, **_choice(req, pieces)}],
        "usage": _usage(ids, pieces[-1].completion_tokens),
    }


def _choice(req: "Request", pieces: list[Piece]) -> dict:
    """A finished completion's choice: its text (after the prompt, when echoed), its log-probs."""
    text = "".join(p.text for p in pieces if not p.prompt)
    logprobs = None
    if req.logprobs is not None:
        logprobs = _logprobs([e for p in pieces for e in p.logprobs or []], req.logprobs)
    return {"text": (req.prompt if req.echo else "") + text, "logprobs": logprobs, "finish_reason": pieces[-1].finish}


def _stream(engine: Engine, req: "Request", ids: list[int], queue: asyncio.Queue, cancel: threading.Event):
    """`stream: true`: server-sent events as OpenAI's API sends them (a `data:` line per chunk, then
    `data: [DONE]`). The echoed prompt comes first (with its log-probs when asked for). A client
    that leaves cancels this response (Starlette listens for the disconnect), which stops the
    generation at its next token."""
    from fastapi.responses import StreamingResponse

    head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()), "model": engine.name}
    scored = req.echo and req.logprobs is not None and len(ids) > (0 if req.prompt else len(ids))

    def event(choices: list, usage=None) -> str:
        extra = {"usage": usage} if req.include_usage else {}
        return f"data: {json.dumps({**head, 'choices': choices, **extra})}\n\n"

    def echo(entries: list[TokenLogprob]) -> str:
        lp = _logprobs(entries, req.logprobs) if req.logprobs is not None else None
        return event([{"index": 0, "text": req.prompt, "logprobs": lp, "finish_reason": None}])

    async def events():
        try:
            offset, last = 0, None
            if req.echo and not scored:
                yield echo([])
                offset = len(req.prompt)
            async for p in _pieces(queue):
                if p.prompt:
                    yield echo(p.logprobs)
                    offset = len(req.prompt)
                    continue
                lp = _logprobs(p.logprobs, req.logprobs, offset) if p.logprobs is not None else None
                yield event([{"index": 0, "text": p.text, "logprobs": lp, "finish_reason": p.finish}])
                offset, last = offset + len(p.text), p
            if req.include_usage and last is not None:
                yield event([], _usage(ids, last.completion_tokens))
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
    info(f"serving {model} on http://{host}:{port}/v1, {app.state.engine.batcher.n_seq} requests at a time (Ctrl-C or SIGTERM stops it)")

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            app.state.engine.stopping.set()  # a running generation ends at its next token
            super().handle_exit(sig, frame)

    Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3)).run(sockets=[sock])
