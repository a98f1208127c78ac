#!/usr/bin/env python
"""Coverage-guided fuzzing of the parsers neoxq runs on untrusted bytes, with
atheris (libFuzzer's engine for Python; neoxq's own modules are instrumented for coverage):

  gguf     neoxq's own mmap GGUF metadata parser (core.gguf_info.info_from_buffer)
  imatrix  the imatrix reader, GGUF (through gguf-py) and llama-imatrix's legacy .dat (core.imatrix_io)
  config   config.json → GPTNeoXArgs (convert.checkpoint.parse_config, convert.neox)
  request  the server's request parsing: JSON body → validated Request (runtime.completion_request)

    python scripts/fuzz.py TARGET|all [--runs N] [--seconds N] [--json OUT] [--make-seeds]

A finding is any exception other than neoxq's own one-line errors (NeoxqError; for `request` also
the server's 400 for a body that is not JSON): libFuzzer stops, writes the input as crash-*, and
this script exits 1. The committed seed corpus is scripts/fuzz_corpus/TARGET/ (copied, never
grown in place); --make-seeds writes it again.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "fuzz_corpus"
TARGETS = ("gguf", "imatrix", "config", "request")
CANARY = "canary"  # a planted bug (an uncaught error on one input): proves a finding is reported


def _target(name: str):
    """The function one fuzz input goes through, and the exceptions that are a clean answer."""
    import atheris

    with atheris.instrument_imports(include=["neoxq"]):
        from neoxq.core.errors import NeoxqError

        if name == "gguf":
            from neoxq.core.gguf_info import info_from_buffer
        elif name == "imatrix":
            from neoxq.core.imatrix_io import read_imatrix
        elif name == "config":
            from neoxq.convert.checkpoint import parse_config
            from neoxq.convert.neox import GPTNeoXArgs
        else:
            from neoxq.runtime.completion_request import parse_request
    if name == CANARY:

        def canary(data: bytes) -> None:
            if data.startswith(b"neoxq"):
                raise IndexError("the planted bug")

        return canary
    scratch = Path(tempfile.gettempdir() if not Path("/dev/shm").is_dir() else "/dev/shm") / f"neoxq-fuzz-{os.getpid()}.imatrix"

    def one(data: bytes) -> None:
        try:
            if name == "gguf":
                info_from_buffer(data, Path("fuzz.gguf"), require_arch=None)
            elif name == "imatrix":
                scratch.write_bytes(data)
                read_imatrix(scratch)
            elif name == "config":
                GPTNeoXArgs.from_config(parse_config(data, Path("config.json")))
            else:
                try:
                    body = json.loads(data)
                except (ValueError, RecursionError):
                    return  # the server answers 400: the body is not JSON
                parse_request(body, 50304)
        except NeoxqError:
            pass  # a one-line error: the right answer to bad bytes

    return one


def _worker(name: str, libfuzzer_args: list[str]) -> None:
    import atheris

    atheris.Setup([sys.argv[0], *libfuzzer_args], _target(name))
    atheris.Fuzz()


def run(name: str, runs: int | None, seconds: int | None, findings: Path) -> dict:
    """One target in a child process on a copy of its seed corpus; its libFuzzer statistics. A
    finding's input is kept in `findings` (replay it: scripts/fuzz.py --worker TARGET -- FILE)."""
    findings.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"neoxq-fuzz-{name}-") as work:
        corpus = Path(work) / "corpus"
        if name == CANARY:
            corpus.mkdir()
            (corpus / "seed").write_bytes(b"neoxq canary")
        else:
            shutil.copytree(CORPUS / name, corpus)
        args = ["-print_final_stats=1", f"-artifact_prefix={findings}/{name}-", "-rss_limit_mb=4096", "-timeout=20", "-max_len=65536"]
        words = CORPUS / f"{name}.dict"  # the format's keywords, for mutations that keep JSON valid
        args += [f"-dict={words}"] if words.is_file() else []
        args += [f"-runs={runs}"] if runs else []
        args += [f"-max_total_time={seconds}"] if seconds else []
        t0, t0_wall = time.perf_counter(), time.time() - 1
        proc = subprocess.run([sys.executable, __file__, "--worker", name, "--", *args, str(corpus)], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        stats = {k: float(v) for k, v in re.findall(r"stat::(\w+):\s*([\d.]+)", proc.stderr)}
        crashes = sorted(str(p) for p in findings.glob(f"{name}-*") if p.stat().st_mtime >= t0_wall)
        finding = proc.returncode != 0 or bool(crashes)
        tail = "\n".join(proc.stderr.splitlines()[-30:]) if finding else ""
        done = int(stats.get("number_of_executed_units", 0))
        return {
            "target": name,
            "executions": done,
            "seconds": round(wall, 1),
            "execs_per_second": done / wall if wall else 0.0,
            "new_units": int(stats.get("new_units_added", 0)),
            "peak_rss_mb": stats.get("peak_rss_mb", 0),
            "corpus_files": len(list(corpus.iterdir())),
            "finding": finding,
            "crash_files": crashes,
            "tail": tail,
        }


def make_seeds() -> None:
    """The committed seed corpus: small valid inputs of each kind (no model weights: zero tensors)."""
    import gguf
    import numpy as np

    from neoxq.core.imatrix_io import IMatrix, write_imatrix

    for name in TARGETS:
        shutil.rmtree(CORPUS / name, ignore_errors=True)
        (CORPUS / name).mkdir(parents=True)
    w = gguf.GGUFWriter(str(CORPUS / "gguf" / "tiny.gguf"), arch="gptneox")
    w.add_name("seed")
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_block_count(1)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["<|endoftext|>", "a", "b"])
    w.add_array("neoxq.seed.numbers", [1, 2, 3])
    w.add_float32("neoxq.seed.float", 0.5)
    w.add_tensor("token_embd.weight", np.zeros((3, 32), np.float16))
    w.add_tensor("blk.0.attn_norm.weight", np.zeros(32, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    im = IMatrix(
        {"blk.0.ffn_up.weight": np.ones(32, np.float32), "output.weight": np.full(32, 2.0, np.float32)},
        {"blk.0.ffn_up.weight": 4.0, "output.weight": 4.0},
        ["seed text"],
        4,
        64,
    )
    write_imatrix(CORPUS / "imatrix" / "tiny.imatrix", im)
    legacy = bytearray((1).to_bytes(4, "little", signed=True))
    name = b"blk.0.ffn_up.weight"
    legacy += len(name).to_bytes(4, "little") + name + (4).to_bytes(4, "little") + (8).to_bytes(4, "little")
    legacy += np.ones(8, "<f4").tobytes() + (4).to_bytes(4, "little") + (4).to_bytes(4, "little") + b"seed"
    (CORPUS / "imatrix" / "legacy.dat").write_bytes(bytes(legacy))
    pythia = {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "hidden_size": 512,
        "num_attention_heads": 8,
        "num_hidden_layers": 6,
        "intermediate_size": 2048,
        "vocab_size": 50304,
        "max_position_embeddings": 2048,
        "rotary_pct": 0.25,
        "rotary_emb_base": 10000,
        "use_parallel_residual": True,
        "layer_norm_eps": 1e-5,
        "hidden_act": "gelu",
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "bos_token_id": 0,
        "eos_token_id": 0,
    }
    hf5 = {
        **{k: v for k, v in pythia.items() if k not in ("rotary_pct", "rotary_emb_base", "torch_dtype")},
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        "dtype": "float16",
    }
    for n, cfg in (("pythia.json", pythia), ("hf5.json", hf5)):
        (CORPUS / "config" / n).write_text(json.dumps(cfg))
    bodies = [
        {"prompt": "The capital of France is", "max_tokens": 16, "temperature": 0.7, "stop": ["\n"]},
        {"prompt": "a", "max_tokens": 0, "echo": True, "logprobs": 5},
        {"prompt": ["x"], "logit_bias": {"12": -100}, "seed": 3, "top_k": 40, "stream": True, "stream_options": {"include_usage": True}},
        {
            "prompt": "",
            "n": 1,
            "best_of": 1,
            "user": "u",
            "top_p": 0.9,
            "min_p": 0.05,
            "repeat_penalty": 1.1,
            "frequency_penalty": 0.5,
            "presence_penalty": -0.5,
        },
    ]
    for i, b in enumerate(bodies):
        (CORPUS / "request" / f"body{i}.json").write_text(json.dumps(b))


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], sys.argv[sys.argv.index("--") + 1 :])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("target", nargs="?", choices=(*TARGETS, "all", CANARY), default="all")
    ap.add_argument("--runs", type=int, help="executions per target (libFuzzer's -runs)")
    ap.add_argument("--seconds", type=int, help="at most this long per target")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--findings", type=Path, default=Path("fuzz-findings"), help="where a finding's input is kept")
    ap.add_argument("--make-seeds", action="store_true", help="write the seed corpus again and stop")
    a = ap.parse_args()
    if a.make_seeds:
        make_seeds()
        return 0
    results = []
    for name in TARGETS if a.target == "all" else (a.target,):
        r = run(name, a.runs, a.seconds, a.findings.resolve())
        results.append(r)
        print(
            f"{name:8} {r['executions']:>10,} executions in {r['seconds']:7.0f} s ({r['execs_per_second']:,.0f}/s), "
            f"corpus {r['corpus_files']} files, peak RSS {r['peak_rss_mb']:.0f} MB: "
            + ("FINDING " + " ".join(r["crash_files"]) + "\n" + r["tail"] if r["finding"] else "no finding"),
            flush=True,
        )
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    return 1 if any(r["finding"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
