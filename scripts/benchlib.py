"""Shared by the benchmark scripts: checkpoints of real Pythia shapes built locally (random fp16
weights written tensor by tensor, so even a 6.9B-shaped checkpoint never sits in memory), a
Pythia-sized BPE vocabulary trained offline, a briefly trained 50k-vocabulary model, child-process
measurements (wall time, peak RSS), and the cache folder where all of it is kept between runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

VOCAB = 50304  # Pythia's padded embedding rows
SHAPES = {  # Pythia's own sizes (hidden, layers, heads[, vocabulary when not VOCAB]); intermediate = 4 × hidden
    "70m": (512, 6, 8),
    "160m": (768, 12, 12),
    "410m": (1024, 24, 16),
    "1.4b": (2048, 24, 16),
    "6.9b": (4096, 32, 32),
    "12b": (5120, 36, 40, 50688),
}


def run_record(argv: list[str]) -> dict:
    """What a benchmark's JSON starts with: the command, the date, the code and the machine, so a
    table rendered from it (scripts/bench_docs.py) names the run that made it."""
    import datetime
    import platform

    from neoxq import __version__

    here = Path(__file__).parent
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here).stdout.strip()
    if commit and subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "."], cwd=here.parent).returncode:
        commit += "+uncommitted"  # the tree that ran is not that commit's: say so
    return {
        "command": " ".join([f"scripts/{Path(argv[0]).name}", *argv[1:]]),
        "date": datetime.date.today().isoformat(),
        "commit": commit or None,
        "neoxq": __version__,
        "machine": f"{os.cpu_count()} cores, {platform.machine()}{cpu_units()}",
        "rows": [],
    }


# the CPU's matrix units: the dense arithmetic's rates (bfloat16 most of all) differ several-fold
# between machines that have them and machines that do not, so a record names them
MATRIX_UNITS = ("avx512f", "avx512_bf16", "amx_bf16")


def cpu_units() -> str:
    """', <model name> (<its matrix units>)' from /proc/cpuinfo; empty where there is none."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in info.splitlines() if ":" in line)}
    flags = set(fields.get("flags", "").split())
    units = [u for u in MATRIX_UNITS if u in flags]
    return f", {fields.get('model name', 'CPU')} ({', '.join(units) or 'no AVX-512'})"


def add_record_args(ap) -> None:
    """--json (where the run's record goes: docs/bench/NAME.json for the docs' tables) and --markdown."""
    ap.add_argument("--json", type=Path, help="write the run's record (command, date, rows) here")
    ap.add_argument("--markdown", type=Path, help="print the table of an earlier --json run and exit")


def printed_earlier(args, markdown) -> bool:
    """With --markdown: print that record's table (rendered by the script's `markdown`) and say so."""
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
    return bool(args.markdown)


def ratio_cell(x: dict | None) -> str:
    """A paired ratio as the tables show it: `0.123× [0.110, 0.137]` (its 95 % interval), or –."""
    return f"{x['ratio']:.3f}× [{x['ci95'][0]:.3f}, {x['ci95'][1]:.3f}]" if x else "–"


def write_record(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def cache_dir() -> Path:
    d = Path(os.environ.get("NEOXQ_BENCH_CACHE", Path.home() / ".cache" / "neoxq" / "bench"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def stdlib_source(max_bytes: int) -> str:
    """The standard library's source files in a fixed order: offline text with a code-heavy vocabulary."""
    import sysconfig

    out, total = [], 0
    for p in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        try:
            s = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        out.append(s)
        total += len(s)
        if total >= max_bytes:
            break
    return "\n\n".join(out)[:max_bytes]


def tokenizer_50k() -> Path:
    """A byte-level BPE with ~50k tokens (Pythia: 50277), trained once on stdlib source; cached."""
    from neoxq.convert.tiny import train_tokenizer

    folder = cache_dir() / "tokenizer-50k"
    if not (folder / "tokenizer.json").is_file():
        print("training a 50k-token BPE vocabulary (once) ...", file=sys.stderr)
        train_tokenizer(folder, stdlib_source(20_000_000), vocab_size=50277)
    return folder


def config_for(shape: str | tuple[int, ...], n_tok: int, max_pos: int = 2048) -> dict:
    """A shape is a name in SHAPES or (hidden, layers, heads[, vocabulary])."""
    h, layers, heads, *vocab = SHAPES[shape] if shape in SHAPES else shape
    vocab = vocab[0] if vocab else VOCAB
    return {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "hidden_size": h,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "intermediate_size": 4 * h,
        "vocab_size": vocab,
        "max_position_embeddings": max_pos,
        "rotary_pct": 0.25,
        "rotary_emb_base": 10000,
        "use_parallel_residual": True,
        "tie_word_embeddings": False,
        "layer_norm_eps": 1e-5,
        "hidden_act": "gelu",
        "bos_token_id": 0,
        "eos_token_id": 0,
        "torch_dtype": "float16",
        "transformers_version": "4.24.0",
    }


def _tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    out = {"gpt_neox.embed_in.weight": (v, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"gpt_neox.layers.{i}."
        out |= {
            p + "input_layernorm.weight": (h,),
            p + "input_layernorm.bias": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "post_attention_layernorm.bias": (h,),
            p + "attention.query_key_value.weight": (3 * h, h),
            p + "attention.query_key_value.bias": (3 * h,),
            p + "attention.dense.weight": (h, h),
            p + "attention.dense.bias": (h,),
            p + "mlp.dense_h_to_4h.weight": (f, h),
            p + "mlp.dense_h_to_4h.bias": (f,),
            p + "mlp.dense_4h_to_h.weight": (h, f),
            p + "mlp.dense_4h_to_h.bias": (h,),
        }
    out |= {"gpt_neox.final_layer_norm.weight": (h,), "gpt_neox.final_layer_norm.bias": (h,), "embed_out.weight": (v, h)}
    return out


def _write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], rng) -> None:
    """The safetensors layout (8-byte header length, JSON header, raw little-endian data) written one
    tensor at a time: memory stays at the largest tensor."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_suffix(".partial")
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name, shape in shapes.items():
            scale = 1.0 if len(shape) == 1 and "norm" in name and name.endswith("weight") else 0.02
            base = 1.0 if scale == 1.0 else 0.0
            (rng.standard_normal(shape, dtype=np.float32) * (0.1 if base else scale) + base).astype("<f2").tofile(f)
    tmp.replace(path)


def random_checkpoint(shape: str | tuple[int, ...], shards: int = 1) -> Path:
    """A Pythia-shaped checkpoint with random fp16 weights and the 50k tokenizer; cached."""
    label = shape if isinstance(shape, str) else "x".join(map(str, shape))  # (hidden, layers, heads[, vocabulary]): another shape
    folder = cache_dir() / (f"ckpt-{label}" + ("" if shards == 1 else f"-{shards}shards"))
    shapes = _tensor_shapes(config_for(shape, 0))
    names = list(shapes)
    files = ["model.safetensors"] if shards == 1 else [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    if all((folder / f).is_file() for f in files):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tok = tokenizer_50k()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok / f, folder / f)
    (folder / "config.json").write_text(json.dumps(config_for(shape, 0), indent=1))
    rng = np.random.default_rng(0)
    parts = np.array_split(np.arange(len(names)), shards)
    weight_map = {}
    for fname, idx in zip(files, parts):
        print(f"writing {folder.name}/{fname} ...", file=sys.stderr)
        _write_safetensors(folder / fname, {names[i]: shapes[names[i]] for i in idx}, rng)
        weight_map |= {names[i]: fname for i in idx}
    if shards > 1:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def checkpoint_bytes(shape: str) -> int:
    return sum(int(np.prod(s)) * 2 for s in _tensor_shapes(config_for(shape, 0)).values())


def trained_50k(steps: int = 120, shape: str | None = None) -> Path:
    """A 4-layer, 256-wide GPT-NeoX (31M parameters with the 50k vocabulary) trained briefly on
    stdlib source with that vocabulary: distributions as peaked as a small real model's; cached.
    shape: one of SHAPES (e.g. "70m": Pythia-70m's 6 × 512) instead of 4 × 256."""
    from neoxq.convert.tiny import TinySpec, random_model, save_checkpoint

    folder = cache_dir() / (f"trained-50k-{steps}" + (f"-{shape}" if shape else ""))
    if (folder / "model.safetensors").is_file():
        return folder
    import torch
    from tokenizers import Tokenizer

    tok = tokenizer_50k()
    folder.mkdir(parents=True, exist_ok=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok / f, folder / f)
    hidden, layers, heads, *_ = SHAPES[shape] if shape else (256, 4, 4)
    spec = TinySpec(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        scale=1.0,
        vocab_pad=0,
        max_position_embeddings=2048,
        dtype="float32",
    )
    ids = torch.tensor(Tokenizer.from_file(str(tok / "tokenizer.json")).encode(stdlib_source(3_000_000)).ids)
    model = random_model(spec, VOCAB).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        starts = torch.randint(0, len(ids) - 129, (8,), generator=gen)
        x = torch.stack([ids[s : s + 128] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0:
            print(f"training the 50k-vocabulary model: step {step}, loss {loss.item():.2f}", file=sys.stderr)
    return save_checkpoint(model.eval(), folder, spec)


def manual_text() -> str:
    """Python's reference manual as plain text (shipped with every CPython), topics in a fixed
    order: prose about code, a domain the benchmark models were not trained on."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def eval_text(chars: int = 400_000) -> Path:
    """Held-out text for scoring: stdlib source past what the trained model saw."""
    path = cache_dir() / f"eval-{chars}.txt"
    if not path.is_file():
        path.write_text(stdlib_source(3_000_000 + chars)[3_000_000:], encoding="utf-8")
    return path


# Why a launcher: Linux carries a process's resident high-water mark over fork+exec (exec_mmap saves
# the old memory map's peak into the process's maxrss), so a child started straight from this
# script, after it built a checkpoint in memory, reports the script's RSS as its own peak: that is
# how bench_convert once printed 1484 MiB for a conversion that /usr/bin/time measured at 340 MiB.
# A small launcher process spawns the command and reports wait4's ru_maxrss, which then starts from
# the launcher's few MiB, not from ours.
LAUNCHER = """
import json, os, sys, time
t0 = time.perf_counter()
pid = os.posix_spawnp(sys.argv[1], sys.argv[1:], os.environ)
_, status, usage = os.wait4(pid, 0)
# on a line of its own: a child may leave its last line unfinished (llama-perplexity's ETA)
print("\\n" + json.dumps({"rc": os.waitstatus_to_exitcode(status), "wall_s": time.perf_counter() - t0,
                         "peak_rss_MiB": usage.ru_maxrss / 1024}), file=sys.stderr)
"""


def run_child(cmd: list, env: dict | None = None, cwd=None, check: bool = True) -> dict:
    """Run a command; return its wall seconds, its own peak RSS (MiB), stdout and stderr."""
    proc = subprocess.run(
        [sys.executable, "-c", LAUNCHER, *map(str, cmd)], capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=cwd
    )
    *lines, last = proc.stderr.rstrip("\n").split("\n")
    out = json.loads(last)
    if check and out["rc"]:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n" + "\n".join(lines)[-3000:])
    return {**out, "stdout": proc.stdout, "stderr": "\n".join(lines)}


def llama_tools() -> Path | None:
    """The folder of llama-perplexity / llama-quantize built by scripts/build_llama_tools.sh, if built."""
    d = cache_dir() / "bin"
    return d if (d / "llama-perplexity").is_file() and (d / "llama-quantize").is_file() else None


def build_llama_tools() -> Path:
    """Build them now when missing (several minutes the first time)."""
    if not llama_tools():
        subprocess.run(
            ["bash", str(Path(__file__).resolve().parent / "build_llama_tools.sh")], check=True, env={**os.environ, "PYTHON": sys.executable}
        )
    return llama_tools()


def convert_f16(folder: Path, work: Path) -> Path:
    out = work / f"{folder.name}-F16.gguf"
    if not out.is_file():
        run_child([sys.executable, "-m", "neoxq", "convert", folder, "-o", out, "--quiet"])
    return out


def add_model_args(ap) -> None:
    """--model (31m or 70m, benchlib.trained_50k's trained models) and --type (the file's type)."""
    ap.add_argument("--model", default="31m")
    ap.add_argument("--type", default="Q4_K_M")


def trained_quantized(folder: str, model: str, qtype: str) -> tuple[Path, Path]:
    """A trained benchmark model's F16 file and its `qtype` file (stock llama.cpp), made once in
    cache/<folder>/<model>; model: 31m or a shape trained_50k knows (70m)."""
    work = cache_dir() / folder / model
    work.mkdir(parents=True, exist_ok=True)
    f16 = convert_f16(trained_50k(shape=None if model == "31m" else model), work)
    path = work / f"{qtype}.gguf"
    if not path.is_file():
        run_child([sys.executable, "-m", "neoxq", "quantize", f16, "--type", qtype, "-o", path, "--quiet"])
    return f16, path


def eval_windows(f16: Path, text: Path, windows: int, work: Path, ctx: int = 512) -> tuple[Path, Path]:
    """N windows of evaluation text (a file every tool reads: it tokenizes back to the same ids) and
    its tokens as llama.cpp makes them (.npy)."""
    from neoxq.runtime.model import NeoxModel, RuntimeOptions

    with NeoxModel(f16, RuntimeOptions(n_ctx=64, n_gpu_layers=0)) as m:
        ids = m.tokenize(text.read_text(encoding="utf-8"))[: windows * ctx + 64]
        cut = work / f"text-{windows}.txt"
        cut.write_text(m.detokenize(ids), encoding="utf-8")
        ids = m.tokenize(cut.read_text(encoding="utf-8"))[: windows * ctx]
    if len(ids) < windows * ctx:
        raise SystemExit(f"the evaluation text has only {len(ids) // ctx} windows of {ctx}")
    out = work / f"ids-{windows}.npy"
    np.save(out, np.asarray(ids, dtype=np.int32))
    return out, cut


# `python -c BEFORE FOLDER ARGS…` runs `python -m neoxq ARGS…` with neoxq imported from FOLDER (made
# by package_at), not from the editable install, whose import finder would otherwise win
BEFORE = r"""
import runpy, sys
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path.insert(0, sys.argv.pop(1))
sys.argv[0] = "neoxq"
runpy.run_module("neoxq", run_name="__main__", alter_sys=True)
"""


def package_at(rev: str) -> Path:
    """neoxq as it was at git revision `rev`, in a folder (its runtime/ and convert/ placed as the
    subpackages the installed layout makes them) that `python -c BEFORE FOLDER …` runs, for a
    benchmark's "before" row measured in the same run as "after"."""
    root = Path(__file__).resolve().parent.parent
    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    out = cache_dir() / "before" / sha
    if not (out / "neoxq" / "runtime").is_dir():
        tmp = out.with_suffix(".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", sha, "neoxq", "runtime", "convert"], cwd=root, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
        for sub in ("runtime", "convert"):
            (tmp / sub).rename(tmp / "neoxq" / sub)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model, ctx: int = 256, extra: tuple = (), command: list | None = None, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """`neoxq serve` (or `command`, listening on `port`) on a free local port, waited for until it
    answers /v1/models; (process, base URL)."""
    import httpx

    if command is None:
        port = free_port()
        command = [sys.executable, "-m", "neoxq", "serve", str(model), "--port", str(port), "--ctx", str(ctx), *map(str, extra)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            if httpx.get(f"{base}/v1/models", timeout=1).status_code == 200:
                return proc, base
            time.sleep(0.25)
        except httpx.HTTPError:
            if proc.poll() is not None:
                raise SystemExit(f"the server did not start: {proc.stderr.read().decode(errors='replace')[-500:]}")
            time.sleep(0.25)
    proc.kill()
    raise SystemExit("the server did not answer within 60 s")


def file_levels(path: Path) -> np.ndarray:
    """Every block-format matrix's levels in a GGUF (neoxq.core.blocks), concatenated in the file's
    order, int32: two files of the same tensors compared level by level."""
    from neoxq.core import blocks
    from neoxq.core.gguf_info import read_info

    info, out = read_info(path), []
    for t in info.tensors:
        fmt = blocks.FORMATS.get(t.type)
        if fmt is not None and len(t.shape) == 2:
            raw = np.fromfile(info.path, np.uint8, t.n_bytes, offset=info.data_offset + t.offset)
            out.append(blocks.levels(fmt, raw.reshape(-1, fmt.size)).reshape(-1).astype(np.int32))
    return np.concatenate(out)
