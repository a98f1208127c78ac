"""`neoxq quantize --optimize`: llama.cpp's file, with every quantized weight's level re-chosen
against the model's output on calibration text, and the layers' F32 biases re-solved.

1. One fp32 pass of the checkpoint (transformers) over the calibration windows gives the importance
   matrix (each matmul's input second moments' diagonal; `--imatrix` names another or `none`), the
   token embedding's Fisher information (a lookup has no inputs: the gradient of the output's
   log-likelihood in embedding space stands in for them), each attention head's Fisher in QKV's
   output space, and each matmul input's largest magnitude per channel.
2. Each LayerNorm's channels are equalised into the matmuls reading it (neoxq.core.equalize): the
   same model, with the large activation channels that llama.cpp's k-quant kernels round coarsely
   (8 bits per 256 values) moved into the weights. The equalised F16 copy is the source from here.
3. llama.cpp's own quantizer writes the stock file of the type (or the measured mix's types) with
   that imatrix (rescaled to the equalised inputs): its tensor types, block scales and mins (the
   grids) and metadata, plus neoxq's provenance keys.
4. The embedding's levels: GPTQ on llama.cpp's grids in the Fisher metric (neoxq.core.gptq).
5. Then layer by layer (neoxq.convert.calibrate), the fp32 model and the quantized one side by side:
   each matmul's levels are chosen by GPTQ to reproduce the fp32 layer's output from the inputs the
   already-quantized layers give (so each layer also cancels what rounding upstream did), with its
   bias solved in the same least squares; attention QKV's rows coupled per head through that
   head's output Fisher (gptq.RowCoupling); the output matrix last.
Levels go into llama.cpp's blocks in place (neoxq.core.blocks), biases and norms into their F32
tensors: same tensor types and sizes, same kernels; every llama.cpp reads and runs the file.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from neoxq.core.atomic import atomic_output, check_output, output_in
from neoxq.core.cache import cache_root
from neoxq.core.equalize import ALPHA
from neoxq.core.errors import UsageError
from neoxq.core.gguf_info import GGUFInfo, TensorInfo, read_info
from neoxq.core.gptq import DAMP
from neoxq.core.progress import Progress
from neoxq.core.progress import info as say
from neoxq.core.qtypes import QuantType
from neoxq.core.textfile import text_sha256

METHOD = "gptq-sequential-asymmetric-on-llama.cpp-grids"
QKV_METHOD = "+qkv-heads-in-output-fisher"  # METHOD's suffix when attention QKV rows are coupled (OptimizeOptions.qkv_fisher)
EQUALIZE_METHOD = "+norm-equalized"  # … when the norms' channels are equalised first (OptimizeOptions.equalize)
BF16_METHOD = "+fisher-bf16"  # … when the first pass's Fisher ran in bfloat16 (OptimizeOptions.fisher_bf16)
STREAM_BF16_METHOD = "+quantized-stream-bf16"  # … when the quantized model's layers ran in bfloat16 (OptimizeOptions.stream_bf16)
EMBEDDING = "token_embd.weight"
EQUALIZED_FILE = "equalized.gguf"  # in the job folder: the source with its norms' channels equalised
OUTPUT_FISHER_FILE = "output_fisher.npz"  # in the job folder: the sequential pass's QKV metrics, kept for a resumed run


@dataclass
class OptimizeOptions:
    calib: str  # calibration text (never scored)
    reference: str | None = None  # fp32 checkpoint (folder or hub id); None: the file's recorded source
    revision: str | None = None
    imatrix: str | None = "auto"  # auto: from the calibration pass; a file; None: no imatrix
    ctx: int = 512
    act_order: bool = True
    damp: float = DAMP
    mix: bool = False  # the tensor types of a measured mix (neoxq.mix) instead of stock's: <T>-opt-mix
    # Re-choose each block's scales from the error-compensated weights (natural column order, so no
    # act order). Off: on the 31M benchmark model it measured 0.96x the fixed-grid KLD at Q2_K_S but
    # 1.24x at Q4_K_M, where losing act order costs more than the new grids gain.
    dynamic_grids: bool = False
    max_memory: int | None = None  # bytes --optimize may use; None: what is available. Above it, the first pass streams
    first_pass: str = "auto"  # auto: streamed when the fp32 model does not fit max_memory; memory; streamed
    # Round attention QKV in the metric of the output's Fisher per head (gptq.RowCoupling), not
    # every output alike: an error in a head's queries and keys is felt through its softmax.
    qkv_fisher: bool = True
    # Move the layer inputs' large channels from the activations (which llama.cpp's k-quant kernels
    # round to 8 bits per 256 values) into the weights, through the LayerNorms (neoxq.core.equalize).
    equalize: bool = True
    # The first pass's forward and backward (the Fisher, the imatrix, the channel maxima) in
    # bfloat16; None: where the CPU multiplies bfloat16 natively (neoxq.convert.calibrate.native_bf16).
    fisher_bf16: bool | None = None
    # The sequential pass's quantized model (whose activations the layers are rounded on) in bfloat16
    # matmuls; the fp32 model, the target, stays float32. None: as fisher_bf16.
    stream_bf16: bool | None = None

    @property
    def method(self) -> str:
        bf16 = (BF16_METHOD if self.fisher_bf16 else "") + (STREAM_BF16_METHOD if self.stream_bf16 else "")
        return METHOD + (EQUALIZE_METHOD if self.equalize else "") + (QKV_METHOD if self.qkv_fisher else "") + bf16

    def resolved(self) -> "OptimizeOptions":
        """These options with what `None` leaves to the machine decided (the job's inputs name it)."""
        import dataclasses

        from neoxq.convert.calibrate import native_bf16

        unset = {k: native_bf16() for k in ("fisher_bf16", "stream_bf16") if getattr(self, k) is None}
        return dataclasses.replace(self, **unset) if unset else self


def reference_checkpoint(src: GGUFInfo, reference: str | None, revision: str | None = None):
    """The fp32 checkpoint the calibration activations come from: --reference, else the hub source
    recorded in the file; it must be the checkpoint the file was converted from (fingerprint)."""
    from neoxq.convert.checkpoint import open_checkpoint
    from neoxq.reference import check_checkpoint_belongs, source_of

    if reference is None:
        reference, revision = source_of(src, "the checkpoint folder it was converted from")
    ckpt = open_checkpoint(str(reference), revision)
    check_checkpoint_belongs(ckpt, src)
    return ckpt


def calibration_imatrix(src: GGUFInfo, calib: str, folder: Path, reference: str | None = None, revision: str | None = None, ctx: int = 512) -> Path:
    """An importance matrix from the calibration text (the fp32 checkpoint the file was converted
    from; --reference or the recorded hub source), written into `folder`: what --mix uses when no
    --imatrix is named (measured: a mix with it reaches 0.58x stock's KLD at Q4_K_M, 0.95x without)."""
    from neoxq.convert.imatrix import compute_imatrix
    from neoxq.core.imatrix_io import write_imatrix

    ckpt = reference_checkpoint(src, reference, revision)
    im = compute_imatrix(
        ckpt, calib, ctx=min(ctx, src.context_length or ctx), include_output=True, dataset_name=f"calibration sha256:{text_sha256(calib)[:16]}"
    )
    return write_imatrix(Path(folder) / "calibration.imatrix", im, force=True)


def read_weights(info: GGUFInfo, t: TensorInfo, rows: slice = slice(None)) -> np.ndarray:
    """A float tensor of an F32/F16/BF16 GGUF (or some of its rows) as float32 [rows, cols]."""
    from neoxq.core.gguf_info import FLOAT_DTYPES, float_rows

    if t.type not in FLOAT_DTYPES:
        raise UsageError(f"{info.path.name} holds {t.name} as {t.type}; optimise from the F32/F16/BF16 file")
    return float_rows(info, t, rows)


class RowChunks:
    """A [rows, cols] matrix produced a row range at a time (read from a file, dequantized): the
    largest tensors (a 6.9B model's embedding and output matrix, 50k × 4096) are never held whole
    in float32 or float64."""

    def __init__(self, shape: tuple[int, int], rows_fn):
        self.shape, self._rows = tuple(shape), rows_fn

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        return self._rows(rows)


def source_weights(src: GGUFInfo, name: str) -> RowChunks:
    t = src.tensor(name)
    return RowChunks(t.shape, lambda rows: read_weights(src, t, rows))


# Rows the per-tensor output-error ratio (a report line, not an input to anything) is estimated on,
# evenly spaced: the exact figure is a [rows, in] × [in, in] product twice per matrix, 6 % of
# --optimize's time on the 410M shape (cProfile), and rows are rounded alike.
ERROR_ROWS = 256


def error_rows(n: int) -> np.ndarray:
    return np.arange(0, n, -(-n // ERROR_ROWS))


def _at(v: np.ndarray | None, idx: np.ndarray) -> np.ndarray | None:
    return None if v is None else v[idx]


def dequantized_rows(fmt, raw: np.ndarray, shape: tuple[int, int], rows: np.ndarray) -> np.ndarray:
    """What ggml's dequantize gives for some rows (an index array) of `raw` blocks [n, size] of a
    [rows, cols] tensor, float32 [len(rows), cols]."""
    from neoxq.core import blocks

    per_row = raw.reshape(shape[0], -1, fmt.size)[rows]
    return blocks.values(fmt, per_row.reshape(-1, fmt.size)).reshape(len(rows), shape[1])


def _block_rows(rows: slice, per_row: int, n: int) -> slice:
    r0, r1, _ = rows.indices(n)
    return slice(r0 * per_row, r1 * per_row)


def tensor_values(info: GGUFInfo, t: TensorInfo, raw: np.ndarray) -> np.ndarray:
    """float32 [rows, cols] of a tensor's raw bytes: neoxq's block formats, the float types, or
    ggml's own dequantize for the rest (a mix's IQ types)."""
    from neoxq.core import blocks

    if t.type in blocks.FORMATS:
        fmt = blocks.FORMATS[t.type]
        return blocks.values(fmt, raw.reshape(-1, fmt.size)).reshape(t.shape)
    if t.type in ("F32", "F16", "BF16"):
        return read_weights(info, t)
    import gguf

    from neoxq.runtime import capi

    return capi.dequantize(raw, int(gguf.GGMLQuantizationType[t.type]), t.n_elements).reshape(t.shape)


def _regridder(fmt, raw: np.ndarray, shape: tuple[int, int], importance: np.ndarray):
    """regrid for gptq_levels: llama.cpp's own search (ggml_quantize_chunk, importance-weighted)
    re-chooses a block column's scales and mins from the weights as GPTQ has updated them; the new
    header bytes go into `raw` (viewed [rows, blocks per row, size]) in place."""
    from neoxq.runtime import capi

    from neoxq.core import blocks

    per_row = raw.reshape(shape[0], shape[1] // fmt.block, fmt.size)
    imp = np.ascontiguousarray(importance, dtype=np.float32)

    def regrid(rows: slice, col: int, wcur: np.ndarray):
        new = capi.quantize_rows(np.ascontiguousarray(wcur, dtype=np.float32), fmt.ggml_type, imp[col : col + fmt.block])
        per_row[rows, col // fmt.block] = new
        return blocks.grid(fmt, new)

    return regrid


def rewrite_levels(
    path: Path, src: GGUFInfo, moments: dict, counts: dict, act_order: bool = True, damp: float = DAMP, dynamic: bool = False
) -> list[dict]:
    """GPTQ every matmul of the quantized file at `path` whose block format neoxq encodes and whose
    calibration inputs were collected (here: the embedding, in its Fisher metric); write the levels
    in place, a row chunk at a time. Returns one line per tensor."""
    from neoxq.core import blocks, gptq

    info = read_info(path)
    todo = [t for t in info.tensors if t.type in blocks.FORMATS and t.name in moments]
    done = []
    with open(path, "r+b") as fh, Progress("optimising", sum(t.n_elements for t in todo), "weights") as bar:
        for t in todo:
            fmt = blocks.FORMATS[t.type]
            fh.seek(info.data_offset + t.offset)
            raw = np.frombuffer(fh.read(t.n_bytes), np.uint8).reshape(-1, fmt.size).copy()
            w = source_weights(src, t.name)
            h = moments[t.name] / max(counts[t.name], 1)
            factor = gptq.compensation(h, act_order and not dynamic, damp)  # a re-chosen grid keeps the columns in order
            some = error_rows(t.shape[0])
            before = dequantized_rows(fmt, raw, t.shape, some)
            for _, wr, _ in rounded_chunks(fmt, raw, w, factor, np.diag(h) if dynamic else None):
                bar.update(wr.size, note=t.name)
            fh.seek(info.data_offset + t.offset)
            fh.write(raw.tobytes())
            ws = np.concatenate([w[i : i + 1] for i in some])
            e = [gptq.output_error(ws, q, h) for q in (before, dequantized_rows(fmt, raw, t.shape, some))]
            done.append({"name": t.name, "type": t.type, "output_error_ratio": e[1] / e[0] if e[0] > 0 else 1.0})
    return done


def quantize_optimized(
    src: GGUFInfo | Path | str, qtype: QuantType | str, opts: OptimizeOptions, output: Path | str | None = None, force: bool = False
):
    """The stock `qtype` file (or the measured mix's) with every quantized weight's level re-chosen;
    its label is `<T>-opt` (`<T>-opt-mix`). A run killed outright resumes from its last finished
    layer (neoxq.core.resume); Ctrl-C, SIGTERM and errors leave nothing behind."""
    from neoxq.convert.imatrix import calibration_windows
    from neoxq.core.resume import ResumeState
    from neoxq.runtime.quantize import check_quantizable, default_output, summarize

    qtype = QuantType.parse(qtype) if isinstance(qtype, str) else qtype
    src = src if isinstance(src, GGUFInfo) else read_info(src)
    opts = opts.resolved()
    label = f"{qtype.value}-opt" + ("-mix" if opts.mix else "")
    check_quantizable(src, qtype, has_imatrix=opts.imatrix is not None)
    out = output_in(output, default_output(src, label))
    check_output(out, force, inputs=[src.path])
    ckpt = reference_checkpoint(src, opts.reference, opts.revision)
    windows = calibration_windows(ckpt, opts.calib, opts.ctx)
    plan = _preflight(ckpt, opts, len(windows))
    t0 = time.perf_counter()
    job = ResumeState(cache_root() / "optimize", _job_inputs(src, ckpt, qtype, opts))
    with atomic_output(out, force, inputs=[src.path]) as tmp:
        try:
            state = job.load()
            resumed = state["layers_done"] if state else None
            if state is None:
                state = _first_stage(src, ckpt, qtype, opts, label, job, plan.streamed)
            else:
                say(f"resuming --optimize from layer {state['layers_done']} (a killed run's work in {job.folder})")
            with _saved_fisher(job.folder, opts.qkv_fisher) as fisher:
                state["tensors"] += rewrite_sequential(
                    job.file,
                    read_info(job.folder / EQUALIZED_FILE) if opts.equalize else src,
                    ckpt,
                    windows,
                    opts,
                    state["layers_done"],
                    on_layer=lambda k: job.save({**state, "layers_done": k}),
                    output_fisher=fisher,
                )
            shutil.move(job.file, tmp)
        finally:
            job.clear()
    result = summarize(out, qtype, time.perf_counter() - t0)
    result.extra.update(
        {
            "label": label,
            "optimize": {
                "method": opts.method,
                "calibration_sha256": text_sha256(opts.calib),
                "calibration_tokens": windows.size,
                "tensors": state["tensors"],
                "resumed_from_layer": resumed,
                "first_pass": "streamed" if plan.streamed else "in memory",
                "memory_estimate_bytes": plan.peak,
            },
        }
    )
    if state.get("mix"):
        result.extra["mix"] = {**state["mix"], "size_bytes": result.size_bytes}
    return result


def _first_stage(src: GGUFInfo, ckpt, qtype: QuantType, opts: OptimizeOptions, label: str, job, streamed: bool) -> dict:
    """Steps 1–4: the fp32 pass (layer by layer when the model does not fit the memory budget), the
    equalised source, llama.cpp's file of it (stock or mix types) and the embedding's levels,
    written into the job's work folder; returns the state the sequential pass starts from."""
    from neoxq.convert.calibrate import ABSMAX, OUTPUT_FISHER
    from neoxq.convert.imatrix import second_moments
    from neoxq.runtime.quantize import quantize

    work = job.start()
    moments, counts, n_chunks = second_moments(ckpt, opts.calib, opts.ctx, include_output=True, fisher=True, streamed=streamed, bf16=opts.fisher_bf16)
    out_fisher, absmax = (_split(moments, suffix) for suffix in (OUTPUT_FISHER, ABSMAX))
    if opts.qkv_fisher:
        np.savez(job.folder / OUTPUT_FISHER_FILE, **out_fisher)
    eq_scales = {}
    if opts.equalize:
        src, eq_scales = equalized_source(src, absmax, job.folder / EQUALIZED_FILE)
    calib_sha = text_sha256(opts.calib)
    kv = {
        "neoxq.optimize.method": opts.method,
        **({"neoxq.optimize.equalize_alpha": f"{ALPHA:g}"} if opts.equalize else {}),
        "neoxq.optimize.calibration.sha256": calib_sha,
        "neoxq.optimize.calibration.tokens": str(n_chunks * opts.ctx),
        "neoxq.optimize.damp": f"{opts.damp:g}",
        "neoxq.optimize.act_order": str(opts.act_order).lower(),
        "neoxq.optimize.reference": ckpt.name,
        "neoxq.optimize.ctx": str(opts.ctx),
    }
    with tempfile.TemporaryDirectory(prefix="neoxq-opt-") as scratch:
        im = _importance(opts, (moments, counts, n_chunks), ckpt, eq_scales, Path(scratch), kv)
        plan = _mix_plan(src, qtype, opts, im, label, kv) if opts.mix else None
        written = quantize(
            src,
            qtype,
            output=work,
            imatrix=im,
            force=True,
            kv={**kv, **(plan.kv if plan else {})},
            label=label,
            tensor_types=plan.types if plan else None,
        )
        if plan:
            from neoxq.mix import check_written

            check_written(written, plan, work)
    fisher = {k: np.asarray(v) for k, v in moments.items() if k == EMBEDDING}
    state = {
        "layers_done": 0,
        "tensors": rewrite_levels(work, src, fisher, counts, opts.act_order, opts.damp, opts.dynamic_grids),
        "mix": plan.extra if plan else None,
    }
    job.save(state)
    return state


def _importance(opts: OptimizeOptions, calibration: tuple, ckpt, eq_scales: dict, scratch: Path, kv: dict):
    """The imatrix the stock file is quantized with: the calibration pass's (auto), the named file or
    none, its columns rescaled to the equalised inputs (mean square ÷ s²; a named file's name and
    sha256 are still what the file records, in `kv`)."""
    from neoxq.convert.imatrix import imatrix_from_moments
    from neoxq.core.imatrix_io import file_sha256, read_imatrix, write_imatrix

    im = opts.imatrix
    if im == "auto":
        moments, counts, n_chunks = calibration
        given = imatrix_from_moments(moments, counts, n_chunks, opts.ctx, f"calibration sha256:{text_sha256(opts.calib)[:16]}", ckpt.fingerprint())
    elif im is not None and eq_scales:
        given = read_imatrix(im)
        kv |= {"quantize.imatrix.file": Path(im).name, "neoxq.imatrix.sha256": file_sha256(Path(im))}
    else:
        return im
    for name, s in eq_scales.items():
        if name in given.sums:
            given.sums[name] = (given.sums[name] / s**2).astype(np.float32)
    return write_imatrix(scratch / "calibration.imatrix", given)


def _split(sums: dict, suffix: str) -> dict:
    """Take the entries named `<name><suffix>` out of the calibration sums, as {name: value}."""
    return {k.removesuffix(suffix): np.asarray(sums.pop(k)) for k in [k for k in sums if k.endswith(suffix)]}


def equalized_source(src: GGUFInfo, absmax: dict, dest: Path) -> tuple[GGUFInfo, dict[str, np.ndarray]]:
    """A copy of the F16 source at `dest` with every LayerNorm → matmul pair's channels equalised
    (neoxq.core.equalize: the norm's weight and bias divided by s, the matmul's input columns
    multiplied by s; the same model in exact arithmetic), streamed a row chunk at a time. Returns
    it and s per matmul."""
    import gguf

    from neoxq.convert.writer import encode
    from neoxq.core import gptq
    from neoxq.core.equalize import norm_pairs, scales

    size, free = src.path.stat().st_size, shutil.disk_usage(dest.parent).free
    if free < size:
        from neoxq.core.errors import OutputError

        raise OutputError(
            f"--optimize needs {size / 1e6:.0f} MB in {dest.parent} for its equalised copy of {src.path.name}, {free / 1e6:.0f} MB free;"
            " free space or point NEOXQ_CACHE at another disk"
        )
    shutil.copyfile(src.path, dest)
    done = {}
    n_layers = sum(1 for t in src.tensors if t.name.endswith(".attn_qkv.weight"))
    with open(dest, "r+b") as fh:

        def put(t: TensorInfo, row0: int, values: np.ndarray):
            data = encode(values, int(gguf.GGMLQuantizationType[t.type]))
            fh.seek(src.data_offset + t.offset + row0 * (t.n_bytes // t.shape[0] if len(t.shape) > 1 else 0))
            fh.write(np.ascontiguousarray(data).tobytes())

        names = {t.name for t in src.tensors}
        for pair in norm_pairs(n_layers):
            if pair.matmul not in names:  # a tied output matrix is the embedding, which is not a norm's reader
                continue
            w, t = source_weights(src, pair.matmul), src.tensor(pair.matmul)
            step = gptq.row_chunk(w.shape[1])
            colmax = np.zeros(w.shape[1], np.float32)
            for r0 in range(0, len(w), step):
                np.maximum(colmax, np.abs(w[r0 : r0 + step]).max(0), out=colmax)
            s = scales(absmax[pair.matmul], colmax)
            for r0 in range(0, len(w), step):
                put(t, r0, w[r0 : r0 + step] * s[None].astype(np.float32))
            for part in (".weight", ".bias"):
                tn = src.tensor(pair.norm + part)
                put(tn, 0, (read_weights(src, tn).reshape(-1) / s).astype(np.float32))
            done[pair.matmul] = s
    return read_info(dest), done


def _saved_fisher(folder: Path, wanted: bool):
    """The QKV output Fisher matrices the first stage saved, read one at a time when asked for
    (numpy's NpzFile, a context manager: 0.6 GB in all at 6.9B's shape, 19 MB a layer)."""
    import contextlib

    return np.load(folder / OUTPUT_FISHER_FILE, allow_pickle=False) if wanted else contextlib.nullcontext({})


def _job_inputs(src: GGUFInfo, ckpt, qtype: QuantType, opts: OptimizeOptions) -> dict:
    """Everything that decides the optimised file's bytes: what a resumed run must share."""
    from neoxq import __version__

    st = src.path.stat()
    im = opts.imatrix
    if im not in (None, "auto"):
        im = hashlib.sha256(Path(im).read_bytes()).hexdigest()
    return {
        "source": [str(src.path.resolve()), st.st_size, st.st_mtime_ns],
        "reference": ckpt.fingerprint(),
        "type": qtype.value,
        "calibration": text_sha256(opts.calib),
        "imatrix": im,
        "ctx": opts.ctx,
        "act_order": opts.act_order,
        "damp": opts.damp,
        "mix": opts.mix,
        "dynamic_grids": opts.dynamic_grids,
        "method": opts.method,  # names the equalisation and the QKV coupling
        "neoxq": __version__,
    }


def rewrite_sequential(
    path: Path,
    src: GGUFInfo,
    ckpt,
    windows: np.ndarray,
    opts: OptimizeOptions,
    start_layer: int = 0,
    on_layer=None,
    output_fisher: dict | None = None,
) -> list[dict]:
    """Every layer matmul and the output matrix of the file at `path`, rounded in order on the
    quantized model's own inputs against the fp32 outputs (neoxq.convert.calibrate), their F32 biases
    re-solved; levels and biases written in place. Layers below `start_layer` are taken as written
    (a resumed run). output_fisher: attention QKV matrices' output Fisher per head (their rows are
    rounded coupled, gptq.RowCoupling). One line per tensor rounded: the output error on the
    calibration tokens, against llama.cpp's levels (on ERROR_ROWS of its rows)."""
    from neoxq.convert.calibrate import sequential_calibration
    from neoxq.convert.neox import GPTNeoXArgs, interleave_qkv
    from neoxq.core import blocks, gptq

    args = GPTNeoXArgs.from_config(ckpt.config)
    head_rows = interleave_qkv(np.arange(3 * args.hidden_size), args).reshape(args.num_attention_heads, -1)  # GGUF rows of each head's q, k, v
    output_fisher = output_fisher or {}

    info = read_info(path)
    by_name = {t.name: t for t in info.tensors}
    done: list[dict] = []
    with open(path, "r+b") as fh:

        def read(t):
            fh.seek(info.data_offset + t.offset)
            return np.frombuffer(fh.read(t.n_bytes), np.uint8)

        def write(t, data: np.ndarray):
            fh.seek(info.data_offset + t.offset)
            fh.write(np.ascontiguousarray(data).tobytes())

        def current(name: str):
            """The tensor's values and its bias as the file holds them now."""
            t, tb = by_name[name], by_name.get(name.replace(".weight", ".bias"))
            return tensor_values(info, t, read(t)), (read(tb).view(np.float32).astype(np.float64) if tb is not None and tb.type == "F32" else None)

        def requantize(name: str, mom: gptq.Moments):
            t = by_name[name]
            if t.type not in blocks.FORMATS:  # a type neoxq does not encode: keep llama.cpp's, but feed it forward
                return current(name)
            fmt, bias = blocks.FORMATS[t.type], by_name.get(name.replace(".weight", ".bias"))
            raw = read(t).reshape(-1, fmt.size).copy()
            b = read(bias).view(np.float32).astype(np.float64) if bias is not None and bias.type == "F32" else None
            some = error_rows(t.shape[0])
            e_old = gptq.asymmetric_error(dequantized_rows(fmt, raw, t.shape, some), _at(b, some), mom.rows(some))
            factor = gptq.moments_factor(mom, opts.act_order, opts.damp, bias=b is not None)  # the target's and GPTQ's
            w_t, b_t = gptq.asymmetric_target(source_weights(src, name), b, mom, opts.damp, factor=factor)
            coupling = gptq.RowCoupling.of(output_fisher[name], head_rows, opts.damp) if name in output_fisher else None
            q = round_rows(fmt, raw, w_t, factor, coupling)
            del factor
            bq = None if b is None else gptq.corrected_bias(w_t, b_t, q, mom)
            write(t, raw)
            if bq is not None:
                write(bias, bq.astype(np.float32))
            e_new = gptq.asymmetric_error(q[some], _at(bq, some), mom.rows(some))
            done.append({"name": name, "type": t.type, "output_error_ratio": e_new / e_old if e_old > 0 else 1.0})
            return q, bq

        def finished(k: int):
            fh.flush()
            if on_layer:
                on_layer(k)

        inputs_q = current(EMBEDDING)[0][windows]  # the quantized model's inputs; the whole embedding is let go
        sequential_calibration(
            ckpt,
            windows,
            inputs_q,
            requantize,
            with_head="output.weight" in by_name,
            start_layer=start_layer,
            restore=current,
            on_layer=finished,
            norms=lambda name: current(name)[0],
            bf16=bool(opts.stream_bf16),
        )
    return done


def rounded_chunks(fmt, raw: np.ndarray, target, factor, importance: np.ndarray | None = None):
    """The one rounding loop: GPTQ levels for `target` ([rows, cols], an array or RowChunks) on the
    grids of `raw` (its blocks [n, size], rewritten in place), a row chunk at a time against one
    factor (gptq.compensation). With `importance`, llama.cpp's own importance-weighted search
    re-chooses each block column's grid as GPTQ reaches it. Yields, per chunk, (rows, the target's
    rows, the chunk's values now: float32 [rows, cols])."""
    from neoxq.core import blocks, gptq

    n, cols = target.shape
    step = gptq.row_chunk(cols)
    for r0 in range(0, n, step):
        rows = slice(r0, min(r0 + step, n))
        wr, chunk = target[rows], raw[_block_rows(rows, cols // fmt.block, n)]
        regrid = None if importance is None else _regridder(fmt, chunk, wr.shape, importance)
        a, m = (g.reshape(wr.shape) for g in blocks.grid(fmt, chunk))
        lv = gptq.gptq_levels(wr, None, a, m, fmt.lmin, fmt.lmax, regrid=regrid, group=fmt.block, factor=factor)
        chunk[:] = blocks.with_levels(fmt, chunk, lv.reshape(-1, fmt.block))
        if regrid is not None:  # the grids were re-chosen as the sweep went
            a, m = (g.reshape(wr.shape) for g in blocks.grid(fmt, chunk))
        yield rows, wr, blocks.level_values(a, m, lv)


def round_rows(fmt, raw: np.ndarray, target: np.ndarray, factor, coupling=None) -> np.ndarray:
    """rounded_chunks for a matrix held whole, or with its rows coupled (gptq.coupled_levels);
    returns its new values, float32."""
    from neoxq.core import blocks, gptq

    if coupling is not None:
        a, m = (g.reshape(target.shape) for g in blocks.grid(fmt, raw))
        lv = gptq.coupled_levels(target, a, m, fmt.lmin, fmt.lmax, factor, coupling)
        raw[:] = blocks.with_levels(fmt, raw, lv.reshape(-1, fmt.block))
        return blocks.level_values(a, m, lv)
    q = np.empty(target.shape, np.float32)
    for rows, _, values in rounded_chunks(fmt, raw, target, factor):
        q[rows] = values
    return q


def _preflight(ckpt, opts: OptimizeOptions, windows: int):
    """The memory plan (neoxq.preflight.optimize_plan) within --max-memory, else what is available:
    the first pass streams when the fp32 model does not fit; refused in one line when even that
    and the layer-by-layer pass do not."""
    from neoxq import preflight
    from neoxq.convert.neox import GPTNeoXArgs
    from neoxq.core.machine import available_memory

    budget = opts.max_memory if opts.max_memory is not None else available_memory()
    plan = preflight.optimize_plan(GPTNeoXArgs.from_config(ckpt.config), opts.ctx, windows, budget, opts.first_pass, bool(opts.fisher_bf16))
    preflight.check(
        f"--optimize on {ckpt.name} ({windows} calibration windows of {opts.ctx})",
        plan.peak,
        "pass a shorter --calib or a smaller --ctx, or a larger --max-memory",
        available=budget,
    )
    return plan


def _mix_plan(src: GGUFInfo, qtype: QuantType, opts: OptimizeOptions, imatrix, label: str, kv: dict[str, str]):
    """The measured mix's types for this file (its sensitivities measured with the same imatrix),
    chosen among the types neoxq re-rounds (measured on the 31M benchmark model at Q3_K_M: with
    llama.cpp's IQ4_XS embedding left as it was, opt-mix had 2.1× opt's KLD)."""
    from neoxq.core.blocks import FORMATS
    from neoxq.core.mix_plan import MixOptions
    from neoxq.mix import plan_mix

    return plan_mix(src, qtype, MixOptions(opts.calib, ctx=opts.ctx, types=("F16", *FORMATS), guard=False), imatrix, label, kv)
