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
        help="Importance matrix (neoxq or llama-imatrix GGUF, or legacy .dat); with --mix/--optimize, 'none' for none (default: computed from --calib).",
    ),
]


def convert(
    src: Source,
    revision: Revision = None,
    outtype: Annotated[Optional[OutType], typer.Option("--outtype", help="Type of the converted file (default f16).")] = None,
    quant: Annotated[Optional[str], typer.Option("--quant", help="Also quantize to these comma-separated types. " + QUANT_HELP)] = None,
    imatrix: IMatrixFile = None,
    output: Output = None,
    force: Force = False,
    quiet: Quiet = False,
):
    """Convert a GPT-NeoX checkpoint to GGUF (and optionally quantize it to several types).

    -o is the output file (default <name>[-<revision>]-<TYPE>.gguf); with --quant, a folder."""
    from neoxq.convert.checkpoint import open_checkpoint
    from neoxq.convert.converter import convert as do_convert

    from neoxq import preflight

    ckpt = open_checkpoint(src, revision)
    preflight.check(f"converting {ckpt.name}", preflight.convert_bytes(ckpt), "free memory (the converter already holds only one tensor at a time)")
    if quant:
        from neoxq.build import build_types

        types = QuantType.parse_list(quant)
        base = QuantType(outtype.value.upper()) if outtype else QuantType.F16
        out_dir = output or Path(".")
        built = build_types(ckpt, types, out_dir, imatrix=imatrix, base_type=base, replace_invalid=force)
        paths = [b.path for b in built.values()]
    else:
        paths = [do_convert(ckpt, outtype.value if outtype else QuantType.F16, output=output, force=force)]
    for p in paths:
        result_line(str(p))


def quantize(
    inp: Annotated[Path, typer.Argument(help="F32/F16/BF16 GGUF to quantize.")],
    qtype: Annotated[str, typer.Option("--type", help=QUANT_HELP)],
    imatrix: IMatrixFile = None,
    mix: Annotated[bool, typer.Option("--mix", help="Choose each tensor's type from measured sensitivity (needs --calib).")] = False,
    calib: Annotated[Optional[Path], typer.Option("--calib", help="Calibration text for --mix (never scored).")] = None,
    target_size: Annotated[
        Optional[str], typer.Option("--target-size", help="--mix budget as a file size (2.1GB, 850MB); default: the stock --type file's size.")
    ] = None,
    target_bpw: Annotated[Optional[float], typer.Option("--target-bpw", callback=number(1.0, 32.0), help="--mix budget in bits per weight.")] = None,
    optimize: Annotated[
        bool,
        typer.Option(
            "--optimize",
            help="Re-choose every weight's level on llama.cpp's grids against the model's output on --calib (GPTQ, layer by layer on the quantized model's own inputs; biases re-solved); label <TYPE>-opt. A killed run resumes.",
        ),
    ] = False,
    reference: Annotated[
        Optional[str],
        typer.Option(
            "--reference",
            help="--optimize, and --mix without --imatrix: the fp32 checkpoint the file was converted from (default: the hub source it records).",
        ),
    ] = None,
    ctx: Annotated[int, typer.Option("--ctx", "-c", min=4, help="--mix calibration window.")] = 512,
    max_memory: MaxMemory = None,
    float32: Annotated[
        bool,
        typer.Option(
            "--float32",
            help="--optimize: every pass in float32, also where the CPU multiplies bfloat16 natively (slower; the same method on every machine).",
        ),
    ] = False,
    output: Output = None,
    as_json: Json = False,
    force: Force = False,
    quiet: Quiet = False,
):
    """Quantize a GGUF with llama.cpp's quantizer; shows which tensor got which type.

    With --mix, the types are chosen per tensor to minimise the KL divergence from the input on the
    calibration text, within the budget (default: no larger than the stock --type file)."""
    from neoxq import preflight
    from neoxq.core.gguf_info import read_info
    from neoxq.runtime.quantize import quantize as do_quantize

    qt = QuantType.parse(qtype)
    _check_mix_options(mix, calib, target_size, target_bpw, optimize, reference, max_memory, float32)
    info = read_info(inp)
    preflight.check(f"quantizing {info.path.name}", preflight.quantize_bytes(info), "free memory")
    if optimize:
        from neoxq.core.textfile import read_text
        from neoxq.optimize import OptimizeOptions, quantize_optimized

        im = "auto" if imatrix is None else (None if str(imatrix).lower() == "none" else str(imatrix))
        result = quantize_optimized(
            info,
            qt,
            OptimizeOptions(
                read_text(calib, "--calib"),
                reference=reference,
                imatrix=im,
                ctx=ctx,
                mix=mix,
                max_memory=max_memory,
                fisher_bf16=False if float32 else None,
                stream_bf16=False if float32 else None,
            ),
            output=output,
            force=force,
        )
    elif mix:
        from neoxq.core.sizes import parse_size
        from neoxq.core.textfile import read_text
        from neoxq.core.mix_plan import MixOptions
        from neoxq.mix import mix_with_imatrix

        opts = MixOptions(
            read_text(calib, "--calib"),
            target_bytes=parse_size(target_size, "--target-size") if target_size else None,
            target_bpw=target_bpw,
            ctx=ctx,
        )
        result = mix_with_imatrix(info, qt, opts, output, imatrix, reference, force)
    else:
        result = do_quantize(info, qt, output=output, imatrix=imatrix, force=force)
    if as_json:
        print(json.dumps(result.as_json(), indent=1))
    elif not quiet:
        from neoxq.tables import quant_result_table

        print(quant_result_table(result))


def _check_mix_options(mix: bool, calib, target_size, target_bpw, optimize: bool = False, reference=None, max_memory=None, float32=False) -> None:
    from neoxq.core.errors import UsageError

    if optimize:
        if calib is None:
            raise UsageError(
                "--optimize chooses the rounding against each layer's output on a calibration text; pass --calib FILE (a text not used for scoring)"
            )
        if target_size or target_bpw:
            raise UsageError("--target-size and --target-bpw belong to --mix; --optimize keeps the stock type's size")
        return
    if max_memory is not None or float32:
        flag = "--max-memory" if max_memory is not None else "--float32"
        raise UsageError(f"{flag} belongs to --optimize (its calibration passes); add --optimize or drop it")
    if reference and not mix:
        raise UsageError("--reference belongs to --optimize and --mix; add one of them")
    if mix and calib is None:
        raise UsageError("--mix measures each tensor's sensitivity on a calibration text; pass --calib FILE (a text not used for scoring)")
    if not mix and (calib or target_size or target_bpw):
        raise UsageError("--calib, --target-size and --target-bpw belong to --mix; add --mix")
    if target_size and target_bpw:
        raise UsageError("pass one budget: --target-size or --target-bpw")


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
