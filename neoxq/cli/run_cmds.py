"""run, tokenize, perplexity, kld, serve: using GGUF files."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .options import CacheDir, Ctx, Device, FlashAttn, GpuLayers, Json, MaxMemory, Model, Quiet, Revision, Text, Threads


def _open(
    model: Path,
    ctx: Optional[int],
    threads: Optional[int],
    gpu_layers: Optional[int],
    batch: int = 512,
    flash_attn: str = "auto",
    device: str = "auto",
    repack: bool | None = False,
):
    from neoxq.runtime.model import NeoxModel, runtime_options

    opts = runtime_options(ctx, threads, gpu_layers, batch, flash_attn, device, repack)
    return NeoxModel(model, opts, info=_preflight(model, ctx, batch))


def _preflight(model: Path, ctx: Optional[int], batch: int = 512, cells: int = 1, fix: str = "pass a smaller --ctx or use a smaller quantized file"):
    """The file's metadata, after checking that loading it fits in memory (one line if not); `cells`
    sequences of `ctx` tokens each in the KV cache."""
    from neoxq import preflight
    from neoxq.core.gguf_info import read_info

    info = read_info(model)
    need = preflight.llama_bytes(info, cells * (ctx or info.context_length or 2048), batch)
    preflight.check(f"loading {info.path.name}", need, fix)
    return info


def run(
    model: Model,
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="Prompt text (else --prompt-file, or stdin).")] = None,
    prompt_file: Annotated[Optional[Path], typer.Option("--prompt-file", "-f")] = None,
    # the accepted ranges are SamplingOptions' (one statement for run and the server)
    n: Annotated[int, typer.Option("--max-tokens", "-n", help="Tokens to generate (clamped to the context left).")] = 128,
    temperature: Annotated[float, typer.Option("--temp", "--temperature")] = 0.8,
    top_k: Annotated[int, typer.Option("--top-k")] = 40,
    top_p: Annotated[float, typer.Option("--top-p")] = 0.95,
    min_p: Annotated[float, typer.Option("--min-p")] = 0.05,
    repeat_penalty: Annotated[float, typer.Option("--repeat-penalty")] = 1.1,
    seed: Annotated[Optional[int], typer.Option("--seed")] = None,
    stop: Annotated[Optional[list[str]], typer.Option("--stop", help="Stop string (repeatable).")] = None,
    interactive: Annotated[
        bool, typer.Option("--interactive", "-i", help="Read prompts line by line, each completed (the default on a terminal without -p).")
    ] = False,
    ctx: Ctx = None,
    threads: Threads = None,
    gpu_layers: GpuLayers = None,
    flash_attn: FlashAttn = "auto",
    device: Device = "auto",
):
    """Stream a completion token by token; prompt and generation tokens/s on stderr. Without a
    prompt on a terminal: a prompt loop (Ctrl-C stops a generation, Ctrl-D exits)."""
    from neoxq.core.cache import cache_root
    from neoxq.runtime.generate import SamplingOptions
    from neoxq.runtime.interactive import print_completion, prompt_loop

    opts = SamplingOptions(
        max_tokens=n, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty, seed=seed, stop=list(stop or [])
    ).checked(as_flags=True)
    if interactive and (prompt is not None or prompt_file is not None):
        from neoxq.core.errors import UsageError

        raise UsageError("-i reads its prompts from the input, line by line; drop -p/--prompt-file, or -i")
    loop = interactive or (prompt is None and prompt_file is None and sys.stdin.isatty())
    text = None if loop else _read_prompt(prompt, prompt_file)
    with _open(model, ctx, threads, gpu_layers, flash_attn=flash_attn, device=device, repack=None) as m:
        if loop:
            prompt_loop(m, opts, cache_root() / "run_history")
        else:
            print_completion(m, text, opts)


def _read_prompt(prompt: Optional[str], path: Optional[Path]) -> str:
    from neoxq.core.errors import UsageError
    from neoxq.core.textfile import read_text

    if prompt is not None and path is not None:
        raise UsageError("-p and --prompt-file both give a prompt; pass one")
    if prompt is not None:
        return prompt
    if path is not None:
        return read_text(path, "--prompt-file", allow_empty=True)
    try:
        return sys.stdin.buffer.read().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError("the prompt on stdin is not UTF-8 text; convert it to UTF-8 first") from exc


def tokenize(
    model: Model,
    text: Annotated[str, typer.Argument(help="Text to tokenise (NFC-normalised first, as GPT-NeoX's tokenizer does).")],
    as_json: Json = False,
):
    """Print the token ids of TEXT."""
    from neoxq.runtime.model import NeoxModel, RuntimeOptions

    with NeoxModel(model, RuntimeOptions(vocab_only=True)) as m:  # the vocabulary only: no weights, no context
        ids = m.tokenize(text)
        if as_json:
            print(json.dumps(ids))
        else:
            for i in ids:
                print(f"{i:>8} {m.detokenize([i])!r}")


def perplexity(
    model: Model,
    text: Text,
    ctx: Annotated[int, typer.Option("--ctx", "-c", min=4, help="Window size; the second half of each window is scored.")] = 512,
    as_json: Json = False,
    threads: Threads = None,
    gpu_layers: GpuLayers = None,
    flash_attn: FlashAttn = "auto",
    device: Device = "auto",
    quiet: Quiet = False,
):
    """Perplexity as llama-perplexity computes it, with its standard error."""
    from neoxq.core.textfile import read_text
    from neoxq.runtime.score import perplexity as ppl

    body = read_text(text)
    with _open(model, ctx, threads, gpu_layers, batch=ctx, flash_attn=flash_attn, device=device) as m:
        r = ppl(m, body, ctx)
    if as_json:
        print(json.dumps(r.as_json(), indent=1))
    else:
        print(f"perplexity {r.ppl:.4f} ± {r.ppl_se:.4f} ({r.tokens_scored} tokens, ctx {r.ctx}, {r.n_chunks} windows)")


def kld(
    model: Annotated[Path, typer.Argument(help="GGUF file to evaluate.")],
    reference: Annotated[
        str,
        typer.Option(
            "--reference",
            help="F16/F32 GGUF, an HF checkpoint (folder or repo id), or auto/hf: the checkpoint this file was converted from (fp32 transformers).",
        ),
    ],
    text: Text,
    ctx: Annotated[int, typer.Option("--ctx", "-c", min=4)] = 512,
    revision: Revision = None,
    max_memory: MaxMemory = None,
    cache_dir: CacheDir = None,
    as_json: Json = False,
    threads: Threads = None,
    gpu_layers: GpuLayers = None,
    flash_attn: FlashAttn = "auto",
    device: Device = "auto",
    quiet: Quiet = False,
):
    """KL divergence, top-1 agreement, RMS Δp and Δppl against a reference.

    A checkpoint reference runs in transformers fp32, in memory when it fits --max-memory (default:
    the memory available), streamed layer by layer otherwise."""
    from neoxq.core.textfile import read_text
    from neoxq.reference import open_reference
    from neoxq.runtime.model import runtime_options
    from neoxq.runtime.score import kld as do_kld

    body = read_text(text)
    with _open(model, ctx, threads, gpu_layers, batch=ctx, flash_attn=flash_attn, device=device) as m:
        ref = open_reference(
            reference,
            revision,
            runtime_options(ctx, threads, gpu_layers, ctx, flash_attn, device),
            max_memory=max_memory,
            reserved=preflight_bytes(m),
            model_info=m.info,
        )
        r = do_kld(m, ref, body, ctx, cache_dir=cache_dir)
    if as_json:
        print(json.dumps(r.as_json(), indent=1))
        return
    from neoxq.render import kld_text

    print(kld_text(r.stats))


def compare(
    a: Annotated[Path, typer.Argument(help="GGUF file (or the per-token .npz a report wrote for it).")],
    b: Annotated[Path, typer.Argument(help="GGUF file (or .npz) A is compared with.")],
    reference: Annotated[
        Optional[str], typer.Option("--reference", help="F16/F32 GGUF, an HF checkpoint, or auto/hf (needed for GGUF files).")
    ] = None,
    text: Annotated[Optional[Path], typer.Option("--text", help="UTF-8 text both files are scored on (needed for GGUF files).")] = None,
    ctx: Annotated[int, typer.Option("--ctx", "-c", min=4)] = 512,
    revision: Revision = None,
    max_memory: MaxMemory = None,
    cache_dir: CacheDir = None,
    as_json: Json = False,
    threads: Threads = None,
    gpu_layers: GpuLayers = None,
    flash_attn: FlashAttn = "auto",
    device: Device = "auto",
    quiet: Quiet = False,
):
    """Is A better than B? A paired test on the same tokens: the ratio of mean KLDs and of
    perplexities, each with a 95 % interval from per-window errors, and a verdict."""
    from neoxq.compare import compare_files
    from neoxq.runtime.model import runtime_options

    r = compare_files(
        a,
        b,
        reference,
        text,
        ctx,
        cache_dir,
        runtime_options(ctx, threads, gpu_layers, ctx, flash_attn, device),
        revision=revision,
        max_memory=max_memory,
    )
    if as_json:
        print(json.dumps(r, indent=1))
        return
    k, p = r["kld"], r["ppl"]
    print(f"{r['tokens']} tokens in {r['windows']} windows; A = {a.name}, B = {b.name}")
    print(
        f"KLD  A/B {k['ratio']:.4f}×  95 % [{k['ci95'][0]:.4f}, {k['ci95'][1]:.4f}]  A is {k['verdict']}  "
        f"(A {k['a']:.6f}, B {k['b']:.6f}; A lower on {100 * r['share_of_tokens_a_lower']:.1f} % of tokens)"
    )
    print(f"PPL  A/B {p['ratio']:.5f}×  95 % [{p['ci95'][0]:.5f}, {p['ci95'][1]:.5f}]  A is {p['verdict']}")


def preflight_bytes(m) -> int:
    from neoxq import preflight

    return preflight.llama_bytes(m.info, m.n_ctx, m.n_batch)


def serve(
    model: Model,
    host: Annotated[str, typer.Option("--host", help="Address to bind (default: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8000,
    ctx: Ctx = None,
    threads: Threads = None,
    gpu_layers: GpuLayers = None,
    flash_attn: FlashAttn = "auto",
    device: Device = "auto",
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="NEOXQ_API_KEY", help="Require 'Authorization: Bearer KEY'.")] = None,
    parallel: Annotated[
        Optional[int],
        typer.Option("--parallel", "-np", help="Requests decoded together, each with its own --ctx of KV cells (default: the cores, at most 4)."),
    ] = None,
):
    """OpenAI-compatible completions server, on localhost by default (up to --parallel requests
    decoded together, others queued)."""
    from neoxq.runtime.model import runtime_options
    from neoxq.runtime.serve import check_parallel
    from neoxq.runtime.serve import serve as do_serve

    options = runtime_options(ctx, threads, gpu_layers, 512, flash_attn, device)
    options.n_seq = check_parallel(parallel)
    # the server loads the model itself; a load failure there is one line too
    _preflight(model, ctx, cells=options.n_seq, fix="pass a smaller --parallel or --ctx, or use a smaller quantized file")
    do_serve(model, host=host, port=port, options=options, api_key=api_key)


def info(
    model: Annotated[Optional[Path], typer.Argument(help="GGUF file to describe (optional with --system).")] = None,
    system: Annotated[bool, typer.Option("--system", help="The llama.cpp build: backend, devices, flash attention, offload.")] = False,
    as_json: Json = False,
):
    """What a GGUF holds (architecture, type, mix, provenance, tensors), or what this machine's
    llama.cpp build can do (--system)."""
    from neoxq.core.errors import UsageError
    from neoxq.describe import describe_file, describe_system

    if model is None and not system:
        raise UsageError("pass a GGUF file, or --system for the llama.cpp build")
    data = {**({"system": describe_system()} if system else {}), **({"file": describe_file(model)} if model else {})}
    if as_json:
        print(json.dumps(data, indent=1))
        return
    for section in data.values():
        for k, v in section.items():
            print(f"{k:<22} {v}")
