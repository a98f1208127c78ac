"""convert, quantize, imatrix, types: making GGUF files."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from neoxq.core.qtypes import CONVERT_OUTTYPES, QUANTIZED, QuantType

from .options import number, Force, Json, MaxMemory, Output, Quiet, Revision, Source, Text
from .say import result_line

OutType = Enum("OutType", {t.value.lower(): t.value.lower() for t in CONVERT_OUTTYPES}, type=str)
QUANT_HELP = "Types (nominal bpw): " + ", ".join(f"{t.value} ({t.nominal_bpw:g})" for t in QUANTIZED)
IMatrixFile = Annotated[
    Optional[Path],
    typer.Option(
        "--imatrix",
        help="Importance matrix (neoxq or llama-imatrix GGUF, or legacy .dat); with --mix/--optimize, 'none' for none (default: computed from the calibration text).",
    ),
]


Calib = Annotated[
    Optional[list[Path]],
    typer.Option(
        "--calib",
        help="Calibration text for --mix and --optimize (never scored); repeat for several files. Default: text the fp32 checkpoint samples itself (seeded, cached).",
    ),
]


def convert(
    src: Source,
    revision: Revision = None,
    outtype: Annotated[Optional[OutType], typer.Option("--outtype", help="Type of the converted file (default f16).")] = None,
    quant: Annotated[Optional[str], typer.Option("--quant", help="Also quantize to these comma-separated types. " + QUANT_HELP)] = None,
    imatrix: IMatrixFile = None,
    optimize: Annotated[
        bool, typer.Option("--optimize", help="With --quant: the <TYPE>-opt files (levels chosen against each layer's output) instead of stock's.")
    ] = False,
    calib: Calib = None,
    ctx: Annotated[int, typer.Option("--ctx", "-c", min=4, help="--optimize's calibration window.")] = 512,
    output: Output = None,
    force: Force = False,
    quiet: Quiet = False,
):
    """Convert a GPT-NeoX checkpoint to GGUF (and optionally quantize it to several types).

    -o is the output file (default <name>[-<revision>]-<TYPE>.gguf); with --quant, a folder."""
    from neoxq.convert.checkpoint import open_checkpoint
    from neoxq.convert.converter import convert as do_convert

    from neoxq import build, preflight

    types = QuantType.parse_list(quant) if quant else []
    base = QuantType(outtype.value.upper()) if outtype else QuantType.F16
    build.check_convert_options(types, base, imatrix, optimize, bool(calib))
    ckpt = open_checkpoint(src, revision)
    preflight.check(f"converting {ckpt.name}", preflight.convert_bytes(ckpt), "free memory (the converter already holds only one tensor at a time)")
    if optimize:
        built = build.build_optimized_types(ckpt, types, output or Path("."), calib, imatrix, base, ctx, replace_invalid=force)
        paths = [b.path for b in built.values()]
    elif quant:
        built = build.build_types(ckpt, types, output or Path("."), imatrix=imatrix, base_type=base, replace_invalid=force)
        paths = [b.path for b in built.values()]
    else:
        paths = [do_convert(ckpt, outtype.value if outtype else QuantType.F16, output=output, force=force)]
    for p in paths:
        result_line(str(p))


Mix = Annotated[bool, typer.Option("--mix", help="Choose each tensor's type from its sensitivity probed on the calibration text.")]
TargetSize = Annotated[
    Optional[str], typer.Option("--target-size", help="--mix budget as a file size (2.1GB, 850MB); default: the stock --type file's size.")
]
TargetBpw = Annotated[Optional[float], typer.Option("--target-bpw", callback=number(1.0, 32.0), help="--mix budget in bits per weight.")]
Optimize = Annotated[
    bool,
    typer.Option(
        "--optimize",
        help="Re-choose every weight's level on llama.cpp's grids against the model's output on the calibration text (GPTQ, layer by layer on the quantized model's own inputs; biases re-solved); label <TYPE>-opt. A killed run resumes.",
    ),
]
Checkpoint = Annotated[
    Optional[str],
    typer.Option(
        "--reference",
        help="--optimize and --mix: the fp32 checkpoint the file was converted from (default: the hub source or local folder it records).",
    ),
]
Float32 = Annotated[
    bool,
    typer.Option(
        "--float32",
        help="--optimize: every pass in float32, also where the CPU multiplies bfloat16 natively (slower; the same method on every machine).",
    ),
]


OptimizeDevice = Annotated[
    Optional[str],
    typer.Option(
        "--device",
        help="--optimize: where its passes and GPTQ run: auto (a CUDA GPU when torch sees one, else the CPU), cpu, cuda or cuda:N.",
    ),
]


def quantize(
    inp: Annotated[Path, typer.Argument(help="F32/F16/BF16 GGUF to quantize.")],
    qtype: Annotated[str, typer.Option("--type", help=QUANT_HELP)],
    imatrix: IMatrixFile = None,
    mix: Mix = False,
    calib: Calib = None,
    target_size: TargetSize = None,
    target_bpw: TargetBpw = None,
    optimize: Optimize = False,
    reference: Checkpoint = None,
    ctx: Annotated[int, typer.Option("--ctx", "-c", min=4, help="--mix/--optimize calibration window.")] = 512,
    max_memory: MaxMemory = None,
    float32: Float32 = False,
    device: OptimizeDevice = None,
    output: Output = None,
    as_json: Json = False,
    force: Force = False,
    quiet: Quiet = False,
):
    """Quantize a GGUF with llama.cpp's quantizer; shows which tensor got which type.

    With --mix, the types are chosen per tensor to minimise the KL divergence from the input on the
    calibration text, within the budget (default: no larger than the stock --type file)."""
    from neoxq.quantize_gguf import QuantizeRequest, quantize_gguf

    request = QuantizeRequest(imatrix, mix, optimize, calib, target_size, target_bpw, reference, ctx, max_memory, float32, output, force, device)
    result = quantize_gguf(inp, QuantType.parse(qtype), request)
    if as_json:
        print(json.dumps(result.as_json(), indent=1))
    elif not quiet:
        from neoxq.tables import quant_result_table

        print(quant_result_table(result))


def imatrix(
    src: Source,
    text: Text,
    output: Annotated[Path, typer.Option("--output", "-o", help="Output imatrix file (llama.cpp's GGUF imatrix format).")],
    ctx: Annotated[int, typer.Option("--ctx", "-c", min=4, help="Tokens per chunk.")] = 512,
    revision: Revision = None,
    include_output: Annotated[bool, typer.Option("--include-output", help="Also collect output.weight.")] = False,
    force: Force = False,
    quiet: Quiet = False,
):
    """Compute an importance matrix over a calibration text (with the transformers fp32 model)."""
    from neoxq.convert.imatrix import make_imatrix

    result_line(str(make_imatrix(src, text, output, ctx=ctx, revision=revision, include_output=include_output, force=force)))


def types():
    """List the quant types with their nominal bits per weight."""
    from neoxq.tables import types_table

    print(types_table())
