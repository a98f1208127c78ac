"""The runtime: perplexity, tokenisation, generation, KLD, server, bad input."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import time
import unicodedata

import numpy as np
import pytest

from neoxq.runtime.model import NeoxModel, RuntimeOptions, gpu_offload_supported
from neoxq.runtime.score import perplexity

from .helpers import assert_one_line_error, run_cli


@pytest.fixture(scope="session")
def hf_tok(trained):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(trained / "tokenizer.json"))


def hf_perplexity(folder, ids, ctx):
    """Independent: transformers on the same non-overlapping windows, second half scored."""
    import torch

    from neoxq.convert.reference import load_reference

    model = load_reference(folder)
    nll = []
    with torch.no_grad():
        for c in range(len(ids) // ctx):
            w = torch.tensor([ids[c * ctx : (c + 1) * ctx]])
            lp = torch.log_softmax(model(w).logits[0].double(), -1)
            for j in range(ctx // 2, ctx - 1):
                nll.append(-lp[j, w[0, j + 1]].item())
    return math.exp(sum(nll) / len(nll)), len(nll)


def test_perplexity_matches_transformers(trained, trained_f32, texts, hf_tok):
    text = texts["eval"][:30000]
    with NeoxModel(trained_f32, RuntimeOptions(n_ctx=128)) as m:
        ours = perplexity(m, text, ctx=128)
    ref, n = hf_perplexity(trained, hf_tok.encode(text).ids, 128)
    rel = abs(ours.ppl - ref) / ref
    print(f"perplexity: neoxq {ours.ppl:.5f} ± {ours.ppl_se:.5f}, transformers {ref:.5f}, rel diff {rel:.2e}, {n} tokens")
    assert ours.tokens_scored == n
    assert rel < 1e-3  # the issue asks for well under 0.5%
    assert 1 < ours.ppl < 200 and ours.ppl_se > 0


@pytest.mark.parametrize(
    "text",
    [
        "Hello world, the quick brown fox.",
        "café naïve résumé",  # precomposed
        unicodedata.normalize("NFD", "café naïve résumé Ångström"),  # decomposed accents: NFC first
        "def f(x):\n        return x  # four/eight-space runs are added tokens",
        "end of text<|endoftext|>next document",
        "emoji 🦙 and 中文 and tabs\t\tand\r\nnewlines",
    ],
)
def test_tokenize_equals_hf(trained_f16, hf_tok, text):
    with NeoxModel(trained_f16, RuntimeOptions(n_ctx=64)) as m:
        assert m.tokenize(text) == hf_tok.encode(text).ids


def test_tokenize_cli_json(trained_f16, hf_tok):
    text = unicodedata.normalize("NFD", "Ångström")
    proc = run_cli("tokenize", trained_f16, text, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == hf_tok.encode(text).ids


def test_greedy_generation_matches_transformers(trained, trained_f32, hf_tok, texts):
    import torch

    from neoxq.convert.reference import load_reference

    prompt = texts["eval"][1000:1200]
    ids = hf_tok.encode(prompt).ids
    with torch.no_grad():
        ref = load_reference(trained).generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids) :].tolist()
    proc = run_cli("run", trained_f32, "-p", prompt, "-n", "24", "--temp", "0", "--repeat-penalty", "1", "--ctx", "256")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(prompt)
    assert proc.stdout[len(prompt) :].rstrip("\n") == hf_tok.decode(ref)
    assert "tok/s" in proc.stderr and "generation: 24 tokens" in proc.stderr


def test_run_reads_stdin_seed_and_stop(trained_f16):
    args = ("run", trained_f16, "-n", "16", "--seed", "7", "--ctx", "128")
    a = run_cli(*args, stdin="The function returns")
    b = run_cli(*args, stdin="The function returns")
    assert a.returncode == 0 and a.stdout == b.stdout  # same seed, same text
    stop = run_cli("run", trained_f16, "-p", "The", "-n", "64", "--temp", "0", "--stop", " ", "--ctx", "128")
    assert stop.returncode == 0 and " " not in stop.stdout[len("The") :].strip("\n")
    inter = run_cli("run", trained_f16, "-i", "-n", "4", "--ctx", "128", stdin="first\nsecond\n")
    assert inter.returncode == 0 and inter.stdout.count("\n") >= 2 and inter.stderr.count("generation:") == 2


def test_the_growing_text_is_the_whole_completion_detokenized(trained_f16):
    """completion_steps grows its text by each token's bytes: at every step it equals the whole
    completion detokenized (multi-byte characters split across tokens included), and a stop string
    ends it at its first occurrence, as a search of the whole text finds it."""
    from neoxq.runtime.generate import SamplingOptions, completion_steps

    with NeoxModel(trained_f16, RuntimeOptions(n_ctx=256)) as m:
        prompt = m.tokenize("emoji 🦙 and 中文 and")
        free = SamplingOptions(max_tokens=96, temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=3)
        checked = 0
        for c in completion_steps(m, prompt, free):  # the same Completion, growing: checked at each step
            assert c.text == m.detokenize(c.ids)
            checked += 1
        whole = c.text
        assert checked > 40
        assert len(whole) > 40
        stop = whole[30:33]
        stopped = list(completion_steps(m, prompt, SamplingOptions(**{**free.__dict__, "stop": ["\x00never", stop]})))[-1]
        assert stopped.finish == "stop" and stopped.text == whole[: whole.index(stop)]


def test_kld_cli_against_hf_and_cached_reference(trained, trained_f16, trained_f32, texts, tmp_path):
    (tmp_path / "eval.txt").write_text(texts["eval"][:12000])
    cache = tmp_path / "cache"
    # F32 GGUF against the HF checkpoint: the conversion is exact, so KLD ~ 0.
    proc = run_cli("kld", trained_f32, "--reference", trained, "--text", tmp_path / "eval.txt", "--ctx", "128", "--json", "--cache-dir", cache)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["kld_mean"] < 1e-4 and r["top1"] > 0.99 and abs(r["dppl_pct"]) < 0.1
    # A quantized file against the F16 GGUF: reference computed once, reused the second time.
    q = run_cli("quantize", trained_f16, "--type", "Q4_K_M", "-o", tmp_path / "q4.gguf", "--quiet")
    assert q.returncode == 0, q.stderr
    args = ("kld", tmp_path / "q4.gguf", "--reference", trained_f16, "--text", tmp_path / "eval.txt", "--ctx", "128", "--json", "--cache-dir", cache)
    first = json.loads(run_cli(*args).stdout)
    cached = sorted(cache.glob("*.npy"))
    stamps = [p.stat().st_mtime_ns for p in cached]
    second = json.loads(run_cli(*args).stdout)
    assert [p.stat().st_mtime_ns for p in sorted(cache.glob("*.npy"))] == stamps
    assert first == second
    for key in ("kld_mean", "kld_median", "kld_p99", "kld_max", "top1", "rms_dp", "dppl", "ppl", "ppl_se"):
        assert key in first
    assert 1e-4 < first["kld_mean"] < 0.05 and first["kld_median"] <= first["kld_p99"] <= first["kld_max"]


def test_perplexity_cli_json(trained_f16, texts, tmp_path):
    (tmp_path / "t.txt").write_text(texts["eval"][:8000])
    proc = run_cli("perplexity", trained_f16, "--text", tmp_path / "t.txt", "--ctx", "128", "--json")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    import hashlib

    assert r["text_sha256"] == hashlib.sha256(texts["eval"][:8000].encode()).hexdigest()
    assert r["ctx"] == 128 and r["tokens_scored"] == r["n_chunks"] * 63 and r["ppl_se"] > 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_completions(trained_f16):
    import httpx

    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "neoxq", "serve", str(trained_f16), "--port", str(port), "--ctx", "256"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                if httpx.get(f"{base}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            pytest.fail("server did not start: " + proc.stderr.read1().decode(errors="replace") if proc.poll() is not None else "timeout")
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "The function", "max_tokens": 8, "temperature": 0}, timeout=60)
        assert r.status_code == 200
        body = r.json()
        assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] > 0
        assert isinstance(body["choices"][0]["text"], str)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_runtime_bad_input(trained_f16, texts, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("only a few words")
    assert_one_line_error(run_cli("perplexity", trained_f16, "--text", short, "--ctx", "128"), "fewer than two windows")
    (tmp_path / "ok.txt").write_text(texts["eval"][:4000])
    assert_one_line_error(run_cli("perplexity", trained_f16, "--text", tmp_path / "ok.txt", "--ctx", "4096"), "training context")
    assert_one_line_error(run_cli("run", tmp_path / "missing.gguf", "-p", "x"), "no such file")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not gguf at all")
    assert_one_line_error(run_cli("perplexity", bad, "--text", tmp_path / "ok.txt"), "not a GGUF")
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(trained_f16.read_bytes()[:200_000])
    assert_one_line_error(run_cli("run", trunc, "-p", "x"), "truncated")
    assert_one_line_error(run_cli("kld", trained_f16, "--reference", trained_f16, "--text", short), "fewer than two windows")
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")  # whitespace is text (it tokenises), just too little of it
    assert_one_line_error(run_cli("perplexity", trained_f16, "--text", empty), "fewer than two windows")
    empty.write_text("")
    assert_one_line_error(run_cli("perplexity", trained_f16, "--text", empty), "empty")


def test_not_gptneox_gguf_is_refused(tmp_path):
    import gguf

    path = tmp_path / "llama.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_one_line_error(run_cli("run", path, "-p", "x"), "llama", "gptneox")


@pytest.mark.skipif(not gpu_offload_supported(), reason="llama.cpp build without GPU offload")
@pytest.mark.gpu
def test_gpu_logits_match_transformers(trained, trained_f32, texts, hf_tok):
    from .helpers import hf_logits, kl_stats

    ids = hf_tok.encode(texts["eval"][:3000]).ids[:128]
    with NeoxModel(trained_f32, RuntimeOptions(n_ctx=128, n_gpu_layers=-1)) as m:
        assert m.n_gpu_layers == -1
        got = m.eval_logits(ids)
    kl, top1 = kl_stats(hf_logits(trained, ids), got)
    assert kl < 1e-4 and top1 == 1.0


def _batched_texts(path, layers: int, seeds: list[int], together: bool) -> tuple[list[str], int]:
    """The texts of one seeded request per seed, on a batcher of 4 sequences with `layers`
    offloaded: all submitted at once, or each after the last ended; and the most sequences one
    step decoded."""
    import threading

    from neoxq.runtime.batch import Batcher, Job
    from neoxq.runtime.generate import SamplingOptions

    b = Batcher(path, RuntimeOptions(n_ctx=256, n_seq=4, n_gpu_layers=layers), capacity=8)
    texts: list[list[str]] = [[] for _ in seeds]
    try:
        ids = b.model.prompt_ids("The history of the city")
        done = threading.Semaphore(0)
        for i, seed in enumerate(seeds):
            opts = SamplingOptions(max_tokens=40, temperature=0.9 if seed else 0.0, seed=seed or None)
            emit = lambda x, i=i: done.release() if x is None else texts[i].append(x.text)  # noqa: E731
            assert b.submit(Job(ids, opts, emit, stream=False))
            if not together:
                done.acquire()
        for _ in seeds if together else ():
            done.acquire()
        return ["".join(t) for t in texts], b.peak
    finally:
        b.close()


@pytest.mark.skipif(not gpu_offload_supported(), reason="llama.cpp build without GPU offload")
@pytest.mark.gpu
def test_gpu_batched_requests_equal_what_each_gets_alone(trained_f16, tmp_path):
    """--parallel with every layer offloaded: requests decoded in one batch get, token for token,
    what each gets alone; the peak shows they shared steps, and another seed gives another text."""
    from neoxq.runtime.quantize import quantize

    q4 = quantize(trained_f16, "Q4_K_M", output=tmp_path / "q4.gguf").path
    seeds = [0, 1, 2, 3]  # 0: greedy
    alone, peak_alone = _batched_texts(q4, -1, seeds, together=False)
    together, peak = _batched_texts(q4, -1, seeds, together=True)
    assert peak_alone == 1 and peak >= 2
    assert together == alone and all(alone)
    assert len(set(alone)) > 1  # the seeds sample different texts


def test_runtime_imports_no_torch():
    """Every module of neoxq.runtime and neoxq.core, and the CLI, imported: no torch/transformers."""
    code = (
        "import importlib, pkgutil, sys, neoxq.runtime, neoxq.core, neoxq.cli\n"
        "for pkg in (neoxq.runtime, neoxq.core):\n"
        "    for m in pkgutil.iter_modules(pkg.__path__):\n"
        "        importlib.import_module(pkg.__name__ + '.' + m.name)\n"
        "print([m for m in ('torch', 'transformers') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


BLOCK_TORCH = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers', 'safetensors'):
            raise ImportError(f"No module named '{name}'", name=name)
sys.meta_path.insert(0, _Block())
sys.argv = ['neoxq'] + sys.argv[1:]
from neoxq.cli import main
main()
"""


def test_runtime_only_install(trained_f16, trained, texts, tmp_path):
    """With torch/transformers/safetensors unimportable (a `pip install .` laptop), the runtime
    commands work and the converter names the extra to install."""

    def cli(*args):
        return subprocess.run([sys.executable, "-c", BLOCK_TORCH, *map(str, args)], capture_output=True, text=True, timeout=300)

    (tmp_path / "t.txt").write_text(texts["eval"][:6000])
    assert cli("tokenize", trained_f16, "hello", "--json").returncode == 0
    ppl = cli("perplexity", trained_f16, "--text", tmp_path / "t.txt", "--ctx", "128", "--json")
    assert ppl.returncode == 0, ppl.stderr
    q = cli("quantize", trained_f16, "--type", "Q4_0", "-o", tmp_path / "q.gguf", "--quiet")
    assert q.returncode == 0, q.stderr
    k = cli("kld", tmp_path / "q.gguf", "--reference", trained_f16, "--text", tmp_path / "t.txt", "--ctx", "128", "--cache-dir", tmp_path / "c")
    assert k.returncode == 0, k.stderr
    assert_one_line_error(cli("convert", trained, "-o", tmp_path / "x.gguf"), "neoxq[convert]")
    assert_one_line_error(
        cli("kld", trained_f16, "--reference", trained, "--text", tmp_path / "t.txt", "--ctx", "128", "--cache-dir", tmp_path / "c2"),
        "neoxq[convert]",
    )


def test_prompt_loop_ctrl_c_stops_only_the_generation(trained_f16, monkeypatch, capsys):
    """A real SIGINT, sent the moment the first generated piece is written (no race with a fast
    model): that generation stops within a token, the loop goes on and completes the next line in
    full. Negative control: the second line, never interrupted, runs to max_tokens."""
    import io
    import os
    import signal

    from neoxq.runtime.generate import SamplingOptions
    from neoxq.runtime.interactive import prompt_loop
    from neoxq.runtime.model import NeoxModel, RuntimeOptions

    class Out(io.StringIO):
        sent = False

        def write(self, s):
            if s.strip() and not self.sent and self.getvalue().endswith("The"):
                Out.sent = True
                os.kill(os.getpid(), signal.SIGINT)  # the handler runs before the next bytecode: mid-generation
            return super().write(s)

    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"The\nHello\n")))
    out = Out()
    monkeypatch.setattr("sys.stdout", out)
    before = signal.getsignal(signal.SIGINT)
    with NeoxModel(trained_f16, RuntimeOptions(n_ctx=512)) as m:
        prompt_loop(m, SamplingOptions(max_tokens=300, temperature=0.8, seed=1))
    err = capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is before  # put back
    first, second = [line for line in err.splitlines() if "generation:" in line]
    assert first.startswith("[stopped]") and int(first.split("generation: ")[1].split()[0]) < 10
    assert not second.startswith("[stopped]") and "generation: 300 tokens" in second
    assert out.getvalue().startswith("The") and out.getvalue().split("\n", 1)[1].startswith("Hello")  # stopped, then the next line


def test_run_without_prompt_on_a_terminal(trained_f16, tmp_path):
    """On a terminal with no -p: a `> ` prompt, Ctrl-C at the prompt clears it, a line is completed,
    Ctrl-D exits 0, and the line is in the history file for next time (readline's)."""
    import os
    import pty
    import select

    pid, fd = pty.fork()
    if pid == 0:  # the child: neoxq on the pty
        os.environ["NEOXQ_CACHE"] = str(tmp_path / "c")
        os.execv(sys.executable, [sys.executable, "-m", "neoxq", "run", str(trained_f16), "-n", "8", "--ctx", "128"])
    seen = b""

    def until(marker: bytes, timeout: float = 120):
        nonlocal seen
        end = time.time() + timeout
        while marker not in seen:
            assert time.time() < end, seen[-500:]
            if select.select([fd], [], [], 1)[0]:
                try:
                    seen += os.read(fd, 4096)
                except OSError:
                    break
        found, seen = seen, seen[seen.index(marker) + len(marker) :] if marker in seen else b""
        return found

    until(b"> ")
    # readline prints the prompt before it waits in select(); a SIGINT in between is seen only at
    # the next key (CPython's readline), so a Ctrl-C that gets no answer is sent again
    for attempt in range(12):
        os.write(fd, b"\x03")
        try:
            until(b"(Ctrl-D exits)", timeout=10)
            break
        except AssertionError:
            assert attempt < 11, "no answer to Ctrl-C at the prompt"
    until(b"> ")
    os.write(fd, b"Once upon a time\r")
    assert b"generation: 8 tokens" in until(b"generation:") + until(b"> ")
    os.write(fd, b"\x04")
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert "Once upon a time" in (tmp_path / "c" / "run_history").read_text()
