"""The `neoxq` command: parses options and forwards to library functions, which own the defaults.

Every NeoxqError becomes one line on stderr and exit code 1; --debug shows the traceback.
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from .errors import NeoxqError
from .qtypes import CONVERT_OUTTYPES, QUANTIZED, QuantType, types_table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="GPT-NeoX / Pythia checkpoints → GGUF, run on llama.cpp, and measure what quantization costs.")
_state = {"debug": False}

OutType = Enum("OutType", {t.value.lower(): t.value.lower() for t in CONVERT_OUTTYPES}, type=str)
QUANT_HELP = "Types (nominal bpw): " + ", ".join(f"{t.value} ({t.nominal_bpw:g})" for t in QUANTIZED)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors.")):
    _state["debug"] = debug


@app.command()
def convert(
    src: str = typer.Argument(..., help="Checkpoint folder, or hub repo id (org/name or org/name@revision)."),
    revision: Optional[str] = typer.Option(None, "--revision", "-r", help="Hub branch, tag or commit (Pythia: step3000 …)."),
    outtype: Optional[OutType] = typer.Option(None, "--outtype", help="Type of the converted file (default f16)."),
    quant: Optional[str] = typer.Option(None, "--quant", "-q", help="Also quantize to these comma-separated types. " + QUANT_HELP),
    imatrix: Optional[Path] = typer.Option(None, "--imatrix", help="Importance matrix for --quant (neoxq or llama-imatrix file)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Output file (default <name>[-<revision>]-<TYPE>.gguf); with --quant, a folder."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing outputs."),
    quiet: bool = typer.Option(False, "--quiet", help="Print nothing but errors."),
):
    """Convert a GPT-NeoX checkpoint to GGUF (and optionally quantize it to several types)."""
    from convert.converter import convert as do_convert

    if quant:
        from convert.quantize import convert_and_quantize

        paths = convert_and_quantize(src, QuantType.parse_list(quant), revision=revision, out_dir=output,
                                     imatrix=imatrix, base_type=QuantType(outtype.value.upper()) if outtype else None,
                                     force=force, quiet=quiet)
    else:
        kw = {"outtype": outtype.value} if outtype else {}
        paths = [do_convert(src, revision=revision, output=output, force=force, quiet=quiet, **kw)]
    for p in paths:
        _say(str(p), quiet)


@app.command()
def quantize(
    inp: Path = typer.Argument(..., help="F32/F16/BF16 GGUF to quantize."),
    qtype: str = typer.Option(..., "--type", "-t", help=QUANT_HELP),
    imatrix: Optional[Path] = typer.Option(None, "--imatrix", help="Importance matrix (neoxq or llama-imatrix GGUF, or legacy .dat)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Output file (default <name>[-<revision>]-<TYPE>.gguf beside the input)."),
    as_json: bool = typer.Option(False, "--json", help="Print the per-tensor table as JSON."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output."),
    quiet: bool = typer.Option(False, "--quiet", help="Print nothing but errors."),
):
    """Quantize a GGUF with llama.cpp's quantizer; shows which tensor got which type."""
    import json

    from convert.quantize import quantize as do_quantize

    result = do_quantize(inp, QuantType.parse(qtype), output=output, imatrix=imatrix, force=force, quiet=quiet)
    if as_json:
        print(json.dumps(result.as_json(), indent=1))
    elif not quiet:
        print(result.table())


@app.command()
def imatrix(
    src: str = typer.Argument(..., help="Checkpoint folder or hub repo id (the fp32 reference computes the activations)."),
    text: Path = typer.Option(..., "--text", help="Calibration text file (UTF-8)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output imatrix file (llama.cpp's GGUF imatrix format)."),
    ctx: int = typer.Option(512, "--ctx", help="Tokens per chunk."),
    revision: Optional[str] = typer.Option(None, "--revision", "-r"),
    include_output: bool = typer.Option(False, "--include-output", help="Also collect output.weight."),
    force: bool = typer.Option(False, "--force"),
    quiet: bool = typer.Option(False, "--quiet"),
):
    """Compute an importance matrix over a calibration text."""
    from convert.imatrix import make_imatrix

    path = make_imatrix(src, text, output, ctx=ctx, revision=revision, include_output=include_output, force=force, quiet=quiet)
    _say(str(path), quiet)


def _open(model: Path, ctx: Optional[int], threads: Optional[int], gpu_layers: Optional[int], batch: int = 512, seed: int = 0):
    from runtime.model import NeoxModel, RuntimeOptions

    return NeoxModel(model, RuntimeOptions(n_ctx=ctx, n_batch=batch, n_threads=threads, n_gpu_layers=gpu_layers, seed=seed))


CTX = typer.Option(None, "--ctx", "-c", help="Context size (default: the model's training context).")
THREADS = typer.Option(None, "--threads", "-t", help="CPU threads (default: all cores).")
GPU = typer.Option(None, "--n-gpu-layers", "-ngl", help="Layers on the GPU (default: all, when the build supports offload).")


@app.command()
def run(
    model: Path = typer.Argument(..., help="GGUF file."),
    prompt: Optional[str] = typer.Option(None, "-p", "--prompt", help="Prompt text (else --prompt-file, or stdin)."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", "-f"),
    n: int = typer.Option(128, "-n", "--max-tokens", help="Tokens to generate."),
    temperature: float = typer.Option(0.8, "--temp", "--temperature"),
    top_k: int = typer.Option(40, "--top-k"),
    top_p: float = typer.Option(0.95, "--top-p"),
    min_p: float = typer.Option(0.05, "--min-p"),
    repeat_penalty: float = typer.Option(1.1, "--repeat-penalty"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    stop: list[str] = typer.Option([], "--stop", help="Stop string (repeatable)."),
    interactive: bool = typer.Option(False, "-i", "--interactive", help="Read prompts line by line; each gets a completion."),
    ctx: Optional[int] = CTX, threads: Optional[int] = THREADS, gpu_layers: Optional[int] = GPU,
):
    """Stream a completion token by token; prompt and generation tokens/s on stderr."""
    from runtime.generate import GenerationStats, SamplingOptions, generate

    opts = SamplingOptions(max_tokens=n, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                           repeat_penalty=repeat_penalty, seed=seed, stop=list(stop))
    with _open(model, ctx, threads, gpu_layers) as m:
        def one(text: str) -> None:
            stats = GenerationStats()
            sys.stdout.write(text)
            for piece in generate(m, text, opts, stats):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            print(stats.line(), file=sys.stderr)

        if interactive:
            while True:
                if sys.stdin.isatty():
                    print("> ", end="", file=sys.stderr, flush=True)
                line = sys.stdin.readline()
                if not line:
                    break
                if line.strip():
                    one(line.rstrip("\n"))
            return
        text = prompt if prompt is not None else _read_prompt(prompt_file)
        one(text)


def _read_prompt(path: Optional[Path]) -> str:
    from .errors import UsageError
    from .textfile import read_text

    if path is not None:
        return read_text(path)
    if sys.stdin.isatty():
        raise UsageError("no prompt; pass -p TEXT, --prompt-file FILE, or pipe text on stdin")
    return sys.stdin.read()


@app.command()
def tokenize(
    model: Path = typer.Argument(..., help="GGUF file."),
    text: str = typer.Argument(..., help="Text to tokenise (NFC-normalised first, as GPT-NeoX's tokenizer does)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list of ids."),
):
    """Print the token ids of TEXT."""
    import json

    from runtime.model import NeoxModel, RuntimeOptions

    with NeoxModel(model, RuntimeOptions(n_ctx=64)) as m:
        ids = m.tokenize(text)
        if as_json:
            print(json.dumps(ids))
        else:
            for i in ids:
                print(f"{i:>8} {m.detokenize([i])!r}")


@app.command()
def perplexity(
    model: Path = typer.Argument(..., help="GGUF file."),
    text: Path = typer.Option(..., "--text", help="UTF-8 text file to score."),
    ctx: int = typer.Option(512, "--ctx", "-c", help="Window size; the second half of each window is scored."),
    as_json: bool = typer.Option(False, "--json"),
    threads: Optional[int] = THREADS, gpu_layers: Optional[int] = GPU,
    quiet: bool = typer.Option(False, "--quiet"),
):
    """Perplexity as llama-perplexity computes it, with its standard error."""
    import json

    from runtime.score import perplexity as ppl

    from .textfile import read_text

    body = read_text(text)
    with _open(model, ctx, threads, gpu_layers, batch=ctx) as m:
        r = ppl(m, body, ctx, quiet=quiet)
    if as_json:
        print(json.dumps(r.as_json(), indent=1))
    else:
        print(f"perplexity {r.ppl:.4f} ± {r.ppl_se:.4f} ({r.tokens_scored} tokens, ctx {r.ctx}, {r.n_chunks} windows)")


@app.command()
def kld(
    model: Path = typer.Argument(..., help="GGUF file to evaluate."),
    reference: str = typer.Option(..., "--reference", help="F16/F32 GGUF, or the HF checkpoint (folder or repo id)."),
    text: Path = typer.Option(..., "--text"),
    ctx: int = typer.Option(512, "--ctx", "-c"),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Where reference log-probs are cached (default ~/.cache/neoxq)."),
    as_json: bool = typer.Option(False, "--json"),
    threads: Optional[int] = THREADS, gpu_layers: Optional[int] = GPU,
    quiet: bool = typer.Option(False, "--quiet"),
):
    """KL divergence, top-1 agreement, RMS Δp and Δppl against a reference."""
    import json

    from runtime.score import kld as do_kld

    from .textfile import read_text

    body = read_text(text)
    with _open(model, ctx, threads, gpu_layers, batch=ctx) as m:
        r = do_kld(m, reference, body, ctx, cache_dir=cache_dir, quiet=quiet)
    if as_json:
        print(json.dumps(r.as_json(), indent=1))
    else:
        print(f"KLD mean {r.kld_mean:.6f} ± {r.kld_mean_se:.6f}  median {r.kld_median:.6f}  p99 {r.kld_p99:.6f}  max {r.kld_max:.6f}")
        print(f"top-1 agreement {100 * r.top1:.2f}% ± {100 * r.top1_se:.2f}%  RMS Δp {100 * r.rms_dp:.3f}%")
        print(f"ppl {r.ppl:.4f} ± {r.ppl_se:.4f} vs reference {r.ppl_ref:.4f} ± {r.ppl_ref_se:.4f}  Δppl {r.dppl:+.4f} ({r.dppl_pct:+.2f}%)  [{r.tokens_scored} tokens]")


@app.command()
def serve(
    model: Path = typer.Argument(..., help="GGUF file."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    ctx: Optional[int] = CTX, threads: Optional[int] = THREADS, gpu_layers: Optional[int] = GPU,
):
    """OpenAI-compatible completions server (llama-cpp-python's), on localhost by default."""
    from runtime.serve import serve as do_serve

    do_serve(model, host=host, port=port, n_ctx=ctx, n_threads=threads, n_gpu_layers=gpu_layers)


@app.command()
def report(
    src: str = typer.Argument(..., help="Checkpoint folder or hub repo id."),
    text: Path = typer.Option(..., "--text", help="Evaluation text (UTF-8), e.g. wikitext-2's wiki.test.raw."),
    qtypes: Optional[str] = typer.Option(None, "--types", help="Comma-separated types (default F16,Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q3_K_M,Q2_K)."),
    imatrix: Optional[str] = typer.Option(None, "--imatrix", help="'auto' (from the text's first quarter, which is then not scored), 'none', or a file."),
    ctx: Optional[int] = typer.Option(None, "--ctx", "-c", help="Window size (default 512)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Report folder (default report-<name>[-<revision>])."),
    revision: Optional[str] = typer.Option(None, "--revision", "-r"),
    quiet: bool = typer.Option(False, "--quiet"),
):
    """Convert, quantize to each type, and score each against the HF fp32 reference (resumable)."""
    from .report import ReportOptions, run_report

    kw = {k: v for k, v in dict(types=qtypes, ctx=ctx, revision=revision).items() if v is not None}
    if imatrix is not None:
        kw["imatrix"] = None if imatrix.lower() == "none" else imatrix
    rj = run_report(src, text, output, ReportOptions(quiet=quiet, **kw))
    _print_report(rj, quiet)


def _print_report(rj: Path, quiet: bool) -> None:
    import json

    from runtime.report import table

    if not quiet:
        print(table(json.loads(rj.read_text())))
        print(f"\nreport: {rj} (+ report.md, report.png)")


@app.command()
def demo(
    output: Path = typer.Option(Path("demo-out"), "-o", "--output", help="Folder for the demo's model and report."),
    quiet: bool = typer.Option(False, "--quiet"),
):
    """Offline demo: build and briefly train a small GPT-NeoX, then run the full quality report on it."""
    from .demo import run_demo

    _print_report(run_demo(output, quiet=quiet), quiet)


@app.command()
def types():
    """List the quant types with their nominal bits per weight."""
    print(types_table())


def _say(msg: str, quiet: bool) -> None:
    """Result lines go to stdout on a terminal; pipes and --quiet get nothing but errors."""
    if not quiet and sys.stdout.isatty():
        print(msg)


def main() -> None:
    try:
        app(standalone_mode=False)
    except NeoxqError as exc:
        if _state["debug"]:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # usage errors from typer's click, and the unexpected
        usage = _usage_error_types()
        if isinstance(exc, usage):
            print(f"error: {exc.format_message()} (see `neoxq {' '.join(sys.argv[1:2])} --help`)", file=sys.stderr)
            sys.exit(1)
        if _state["debug"]:
            raise
        print(f"error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", file=sys.stderr)
        sys.exit(1)


def _usage_error_types() -> tuple[type, ...]:
    """typer ships its own click; accept either's ClickException."""
    found = []
    for mod in ("typer._click.exceptions", "click.exceptions"):
        try:
            found.append(__import__(mod, fromlist=["ClickException"]).ClickException)
        except ImportError:
            pass
    return tuple(found)

if __name__ == "__main__":
    main()
