"""Rewriting a quantized GGUF's levels in place, against the model's output on calibration text:
the token embedding in its Fisher metric, then every layer matmul in order on the quantized
model's own inputs (neoxq.convert.calibrate), with their F32 biases re-solved. Tensor types and
sizes stay llama.cpp's; each returns one `TensorRounding` per tensor it rounded."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from neoxq.convert.calibrate import sequential_calibration
from neoxq.convert.neox import GPTNeoXArgs, interleave_qkv
from neoxq import accelerator
from neoxq.convert import gptq_torch
from neoxq.core import gptq
from neoxq.core.calibration_stats import EMBEDDING
from neoxq.core.gguf_info import GGUFInfo
from neoxq.core.progress import Progress
from neoxq.core.tensor_file import TensorFile
from neoxq.levels import at, column_group, dequantized_rows, error_rows, format_of, round_rows, rounded_chunks, source_weights, tensor_values


@dataclass
class TensorRounding:
    name: str
    type: str
    # the layer's output error on the calibration tokens with the new levels over llama.cpp's own
    # (estimated on levels.ERROR_ROWS rows): below 1 is better
    output_error_ratio: float

    def as_json(self) -> dict:
        return asdict(self)


def _ratio(new: float, old: float) -> float:
    return new / old if old > 0 else 1.0


def rewrite_embedding(path: Path, src: GGUFInfo, fisher: np.ndarray, act_order: bool = True, damp: float = gptq.DAMP) -> list[TensorRounding]:
    """GPTQ the token embedding of the quantized file at `path` on its own grids, in the metric of
    the output's Fisher information (the mean of g gᵀ over tokens); levels written in place, a row
    chunk at a time. Nothing is done where llama.cpp's type is one neoxq does not encode."""
    with TensorFile(path) as f:
        t = f.tensor(EMBEDDING)
        fmt = format_of(t.type)
        if fmt is None:
            return []
        raw = f.read(t).reshape(-1, fmt.size)
        w = source_weights(src, t.name)
        factor = gptq.compensation(fisher, act_order, damp, group=column_group(fmt))
        some = error_rows(t.shape[0])
        before = dequantized_rows(fmt, raw, t.shape, some)
        with Progress("optimising", t.n_elements, "weights") as bar:
            for _, wr, _ in rounded_chunks(fmt, raw, w, factor):
                bar.update(wr.size, note=t.name)
        f.write(t, raw)
    ws = np.concatenate([w[i : i + 1] for i in some])
    old, new = (gptq.output_error(ws, q, fisher) for q in (before, dequantized_rows(fmt, raw, t.shape, some)))
    return [TensorRounding(t.name, t.type, _ratio(new, old))]


def bias_name(weight: str) -> str:
    """The GGUF name of a matmul's bias, beside its weight's."""
    return weight.replace(".weight", ".bias")


class _LayerRounding:
    """The callbacks sequential_calibration calls, over the work file held open: the values it
    holds now, and the rounding of one matmul (its levels and bias written in place)."""

    def __init__(self, f: TensorFile, src: GGUFInfo, opts, head_rows: np.ndarray, output_fisher, on_layer, originals=None):
        self.f, self.src, self.opts, self.head_rows = f, src, opts, head_rows
        self.output_fisher, self.on_layer, self.originals = output_fisher, on_layer, originals
        self.done: list[TensorRounding] = []

    def _bias(self, name: str):
        tb = self.f.by_name.get(bias_name(name))
        return tb if tb is not None and tb.type == "F32" else None

    def current(self, name: str):
        """The tensor's values and its bias as the file holds them now."""
        t, tb = self.f.tensor(name), self._bias(name)
        b = None if tb is None else self.f.read(tb).view(np.float32).astype(np.float64)
        return tensor_values(self.f.info, t, self.f.read(t)), b

    def current_rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Some rows (an index array) of the tensor's values as the file holds them now."""
        t = self.f.tensor(name)
        return tensor_values(self.f.info, t, self.f.read(t), rows)

    def requantize(self, name: str, mom: gptq.Moments):
        t = self.f.tensor(name)
        fmt = format_of(t.type)
        if fmt is None:  # a type neoxq does not encode: keep llama.cpp's, but feed it forward
            return self.current(name)
        tb, opts = self._bias(name), self.opts
        raw = self.f.read(t).reshape(-1, fmt.size)
        if self.originals is not None:  # before any byte of it changes (neoxq.core.resume.Originals)
            self.originals.keep(name, weight=raw, **({} if tb is None else {"bias": self.f.read(tb)}))
        b = None if tb is None else self.f.read(tb).view(np.float32).astype(np.float64)
        some = error_rows(t.shape[0])
        e_old = gptq.asymmetric_error(dequantized_rows(fmt, raw, t.shape, some), at(b, some), mom.rows(some))
        device = accelerator.rounding_device(opts.device)
        args = (mom, opts.act_order, opts.damp, b is not None, column_group(fmt))
        factor = gptq.moments_factor(*args) if device is None else gptq_torch.moments_factor(*args, device)  # the target's and GPTQ's
        w_t, b_t = gptq.asymmetric_target(source_weights(self.src, name), b, mom, opts.damp, factor=factor)
        coupling = gptq.RowCoupling.of(self.output_fisher[name], self.head_rows, opts.damp) if name in self.output_fisher else None
        q = round_rows(fmt, raw, w_t, factor, coupling)
        del factor
        bq = None if b is None else gptq.corrected_bias(w_t, b_t, q, mom)
        self.f.write(t, raw)
        if bq is not None:
            self.f.write(tb, bq.astype(np.float32))
        e_new = gptq.asymmetric_error(q[some], at(bq, some), mom.rows(some))
        self.done.append(TensorRounding(name, t.type, _ratio(e_new, e_old)))
        return q, bq

    def finished(self, k: int) -> None:
        self.f.flush()
        if self.on_layer:
            self.on_layer(k)


def rewrite_sequential(
    path: Path, src: GGUFInfo, ckpt, windows: np.ndarray, opts, start_layer: int = 0, on_layer=None, output_fisher=None, originals=None
) -> list[TensorRounding]:
    """Every layer matmul and the output matrix of the file at `path`, rounded in order on the
    quantized model's own inputs against the fp32 outputs, their F32 biases re-solved; levels and
    biases written in place, each tensor's former bytes handed to `originals` first (a
    neoxq.core.resume.Originals). Layers below `start_layer` are taken as written (a resumed run).
    output_fisher: attention QKV matrices' output Fisher per head (their rows are rounded coupled,
    gptq.RowCoupling). opts: the OptimizeOptions (act_order, damp, stream_bf16, device)."""
    args = GPTNeoXArgs.from_config(ckpt.config)
    head_rows = interleave_qkv(np.arange(3 * args.hidden_size), args).reshape(args.num_attention_heads, -1)  # GGUF rows of each head's q, k, v
    with TensorFile(path) as f:
        r = _LayerRounding(f, src, opts, head_rows, output_fisher or {}, on_layer, originals)
        used, where = np.unique(windows, return_inverse=True)
        inputs_q = r.current_rows(EMBEDDING, used)[where.reshape(np.shape(windows))]  # the quantized model's inputs
        sequential_calibration(
            ckpt,
            windows,
            inputs_q,
            r.requantize,
            with_head="output.weight" in f.by_name,
            start_layer=start_layer,
            restore=r.current,
            on_layer=r.finished,
            norms=lambda name: r.current(name)[0],
            bf16=bool(opts.stream_bf16),
            device=opts.device,
        )
    return r.done


def put_back(path: Path, originals: dict[str, dict[str, np.ndarray]], layers_done: int) -> None:
    """The tensors of the layers a killed run had not finished (and of the output matrix), written
    back as they were before it changed them; those of finished layers stay as written."""
    with TensorFile(path) as f:
        for name, arrays in originals.items():
            if name.startswith("blk.") and int(name.split(".")[1]) < layers_done:
                continue
            f.write(f.tensor(name), arrays["weight"])
            if "bias" in arrays:
                f.write(f.tensor(bias_name(name)), arrays["bias"])
