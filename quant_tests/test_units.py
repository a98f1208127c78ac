"""Fast unit tests: no trained model, no llama.cpp model load unless stated (the fast tier)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from neoxq.convert.neox import GPTNeoXArgs, deinterleave_qkv

from neoxq.core.errors import CorruptFileError, UnsupportedModelError, UsageError
from neoxq.core.naming import gguf_name
from neoxq.core.qtypes import QUANTIZED, QuantType

HF4 = {
    "architectures": ["GPTNeoXForCausalLM"],
    "model_type": "gpt_neox",
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "intermediate_size": 256,
    "vocab_size": 512,
    "rotary_pct": 0.25,
    "rotary_emb_base": 10000,
    "torch_dtype": "float16",
}
HF5 = {k: v for k, v in HF4.items() if k not in ("rotary_pct", "rotary_emb_base", "torch_dtype")} | {
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    "dtype": "float16",
}


def test_config_styles_agree():
    a, b = GPTNeoXArgs.from_config(HF4), GPTNeoXArgs.from_config(HF5)
    for f in ("rotary_fraction", "rope_base", "head_dim", "n_rot", "weights_dtype"):
        assert getattr(a, f) == getattr(b, f), f
    assert (a.n_rot, a.head_dim, a.rope_base) == (4, 16, 10000.0)


@pytest.mark.parametrize(
    "change,field",
    [
        ({"num_hidden_layers": -2}, "num_hidden_layers"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"vocab_size": "512"}, "vocab_size"),
        ({"intermediate_size": 2.5}, "intermediate_size"),
        ({"num_attention_heads": 5}, "num_attention_heads"),
        ({"rotary_pct": 0}, "rotary"),
        ({"rotary_pct": 1.5}, "rotary"),
        ({"layer_norm_eps": -1}, "layer_norm_eps"),
        ({"rotary_emb_base": "big"}, "rotary_emb_base"),
        ({"num_hidden_layers": True}, "num_hidden_layers"),
    ],
)
def test_config_field_validation_names_the_field(change, field):
    with pytest.raises(CorruptFileError, match=field):
        GPTNeoXArgs.from_config(HF4 | change)


def test_config_not_neox_or_incomplete():
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM"):
        GPTNeoXArgs.from_config(HF4 | {"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    with pytest.raises(CorruptFileError, match="vocab_size"):
        GPTNeoXArgs.from_config({k: v for k, v in HF4.items() if k != "vocab_size"})
    with pytest.raises(CorruptFileError, match="JSON object"):
        GPTNeoXArgs.from_config([1, 2])


def test_qkv_deinterleave_on_known_arrays():
    """HF: per head [q(hd), k(hd), v(hd)]; llama.cpp: all q heads, then all k, then all v."""
    args = GPTNeoXArgs.from_config(HF4 | {"hidden_size": 8, "num_attention_heads": 2, "intermediate_size": 16})
    nh, hd, h = 2, 4, 8
    rows = np.arange(3 * h)  # row r of HF's layout is head r // (3hd), part (r // hd) % 3
    out = deinterleave_qkv(np.repeat(rows[:, None], h, 1).astype(np.float32), args)[:, 0].astype(int)
    expect = [head * 3 * hd + part * hd + j for part in range(3) for head in range(nh) for j in range(hd)]
    assert out.tolist() == expect
    assert deinterleave_qkv(rows.astype(np.float32), args).astype(int).tolist() == expect


def test_naming_rule():
    assert gguf_name("pythia-160m", None, "F16") == "pythia-160m-F16.gguf"
    assert gguf_name("pythia-160m", "main", "Q4_K_M") == "pythia-160m-Q4_K_M.gguf"
    assert gguf_name("pythia-410m-deduped", "step3000", "Q8_0") == "pythia-410m-deduped-step3000-Q8_0.gguf"


def test_quant_type_parsing():
    assert QuantType.parse(" q4_k_m ") == QuantType.Q4_K_M
    assert QuantType.parse_list("Q8_0,q8_0,,Q2_K") == [QuantType.Q8_0, QuantType.Q2_K]
    with pytest.raises(UsageError, match="Q4_K_M"):
        QuantType.parse("Q7_X")
    with pytest.raises(UsageError, match="no quant type"):
        QuantType.parse_list(" , ")
    assert QuantType.from_ftype(15) == QuantType.Q4_K_M and QuantType.from_ftype(999) is None
    assert all(1.5 <= t.nominal_bpw <= 8.5 for t in QUANTIZED)


def test_windows():
    from neoxq.runtime.score import Windows

    w = Windows(list(range(1000)), 128)
    assert (w.n_chunks, w.first, w.per_window, w.tokens_scored) == (7, 64, 63, 441)
    assert w.targets(1).tolist() == list(range(128 + 65, 256))
    with pytest.raises(UsageError, match="two windows"):
        Windows(list(range(200)), 128)
    with pytest.raises(UsageError, match="too small"):
        Windows(list(range(200)), 2)


def test_logsumexp_float32_matches_float64():
    from neoxq.runtime.score import log_softmax, logsumexp

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((16, 5000)) * 8).astype(np.float32)
    ref = np.log(np.exp(x.astype(np.float64) - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    assert np.abs(logsumexp(x) - ref).max() < 1e-4
    from neoxq.runtime.score import RowReducer

    r = RowReducer(5000, threads=3)
    lse, gathered, arg = r(x, argmax=True)
    assert np.abs(lse - ref).max() < 1e-4 and gathered is None and np.array_equal(arg, x.argmax(-1))
    tied = x.copy()
    tied[5, 7] = tied[5, 9] = tied[5].max() + 1  # a tie: the lower id, as numpy's argmax
    assert r(tied, argmax=True)[2][5] == 7
    assert np.allclose(np.exp(log_softmax(x)).sum(-1), 1.0)
    # shifted by a target's logit: the same numbers; a target ~200 below the max overflows exp
    # (float32 exp ends at 88), and that row is redone with its max instead of returning inf
    t = rng.integers(0, 5000, 16)
    x[3, t[3]] = x[3].max() - 200.0
    ref[3] = np.log(np.exp(x[3].astype(np.float64) - x[3].max()).sum()) + x[3].max()
    got = r(x, shift_at=t)[0]
    r.close()
    assert np.isfinite(got).all() and np.abs(got - ref).max() < 1e-4


def test_row_reducer_numpy_path_matches_ggml(monkeypatch):
    """Where libggml-cpu does not export its fused exp-and-sum, numpy computes the same sums."""
    from neoxq.runtime import capi
    from neoxq.runtime.score import RowReducer

    rng = np.random.default_rng(1)
    x = (rng.standard_normal((40, 3000)) * 6).astype(np.float32)
    t = rng.integers(0, 3000, 40)
    fast = RowReducer(3000, threads=2)(x, shift_at=t)[0]
    assert capi._exp_sum_fn(), "this llama-cpp-python build should export ggml_vec_soft_max_f32"
    monkeypatch.setattr(capi, "_softmax_f32", False)
    slow = RowReducer(3000, threads=2)(x, shift_at=t)[0]
    ref = np.log(np.exp(x.astype(np.float64)).sum(-1))
    assert np.abs(fast - ref).max() < 1e-5 and np.abs(slow - ref).max() < 1e-5


def test_compact_reference_kl_exact_and_bounded():
    """K = V: the stored tables give the exact KL; K < V: a lower bound, close when the top K hold
    nearly all the mass."""
    from neoxq.runtime.reference_cache import ReferenceTables, compact
    from neoxq.runtime.score import RowReducer, log_softmax, logsumexp

    rng = np.random.default_rng(1)
    ref_logits = (rng.standard_normal((8, 400)) * 4).astype(np.float32)
    test_logits = ref_logits + rng.standard_normal((8, 400)).astype(np.float32) * 0.3
    lp, lq = log_softmax(ref_logits), log_softmax(test_logits)
    exact = (np.exp(lp) * (lp - lq)).sum(-1)
    targets = rng.integers(0, 400, 8)
    for k, tol in ((400, 2e-5), (128, 0.05)):  # K = V: exact but for float32 storage (~1e-6 absolute)
        t = ReferenceTables(**compact(lp, targets, k))
        parts = []
        RowReducer(400, threads=1)(
            test_logits, shift_at=t.top_idx[:, 0], gather=t.top_idx, after=lambda lo, hi, shift, sums, top: parts.append((shift, sums, top))
        )
        shift, sums, top = parts[0]  # as scoring has them
        assert np.array_equal(top, np.take_along_axis(test_logits, t.top_idx.astype(np.int64), 1))
        assert np.allclose(shift + np.log(sums), logsumexp(test_logits))
        got = t.kl_rows(slice(0, 8), top, shift, sums)
        assert np.all(got <= exact + 1e-6)
        assert np.abs(got - exact).max() <= tol * exact.max(), (k, got, exact)
        assert np.allclose(t.target_lp, lp[np.arange(8), targets], atol=1e-6)
        assert (t.top_idx[:, 0] == ref_logits.argmax(-1)).all()


def test_reference_cache_roundtrip(tmp_path):
    from neoxq.runtime.reference_cache import reference_tables
    from neoxq.runtime.score import Windows, log_softmax

    class Fake:
        description, calls = "fake", 0

        def identity(self):
            return "fake:1"

        def log_probs(self, w):
            Fake.calls += 1
            rng = np.random.default_rng(2)
            for c in range(w.n_chunks):
                yield c, log_softmax(rng.standard_normal((w.per_window, 50)))

    w = Windows([i % 50 for i in range(64)], 16)
    a = reference_tables(Fake(), w, 50, tmp_path, k=8)
    b = reference_tables(Fake(), w, 50, tmp_path, k=8)
    assert Fake.calls == 1 and np.array_equal(a.top_lp, b.top_lp) and a.top_idx.shape == (w.tokens_scored, 8)
    assert not list(tmp_path.glob(".*.partial"))
    with pytest.raises(UsageError, match="different models"):
        reference_tables(Fake(), w, 60, tmp_path / "other", k=8)


def test_stale_partials_removed_live_kept(tmp_path):
    from neoxq.core.atomic import atomic_output

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".old.gguf.{dead}.partial"
    live = tmp_path / f".busy.gguf.{os.getppid()}.partial"
    stale.write_text("x")
    live.write_text("x")
    with atomic_output(tmp_path / "new.txt") as tmp:
        tmp.write_text("done")
    assert not stale.exists() and live.exists() and (tmp_path / "new.txt").read_text() == "done"


def test_imatrix_readers_roundtrip_and_corrupt(tmp_path):
    from neoxq.core.imatrix_io import IMatrix, read_imatrix, write_imatrix

    im = IMatrix({"blk.0.attn_qkv.weight": np.arange(1, 9, dtype=np.float32)}, {"blk.0.attn_qkv.weight": 4.0}, ["calib"], 3, 128)
    back = read_imatrix(write_imatrix(tmp_path / "a.imatrix", im))
    assert np.allclose(back.values("blk.0.attn_qkv.weight"), np.arange(1, 9) / 4) and back.datasets == ["calib"]
    (tmp_path / "bad.dat").write_bytes(b"\x05\x00\x00\x00garbage")
    with pytest.raises(CorruptFileError):
        read_imatrix(tmp_path / "bad.dat")


CANNED = {
    "source": {"name": "tiny", "path": "/x/tiny", "repo": None, "revision": None, "commit": None, "format": "safetensors"},
    "text": {"file": "t.txt", "sha256": "ab" * 32, "scored_sha256": "cd" * 32, "ctx": 128, "tokens_scored": 6300, "calibration_excluded": True},
    "reference": {"kind": "transformers GPTNeoXForCausalLM, fp32", "ppl": 35.0, "ppl_se": 0.4},
    "imatrix": {"file": "imatrix.gguf", "sha256": "ef" * 32, "calibration": "first 25%"},
    "machine": {"platform": "Linux", "processor": "x86_64", "cores": 2, "python": "3.11"},
    "versions": {"neoxq": "0.2.0", "llama-cpp-python": "0.3.36"},
    "results": [
        {
            "type": "F16",
            "size_bytes": 6_890_000,
            "bpw": 16.06,
            "ppl": 35.49,
            "ppl_se": 0.39,
            "dppl_pct": 0.0,
            "kld_mean": 1e-6,
            "kld_p99": 1e-5,
            "top1": 0.999,
            "pp_tps": 6401,
            "tg_tps": 1404.7,
            "speed": {"reliable": True, "why": ""},
        },
        {
            "type": "Q2_K",
            "size_bytes": 1_470_000,
            "bpw": 3.39,
            "ppl": 36.04,
            "ppl_se": 0.40,
            "dppl_pct": 1.56,
            "kld_mean": 0.018,
            "kld_p99": 0.09,
            "top1": 0.84,
            "pp_tps": 9815,
            "tg_tps": 2.0,
            "speed": {"reliable": False, "why": "load average 5.1 above 2 cores"},
        },
    ],
}


def test_render_from_canned_report(tmp_path):
    from neoxq.render import markdown, render, table

    t = table(CANNED)
    lines = t.splitlines()
    assert lines[0].split()[:2] == ["type", "size"] and len(lines) == 1 + len(CANNED["results"])
    assert "Q2_K" in lines[-1] and "busy" in lines[-1] and "6401" in t
    md = markdown(CANNED)
    assert "| Q2_K |" in md and "load average 5.1" in md and CANNED["text"]["sha256"] in md and "35.000 ± 0.400" in md
    (tmp_path / "report.json").write_text(json.dumps(CANNED))
    md_path, png = render(tmp_path / "report.json")
    assert md_path.read_text().startswith("# Quantization report: tiny") and png.read_bytes()[:4] == b"\x89PNG"


def test_report_rows_read_back_typed_and_ignore_unknown_fields():
    """A row of report.json (or sweep.json's subset) reads into ReportRow and writes back the same;
    a field a newer neoxq adds is ignored; a row without its type is refused (the negative control)."""
    from neoxq.core.report_row import ReportRow, rows_of

    rows = rows_of(CANNED)
    assert [r.type for r in rows] == [r["type"] for r in CANNED["results"]]
    assert [r.as_json() for r in rows] == CANNED["results"]
    newer = ReportRow.from_json({**CANNED["results"][0], "a_field_from_the_future": 1})
    assert newer.as_json() == CANNED["results"][0]
    sweep = rows[0].sweep_json()
    assert sweep["type"] == rows[0].type and "file" not in sweep and "tasks" not in sweep
    with pytest.raises(TypeError):
        ReportRow.from_json({"kld_mean": 0.1})


def test_gguf_info_matches_gguf_reader_and_skips_vocab(tmp_path):
    import gguf

    from neoxq.core.gguf_info import read_info

    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(path, "gptneox")
    w.add_context_length(2048)
    w.add_token_list([f"tok{i}" for i in range(50_000)])
    w.add_token_merges([f"a{i} b{i}" for i in range(50_000)])
    w.add_string("neoxq.quant_type", "F16")
    w.add_array("imatrix.datasets", ["x", "y"])
    w.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float16))
    w.add_tensor("output_norm.bias", np.zeros(32, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    info, ref = read_info(path), gguf.GGUFReader(path)
    assert info.n_vocab == 50_000 and "tokenizer.ggml.tokens" not in info.metadata
    assert info.metadata["imatrix.datasets"] == ["x", "y"] and info.quant_type == QuantType.F16
    assert [(t.name, t.type, t.shape, t.n_bytes) for t in info.tensors] == [
        (t.name, t.tensor_type.name, tuple(int(x) for x in reversed(t.shape)), int(t.n_bytes)) for t in ref.tensors
    ]
    assert info.data_offset + info.tensors[0].offset == int(ref.tensors[0].data_offset)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CorruptFileError, match="truncated"):
        read_info(path)


def _cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "neoxq", *map(str, args)], capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=120
    )


@pytest.mark.parametrize(
    "args,needle",
    [
        (("run", "x.gguf", "-n", "-5"), "--max-tokens"),
        (("perplexity", "x.gguf", "--text", "t", "--ctx", "2"), "--ctx"),
        (("quantize", "x.gguf", "--type", "Q9_K"), "Q9_K"),
        (("run", "missing.gguf", "-p", "x"), "no such file"),
        (("serve", "x.gguf", "--port", "70000"), "--port"),
        (("run", "x.gguf", "-t", "0", "-p", "x"), "--threads"),
    ],
)
def test_cli_bad_values_one_line(args, needle):
    from .helpers import assert_one_line_error

    assert_one_line_error(_cli(*args), needle)


def test_cli_debug_env_version_and_short_flags():
    proc = _cli("run", "missing.gguf", "-p", "x", env={"NEOXQ_DEBUG": "1"})
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "SourceError" in proc.stderr
    import neoxq

    assert _cli("--version").stdout.strip() == f"neoxq {neoxq.__version__}"
    # -t is --threads everywhere; --type has no short form.
    for cmd in ("run", "perplexity", "kld", "serve"):
        assert "--threads" in _cli(cmd, "--help").stdout
    assert "-t," not in _cli("quantize", "--help").stdout.replace("--type", "")


# What each layer may import besides the standard library and itself: an
# allowlist, so a new arrow (runtime → neoxq.sweep, core → llama_cpp) fails here.
BASE = ("numpy", "gguf", "rich", "scipy", "neoxq", "neoxq.core")  # rich: progress bars; scipy: LAPACK for core.gptq (inside its functions)
LAYERS = {
    "neoxq/core": BASE,
    "runtime": (*BASE, "llama_cpp", "neoxq.runtime", "fastapi", "uvicorn", "pydantic"),  # the last three: the server extra
    "convert": (*BASE, "neoxq.convert", "torch", "transformers", "safetensors", "huggingface_hub", "tokenizers"),
}


def test_single_import_root_and_layers():
    """One top-level package, and each layer imports only what LAYERS allows (checked on every
    module's source, imports inside functions included). Negative control: a runtime module that
    imported neoxq.sweep, or core importing llama_cpp, would be caught."""
    import ast

    from .helpers import REPO

    def imports(path):
        tree = ast.parse(path.read_text())
        for n in ast.walk(tree):
            if isinstance(n, ast.Import):
                yield from (a.name for a in n.names)
            elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
                yield n.module

    def allowed(mod: str, allow: tuple) -> bool:
        if mod.split(".")[0] in sys.stdlib_module_names and mod.split(".")[0] not in ("convert", "runtime"):
            return True
        # "neoxq" alone means the package's own __init__ (its version), not every subpackage
        return mod == "neoxq" or any(mod == a or mod.startswith(a + ".") for a in allow if a != "neoxq")

    assert not allowed("neoxq.sweep", LAYERS["runtime"]) and not allowed("llama_cpp", LAYERS["neoxq/core"])
    for folder, allow in LAYERS.items():
        for path in (REPO / folder).glob("*.py"):
            for mod in imports(path):
                assert allowed(mod, allow), f"{path.relative_to(REPO)} imports {mod}, outside its layer's allowlist"
    top = (REPO / "pyproject.toml").read_text()
    assert 'packages = ["neoxq", "neoxq.core", "neoxq.cli", "neoxq.convert", "neoxq.runtime"]' in top


def test_works_beside_a_stray_convert_py(tmp_path):
    (tmp_path / "convert.py").write_text("raise SystemExit('the stray convert.py was imported')\n")
    (tmp_path / "runtime.py").write_text("raise SystemExit('the stray runtime.py was imported')\n")
    proc = subprocess.run(
        [sys.executable, "-c", "import neoxq.convert.converter, neoxq.runtime.model, neoxq.cli; print('ok')"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.stdout.strip() == "ok", proc.stderr


def test_wheel_has_one_import_root(tmp_path):
    """Built as a wheel: only neoxq/ at the top, with convert and runtime inside; importable from it."""
    import zipfile

    from .helpers import REPO

    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(REPO)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next(tmp_path.glob("neoxq-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"neoxq"}, tops
    assert "neoxq/convert/converter.py" in names and "neoxq/runtime/capi.py" in names and "neoxq/core/errors.py" in names
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    (tmp_path / "convert.py").write_text("raise SystemExit('stray')\n")
    proc = subprocess.run(
        [sys.executable, "-c", "import neoxq.convert.converter as c, neoxq.runtime.model; print(c.__file__)"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout.startswith(str(target)), proc.stderr


def test_ggml_type_table_equals_gguf_py():
    import gguf

    from neoxq.core.ggml_types import GGML_TYPES

    theirs = {int(t): (t.name, *gguf.GGML_QUANT_SIZES[t]) for t in gguf.GGMLQuantizationType if t in gguf.GGML_QUANT_SIZES}
    assert GGML_TYPES == theirs


@pytest.mark.parametrize("setting,expect", [("auto", True), ("on", True), ("off", False)])
def test_flash_attention_setting(setting, expect):
    from neoxq.runtime.model import resolve_flash_attn

    assert resolve_flash_attn(setting) is expect
    with pytest.raises(UsageError, match="auto, on or off"):
        resolve_flash_attn("maybe")


def test_context_parameters_for_the_cpu_switch(checkpoints, tmp_path):
    """--device cpu / -ngl 0: no layers and no op offload; flash attention follows the setting."""
    import llama_cpp
    from neoxq.convert.converter import convert
    from neoxq.runtime.model import NeoxModel, runtime_options

    path = convert(str(checkpoints["hf4-parallel-rot025-safetensors"]), "f16", output=tmp_path / "m.gguf")
    for opts, fa in ((runtime_options(64, 1, None, 64, "off", "cpu"), False), (runtime_options(64, 1, 0, 64, "auto", "auto"), True)):
        with NeoxModel(path, opts) as m:
            cp = m.llm.context_params
            assert m.n_gpu_layers == 0 and cp.op_offload is False
            assert cp.flash_attn_type == (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if fa else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
    assert runtime_options(64, 1, None, 64, "auto", "gpu").n_gpu_layers == -1
    with pytest.raises(UsageError, match="contradict"):
        runtime_options(64, 1, 5, 64, "auto", "cpu")


def test_info_system_and_file(checkpoints, tmp_path):
    from neoxq.convert.converter import convert

    path = convert(str(checkpoints["hf4-parallel-rot025-safetensors"]), "q8_0", output=tmp_path / "m.gguf")
    proc = _cli("info", path, "--system", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["system"]["backend"] in ("CPU", "CUDA", "GPU") and data["file"]["type"] == "Q8_0"
    assert data["file"]["architecture"] == "gptneox" and "Q8_0" in data["file"]["tensor_types"]


def test_network_failure_found_by_type_not_text():
    """lm-eval's data errors become the one-line network message only when a connection error is in
    the chain; an unrelated error whose text mentions "resolve" or "offline" is not hidden."""
    from neoxq.evaluate import network_failure

    try:
        try:
            raise FileNotFoundError("Dataset x is not cached")
        except FileNotFoundError as inner:
            raise ConnectionError("Couldn't reach 'x' on the Hub (OfflineModeIsEnabled)") from inner
    except ConnectionError as exc:
        wrapped = RuntimeError("task build failed")
        wrapped.__context__ = exc
        assert network_failure(wrapped) is exc
    assert network_failure(ValueError("cannot resolve the offline template")) is None
    requests = pytest.importorskip("requests")
    err = requests.ConnectionError("Max retries exceeded")
    assert network_failure(err) is err


def test_importing_neoxq_changes_nothing_outside_it(tmp_path):
    """In a clean interpreter, importing every neoxq module leaves os.environ and
    llama.cpp's log callback and numpy's huge page advice as they were; a library model load installs
    neoxq's callback only for the load and puts the caller's back. Negative control: the CLI's
    init_process does change all three."""
    code = r"""
import ctypes, importlib, os, pkgutil, sys
import llama_cpp

def callback():
    cb, user = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(cb), ctypes.byref(user))
    return ctypes.cast(cb, ctypes.c_void_p).value

import lm_eval  # sets HF_XET_HIGH_PERFORMANCE in its own __init__: its doing, so measured before ours
from numpy._core import multiarray
multiarray._set_madvise_hugepage(True)  # numpy's default where the kernel has huge pages
env, before = dict(os.environ), callback()
import neoxq
names = [m.name for m in pkgutil.walk_packages(neoxq.__path__, "neoxq.") if not m.name.endswith("__main__")]
for name in names:
    importlib.import_module(name)
assert dict(os.environ) == env, set(os.environ.items()) ^ set(env.items())
assert callback() == before, "import installed a log callback"
assert multiarray._get_madvise_hugepage(), "import changed numpy's huge page advice"
from neoxq.runtime.model import NeoxModel, RuntimeOptions
with NeoxModel(sys.argv[1], RuntimeOptions(n_ctx=64)):
    pass
assert callback() == before, "a library load left its callback installed"
from neoxq.core.machine import init_process
init_process()
with NeoxModel(sys.argv[1], RuntimeOptions(n_ctx=64)):
    pass
assert callback() != before and os.environ.get("GOMP_SPINCOUNT"), "init_process changed nothing"
assert not multiarray._get_madvise_hugepage(), "init_process left numpy's huge page advice on"
print(len(names), "modules")
"""
    from neoxq.convert.converter import convert
    from neoxq.convert.tiny import TinySpec, build_random

    ck = build_random(tmp_path / "ck", TinySpec(), "hello world " * 400)
    f16 = convert(str(ck), "f16", output=tmp_path / "m.gguf")
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    proc = subprocess.run([sys.executable, "-c", code, str(f16)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "modules" in proc.stdout, proc.stderr[-3000:]


HEAP_PATTERN = r"""
import sys
import numpy as np
from neoxq.core.heap import keep_temporaries_out_of_heaps
def rss_mib():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS")) // 1024
if sys.argv[1] == "kept out":
    assert keep_temporaries_out_of_heaps()
elif sys.argv[1] == "asked":
    keep_temporaries_out_of_heaps()
big = np.ones(24 << 20, np.uint8)  # a mapped block freed: glibc's own threshold rises to its size
del big
blocks, pins = [], []
for _ in range(32):  # 2 MiB blocks, each followed by a small one that stays
    blocks.append(np.ones(2 << 20, np.uint8))
    pins.append(np.ones(64 << 10, np.uint8))
before = rss_mib()
del blocks
print(before - rss_mib())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap")
def test_freed_temporaries_leave_rss_under_a_budget():
    """Blocks of a few MiB freed between blocks that stay leave RSS at once when the heap keeps
    them out (neoxq.core.heap, what a stated --max-memory sets). Negative control: under glibc's
    own rising threshold they stay resident in the heap."""
    from neoxq.core.heap import is_glibc

    if not is_glibc():
        pytest.skip("not glibc")
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")}

    def released_mib(mode: str) -> int:
        proc = subprocess.run([sys.executable, "-c", HEAP_PATTERN, mode], capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return int(proc.stdout.split()[-1])

    assert released_mib("kept out") >= 56
    assert released_mib("glibc") <= 4


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap")
def test_the_users_own_mmap_threshold_stands():
    """With the threshold set by the user (GLIBC_TUNABLES), a stated budget leaves it alone: the
    freed blocks stay in the heap, as the user's large threshold keeps them."""
    from neoxq.core.heap import is_glibc

    if not is_glibc():
        pytest.skip("not glibc")
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"} | {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=33554432"}
    proc = subprocess.run([sys.executable, "-c", HEAP_PATTERN, "asked"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout.split()[-1]) <= 4


ARENA_PATTERN = r"""
import ctypes, sys, threading
from neoxq.core.heap import one_arena
if sys.argv[1] == "one":
    assert one_arena()
elif sys.argv[1] == "asked":
    one_arena()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
start = threading.Barrier(4)
def work():
    start.wait()
    for _ in range(100):
        libc.free(libc.malloc(4096))
threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
libc.malloc_stats()  # one "Arena N:" block per heap, on stderr
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap")
def test_threads_share_one_heap_unless_the_user_chose():
    """After one_arena (what the CLI's init_process makes) four threads' mallocs come from glibc's
    main heap alone; the user's own MALLOC_ARENA_MAX stands. Negative control: without it each
    thread gets a heap of its own."""
    from neoxq.core.heap import is_glibc

    if not is_glibc():
        pytest.skip("not glibc")
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_ARENA_MAX", "GLIBC_TUNABLES")}

    def heaps(mode: str, extra: dict | None = None) -> int:
        proc = subprocess.run([sys.executable, "-c", ARENA_PATTERN, mode], capture_output=True, text=True, env=env | (extra or {}), timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return len(re.findall(r"^Arena \d+:", proc.stderr, re.M))

    assert heaps("one") == 1
    assert heaps("glibc") > 1
    assert heaps("asked", {"MALLOC_ARENA_MAX": "4"}) > 1


@pytest.mark.parametrize("script", sorted(p.name for p in (Path(__file__).resolve().parent.parent / "scripts").glob("*.py")))
def test_every_script_answers_help(script):
    """A benchmark that no longer runs is found here, not by its next user."""
    from .helpers import REPO

    proc = subprocess.run([sys.executable, str(REPO / "scripts" / script), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_docs_name_every_environment_variable():
    """Every NEOXQ_* variable the code reads is documented in docs/development.md. Negative
    control: a name the page lacks is found missing."""
    import re

    from .helpers import REPO

    readme = (REPO / "docs" / "development.md").read_text()
    used = set()
    for folder in ("neoxq", "runtime", "convert", "scripts"):
        for path in (REPO / folder).rglob("*.py"):
            used |= set(re.findall(r"""(?:environ(?:\.get)?\(|getenv\(|environ\[)\s*["'](NEOXQ_[A-Z_]+)""", path.read_text()))
    assert {"NEOXQ_CACHE", "NEOXQ_CACHE_MAX_SIZE", "NEOXQ_DEBUG"} <= used
    assert [v for v in sorted(used) if f"`{v}" not in readme] == []  # `NAME` or `NAME=1`
    assert "`NEOXQ_NOT_A_VARIABLE" not in readme


def test_llama_defaults_patch_is_one_load_at_a_time():
    """The llama_model/context_default_params patch is held by one load at a time: a second
    thread's block waits for the first to end, then sees only its own fields; the original is back
    after both."""
    import threading

    import llama_cpp.llama_cpp as lib
    from neoxq.runtime import capi

    original, original_ctx = lib.llama_model_default_params, lib.llama_context_default_params
    a_in, a_go, b_in, seen = threading.Event(), threading.Event(), threading.Event(), {}

    def a():
        with capi.llama_defaults(model={"vocab_only": True}, context={"n_seq_max": 3}):
            a_in.set()
            a_go.wait(30)
            seen["a"] = (lib.llama_model_default_params().vocab_only, lib.llama_context_default_params().n_seq_max)

    def b():
        a_in.wait(30)
        with capi.llama_defaults(model={"check_tensors": True}):
            b_in.set()
            seen["b"] = (lib.llama_model_default_params().vocab_only, lib.llama_model_default_params().check_tensors)

    ta, tb = threading.Thread(target=a), threading.Thread(target=b)
    ta.start()
    tb.start()
    assert a_in.wait(30) and not b_in.wait(0.3)  # b waits while a holds the patch
    a_go.set()
    ta.join(30)
    tb.join(30)
    assert seen == {"a": (True, 3), "b": (original().vocab_only, True)} and lib.llama_model_default_params is original
    assert lib.llama_context_default_params is original_ctx and original_ctx().n_seq_max != 3


@pytest.mark.parametrize("shape", [(1, 1), (3, 700), (513, 257), (256, 256), (1000, 1)])
def test_tiled_transpose_equals_numpys(shape):
    from neoxq.core.transpose import transposed

    x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    t = transposed(x[:, ::-1] if shape[1] > 1 else x)  # a strided view too
    assert t.flags.c_contiguous and np.array_equal(t, (x[:, ::-1] if shape[1] > 1 else x).T)


def test_variant_gain_line_names_the_range_and_the_paired_verdicts():
    import copy

    from neoxq.render import variant_gain

    assert variant_gain(CANNED) is None  # no -opt rows: no line (the negative control)
    report = copy.deepcopy(CANNED)
    stock = report["results"][-1]
    for t, ratio, verdict in (("Q2_K-opt", 0.08, "better"), ("Q4_K_M-opt", 0.02, "better"), ("Q6_K-opt", 0.97, "not distinguishable")):
        report["results"].append({**stock, "type": t, "vs_stock": {"stock": t[:-4], "kld": {"ratio": ratio, "verdict": verdict}}})
    line = variant_gain(report)
    assert "0.02× (Q4_K_M-opt) to 0.97× (Q6_K-opt)" in line and "2 of 3 types" in line


def test_best_file_at_each_stock_size():
    """Each stock type's best file is the lowest KLD among files at or under its size: a smaller
    variant that scores better wins; with only stock rows, no table (the negative control)."""
    import copy

    from neoxq.core.report_row import best_at_each_size, rows_of
    from neoxq.render import best_files_md

    assert best_files_md(CANNED) == []
    report = copy.deepcopy(CANNED)
    q2 = next(r for r in report["results"] if r["type"] == "Q2_K")
    report["results"].append({**q2, "type": "Q4_K_M", "bpw": 4.9, "kld_mean": q2["kld_mean"] / 4})
    report["results"].append({**q2, "type": "Q3_K_M-opt", "bpw": 3.4, "kld_mean": q2["kld_mean"] / 8})
    report["results"].append({**q2, "type": "Q2_K-opt", "size_bytes": q2["size_bytes"] + 600, "kld_mean": q2["kld_mean"] / 2})
    pairs = {s.type: b.type for s, b in best_at_each_size(rows_of(report))}
    # Q2_K-opt's extra metadata bytes do not count; Q3_K_M-opt is over Q2_K's bits per weight
    assert pairs == {"Q2_K": "Q2_K-opt", "Q4_K_M": "Q3_K_M-opt"}
    assert any("| Q4_K_M |" in line and "Q3_K_M-opt" in line for line in best_files_md(report))


def test_report_ray_makes_opt_and_opt_mix_files_in_one_ray_session(monkeypatch):
    """optimize_on_ray: the first file here, every other opt and opt-mix file a task of one Ray
    session, returned in order; a single file starts no Ray (the negative control)."""
    import contextlib
    from pathlib import Path
    from types import SimpleNamespace

    from neoxq import cluster
    from neoxq.core.qtypes import QuantType as Q

    here, sessions = [], []

    def build(ckpt, base, types, out_dir, calib, mix=False, on_step=None, **kw):
        here.append((types[0], mix))
        return {types[0]: f"{types[0].value}-{'opt-mix' if mix else 'opt'}"}

    class Ray:  # runs a task at once; its "reference" is its result
        def remote(self, **options):
            return lambda fn: SimpleNamespace(remote=lambda *args: fn(*args))

        def wait(self, refs, num_returns):
            return refs[:num_returns], refs[num_returns:]

        def get(self, ref):
            return ref

    @contextlib.contextmanager
    def session(address):
        sessions.append(address)
        yield Ray(), cluster.Nodes(1, 0)

    monkeypatch.setattr(cluster, "build_optimized", build)
    monkeypatch.setattr(cluster, "ray_session", session)
    monkeypatch.setattr(cluster, "set_up_worker", lambda threads: None)
    got = cluster.optimize_on_ray("ckpt", "base", [Q.F16, Q.Q4_K_M, Q.Q2_K], Path("o"), "text", "local", mixes=(False, True))
    assert got == ["Q4_K_M-opt", "Q2_K-opt", "Q4_K_M-opt-mix", "Q2_K-opt-mix"] and sessions == ["local"]
    assert here[0] == (Q.Q4_K_M, False) and len(here) == 4
    sessions.clear()
    assert cluster.optimize_on_ray("ckpt", "base", [Q.Q4_K_M], Path("o"), "text", "local") == ["Q4_K_M-opt"] and sessions == []


def test_progress_eta_is_the_remaining_work_at_the_average_rate_since_the_start(monkeypatch):
    """Steps a minute apart (a large model's layers) still give an estimate, from the first step on."""
    from neoxq.core import progress

    clock = [1000.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    bar = progress.Progress("rounding", 10, "matmuls")
    assert bar.eta() is None  # negative control: no step, no estimate
    clock[0] += 60.0
    bar.update(2)
    assert bar.eta() == pytest.approx(8 * 30.0)
    clock[0] += 240.0
    bar.update(8)
    assert bar.eta() == 0.0
    assert progress._clock(3725.4) == "1:02:05" and progress._clock(None) == "-:--:--"
    resumed = progress.Progress("rounding", 4, "matmuls")
    clock[0] += 500.0  # replaying finished layers: no step of this bar
    resumed.restart_clock()
    clock[0] += 10.0
    resumed.update(1)
    assert resumed.eta() == pytest.approx(30.0)


def test_progress_eta_of_a_cycled_bar_takes_each_place_at_its_recent_mean(monkeypatch):
    """Layers of four unequal matmuls, then the output matrix: after a whole layer, each step left
    is estimated at the mean time its place in the layer took over the later half of the layers
    seen, so the estimate neither swings inside a layer nor lags far when later layers take longer."""
    from neoxq.core import progress

    clock = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    bar = progress.Progress("rounding", 4 * 4 + 1, "matmuls", cycle=4)

    def steps(*seconds):
        for s in seconds:
            clock[0] += s
            bar.update(1)

    steps(10, 5, 5)
    assert bar.eta() == pytest.approx(14 * 20 / 3)  # before a whole layer: the average rate
    steps(30)
    assert bar.eta() == pytest.approx(3 * 50 + 10)  # three layers and the output matrix, at the first layer's times
    steps(20)  # the second layer is twice as slow
    assert bar.eta() == pytest.approx(3 * (5 + 5 + 30 + 20))  # mid-layer: each step left at its place's time
    steps(10, 10, 60)
    assert bar.eta() == pytest.approx(2 * 100 + 20)  # two layers seen: the later one's times
    steps(40, 10, 10, 100)
    assert bar.eta() == pytest.approx((30 + 10 + 10 + 80) + 30)  # three seen: the mean of the later two
    plain = progress.Progress("plain", 13, "x")
    assert plain.cycle == 0 and progress.eta_seconds(0.0, [], 1, 13) == pytest.approx(12 * clock[0])


def test_stage_times_counts_a_call_only_where_no_timed_call_encloses_it():
    """scripts/stage_times.py: every name it times resolves to a callable (a rename fails here, not
    as a silent zero in a benchmark); a timed call inside another is counted in the outer one only,
    and on its own when called alone."""
    import importlib.util
    import itertools

    from .helpers import REPO

    spec = importlib.util.spec_from_file_location("stage_times", REPO / "scripts" / "stage_times.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for _, module, attr in mod.TIMED:
        owner, name = mod.target(module, attr)
        assert callable(getattr(owner, name))
    with pytest.raises(AttributeError):
        mod.target("neoxq.core.gptq", "no_such_function")
    ticks = itertools.count()
    clock = lambda: float(next(ticks))  # noqa: E731
    spent = {"outer": 0.0, "inner": 0.0}
    inner = mod._timed(lambda: None, "inner", spent, clock)
    outer = mod._timed(lambda: inner(), "outer", spent, clock)
    outer()  # clock 0 → 1: the inner call reads no clock
    inner()  # clock 2 → 3
    assert spent == {"outer": 1.0, "inner": 1.0}


def test_profile_stages_counts_each_sample_once_in_its_first_stage(tmp_path):
    """scripts/profile_stages.py: a sample whose stack holds two stages' frames counts in the first
    of STAGES' order; one that holds none counts as the rest; counts add over lines."""
    import importlib.util

    from .helpers import REPO

    spec = importlib.util.spec_from_file_location("profile_stages", REPO / "scripts" / "profile_stages.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    raw = tmp_path / "prof.txt"
    raw.write_text(
        "main (a.py:1);_run_job (neoxq/optimize.py:9);optimize_statistics (neoxq/calibration.py:3);gptq_levels (g.py:2) 5\n"
        "main (a.py:1);_run_job (neoxq/optimize.py:9);rewrite_sequential (r.py:1);gptq_levels (g.py:2) 3\n"
        "main (a.py:1);_run_job (neoxq/optimize.py:9);rewrite_sequential (r.py:1);gptq_levels (g.py:4) 2\n"
        "main (a.py:1);import (x.py:1) 7\n"
    )
    counts = mod.stage_samples(raw)
    first_pass, sweeps = mod.STAGES[1][0], mod.STAGES[4][0]
    assert counts == {first_pass: 5, sweeps: 5, mod.REST: 7}
