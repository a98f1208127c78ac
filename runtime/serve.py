"""An OpenAI-compatible completions server over neoxq's runtime, on 127.0.0.1 unless told otherwise.

What clients that score text rely on, done right: prompts tokenised as the GPT-NeoX tokenizer does
(NFC, no BOS); `echo` + `logprobs` with `max_tokens: 0` returns the prompt's token log-probs without
generating (computed in one pass, first token null as OpenAI does); `max_tokens` is clamped to the
context left (`finish_reason: "length"`), a prompt that does not fit is a 400. One model, one request
at a time, waiting requests queued (a full queue is a 503 with Retry-After); SIGTERM stops a running
generation at the next token and the server within seconds; `--api-key` requires a bearer token.
"""

import asyncio
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from neoxq.core.errors import MissingExtraError
from neoxq.core.gguf_info import read_info

from .model import NeoxModel, RuntimeOptions
from .score import log_softmax

MAX_QUEUE = 64


class Engine:
    """The model behind the server: one worker thread, a bounded queue, a stop flag per token."""

    def __init__(self, path: Path, options: RuntimeOptions):
        self.model = NeoxModel(path, options)
        self.name = Path(path).stem
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="neoxq-engine")
        self.waiting = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    async def run(self, fn, *args):
        with self.lock:
            if self.waiting >= MAX_QUEUE:
                return None
            self.waiting += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        finally:
            with self.lock:
                self.waiting -= 1

    def logprobs(self, ids: list[int], start: int, k: int) -> dict:
        """OpenAI-style log-probs of ids[start:] given what precedes them (ids[0] has none)."""
        m = self.model
        want = list(range(max(start - 1, 0), len(ids) - 1))
        lp = log_softmax(m.eval_logits(ids, want)) if want else np.zeros((0, m.n_vocab))
        tokens = [m.detokenize([t]) for t in ids[start:]]
        token_lp = ([None] if start == 0 else []) + [float(lp[i, ids[p + 1]]) for i, p in enumerate(want)]
        top = ([None] if start == 0 else []) + [
            {m.detokenize([int(j)]): float(row[j]) for j in np.argsort(-row)[:k]} for row in lp] if k else None
        offsets, pos = [], 0
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {"tokens": tokens, "token_logprobs": token_lp, "top_logprobs": top, "text_offset": offsets}

    def _generate(self, ids: list[int], req: dict, max_tokens: int) -> tuple[list[int], str, str]:
        """Token by token through llama-cpp-python's sampler; stops at a stop string, EOS,
        max_tokens, or server shutdown. Returns (token ids, text, finish reason)."""
        m = self.model
        llm = m.llm
        if req["seed"] is not None:
            llm.set_seed(req["seed"])
        llm.reset()
        gen: list[int] = []
        text = ""
        eos = llm.token_eos()
        for tok in llm.generate(ids, top_k=req["top_k"], top_p=req["top_p"], min_p=0.0, temp=req["temperature"], repeat_penalty=1.0):
            if tok == eos or self.stopping.is_set():
                return gen, text, "stop"
            gen.append(tok)
            text = m.detokenize(gen)
            for stop in req["stop"]:
                if stop and stop in text:
                    return gen, text[: text.index(stop)], "stop"
            if len(gen) >= max_tokens:
                return gen, text, "length"
        return gen, text, "stop"

    def complete(self, req: dict, ids: list[int]) -> dict:
        """The completion of req's prompt, already tokenised as `ids`."""
        m = self.model
        max_tokens = min(req["max_tokens"], max(m.n_ctx - len(ids), 0))
        gen, text, finish = self._generate(ids, req, max_tokens) if max_tokens > 0 else ([], "", "length")
        logprobs = None
        if req["logprobs"] is not None:
            logprobs = self.logprobs(ids + gen, 0 if req["echo"] else len(ids), req["logprobs"])
        return {"text": (req["prompt"] if req["echo"] else "") + text, "logprobs": logprobs, "finish_reason": finish,
                "usage": {"prompt_tokens": len(ids), "completion_tokens": len(gen), "total_tokens": len(ids) + len(gen)}}


def build_app(model: Path | str, n_ctx: int | None = None, n_threads: int | None = None, n_gpu_layers: int | None = None,
              flash_attn: str = "auto", api_key: str | None = None):
    info = read_info(model)  # one clear error for a missing/corrupt/non-NeoX file, before the server starts
    try:
        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse
    except ImportError as exc:
        raise MissingExtraError(f"the server needs extra packages ({exc.name} is missing); install them with: pip install 'neoxq[server]'") from exc
    engine = Engine(info.path, RuntimeOptions(n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers, flash_attn=flash_attn,
                                              repack=None))  # generation: llama.cpp's default (repacked weights decode ~10% faster)
    app = FastAPI(title="neoxq", docs_url=None, redoc_url=None)
    app.state.engine = engine

    def error(status: int, message: str, kind: str = "invalid_request_error", headers=None):
        return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status, headers=headers)

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
            return error(401, "missing or wrong API key (Authorization: Bearer …)", "authentication_error")
        return await call_next(request)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "owned_by": "neoxq", "context_length": engine.model.n_ctx}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            req = _parse(await request.json())
        except ValueError as exc:
            return error(400, str(exc))
        ids = engine.model.tokenize(req["prompt"])
        if len(ids) >= engine.model.n_ctx:
            return error(400, f"the prompt has {len(ids)} tokens; the context holds {engine.model.n_ctx}, so at most {engine.model.n_ctx - 1} fit")
        out = await engine.run(engine.complete, req, ids)
        if out is None:
            return error(503, "the server is busy: too many requests waiting; retry shortly", "server_busy", {"Retry-After": "2"})
        choice = {"index": 0, "text": out["text"], "logprobs": out["logprobs"], "finish_reason": out["finish_reason"]}
        return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()), "model": engine.name,
                "choices": [choice], "usage": out["usage"]}

    return app


def _parse(body) -> dict:
    """The completion request's fields we honour, validated (anything wrong is a 400 with a reason)."""
    if not isinstance(body, dict):
        raise ValueError("the request body must be a JSON object")
    prompt = body.get("prompt", "")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ValueError("prompt must be a string (one prompt per request)")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    logprobs = body.get("logprobs")
    req = {"prompt": prompt, "max_tokens": body.get("max_tokens", 16), "temperature": body.get("temperature", 1.0),
           "top_p": body.get("top_p", 1.0), "top_k": body.get("top_k", 0), "seed": body.get("seed"), "stop": stop,
           "echo": bool(body.get("echo", False)), "logprobs": logprobs}
    for key, lo in (("max_tokens", 0), ("top_k", 0)):
        if not isinstance(req[key], int) or isinstance(req[key], bool) or req[key] < lo:
            raise ValueError(f"{key} must be an integer ≥ {lo}")
    for key in ("temperature", "top_p"):
        if not isinstance(req[key], (int, float)) or req[key] < 0:
            raise ValueError(f"{key} must be a number ≥ 0")
    if logprobs is not None and (not isinstance(logprobs, int) or isinstance(logprobs, bool) or not 0 <= logprobs <= 20):
        raise ValueError("logprobs must be an integer from 0 to 20")
    if not all(isinstance(s, str) for s in stop):
        raise ValueError("stop must be a string or a list of strings")
    if body.get("stream"):
        raise ValueError("stream is not supported; ask without it")
    return req


def serve(model: Path | str, host: str = "127.0.0.1", port: int = 8000, **kw) -> None:
    import uvicorn

    app = build_app(model, **kw)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            app.state.engine.stopping.set()  # a running generation ends at its next token
            super().handle_exit(sig, frame)

    Server(uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=3)).run()
