"""Options shared by several commands, declared once (as huggingface_hub's cli/ does): a flag means
the same thing, with the same short form and the same limits, in every command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def _quiet(value: bool) -> bool:
    """Quiet is process-wide: set once here, read by progress bars and status lines."""
    from neoxq.core.progress import set_quiet

    set_quiet(value)
    return value


def number(lo: float | None = None, hi: float | None = None, integer: bool = False):
    """A callback for a numeric option: finite and within [lo, hi] (click's ranges let NaN through),
    checked by the one rule in neoxq.core.numbers and named as the user spelled the option."""

    def check(ctx: typer.Context, param: typer.CallbackParam, value):
        from neoxq.core.numbers import check_number

        return check_number(value, param.opts[0], lo, hi, integer)

    return check


Quiet = Annotated[bool, typer.Option("--quiet", callback=_quiet, help="Print nothing but errors.")]
Json = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
Force = Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.")]
Revision = Annotated[Optional[str], typer.Option("--revision", "-r", help="Hub branch, tag or commit (Pythia: step3000 …).")]
Output = Annotated[Optional[Path], typer.Option("--output", "-o", help="Output file or folder (see the command's help).")]
Text = Annotated[Path, typer.Option("--text", help="UTF-8 text file.")]
Ctx = Annotated[Optional[int], typer.Option("--ctx", "-c", min=4, help="Context window in tokens.")]
Threads = Annotated[Optional[int], typer.Option("--threads", "-t", min=1, help="CPU threads (default: all cores).")]
GpuLayers = Annotated[
    Optional[int], typer.Option("--n-gpu-layers", "-ngl", min=-1, help="Layers on the GPU (default: all when the build supports offload; 0 = CPU).")
]
CacheDir = Annotated[Optional[Path], typer.Option("--cache-dir", help="Where reference tables are cached (default ~/.cache/neoxq).")]
Model = Annotated[Path, typer.Argument(help="GGUF file.")]
Source = Annotated[str, typer.Argument(help="Checkpoint folder, or hub repo id (org/name or org/name@revision).")]


def _size(value: Optional[str]) -> Optional[int]:
    from neoxq.core.sizes import parse_size

    return None if value is None else parse_size(value, "--max-memory")


MaxMemory = Annotated[
    Optional[str],
    typer.Option(
        "--max-memory",
        callback=_size,
        help="Most memory the fp32 model (the reference, --optimize's calibration) may use (e.g. 8GB); it streams layer by layer when the model does not fit. With --optimize, a stated budget also keeps freed temporaries out of the C heap (docs/method.md, Scale).",
    ),
]
ReferenceOpt = Annotated[
    Optional[str],
    typer.Option("--reference", help="auto (= hf), hf (transformers fp32), f16 (the F16 GGUF this run builds), or a GGUF/checkpoint path."),
]

FlashAttn = Annotated[str, typer.Option("--flash-attn", help="auto (on, as llama.cpp resolves it), on or off.")]
Device = Annotated[str, typer.Option("--device", help="auto, gpu or cpu (cpu = no layers and no ops offloaded).")]
Tasks = Annotated[Optional[str], typer.Option("--tasks", help="lm-eval tasks to score on every file (comma-separated).")]
IncludePath = Annotated[Optional[Path], typer.Option("--include-path", help="Folder with your own lm-eval task YAML files.")]
