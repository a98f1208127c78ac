"""Sequential calibration: the fp32 checkpoint and its quantized copy run side by side, layer by
layer, so that each matmul is rounded on the inputs the already-rounded layers before it produce,
against the fp32 model's output (neoxq.core.gptq: asymmetric target).

Layer-major, with transformers' own GPT-NeoX modules (as the streamed reference): all calibration
windows' hidden states of both models go through layer 1, then 2 …; each layer is read from the
checkpoint in fp32 and released, so the peak is one layer (twice) plus two hidden-state tensors.
In a layer, the matmuls reading the layer's input (attention QKV, MLP up) are rounded first, then
those reading their outputs (attention output, MLP down), on inputs the rounded first stage gives;
the output matrix last, on the final norm of the quantized stream. The rounding itself is a
callback (`requantize`), so this module knows nothing of files or block formats.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Callable

import numpy as np

from neoxq.core.calibration_stats import CalibrationStats
from neoxq.core.gptq import Moments
from neoxq.core.progress import Progress
from neoxq.core.sizes import HEAD_TOKENS, WINDOWS_PER_PASS, rows_per_chunk

from .neox import GPTNeoXArgs, deinterleave_qkv, gguf_name, interleave_qkv, tensor_name_map
from .reference import head_name, layer_inputs, load_final_norm, load_layer, neox_config

# A layer's matmuls in two stages: the first two read the layer's (normed) input, the second two
# read what the first produce; LAYER_MODULES is every one, in the layer's own order.
STAGES = (("attention.query_key_value", "mlp.dense_h_to_4h"), ("attention.dense", "mlp.dense_4h_to_h"))
LAYER_MODULES = tuple(m for pair in zip(*STAGES) for m in pair)
QKV = STAGES[0][0]
# The LayerNorm each first-stage matmul reads (GPT-NeoX's parallel residual: both read the layer's input)
FIRST_STAGE_NORMS = {QKV: "input_layernorm", STAGES[0][1]: "post_attention_layernorm"}

# The optimiser's passes use torch's fused attention, faster than eager attention; the scores differ
# from eager's by float rounding only. The reference and the imatrix keep eager attention.
ATTENTION = "sdpa"

NORMS = ("input_layernorm", "post_attention_layernorm")  # a layer's LayerNorms (GGUF: attn_norm, ffn_norm)

# requantize(gguf name, moments) → the rounded weight and its new bias (GGUF layout), for the layers after it
Requantize = Callable[[str, Moments], tuple[np.ndarray, np.ndarray | None]]


def sequential_calibration(
    ckpt,
    windows: np.ndarray,
    inputs_q: np.ndarray,
    requantize: Requantize,
    with_head: bool = True,
    start_layer: int = 0,
    restore: Callable | None = None,
    on_layer: Callable[[int], None] | None = None,
    norms: Callable[[str], np.ndarray] | None = None,
    bf16: bool = False,
    device: str = "cpu",
) -> None:
    """Round every layer matmul (and the output matrix) in order through `requantize`.
    windows: int [n, ctx] token ids; inputs_q: the quantized token embedding's rows for them
    [n, ctx, hidden] (the quantized model's input; the whole embedding is not needed).
    Resuming: layers below `start_layer` are not rounded again; restore(gguf name) gives their
    rounded weight and bias as written, and both models are run through them. on_layer(k) is called
    when layers 0 … k − 1 are done. norms(gguf name): the quantized model's LayerNorm weights and
    biases (the file's: --optimize's equalisation rescales them, neoxq.core.equalize); without it,
    the checkpoint's. bf16: the quantized model's layers run under autocast_bf16 (its matmuls in
    bfloat16, as llama.cpp's kernels round their activations too); the fp32 model, whose outputs are
    the target, never does, and every moment is summed in float32 products. device: the torch device
    both models, their hidden states and the moments' sums live on (neoxq.accelerator); the
    moments come back to the host."""
    import torch

    config, args = neox_config(ckpt, ATTENTION), GPTNeoXArgs.from_config(ckpt.config)
    names, gguf_names = set(ckpt.tensor_names()), tensor_name_map(args.num_hidden_layers)
    ids = np.asarray(windows)
    h_f = torch.from_numpy(np.ascontiguousarray(ckpt.read("gpt_neox.embed_in.weight")[ids], dtype=np.float32)).to(device)
    h_q = torch.from_numpy(np.ascontiguousarray(inputs_q, dtype=np.float32)).to(device)
    extra = layer_inputs(config, h_f[:1])
    per_layer = sum(len(s) for s in STAGES)
    steps = (args.num_hidden_layers - start_layer) * per_layer + int(with_head)
    with torch.no_grad(), Progress("rounding (sequential)", steps, "matmuls", cycle=per_layer) as bar:
        for i in range(args.num_hidden_layers):
            layer_f = load_layer(ckpt, config, i, names).to(device)
            layer_q = _quantized_copy(layer_f, i, gguf_names, norms, bf16)
            gname = {mod: gguf_name(f"gpt_neox.layers.{i}.{mod}.weight", gguf_names) for stage in STAGES for mod in stage}
            if i < start_layer:
                for mod, name in gname.items():
                    _assign(layer_q.get_submodule(mod), *restore(name), args, qkv=mod == QKV)
                h_f, h_q = _run(layer_f, h_f, extra), _run(layer_q, h_q, extra, bf16)
                continue
            if start_layer and i == start_layer:  # the layers replayed above are no steps of the bar
                bar.restart_clock()
            # one fp32 pass gives the layer's output and every matmul's fp32 output (its weights never
            # change); the fp32 layer and its input are then let go, before any rounding
            moms, h_f, later = _moments(layer_q, h_q, STAGES[0], extra, args, layer_f=layer_f, h_f=h_f, keep=STAGES[1], bf16=bf16)
            del layer_f
            _round_stages(layer_q, h_q, moms, later, extra, args, gname, requantize, bar, bf16)
            h_q = _run(layer_q, h_q, extra, bf16)
            del layer_q
            if on_layer:
                on_layer(i + 1)
        if with_head:
            requantize("output.weight", _head_moments(ckpt, config, head_name(names), h_f, h_q, norms))
            bar.update(1, note=head_name(names))


def _quantized_copy(layer_f, i: int, gguf_names, norms, bf16: bool = False):
    """The quantized model's copy of layer i, with the file's LayerNorms where `norms` gives them;
    bf16: its matmuls' weights held in bfloat16 (it runs only under autocast_bf16 then, and the
    rounded weights put into it are rounded to bfloat16 as autocast would at each call)."""
    layer_q = copy.deepcopy(layer_f)
    if norms is not None:
        for mod in NORMS:
            _set_norm(layer_q.get_submodule(mod), gguf_name(f"gpt_neox.layers.{i}.{mod}.weight", gguf_names), norms)
    if bf16:
        bf16_matmuls(layer_q)
    return layer_q


def _round_stages(layer_q, h_q, moms: dict, later: dict, extra, args, gname: dict, requantize: Requantize, bar, bf16: bool) -> None:
    """Round a layer's two stages of matmuls in order: the first on the first-stage moments, the
    second on inputs the rounded first stage gives, against the fp32 outputs kept in `later`
    (emptied once used). Each rounded matmul is put into `layer_q`."""
    for k, stage in enumerate(STAGES):
        if k:
            moms, _, _ = _moments(layer_q, h_q, stage, extra, args, given=later, bf16=bf16)
            later.clear()
        for mod in stage:
            q, bq = requantize(gname[mod], moms.pop(mod))
            _assign(layer_q.get_submodule(mod), q, bq, args, qkv=mod == QKV)
            bar.update(1, note=gname[mod])


def _set_norm(module, weight_name: str, norms) -> None:
    import torch

    for param, name in ((module.weight, weight_name), (module.bias, weight_name.replace(".weight", ".bias"))):
        param.copy_(torch.from_numpy(np.array(norms(name), dtype=np.float32).reshape(param.shape)))


def _head_moments(ckpt, config, head: str, h_f, h_q, norms=None) -> Moments:
    """The output matrix's moments: the fp32 logits against the quantized stream's final norm."""
    import torch

    norm = load_final_norm(ckpt, config).to(h_f.device)
    norm_q = copy.deepcopy(norm)
    if norms is not None:
        _set_norm(norm_q, "output_norm.weight", norms)
    w = np.array(ckpt.read(head), dtype=np.float32)
    x_f, x_q = h_f.reshape(-1, h_f.shape[-1]), h_q.reshape(-1, h_q.shape[-1])
    # through its inputs: x_f in y_f's place gives Σ x_f x_qᵀ and Σ x_f, grams Σ x_f x_fᵀ
    acc, grams, through = _Accumulator(), _Accumulator(), _through_inputs_cheaper(len(x_f), *w.shape)
    wt = torch.from_numpy(w).to(h_f.device)
    for a in range(0, len(x_f), HEAD_TOKENS):
        nf = norm(x_f[a : a + HEAD_TOKENS])
        acc.add(nf if through else torch.nn.functional.linear(nf, wt), norm_q(x_q[a : a + HEAD_TOKENS]))
        if through:
            grams.add_inputs(nf)
    return Moments.through(acc.moments(), grams.gram(), w) if through else acc.moments()


def _through_inputs_cheaper(tokens: int, out: int, inputs: int) -> bool:
    """Whether the output matrix's moments cost fewer products from its inputs' (Moments.through:
    about 2.1·in² a token for three Gram matrices, half-computed where symmetric, then 2·out·in²)
    than from its logits (2·out·in a token: the logits, then Σ y xᵀ). On the 410M shape's 4096
    calibration tokens that is about a quarter of the products."""
    return 2.1 * inputs * inputs * tokens + 2 * out * inputs * inputs < 2 * out * inputs * tokens


def _run(layer, h, extra, bf16: bool = False):
    with autocast_bf16(bf16, h.device.type):
        return _batched(lambda x: layer(x, **extra), h)


def _batched(fn, h):
    import torch

    return torch.cat([fn(h[a : a + WINDOWS_PER_PASS]) for a in range(0, len(h), WINDOWS_PER_PASS)])


def _moments(layer_q, h_q, stage, extra, args, layer_f=None, h_f=None, given=None, keep=(), bf16=False) -> tuple[dict, object, dict]:
    """Each stage matmul's Moments: its fp32 outputs against the quantized model's inputs (hooks;
    GGUF row order). The fp32 outputs come from running `layer_f` on `h_f` — which also returns
    the fp32 layer's output and keeps the fp32 outputs of the matmuls in `keep`, per window group,
    for a later stage — or from `given` (what an earlier call kept)."""
    import torch

    seen: dict[str, dict] = {mod: {} for mod in (*stage, *keep)}
    acc = {mod: _Accumulator() for mod in stage}
    kept: dict[str, list] = {mod: [] for mod in keep}
    handles = []
    for mod in seen:

        def keep_y(module, inputs, output, mod=mod):
            seen[mod]["y"] = output.detach()

        def keep_x(module, inputs, mod=mod):
            seen[mod]["x"] = inputs[0].detach()
            if all("x" in seen[m] for m in stage):
                raise _Enough  # the rest of the quantized layer's forward is not needed here

        if layer_f is not None:
            handles.append(layer_f.get_submodule(mod).register_forward_hook(keep_y))
        if mod in stage:
            handles.append(layer_q.get_submodule(mod).register_forward_pre_hook(keep_x))
    outs = []
    try:
        for g, a in enumerate(range(0, len(h_q), WINDOWS_PER_PASS)):
            if layer_f is not None:
                outs.append(layer_f(h_f[a : a + WINDOWS_PER_PASS], **extra))
                for mod in keep:
                    kept[mod].append(seen[mod].pop("y"))
            _quantized_inputs(layer_q, h_q[a : a + WINDOWS_PER_PASS], stage, extra, bf16, seen)
            for mod in stage:
                acc[mod].add(seen[mod].pop("y") if layer_f is not None else given[mod][g], seen[mod].pop("x"))
    finally:
        for h in handles:
            h.remove()

    def qkv(x):
        return deinterleave_qkv(x, args)

    moms = {mod: acc[mod].moments(rows=qkv if mod == STAGES[0][0] else None) for mod in stage}
    return moms, (torch.cat(outs) if outs else None), kept


def _quantized_inputs(layer_q, h, stage, extra, bf16: bool, seen: dict) -> None:
    """Each stage matmul's input in the quantized layer run on h, into seen[mod]["x"]: with the
    parallel residual the first stage reads LayerNorms of h alone, so their outputs are those
    inputs (the attention before the MLP is not run); otherwise the layer runs until every stage
    matmul's input hook has fired (_Enough)."""
    with autocast_bf16(bf16, h.device.type):
        if stage == STAGES[0] and layer_q.use_parallel_residual:
            for mod in stage:
                seen[mod]["x"] = layer_q.get_submodule(FIRST_STAGE_NORMS[mod])(h)
            return
        try:
            layer_q(h, **extra)
        except _Enough:
            pass


class _Enough(Exception):
    """Raised by _moments' input hook once every stage matmul's input is in hand: the rest of the
    layer's forward is not run (the stage-2 pass skips the MLP's down matrix; a first-stage pass
    without the parallel residual, the MLP)."""


HQ_BLOCKS = 8  # column blocks of Σ x xᵀ: 8 computes (1 + … + 8) / 64 = 56 % of the full product


class _Accumulator:
    """Moments summed in place, in float64 (no full-size temporary per batch: at a 6.9B model's MLP
    down, Σ x_q x_qᵀ alone is 2.1 GB). `add` sums outputs against inputs; `add_inputs` the inputs'
    own sums alone (the output matrix's route through its inputs needs only their Gram matrix)."""

    def __init__(self):
        self.t = {}
        self.n = 0
        self.step = 0

    def add(self, y, x) -> None:
        """Sum one window group's y [..., out] against x [..., in]."""
        import torch

        y = y.reshape(-1, y.shape[-1]).float()
        x = self.add_inputs(x, out=y.shape[1])
        t = self.t
        if "yx" not in t:
            t["yx"] = torch.zeros(y.shape[1], x.shape[1], dtype=torch.float64, device=y.device)
            t["sum_y"] = torch.zeros(y.shape[1], dtype=torch.float64, device=y.device)
            t["yy"] = torch.zeros(y.shape[1], dtype=torch.float64, device=y.device)
        for c0 in range(0, x.shape[1], self.step):  # float32 into float64, in place, as in add_inputs
            t["yx"][:, c0 : c0 + self.step].add_(y.T @ x[:, c0 : c0 + self.step])
        # the sums over one group in float32 too, as its products (float64 would add a conversion
        # and a square of every value)
        t["sum_y"] += y.sum(0)
        t["yy"] += torch.linalg.vecdot(y, y, dim=0)

    def add_inputs(self, x, out: int = 0):
        """Sum one window group's Σ x xᵀ and Σ x (x [..., in]); x's rows in float32 back. out: the
        width of the y it is summed against, which bounds the column blocks' temporaries too."""
        import torch

        x = x.reshape(-1, x.shape[-1]).float()
        cols = x.shape[1]
        if not self.t:
            self.t = {z: torch.zeros(shape, dtype=torch.float64, device=x.device) for z, shape in (("hq", (cols, cols)), ("sum_q", (cols,)))}
            self.step = min(rows_per_chunk(max(cols, out), 4), -(-cols // HQ_BLOCKS))
        # products of one window group in float32 (half float64's time), summed into float64, a
        # column block at a time (a float32 temporary of at most CHUNK_BYTES). Σ x xᵀ is symmetric:
        # only the blocks on and above the diagonal are computed (mirrored in gram()), with at
        # least HQ_BLOCKS blocks so that most of the saving is had
        for c0 in range(0, cols, self.step):
            c1 = min(c0 + self.step, cols)
            self.t["hq"][:c1, c0:c1].add_(x[:, :c1].T @ x[:, c0:c1])  # no float64 temporary
        self.t["sum_q"] += x.sum(0)
        self.n += len(x)
        return x

    def gram(self) -> np.ndarray:
        """Σ x xᵀ as numpy (shared memory on the CPU, a host copy from a device), its lower blocks
        mirrored from the upper ones."""
        hq = self.t["hq"].cpu().numpy()
        n = len(hq)
        for c0 in range(0, n, self.step):  # a block at a time: no full-size temporary
            c1 = min(c0 + self.step, n)
            hq[c1:, c0:c1] = hq[c0:c1, c1:].T
        return hq

    def moments(self, rows=None) -> Moments:
        """As numpy (shared memory); rows(x) reorders the output rows (attention QKV: HF's per-head
        order to the GGUF's)."""
        t = {k: v.cpu().numpy() for k, v in self.t.items() if k != "hq"}
        t["hq"] = self.gram()
        if rows is not None:
            t.update({k: rows(t[k]) for k in ("yx", "sum_y", "yy")})
        self.t = {}
        return Moments(n=self.n, **t)


def _assign(module, q: np.ndarray, bias: np.ndarray | None, args, qkv: bool) -> None:
    """Put a rounded weight (GGUF layout) and its bias into the quantized model's module."""
    import torch

    def hf(x):
        return torch.from_numpy(np.ascontiguousarray(interleave_qkv(x, args) if qkv else x, dtype=np.float32))

    module.weight.copy_(hf(q))
    if bias is not None:
        module.bias.copy_(hf(bias))


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX tiles), several times float32's
    rate. Without them torch's bfloat16 matmuls are emulated, not faster, so the passes stay float32
    there."""
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, so looked up with care
    return any(bool(getattr(torch.cpu, p, lambda: False)()) for p in probes)


def autocast_bf16(on: bool, device_type: str = "cpu"):
    """torch's autocast to bfloat16 on a device type (matmuls in bfloat16, reductions and norms in
    float32), or nothing. Without autocast's cache of the weights' bfloat16 copies: it would hold half
    a layer more through each pass (400 MB at 6.9B's shape) for casts that cost little next to the
    products."""
    import torch

    return torch.autocast(device_type, dtype=torch.bfloat16, cache_enabled=False) if on else contextlib.nullcontext()


def bf16_matmuls(model) -> None:
    """Every Linear's weight and bias cast to bfloat16 once, in place: the values autocast_bf16
    casts them to at each call (so the same results), without those copies, on a model or layer
    that runs only under it (the first pass's model, each window of which would otherwise cast all
    of it; the quantized stream's layers)."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.to(torch.bfloat16)


def streamed_moments(
    ckpt, windows: np.ndarray, include_output: bool, full: bool, fisher: bool, gen, bf16: bool = False, device: str = "cpu"
) -> CalibrationStats:
    """second_moments' statistics with one fp32 layer in memory at a time (a model larger than
    the memory budget): each window goes forward layer by layer (the matmuls' inputs summed by hooks,
    every layer's input kept), through the head to the sampled labels' log-likelihood, and back
    layer by layer — each layer read again and its forward recomputed under autograd — to the
    gradient at the embedding. The same sums as the in-memory pass (tests: to float rounding);
    bf16: both passes under autocast_bf16, as the in-memory pass; device: where the layers and the
    sums live."""
    import torch

    config, args = neox_config(ckpt, ATTENTION if fisher else "eager"), GPTNeoXArgs.from_config(ckpt.config)
    names, gguf_names = set(ckpt.tensor_names()), tensor_name_map(args.num_hidden_layers)
    acc = CalibrationSums(full, fisher)
    add = acc.add_input
    head = torch.from_numpy(np.array(ckpt.read(head_name(names)), dtype=np.float32)).to(device) if fisher else None
    with Progress("calibration (streamed)", len(windows), "windows") as bar:
        for ids in np.asarray(windows):
            with autocast_bf16(bf16, torch.device(device).type):
                h = torch.from_numpy(np.ascontiguousarray(ckpt.read("gpt_neox.embed_in.weight")[ids[None]], dtype=np.float32)).to(device)
                extra, kept = layer_inputs(config, h), []
                with torch.no_grad():
                    for i in range(args.num_hidden_layers):
                        layer = load_layer(ckpt, config, i, names).to(device)
                        handles = [
                            layer.get_submodule(m).register_forward_pre_hook(
                                lambda mod, inp, n=gguf_name(f"gpt_neox.layers.{i}.{m}.weight", gguf_names): add(n, inp[0])
                            )
                            for m in LAYER_MODULES
                        ]
                        kept.append(h)
                        h = layer(h, **extra)
                        for hd in handles:
                            hd.remove()
                        del layer  # before the next one is read: one fp32 layer at a time
                norm = load_final_norm(ckpt, config).to(device)
                if include_output:
                    with torch.no_grad():
                        add("output.weight", norm(h))
                if fisher:
                    g = _head_gradient(norm, head, h, gen)
                    for i in reversed(range(args.num_hidden_layers)):
                        g, g_qkv = _layer_gradients(load_layer(ckpt, config, i, names).to(device), kept[i], extra, g)
                        acc.add_head_gradient(gguf_name(f"gpt_neox.layers.{i}.{QKV}.weight", gguf_names), g_qkv[0], args.num_attention_heads)
                    acc.add_embedding_gradient(g[0])
            bar.update(1)
    return acc.stats(len(windows))


def _layer_gradients(layer, x, extra, g):
    """The gradient g at a layer's output taken back to its input and to its attention QKV output."""
    import torch

    held = {}
    handle = layer.get_submodule(QKV).register_forward_hook(lambda m, i, o: held.update(qkv=o))
    try:
        x = x.requires_grad_(True)
        return torch.autograd.grad(layer(x, **extra), [x, held["qkv"]], grad_outputs=g)
    finally:
        handle.remove()


def _head_gradient(norm, head, h, gen):
    """d log p(next tokens sampled from the model) / d (last layer's output), as in-memory."""
    import torch

    h = h.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(sampled_log_likelihood(torch.nn.functional.linear(norm(h), head)[0], gen), h)
    return g


def sampled_log_likelihood(logits, gen):
    """Σ log p of next tokens sampled from the model's own distribution (logits [ctx, vocab]): its
    gradients' outer products estimate the Fisher information (cross-position terms vanish)."""
    import torch

    logits = logits.float()
    # The inverse CDF in float32, the fastest of the samplers tried (docs/benchmarks.md). float32's
    # running sum moves a token's bounds by ~√vocab · 6e-8 of probability; the uniform draws stay
    # float64, so the tokens drawn are float64's but within that of a bound. The draw is seeded: it
    # is the largest source of run-to-run difference in --optimize's result.
    with torch.no_grad():
        c = torch.cumsum(torch.softmax(logits, -1), -1)
        u = (torch.rand(len(c), 1, generator=gen, dtype=torch.float64).to(c.device) * c[:, -1:]).float()
        sampled = torch.searchsorted(c, u)[:, 0].clamp_(max=c.shape[1] - 1)
    return torch.log_softmax(logits, -1).gather(1, sampled[:, None]).sum()


class CalibrationSums:
    """The first pass's running sums, in torch (float64, the head Fisher float32), each kind apart;
    `stats()` hands them over as numpy CalibrationStats."""

    def __init__(self, full: bool, fisher: bool):
        self.full, self.fisher = full, fisher
        self.sums: dict = {}
        self.counts: dict[str, int] = {}
        self.head: dict = {}
        self.absmax: dict = {}
        self.embedding = None
        self.embedding_tokens = 0

    def add_input(self, name: str, x) -> None:
        """A matmul's input rows x: Σ x xᵀ (full) or Σ x² per column, their number, and in a Fisher
        pass each channel's largest magnitude."""
        x = x.detach().reshape(-1, x.shape[-1])
        xd = x.double()
        _add(self.sums, name, xd.T @ xd if self.full else (xd**2).sum(0))
        self.counts[name] = self.counts.get(name, 0) + x.shape[0]
        if self.fisher:
            m = x.abs().amax(0).double()
            self.absmax[name] = m.maximum(self.absmax[name]) if name in self.absmax else m

    def add_embedding_gradient(self, g) -> None:
        """Gradients g at the embedding's output [tokens, hidden]: Σ g gᵀ."""
        g = g.detach().reshape(-1, g.shape[-1]).double()
        self.embedding = g.T @ g if self.embedding is None else self.embedding + g.T @ g
        self.embedding_tokens += g.shape[0]

    def add_head_gradient(self, name: str, g, heads: int) -> None:
        """Σ g gᵀ per attention head of QKV output gradients g [tokens, 3·hidden] (HF's layout: per
        head its q, k, v): [heads, 3·head_dim, 3·head_dim], float32 (a metric, not a value). Heads
        only: the cross-head blocks would be a [3·hidden]² matrix per layer for coupling the
        rounding does not use."""
        import torch

        g = g.detach().reshape(-1, heads, g.shape[-1] // heads).float()
        with torch.autocast(g.device.type, enabled=False):  # a sum, float32 even inside a bfloat16 pass
            _add(self.head, name, torch.einsum("thi,thj->hij", g, g))

    def stats(self, windows: int) -> CalibrationStats:
        def np_(d):
            return {k: v.cpu().numpy() for k, v in d.items()}

        emb = None if self.embedding is None else self.embedding.cpu().numpy()
        return CalibrationStats(np_(self.sums), dict(self.counts), windows, emb, self.embedding_tokens, np_(self.head), np_(self.absmax))


def _add(sums: dict, name: str, value) -> None:
    sums[name] = sums[name] + value if name in sums else value
