"""Layer-by-layer calibration (neoxq.convert.calibrate) against the in-memory fp32 model: the
streamed first pass gives the same input moments and embedding Fisher sums; the sequential pass
visits every matmul in order and feeds each one the rounded layers' outputs."""

from __future__ import annotations

import numpy as np


def _half_matmuls(model) -> None:
    """The negative control of the bfloat16 casts: every Linear held in float16 instead."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.to(torch.float16)


def _fields(stats) -> dict:
    """Every array a calibration pass collected, by kind and tensor name."""
    out = {f"sums:{k}": v for k, v in stats.sums.items()}
    out |= {f"head:{k}": v for k, v in stats.head_fisher.items()} | {f"absmax:{k}": v for k, v in stats.absmax.items()}
    return out | {"embedding": stats.embedding_fisher}


def test_streamed_moments_equal_the_in_memory_pass(trained, texts):
    from neoxq.convert.imatrix import second_moments

    text = texts["calib"][:3000]
    mem = second_moments(str(trained), text, 64, include_output=True, fisher=True)
    st = second_moments(str(trained), text, 64, include_output=True, fisher=True, streamed=True)
    assert mem.counts == st.counts and mem.windows == st.windows and mem.embedding_tokens == st.embedding_tokens
    a_all, b_all = _fields(mem), _fields(st)
    assert set(a_all) == set(b_all) and any(k.startswith("head:") for k in a_all) and any(k.startswith("absmax:") for k in a_all)
    for k, v in a_all.items():
        a, b = np.asarray(v), np.asarray(b_all[k])
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(a), k
    # negative control: another window length gives other sums, so the check can fail
    other = second_moments(str(trained), text, 32, include_output=True, fisher=True, streamed=True)
    f_mem = mem.mean_embedding_fisher()
    assert np.linalg.norm(other.mean_embedding_fisher() - f_mem) > 1e-3 * np.linalg.norm(f_mem)


def test_streamed_pass_holds_one_fp32_layer_at_a_time(trained, texts, monkeypatch):
    """When the streamed first pass reads a layer, no layer read before is still alive (its plan,
    neoxq.preflight, counts one). Negative control: a layer kept alive is counted."""
    import weakref

    import neoxq.convert.calibrate as calibrate
    from neoxq.convert.imatrix import second_moments

    live, alive_at_read, keep = weakref.WeakSet(), [], []
    read = calibrate.load_layer

    def counted(*args):
        alive_at_read.append(len(live))
        layer = read(*args)
        live.add(layer)
        keep.extend([layer] if keeping else [])
        return layer

    monkeypatch.setattr(calibrate, "load_layer", counted)
    for keeping in (False, True):
        alive_at_read.clear()
        second_moments(str(trained), texts["calib"][:600], 64, include_output=True, fisher=True, streamed=True)
        assert len(alive_at_read) >= 4 and (max(alive_at_read) > 0) == keeping, alive_at_read


def test_sequential_pass_rounds_every_matmul_in_order_on_the_rounded_inputs(trained, texts):
    """With an identity `requantize`, the quantized stream is the fp32 one: every matmul's
    Σ y_f x_qᵀ equals W Σ x_q x_qᵀ + b Σ x_qᵀ, rows in the GGUF's order (negative control: a perturbed first layer makes the later
    layers' inputs differ)."""
    from neoxq.convert.calibrate import sequential_calibration
    from neoxq.convert.checkpoint import open_checkpoint
    from neoxq.convert.imatrix import calibration_windows
    from neoxq.convert.neox import GPTNeoXArgs, deinterleave_qkv
    from neoxq.convert.reference import head_name

    ckpt = open_checkpoint(str(trained))
    args = GPTNeoXArgs.from_config(ckpt.config)
    windows = calibration_windows(ckpt, texts["calib"][:3000], 64)
    emb = np.array(ckpt.read("gpt_neox.embed_in.weight"), dtype=np.float32)

    def run(scale_first: float, bf16: bool = False):
        seen = []

        def requantize(name, mom):
            hf = name.replace("blk.", "gpt_neox.layers.").replace(".attn_qkv.", ".attention.query_key_value.")
            hf = (
                hf.replace(".attn_output.", ".attention.dense.")
                .replace(".ffn_up.", ".mlp.dense_h_to_4h.")
                .replace(".ffn_down.", ".mlp.dense_4h_to_h.")
            )
            w = np.array(ckpt.read(head_name(set(ckpt.tensor_names())) if name == "output.weight" else hf), dtype=np.float64)
            b = None if name == "output.weight" else np.array(ckpt.read(hf.replace(".weight", ".bias")), dtype=np.float64)
            if "attn_qkv" in name:
                w, b = deinterleave_qkv(w, args), deinterleave_qkv(b, args)
            predicted = w @ mom.hq + (0 if b is None else np.outer(b, mom.sum_q))  # y = W x + b when x_q = x_f
            seen.append((name, np.abs(mom.yx - predicted).max() / np.abs(mom.yx).max()))
            return (w * scale_first if name == "blk.0.attn_qkv.weight" else w), b

        sequential_calibration(ckpt, windows, emb[windows], requantize, bf16=bf16)
        return seen

    seen = run(1.0)
    order = [n for n, _ in seen]
    assert order[:4] == ["blk.0.attn_qkv.weight", "blk.0.ffn_up.weight", "blk.0.attn_output.weight", "blk.0.ffn_down.weight"]
    assert len(order) == 4 * args.num_hidden_layers + 1 and order[-1] == "output.weight"
    assert max(d for _, d in seen) < 1e-5
    perturbed = dict(run(1.05))
    assert perturbed["blk.0.attn_qkv.weight"] < 1e-5 and perturbed["blk.0.attn_output.weight"] > 1e-3
    # the quantized stream in bfloat16: its inputs differ from the fp32 model's by bfloat16's
    # rounding only (the first matmul reads the embedding and the norm, which autocast keeps float32)
    rounded = dict(run(1.0, bf16=True))
    assert rounded["blk.0.attn_qkv.weight"] < 1e-5 and 1e-4 < max(rounded.values()) < 3e-2, rounded


def test_bf16_first_pass_keeps_the_input_sums_and_streams_alike(trained, texts):
    """The first pass under bfloat16 autocast: the imatrix's input sums and the channel maxima
    within bfloat16's rounding of float32's, yet not equal to them (autocast took effect); the
    streamed pass gives the in-memory pass's sums."""
    from neoxq.convert.imatrix import second_moments

    text = texts["calib"][:3000]
    fp32 = _fields(second_moments(str(trained), text, 64, include_output=True, fisher=True))
    mem = _fields(second_moments(str(trained), text, 64, include_output=True, fisher=True, bf16=True))
    st = _fields(second_moments(str(trained), text, 64, include_output=True, fisher=True, bf16=True, streamed=True))
    inputs = [k for k in fp32 if k.endswith(("ffn_down.weight", "attn_output.weight")) or k.startswith("absmax:")]
    rel = {k: np.linalg.norm(np.asarray(mem[k]) - np.asarray(fp32[k])) / np.linalg.norm(np.asarray(fp32[k])) for k in inputs}
    assert 1e-5 < max(rel.values()) < 3e-2, rel
    for k, v in mem.items():
        a, b = np.asarray(v), np.asarray(st[k])
        assert np.linalg.norm(a - b) <= 1e-3 * np.linalg.norm(a), k


def test_matmuls_cast_once_give_autocasts_results(trained, texts, monkeypatch):
    """The in-memory bfloat16 pass casts its Linear weights once (calibrate.bf16_matmuls): every
    sum equals the pass that leaves the casts to autocast at each call, bit for bit. Negative
    control: weights cast to float16 instead give other sums."""

    import neoxq.convert.imatrix as imatrix

    text = texts["calib"][:3000]

    def run(cast):
        monkeypatch.setattr(imatrix, "bf16_matmuls", cast)
        return _fields(imatrix.second_moments(str(trained), text, 64, include_output=True, fisher=True, bf16=True))

    from neoxq.convert.calibrate import bf16_matmuls

    once, per_call = run(bf16_matmuls), run(lambda model: None)
    assert set(once) == set(per_call) and all(np.array_equal(once[k], per_call[k]) for k in once)
    other = run(_half_matmuls)
    assert any(not np.array_equal(other[k], per_call[k]) for k in per_call)


def test_quantized_stream_cast_once_gives_autocasts_moments(trained, texts, monkeypatch):
    """The sequential pass's quantized layers hold their matmuls' weights in bfloat16 (cast once,
    and the rounded weights put into them rounded likewise): every matmul's moments equal those of
    layers that leave the casts to autocast at each call, bit for bit. Negative control: weights
    held in float16 give other moments."""

    import neoxq.convert.calibrate as calibrate
    from neoxq.convert.checkpoint import open_checkpoint
    from neoxq.convert.imatrix import calibration_windows

    ckpt = open_checkpoint(str(trained))
    windows = calibration_windows(ckpt, texts["calib"][:3000], 64)
    emb = np.array(ckpt.read("gpt_neox.embed_in.weight"), dtype=np.float32)
    real = calibrate.bf16_matmuls

    def run(cast):
        monkeypatch.setattr(calibrate, "bf16_matmuls", cast)
        seen = {}

        def requantize(name, mom):  # the moments kept; the weights put back 1 % smaller, as a rounding would change them
            seen[name] = (mom.hq.copy(), mom.yx.copy())
            return mom.yx @ np.linalg.pinv(mom.hq) * 0.99, None

        calibrate.sequential_calibration(ckpt, windows, emb[windows], requantize, with_head=False, bf16=True)
        return seen

    once, per_call = run(real), run(lambda module: None)
    assert once.keys() == per_call.keys() and len(once) > 4
    assert all(np.array_equal(a, b) for k in once for a, b in zip(once[k], per_call[k]))
    other = run(_half_matmuls)
    assert any(not np.array_equal(other[k][1], per_call[k][1]) for k in per_call)


def test_first_stage_inputs_from_the_norms_equal_the_layers_own(trained):
    """With the parallel residual the first-stage matmuls' inputs are taken from the LayerNorms
    alone (the attention before the MLP is not run): bit for bit the inputs the whole layer's
    forward hands them, in float32 and under bfloat16 autocast. Negative control: the norms
    swapped give other inputs."""
    import torch

    import neoxq.convert.calibrate as calibrate
    from neoxq.convert.checkpoint import open_checkpoint
    from neoxq.convert.reference import layer_inputs, load_layer, neox_config

    ckpt = open_checkpoint(str(trained))
    config = neox_config(ckpt, calibrate.ATTENTION)
    layer = load_layer(ckpt, config, 0, set(ckpt.tensor_names()))
    assert layer.use_parallel_residual
    h = torch.randn(2, 64, config.hidden_size, generator=torch.Generator().manual_seed(0))
    extra = layer_inputs(config, h[:1])
    stage = calibrate.STAGES[0]
    for bf16 in (False, True):
        hooked: dict = {}
        handles = [layer.get_submodule(m).register_forward_pre_hook(lambda mod, i, m=m: hooked.__setitem__(m, i[0])) for m in stage]
        with torch.no_grad(), calibrate.autocast_bf16(bf16):
            layer(h, **extra)
        for handle in handles:
            handle.remove()
        seen: dict = {m: {} for m in stage}
        with torch.no_grad():
            calibrate._quantized_inputs(layer, h, stage, extra, bf16, seen)
        assert all(torch.equal(seen[m]["x"], hooked[m]) for m in stage)
        swapped = dict(zip(stage, reversed([calibrate.FIRST_STAGE_NORMS[m] for m in stage])))
        with torch.no_grad():
            assert not any(torch.equal(layer.get_submodule(swapped[m])(h), hooked[m]) for m in stage)
