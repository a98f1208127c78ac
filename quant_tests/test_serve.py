"""The server as a client uses it, with the official `openai` client against a
server this test starts: tokenisation, prompt scoring, clamping, queueing, errors, shutdown, keys."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import unicodedata

import numpy as np
import pytest

openai = pytest.importorskip("openai")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model, *extra, ctx=128):
    import httpx

    port = _port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "neoxq", "serve", str(model), "--port", str(port), "--ctx", str(ctx), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            httpx.get(f"{base}/v1/models", timeout=1)
            return proc, base
        except httpx.HTTPError:
            if proc.poll() is not None:
                pytest.fail(proc.stderr.read())
            time.sleep(0.25)
    proc.kill()
    pytest.fail("the server did not start")


@pytest.fixture(scope="module")
def server(trained_f32):
    proc, base = start(trained_f32)
    yield base
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)


def client(base, key="none"):
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)


def test_prompt_scoring_matches_transformers(server, trained):
    """echo + logprobs + max_tokens 0: the prompt's log-probs, no generation, NFC tokenisation."""
    import torch
    from tokenizers import Tokenizer

    from neoxq.convert.reference import load_reference

    text = unicodedata.normalize("NFD", "Return the café's naïve value of the résumé, or None.")
    r = client(server).completions.create(model="x", prompt=text, max_tokens=0, echo=True, logprobs=1, temperature=0)
    lp = r.choices[0].logprobs
    ids = Tokenizer.from_file(str(trained / "tokenizer.json")).encode(text).ids  # HF applies NFC
    assert len(lp.tokens) == len(ids) and r.usage.completion_tokens == 0 and lp.token_logprobs[0] is None
    with torch.no_grad():
        ref = torch.log_softmax(load_reference(trained)(torch.tensor([ids])).logits[0].double(), -1).numpy()
    want = ref[np.arange(len(ids) - 1), ids[1:]]
    # F32 GGUF vs transformers: measured up to 2e-3 on log-probs near -11 (llama.cpp's tanh GELU)
    assert np.abs(np.array(lp.token_logprobs[1:]) - want).max() < 5e-3
    assert r.choices[0].text == text


def test_generation_clamped_and_long_prompt_refused(server, texts):
    r = client(server).completions.create(model="x", prompt="The function", max_tokens=100000, temperature=0)
    assert r.usage.prompt_tokens + r.usage.completion_tokens <= 128 and r.choices[0].finish_reason in ("length", "stop")
    with pytest.raises(openai.BadRequestError, match="context"):
        client(server).completions.create(model="x", prompt=texts["eval"][:5000], max_tokens=4)


def test_concurrent_clients_all_answered(server):
    results, errors = [], []

    def ask(i):
        try:
            results.append(client(server).completions.create(model="x", prompt=f"Item {i}:", max_tokens=8, temperature=0))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 6


def test_malformed_requests_are_400_and_serving_goes_on(server):
    import httpx

    assert httpx.post(f"{server}/v1/completions", content=b"{not json", headers={"content-type": "application/json"}).status_code in (400, 422)
    assert httpx.post(f"{server}/v1/completions", json={"prompt": "x", "max_tokens": -3}).status_code == 400
    assert httpx.post(f"{server}/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_sigterm_stops_mid_generation(trained_f32):
    """A streamed generation is known to be running once its first chunk arrives (no sleep): SIGTERM
    then ends it at its next token, the stream closes, and the server exits within seconds."""
    proc, base = start(trained_f32, ctx=512)
    stream = client(base).completions.create(model="x", prompt="The", max_tokens=500, temperature=0.8, stream=True)
    chunks = iter(stream)
    assert next(chunks).choices[0].text is not None
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=15)
    assert time.time() - t0 < 10 and proc.returncode in (0, 143)
    rest = []
    _quiet(lambda: rest.extend(chunks))
    assert len(rest) < 499  # stopped, not run to max_tokens


def _quiet(fn):
    try:
        fn()
    except Exception:  # noqa: BLE001 - the server went away on purpose
        pass


def test_api_key_and_binding(trained_f32):
    proc, base = start(trained_f32, "--api-key", "s3cret")
    try:
        with pytest.raises(openai.AuthenticationError):
            client(base).completions.create(model="x", prompt="a", max_tokens=1)
        assert client(base, "s3cret").completions.create(model="x", prompt="a", max_tokens=1).usage.prompt_tokens >= 1
        assert any(c.laddr.ip == "127.0.0.1" for c in _listening(proc.pid))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def _listening(pid):
    out = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True).stdout
    rows = [l for l in out.splitlines() if f"pid={pid}," in l]

    class C:
        def __init__(self, row):
            self.laddr = type("A", (), {"ip": row.split()[3].rsplit(":", 1)[0]})

    return [C(r) for r in rows]


@pytest.fixture(scope="module")
def small_server(ckpt, tmp_path_factory):
    """A server on the random 64-wide checkpoint: request handling needs no trained model."""
    from neoxq.convert.converter import convert

    f16 = convert(str(ckpt), "f16", output=tmp_path_factory.mktemp("serve") / "s-F16.gguf")
    proc, base = start(f16, "--parallel", "3", ctx=512)
    yield base
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)


def test_every_openai_parameter_honoured_or_refused_by_name(small_server):
    """Never a 500 for a request we can validate, never a parameter silently ignored."""
    import httpx

    def post(**body):  # json.dumps writes NaN as JavaScript does, as a careless client would
        return httpx.post(f"{small_server}/v1/completions", content=json.dumps(body), headers={"content-type": "application/json"}, timeout=60)

    refused = {
        "n": 5,
        "best_of": 3,
        "suffix": "x",
        "stream": "yes",
        "foo": 1,
        "temperature": float("nan"),
        "top_p": 2,
        "max_tokens": "5",
        "logprobs": 50,
        "logit_bias": {"999999": 1},
        "stop": [""],
        "prompt": ["a", "b"],
    }
    for key, value in refused.items():
        r = post(**{"prompt": "hi", key: value})
        assert r.status_code == 400 and key.split("_")[0] in r.json()["error"]["message"], (key, r.text)
    r = httpx.post(f"{small_server}/v1/completions", content=b'{"prompt": "\\ud800 x"}', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "surrogate" in r.text
    # honoured: an empty prompt starts after <|endoftext|>; n=1 and user are fine; logit_bias steers the choice
    r = post(prompt="", max_tokens=3, n=1, user="me", temperature=0)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    plain = post(prompt="hi", max_tokens=4, temperature=0).json()["choices"][0]["text"]
    forced = post(prompt="hi", max_tokens=4, temperature=0, logit_bias={"12": 100}).json()
    ids = httpx.post(f"{small_server}/v1/completions", json={"prompt": "hi", "max_tokens": 0, "echo": True, "logprobs": 0}).json()
    assert forced["choices"][0]["text"] != plain and ids["usage"]["completion_tokens"] == 0
    assert post(prompt="hi", max_tokens=2).status_code == 200  # negative control: a plain request still works


def test_a_client_that_leaves_stops_its_generation(small_server):
    """12 clients send a 500-token request and hang up at once: each generation is stopped at its
    next token (or never starts), counted by the server, not timed."""
    import httpx

    # end-of-text (id 0) barred: no generation may end on its own before its hang-up is noticed
    body = json.dumps({"prompt": "The", "max_tokens": 500, "temperature": 0.8, "logit_bias": {"0": -100}}).encode()
    raw = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    host, port = small_server.removeprefix("http://").split(":")
    before = httpx.get(f"{small_server}/health").json()
    for _ in range(12):
        with socket.create_connection((host, int(port))) as s:
            s.sendall(raw)
    r = httpx.post(f"{small_server}/v1/completions", json={"prompt": "a", "max_tokens": 2}, timeout=120)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    # a hang-up may be noticed after the request above is answered: wait for the count
    deadline = time.monotonic() + 60
    while (after := httpx.get(f"{small_server}/health").json())["cancelled"] - before["cancelled"] < 12 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert after["cancelled"] - before["cancelled"] == 12
    # every one finished would be 12 × 500; measured 12-20 in all on two cores
    assert after["generated_tokens"] - before["generated_tokens"] - 2 < 500


def _streamed(base, **body):
    out = list(client(base).completions.create(model="x", stream=True, **body))
    return out, "".join(c.choices[0].text for c in out if c.choices)


def test_streaming_equals_the_plain_answer(small_server):
    """`stream: true` through the official client's streaming API: the pieces join into the plain
    answer's text, the last piece says why it ended, the usage chunk counts the same tokens, and the
    streamed log-probs (from the logits each token was sampled from) equal the plain answer's (one
    pass over the finished text). Echo streams the prompt first. Negative control: another seed
    samples another text."""
    body = {"prompt": "The quick", "max_tokens": 24, "temperature": 0.9, "seed": 7, "logprobs": 2}
    plain = client(small_server).completions.create(model="x", **body)
    chunks, text = _streamed(small_server, **body, stream_options={"include_usage": True})
    assert text == plain.choices[0].text and len(chunks) > 3
    ends = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert ends[-1] == plain.choices[0].finish_reason and all(e is None for e in ends[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    lp = [x for c in chunks if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs]
    toks = [x for c in chunks if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.tokens]
    assert toks == plain.choices[0].logprobs.tokens
    np.testing.assert_allclose(lp, plain.choices[0].logprobs.token_logprobs, atol=2e-3)
    offsets = [x for c in chunks if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.text_offset]
    assert offsets == plain.choices[0].logprobs.text_offset
    echoed, etext = _streamed(small_server, prompt="The quick", max_tokens=4, temperature=0, echo=True)
    assert echoed[0].choices[0].text == "The quick" and etext.startswith("The quick") and len(etext) > len("The quick")
    _, other = _streamed(small_server, **{**body, "seed": 8})
    assert other != text


def test_streaming_client_that_leaves_stops_its_generation(small_server):
    """A streamed request whose client hangs up after its first piece: cancelled (counted by the
    server), its generation stopped at its next token rather than run to max_tokens."""
    import httpx

    before = httpx.get(f"{small_server}/health").json()
    with httpx.stream(
        "POST", f"{small_server}/v1/completions", json={"prompt": "The", "max_tokens": 500, "temperature": 0.8, "stream": True}, timeout=60
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        first = next(r.iter_lines())
        assert first.startswith("data: {")
    for _ in range(200):  # the server notices the hang-up asynchronously: wait for its count, not a time
        after = httpx.get(f"{small_server}/health").json()
        if after["cancelled"] > before["cancelled"] and after["waiting"] == 0:
            break
        time.sleep(0.05)
    assert after["cancelled"] - before["cancelled"] == 1
    assert after["generated_tokens"] - before["generated_tokens"] < 500
    done = httpx.post(f"{small_server}/v1/completions", json={"prompt": "a", "max_tokens": 2}, timeout=60)
    assert done.status_code == 200  # serving goes on


def test_stream_options_and_models(small_server):
    import httpx

    bad = httpx.post(f"{small_server}/v1/completions", json={"prompt": "a", "stream_options": {"include_usage": True}})
    assert bad.status_code == 400 and "stream_options" in bad.json()["error"]["message"]
    bad = httpx.post(f"{small_server}/v1/completions", json={"prompt": "a", "stream": True, "stream_options": {"chunked": 1}})
    assert bad.status_code == 400 and "include_usage" in bad.json()["error"]["message"]
    m = client(small_server).models.list().data[0].model_dump()
    assert m["type"] == "F16" and m["context_length"] == 512 and m["size_bytes"] > 10**5 and m["n_ctx_train"] > 0


def test_startup_failures_are_one_line(small_server, ckpt, tmp_path):
    from neoxq.convert.converter import convert

    from .helpers import assert_one_line_error, run_cli

    f16 = convert(str(ckpt), "f16", output=tmp_path / "m.gguf")
    port = small_server.rsplit(":", 1)[1]
    assert_one_line_error(run_cli("serve", f16, "--port", port), "cannot listen", "--port")
    assert_one_line_error(run_cli("serve", f16, "--host", "no.such.host.invalid", "--api-key", "k"), "cannot resolve")


def test_a_full_queue_refuses_streamed_and_plain_requests_alike(ckpt, tmp_path):
    """With no room in the queue, a streamed request is refused like a plain one (503, Retry-After)
    before any event is sent; with room, the same requests are answered (negative control)."""
    from fastapi.testclient import TestClient

    from neoxq.convert.converter import convert
    from neoxq.runtime import serve

    f16 = convert(str(ckpt), "f16", output=tmp_path / "q.gguf")
    from neoxq.runtime.model import RuntimeOptions

    app = serve.build_app(f16, RuntimeOptions(n_ctx=128))
    with TestClient(app) as c:
        for body in ({"prompt": "a", "max_tokens": 2}, {"prompt": "a", "max_tokens": 2, "stream": True}):
            assert c.post("/v1/completions", json=body).status_code == 200
        app.state.engine.batcher.capacity = 0  # every sequence busy and the queue full
        for body in ({"prompt": "a", "max_tokens": 2}, {"prompt": "a", "max_tokens": 2, "stream": True}):
            r = c.post("/v1/completions", json=body)
            assert r.status_code == 503 and r.headers["retry-after"] == "2" and "busy" in r.json()["error"]["message"]


def test_batched_requests_equal_what_each_gets_alone(small_server):
    """Requests decoded together (--parallel 3, 8 at once) get, token for token, what each gets alone: seeded sampling, greedy with a stop string and a logit bias,
    prompt scoring, a stream. The server's own count shows they shared steps (a test where they
    ran one after another would pass vacuously); another seed samples another text (negative control)."""
    import httpx

    words = ["king", "city", "river", "music", "war"]
    bodies = [{"prompt": f"The {w} of", "max_tokens": 60, "temperature": 0.9, "seed": i, "logprobs": 2} for i, w in enumerate(words)]
    bodies += [
        {"prompt": "a b c", "max_tokens": 12, "temperature": 0, "stop": ["\n"], "logit_bias": {"0": -100}},
        {"prompt": "Hello world", "max_tokens": 0, "echo": True, "logprobs": 1},
    ]

    def ask(body):
        return httpx.post(f"{small_server}/v1/completions", json=body, timeout=120).json()

    alone = [ask(b) for b in bodies]
    streamed_alone = _streamed(small_server, **bodies[0])[1]
    before = httpx.get(f"{small_server}/health").json()["peak_decoding"]
    together: list = [None] * len(bodies)
    streamed: list = []
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, ask(bodies[i]))) for i in range(len(bodies))]
    threads.append(threading.Thread(target=lambda: streamed.append(_streamed(small_server, **bodies[0])[1])))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 2 <= httpx.get(f"{small_server}/health").json()["peak_decoding"] <= 3 and before <= 3
    for x, y in zip(alone, together):
        a, b = x["choices"][0], y["choices"][0]
        assert a["text"] == b["text"] and x["usage"] == y["usage"] and a["finish_reason"] == b["finish_reason"]
        if a["logprobs"]:
            # this file's F16 weights go through llamafile's batched matmul, whose sums depend on
            # the batch's width: equal to float32 rounding (bit for bit on K-quant files)
            assert a["logprobs"]["tokens"] == b["logprobs"]["tokens"] and a["logprobs"]["text_offset"] == b["logprobs"]["text_offset"]
            lp = [(u, v) for u, v in zip(a["logprobs"]["token_logprobs"], b["logprobs"]["token_logprobs"]) if u is not None]
            np.testing.assert_allclose(*zip(*lp), atol=2e-3)
    assert streamed == [streamed_alone] == [alone[0]["choices"][0]["text"]]
    assert ask({**bodies[0], "seed": 99})["choices"][0]["text"] != alone[0]["choices"][0]["text"]


def test_parallel_out_of_range_is_one_line(ckpt, tmp_path):
    """--parallel outside 1…256, or more sequences than the memory holds: one line, no server."""
    from neoxq.convert.converter import convert

    from .helpers import assert_one_line_error, run_cli

    f16 = convert(str(ckpt), "f16", output=tmp_path / "p.gguf")
    for bad in ("0", "300"):
        assert_one_line_error(run_cli("serve", f16, "--parallel", bad), "--parallel", "256")
    # each sequence holds --ctx cells: more sequences than the memory holds is refused up front
    from neoxq import preflight
    from neoxq.core.gguf_info import read_info

    info = read_info(f16)
    available = preflight.llama_bytes(info, 4 * 512)  # room for four sequences of 512
    assert preflight.llama_bytes(info, 512) < available < preflight.llama_bytes(info, 200 * 512)
    (tmp_path / "sitecustomize.py").write_text(f"import neoxq.core.machine as m\nm.available_memory = lambda: {available}\n")
    proc = run_cli("serve", f16, "--parallel", "200", "--ctx", "512", env={"PYTHONPATH": str(tmp_path)})
    assert_one_line_error(proc, "needs about", "--parallel")
