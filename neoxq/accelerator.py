"""Where `--optimize`'s dense arithmetic runs: `cpu` (torch's CPU passes, the rounding in numpy and
LAPACK) or a CUDA device (`cuda`, `cuda:N`: the calibration passes, the moments, the rounding's
factorisations, solves and GPTQ sweeps in torch on the device, neoxq.convert.gptq_torch; only the block codec and the file
stay on the host). `auto` is the first CUDA device when torch sees one, else the CPU.

The levels on a GPU are the CPU path's up to float rounding: its products sum in another order, so a
rare tie between two levels goes the other way (tested on the CPU through the same torch code).
"""

from __future__ import annotations

import re

from neoxq.core.errors import UsageError

CPU = "cpu"
AUTO = "auto"
_CUDA = re.compile(r"cuda(:\d+)?")


def resolve(name: str) -> str:
    """The device `name` names, checked: `cpu`, `cuda` or `cuda:N` (present and seen by this torch),
    or `auto`. Refused in one line otherwise."""
    name = (name or AUTO).strip().lower()
    if name == CPU:
        return CPU
    if name != AUTO and not _CUDA.fullmatch(name):
        raise UsageError(f"--device {name}: not a device --optimize knows; pass cpu, cuda, cuda:N or auto")
    import torch

    if not torch.cuda.is_available():
        if name == AUTO:
            return CPU
        build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a CPU-only build")
        raise UsageError(f"--device {name}: torch sees no CUDA device here ({build}); pass --device cpu, or install a CUDA build of torch")
    if name == AUTO:
        return "cuda:0"
    index = int(name.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0; pick one of them")
    return f"cuda:{index}"


def rounding_device(device: str) -> str | None:
    """The torch device the rounding's dense algebra goes to (neoxq.convert.gptq_torch) for a resolved
    `device`, or None: numpy and LAPACK on the host, the CPU path."""
    return None if device == CPU else device
