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
3. llama.cpp's own quantizer writes the stock file of the type (or the --mix plan's types) with
   that imatrix (rescaled to the equalised inputs): its tensor types, block scales and mins (the
   grids) and metadata, plus neoxq's provenance keys.
4. The embedding's levels: GPTQ on llama.cpp's grids in the Fisher metric (neoxq.core.gptq).
5. Then layer by layer (neoxq.convert.calibrate), the fp32 model and the quantized one side by side:
   each matmul's levels are chosen by GPTQ to reproduce the fp32 layer's output from the inputs the
   already-quantized layers give (so each layer also cancels what rounding upstream did), with its
   bias solved in the same least squares; attention QKV's rows coupled per head through that
   head's output Fisher (gptq.RowCoupling); the output matrix last.
Levels go into llama.cpp's blocks in place (neoxq.core.blocks; the IQ types' grid rows and signs,
neoxq.core.iq_blocks, chosen jointly per group by neoxq.core.gptvq), biases and norms into their F32
tensors: same tensor types and sizes, same kernels; every llama.cpp reads and runs the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from neoxq import __version__, preflight
from neoxq.calibration import calibration_label, optimize_statistics, reference_checkpoint
from neoxq.convert.calibrate import native_bf16
from neoxq.convert.imatrix import calibration_windows, imatrix_from_stats
from neoxq.convert.neox import GPTNeoXArgs
from neoxq.core.atomic import atomic_output, check_output, output_in
from neoxq import accelerator
from neoxq.core import blocks, iq_blocks
from neoxq.core.cache import cache_root
from neoxq.core.calibration_stats import CalibrationStats
from neoxq.core.choices import AUTO
from neoxq.core.equalize import ALPHA
from neoxq.core.gguf_info import GGUFInfo, read_info
from neoxq.core.gptq import DAMP
from neoxq.core.heap import keep_temporaries_out_of_heaps
from neoxq.core.imatrix_io import file_sha256, read_imatrix, write_imatrix
from neoxq.core.machine import available_memory
from neoxq.core.mix_plan import MixOptions
from neoxq.core.progress import info as say
from neoxq.core.qtypes import QuantType
from neoxq.core.resume import ResumeState
from neoxq.core.textfile import text_sha256
from neoxq.equalized import equalized_source
from neoxq.mix import check_written, plan_mix
from neoxq.rewrite import put_back, rewrite_embedding, rewrite_sequential
from neoxq.runtime.quantize import check_quantizable, default_output, quantize, summarize

METHOD = "gptq-sequential-asymmetric-on-llama.cpp-grids"
QKV_METHOD = "+qkv-heads-in-output-fisher"  # METHOD's suffix when attention QKV rows are coupled (OptimizeOptions.qkv_fisher)
EQUALIZE_METHOD = "+norm-equalized"  # … when the norms' channels are equalised first (OptimizeOptions.equalize)
BF16_METHOD = "+fisher-bf16"  # … when the first pass's Fisher ran in bfloat16 (OptimizeOptions.fisher_bf16)
STREAM_BF16_METHOD = "+quantized-stream-bf16"  # … when the quantized model's layers ran in bfloat16 (OptimizeOptions.stream_bf16)
EQUALIZED_FILE = "equalized.gguf"  # in the job folder: the source with its norms' channels equalised
MIX_TYPES = ("F16", *blocks.FORMATS, *iq_blocks.FORMATS)  # what an opt-mix may choose: the types whose levels neoxq re-chooses
OUTPUT_FISHER_FILE = "output_fisher.npz"  # in the job folder: the sequential pass's QKV metrics, kept for a resumed run


@dataclass
class OptimizeOptions:
    calib: str  # calibration text (never scored)
    calib_source: str = "given"  # where the text came from (neoxq.calibration.CalibrationText.source)
    reference: str | None = None  # fp32 checkpoint (folder or hub id); None: the file's recorded source
    revision: str | None = None
    imatrix: str | None = AUTO  # auto: from the calibration pass; a file; None: no imatrix
    ctx: int = 512
    act_order: bool = True
    damp: float = DAMP
    mix: bool = False  # the tensor types of a --mix plan (neoxq.mix) instead of stock's: <T>-opt-mix
    target_bytes: int | None = None  # the mix's budget as a file size (None: the stock file's size)
    target_bpw: float | None = None  # … or in bits per weight
    # bytes --optimize may use; None: what is available. Above it, the first pass streams; a stated
    # budget also keeps freed temporaries out of the C heap (neoxq.core.heap)
    max_memory: int | None = None
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
    # Where the calibration passes and the rounding's dense algebra run (neoxq.accelerator):
    # auto, cpu, cuda or cuda:N.
    device: str = accelerator.AUTO

    @property
    def method(self) -> str:
        bf16 = (BF16_METHOD if self.fisher_bf16 else "") + (STREAM_BF16_METHOD if self.stream_bf16 else "")
        return METHOD + (EQUALIZE_METHOD if self.equalize else "") + (QKV_METHOD if self.qkv_fisher else "") + bf16

    def resolved(self) -> "OptimizeOptions":
        """These options with what `None` leaves to the machine decided (the job's inputs name it)."""
        unset = {k: native_bf16() for k in ("fisher_bf16", "stream_bf16") if getattr(self, k) is None}
        return dataclasses.replace(self, **unset, device=accelerator.resolve(self.device))


def quantize_optimized(
    src: GGUFInfo | Path | str, qtype: QuantType | str, opts: OptimizeOptions, output: Path | str | None = None, force: bool = False
):
    """The stock `qtype` file (or the --mix plan's) with every quantized weight's level re-chosen;
    its label is `<T>-opt` (`<T>-opt-mix`). A run killed outright resumes from its last finished
    layer (neoxq.core.resume); Ctrl-C, SIGTERM and errors leave nothing behind."""
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
    if opts.max_memory is not None:  # a stated budget is a bound the heap must not outgrow
        keep_temporaries_out_of_heaps()
    t0 = time.perf_counter()
    job = ResumeState(cache_root() / "optimize", _job_inputs(src, ckpt, qtype, opts))
    with atomic_output(out, force, inputs=[src.path]) as tmp:
        try:
            state, resumed = _run_job(job, src, ckpt, qtype, opts, label, windows, plan.streamed)
            shutil.move(job.file, tmp)
        finally:
            job.clear()
    result = summarize(out, qtype, time.perf_counter() - t0)
    result.extra["label"] = label
    result.extra["optimize"] = {
        "method": opts.method,
        "calibration_sha256": text_sha256(opts.calib),
        "calibration_source": opts.calib_source,
        "calibration_tokens": windows.size,
        "tensors": state["tensors"],
        "resumed_from_layer": resumed,
        "first_pass": "streamed" if plan.streamed else "in memory",
        "memory_estimate_bytes": plan.peak,
    }
    if state.get("mix"):
        result.extra["mix"] = {**state["mix"], "size_bytes": result.size_bytes}
    return result


def _run_job(job: ResumeState, src: GGUFInfo, ckpt, qtype: QuantType, opts: OptimizeOptions, label: str, windows, streamed: bool):
    """The job's work file, made or resumed and then finished layer by layer; returns its final
    state and the layer a killed run's work was resumed from (None for a fresh run)."""
    state = job.load()
    resumed = state["layers_done"] if state else None
    if state is None:
        state = _first_stage(src, ckpt, qtype, opts, label, job, streamed)
    else:
        say(f"resuming --optimize from layer {state['layers_done']} (a killed run's work in {job.folder})")
        put_back(job.file, job.originals.kept(), state["layers_done"])

    def finished(k: int) -> None:
        job.save({**state, "layers_done": k})
        job.originals.forget()

    with _saved_fisher(job.folder, opts.qkv_fisher) as fisher:
        done = rewrite_sequential(
            job.file,
            read_info(job.folder / EQUALIZED_FILE) if opts.equalize else src,
            ckpt,
            windows,
            opts,
            state["layers_done"],
            on_layer=finished,
            output_fisher=fisher,
            originals=job.originals,
        )
    state["tensors"] += [r.as_json() for r in done]
    return state, resumed


def _first_stage(src: GGUFInfo, ckpt, qtype: QuantType, opts: OptimizeOptions, label: str, job: ResumeState, streamed: bool) -> dict:
    """The fp32 pass (layer by layer when the model does not fit the memory budget), the equalised
    source, llama.cpp's file of it (stock or mix types) and the embedding's levels, written into
    the job's work folder; returns the state the sequential pass starts from."""
    work = job.start()
    stats = optimize_statistics(ckpt, opts.calib, opts.ctx, streamed, bool(opts.fisher_bf16), opts.device)
    if opts.qkv_fisher:
        np.savez(job.folder / OUTPUT_FISHER_FILE, **stats.head_fisher)
    eq_scales = {}
    if opts.equalize:
        src, eq_scales = equalized_source(src, stats.absmax, job.folder / EQUALIZED_FILE)
    kv = _provenance(opts, ckpt, stats)
    with tempfile.TemporaryDirectory(prefix="neoxq-opt-") as scratch:
        im = _importance(opts, stats, ckpt, eq_scales, Path(scratch), kv)
        plan = _mix_plan(src, qtype, opts, im, label, kv) if opts.mix else None
        types, plan_kv = (plan.types, plan.kv) if plan else (None, {})
        written = quantize(src, qtype, output=work, imatrix=im, force=True, kv={**kv, **plan_kv}, label=label, tensor_types=types)
        if plan:
            check_written(written, plan, work)
    state = {
        "layers_done": 0,
        "tensors": [r.as_json() for r in rewrite_embedding(work, src, stats.mean_embedding_fisher(), opts.act_order, opts.damp)],
        "mix": plan.extra if plan else None,
    }
    job.save(state)
    return state


def _provenance(opts: OptimizeOptions, ckpt, stats: CalibrationStats) -> dict[str, str]:
    """The `neoxq.optimize.*` keys the file records: how its levels were chosen."""
    return {
        "neoxq.optimize.method": opts.method,
        **({"neoxq.optimize.equalize_alpha": f"{ALPHA:g}"} if opts.equalize else {}),
        "neoxq.optimize.calibration.sha256": text_sha256(opts.calib),
        "neoxq.optimize.calibration.source": opts.calib_source,
        "neoxq.optimize.calibration.tokens": str(stats.windows * opts.ctx),
        "neoxq.optimize.damp": f"{opts.damp:g}",
        "neoxq.optimize.act_order": str(opts.act_order).lower(),
        "neoxq.optimize.reference": ckpt.name,
        "neoxq.optimize.ctx": str(opts.ctx),
        "neoxq.optimize.device": opts.device,
    }


def _importance(opts: OptimizeOptions, stats: CalibrationStats, ckpt, eq_scales: dict, scratch: Path, kv: dict):
    """The imatrix the stock file is quantized with: the calibration pass's (auto), the named file or
    none, its columns rescaled to the equalised inputs (mean square ÷ s²; a named file's name and
    sha256 are still what the file records, in `kv`)."""
    im = opts.imatrix
    if im == AUTO:
        given = imatrix_from_stats(stats, opts.ctx, calibration_label(opts.calib), ckpt.fingerprint())
    elif im is not None and eq_scales:
        given = read_imatrix(im)
        kv |= {"quantize.imatrix.file": Path(im).name, "neoxq.imatrix.sha256": file_sha256(Path(im))}
    else:
        return im
    for name, s in eq_scales.items():
        if name in given.sums:
            given.sums[name] = (given.sums[name] / s**2).astype(np.float32)
    return write_imatrix(scratch / "calibration.imatrix", given)


def _saved_fisher(folder: Path, wanted: bool):
    """The QKV output Fisher matrices the first stage saved, read one at a time when asked for
    (numpy's NpzFile, a context manager)."""
    return np.load(folder / OUTPUT_FISHER_FILE, allow_pickle=False) if wanted else contextlib.nullcontext({})


def _job_inputs(src: GGUFInfo, ckpt, qtype: QuantType, opts: OptimizeOptions) -> dict:
    """Everything that decides the optimised file's bytes: what a resumed run must share."""
    st = src.path.stat()
    im = opts.imatrix
    if im not in (None, AUTO):
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
        "target": [opts.target_bytes, opts.target_bpw],
        "method": opts.method,  # names the equalisation and the QKV coupling
        "device": opts.device,  # a GPU's levels are the CPU's to float rounding, not to the bit
        "neoxq": __version__,
    }


def _preflight(ckpt, opts: OptimizeOptions, windows: int):
    """The memory plan (neoxq.preflight.optimize_plan) within --max-memory, else what is available:
    the first pass streams when the fp32 model does not fit; refused in one line when even that
    and the layer-by-layer pass do not."""
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
    """The --mix plan's types for this file (its sensitivities probed with the same imatrix),
    chosen among the types neoxq re-rounds: a type left at llama.cpp's rounding would keep its
    error (docs/method.md, "Optimised mixes")."""
    mix = MixOptions(opts.calib, opts.target_bytes, opts.target_bpw, ctx=opts.ctx, types=MIX_TYPES, guard=False)
    return plan_mix(src, qtype, mix, imatrix, label, kv)
