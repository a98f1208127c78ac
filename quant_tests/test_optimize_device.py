"""`--optimize --device`: the rounding's dense algebra in torch (neoxq.convert.gptq_torch) gives the
numpy path's factor, solves and levels (checked here on the CPU, where torch runs the very code a
GPU runs); a whole --optimize through it writes the CPU path's file; a device that is not here is
refused in one line; on a CUDA GPU, the file's levels are the CPU's up to rare ties."""

from __future__ import annotations


import numpy as np
import pytest

from neoxq import accelerator
from neoxq.convert import gptq_torch
from neoxq.core import blocks, gptq
from neoxq.core.gguf_info import read_info

from .helpers import assert_one_line_error, run_cli
from .test_optimize import GRID_FORMATS, _correlated_problem


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.parametrize("fmt", GRID_FORMATS, ids=lambda f: f.name)
def test_torch_rounding_on_the_cpu_equals_numpys(fmt):
    """The factor to float64 rounding, the solve likewise, the levels equal; the negative control:
    the same comparison tells GPTQ's levels from nearest rounding's."""
    h, w, fmt, _, a, m = _correlated_problem(5, 2048, 512, 40, 0.2, fmt)
    h[:, 7] = h[7, :] = 0.0  # a dead column: unit diagonal before the damping, on both paths
    host, dev = gptq.compensation(h, True), gptq_torch.compensation(h, True, device="cpu")
    assert not isinstance(dev[1], np.ndarray) and np.array_equal(host[0], dev[0])
    assert np.abs(gptq.on_host(dev)[1] - host[1]).max() <= 1e-12 * np.abs(host[1]).max()
    rhs = np.random.default_rng(1).standard_normal((len(h), 5))
    want = gptq.solve(host, rhs)
    assert np.abs(gptq.solve(dev, rhs) - want).max() <= 1e-10 * np.abs(want).max()
    ours = gptq.gptq_levels(w, None, a, m, fmt.lmin, fmt.lmax, factor=dev, points=fmt.points)
    numpy_levels = gptq.gptq_levels(w, None, a, m, fmt.lmin, fmt.lmax, factor=host, points=fmt.points)
    assert ours.dtype == np.int16 and (ours == numpy_levels).mean() > 0.999
    assert (gptq.nearest(w, a, m, fmt.lmin, fmt.lmax, fmt.points) != numpy_levels).mean() > 0.05


def test_torch_sweep_in_row_chunks_equals_one_chunk(monkeypatch):
    """Rows are independent: a matrix swept a few rows at a time gives the levels of one sweep."""

    h, w, fmt, _, a, m = _correlated_problem(6, 1024, 256, 24, 0.2)
    factor = gptq_torch.compensation(h, True, device="cpu")
    whole = gptq.gptq_levels(w, None, a, m, fmt.lmin, fmt.lmax, factor=factor)
    monkeypatch.setattr(gptq_torch, "DEVICE_CHUNK_BYTES", 4 * 256 * 5)  # 5 rows at a time
    assert np.array_equal(gptq.gptq_levels(w, None, a, m, fmt.lmin, fmt.lmax, factor=factor), whole)


def _levels(path) -> dict[str, np.ndarray]:
    """Each block-format matrix's levels (neoxq.core.blocks), by name."""
    info, out = read_info(path), {}
    for t in info.tensors:
        fmt = blocks.FORMATS.get(t.type)
        if fmt is not None and len(t.shape) == 2:
            raw = np.fromfile(info.path, np.uint8, t.n_bytes, offset=info.data_offset + t.offset)
            out[t.name] = blocks.levels(fmt, raw.reshape(-1, fmt.size))
    return out


def _optimize(trained, trained_f16, calib, out, device="cpu"):
    from neoxq.optimize import OptimizeOptions, quantize_optimized

    opts = OptimizeOptions(calib, reference=str(trained), ctx=128, fisher_bf16=False, stream_bf16=False, device=device)
    return quantize_optimized(trained_f16, "Q4_K_M", opts, output=out)


def _as_close_as_float_rounding_allows(other: str, trained, trained_f16, texts, tmp_path, monkeypatch) -> None:
    """--optimize on the CPU path, the same with each re-solved bias moved by one float32 ulp
    ("nudged"), and the `other` file the caller made in tmp_path (with the same calibration): the
    same tensors, and the other file's KL divergence as close to the CPU file's as the nudged file's
    is, within a factor for the spread."""
    from neoxq.core import gptq

    from .test_optimize import paired_kld

    _optimize(trained, trained_f16, _calib(texts), tmp_path / "numpy.gguf")
    corrected = gptq.corrected_bias
    with monkeypatch.context() as patch:
        patch.setattr(
            gptq, "corrected_bias", lambda *a, **k: np.nextafter(corrected(*a, **k).astype(np.float32), np.float32(np.inf)).astype(np.float64)
        )
        _optimize(trained, trained_f16, _calib(texts), tmp_path / "nudged.gguf")
    assert _levels(tmp_path / "numpy.gguf").keys() == _levels(tmp_path / f"{other}.gguf").keys()
    theirs, nudged = (
        paired_kld(tmp_path / f"{n}.gguf", tmp_path / "numpy.gguf", trained_f16, texts["eval"], tmp_path / "scores") for n in (other, "nudged")
    )
    spread = max(abs(np.log(nudged["ratio"])), 1.96 * nudged["se_ln"])
    print(f"{other}/cpu KLD {theirs['ratio']:.4f} {theirs['ci95']}, nudged/cpu {nudged['ratio']:.4f} {nudged['ci95']}")
    assert abs(np.log(theirs["ratio"])) <= 3 * spread, (theirs, nudged)


def _calib(texts) -> str:
    return texts["calib"][:8000]


@pytest.mark.slow
def test_optimize_through_the_torch_rounding_matches_the_cpu_file(trained, trained_f16, texts, tmp_path, monkeypatch):
    """The whole --optimize with its rounding sent to torch (on the CPU here, as `--device cuda`
    sends it to the GPU). The first layer's inputs are the CPU run's, and so are its levels. After
    it the levels follow the float rounding of their inputs: the CPU path itself, with each
    re-solved bias moved by one float32 ulp, gives another file whose KL divergence differs by more
    than its paired interval (docs/method.md). So the torch file is held to that. A rounding that
    went wrong (no compensation, another grid) is far outside it."""
    sent = []
    with monkeypatch.context() as patch:
        patch.setattr(accelerator, "rounding_device", lambda device: sent.append(device) or "cpu")
        _optimize(trained, trained_f16, _calib(texts), tmp_path / "torch.gguf")
    assert sent, "the rounding was never asked for its device"
    _as_close_as_float_rounding_allows("torch", trained, trained_f16, texts, tmp_path, monkeypatch)
    a, b = _levels(tmp_path / "numpy.gguf"), _levels(tmp_path / "torch.gguf")
    first = [k for k in a if k.startswith("blk.0.")]
    assert first and all((a[k] == b[k]).mean() > 0.99 for k in first), {k: (a[k] == b[k]).mean() for k in first}


@pytest.mark.skipif(_cuda(), reason="this machine has CUDA: the refusal is for machines without it")
def test_a_device_that_is_not_here_is_refused_in_one_line(trained_f16, tmp_path):
    argv = ("quantize", trained_f16, "--type", "Q4_K_M", "--optimize", "-o", tmp_path / "x.gguf")
    assert_one_line_error(run_cli(*argv, "--device", "cuda"), "--device cuda", "--device cpu")
    assert_one_line_error(run_cli(*argv, "--device", "tpu"), "--device tpu", "cuda:N")
    assert_one_line_error(run_cli("quantize", trained_f16, "--type", "Q4_K_M", "--device", "cpu"), "--device", "--optimize")
    assert not (tmp_path / "x.gguf").exists()
    assert accelerator.resolve("auto") == "cpu" and accelerator.rounding_device("cpu") is None


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not _cuda(), reason="torch sees no CUDA device")
def test_cuda_optimize_is_as_close_to_the_cpu_file_as_float_rounding_allows(trained, trained_f16, texts, tmp_path, monkeypatch):
    """`--device cuda` against the CPU path on the same file and text (its products summed in
    another order are a float rounding like the nudge's)."""
    result = _optimize(trained, trained_f16, _calib(texts), tmp_path / "cuda.gguf", device="cuda")
    assert result.extra["optimize"]["tensors"]
    _as_close_as_float_rounding_allows("cuda", trained, trained_f16, texts, tmp_path, monkeypatch)
