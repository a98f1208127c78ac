"""Build small GPT-NeoX checkpoints locally, offline: a byte-level BPE tokenizer trained on text
every Python install has (the standard library's docstrings), random or briefly trained weights,
and the checkpoint layouts real hubs carry (config styles, safetensors/sharded/.bin, dtypes).

Used by the test suite, `neoxq demo` and scripts/bench_convert.py. Needs the convert extra.
"""

from __future__ import annotations

import ast
import json
import shutil
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

SPECIAL = ["<|endoftext|>", "<|padding|>"]
# Like Pythia's whitespace-run tokens: added, not special (llama.cpp: USER_DEFINED).
ADDED = ["  ", "    ", "        "]


def stdlib_text(max_chars: int = 400_000) -> str:
    """Docstrings of the standard library, in a fixed order: offline English prose and code."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: list[str] = []
    total = 0
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    parts.append(doc.strip())
                    total += len(doc)
        if total >= max_chars:
            break
    return "\n\n".join(parts)[:max_chars]


def train_tokenizer(folder: Path, text: str, vocab_size: int = 512) -> int:
    """Train and save a GPT-NeoX-style tokenizer (NFC, byte-level BPE); return its token count."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(text.split("\n\n"), trainer)
    tok.add_tokens(ADDED)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "GPTNeoXTokenizer",
                "bos_token": SPECIAL[0],
                "eos_token": SPECIAL[0],
                "unk_token": SPECIAL[0],
                "add_bos_token": False,
                "add_eos_token": False,
                "model_max_length": 2048,
                "clean_up_tokenization_spaces": False,
            },
            indent=1,
        )
    )
    return tok.get_vocab_size(with_added_tokens=True)


@dataclass
class TinySpec:
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 256
    max_position_embeddings: int = 512
    rotary_pct: float = 0.25
    use_parallel_residual: bool = True
    tie_word_embeddings: bool = False
    vocab_pad: int = 37  # embedding rows beyond the tokenizer, like Pythia's 50277 → 50304
    config_style: str = "hf4"  # "hf4": rotary_pct/rotary_emb_base/torch_dtype; "hf5": rope_parameters/dtype
    weights: str = "safetensors"  # "safetensors" | "sharded" | "bin" | "sharded-bin"
    dtype: str = "float32"  # float32 | float16 | bfloat16
    scale: float = 12.0  # multiply the default init so logits are far from uniform
    seed: int = 0
    extra: dict = field(default_factory=dict)


def build_config(spec: TinySpec, vocab_size: int):
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position_embeddings,
        rotary_pct=spec.rotary_pct,
        partial_rotary_factor=spec.rotary_pct,
        rotary_emb_base=10000,
        use_parallel_residual=spec.use_parallel_residual,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=0,
        eos_token_id=0,
        hidden_act="gelu",
        attn_implementation="eager",
    )


def random_model(spec: TinySpec, vocab_size: int):
    import torch
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(spec.seed)
    model = GPTNeoXForCausalLM(build_config(spec, vocab_size)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.1)  # non-trivial norms, so a swapped weight/bias shows
            elif p.ndim == 2:
                p.mul_(spec.scale)
            else:
                p.copy_(torch.randn_like(p) * 0.05)
    return model


def save_checkpoint(model, folder: Path, spec: TinySpec) -> Path:
    """Save in the layout and config style the spec asks for; the tokenizer must be there already."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    dtype = getattr(torch, spec.dtype)
    model = model.to(dtype)
    folder.mkdir(parents=True, exist_ok=True)
    if spec.weights in ("safetensors", "sharded"):
        model.save_pretrained(folder, max_shard_size="100KB" if spec.weights == "sharded" else "10GB")
    else:
        _save_bin(model, folder, sharded=spec.weights == "sharded-bin")
        model.config.save_pretrained(folder)
    rewrite_config(folder / "config.json", spec)
    return folder


def _save_bin(model, folder: Path, sharded: bool) -> None:
    """Pythia-style pytorch_model.bin, with the buffers real Pythia .bin files carry."""
    import torch

    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    n = model.config.max_position_embeddings
    for i in range(model.config.num_hidden_layers):
        p = f"gpt_neox.layers.{i}.attention."
        sd[p + "bias"] = torch.tril(torch.ones(n, n, dtype=torch.bool)).view(1, 1, n, n)
        sd[p + "masked_bias"] = torch.tensor(-1e9)
        sd[p + "rotary_emb.inv_freq"] = torch.ones(4)
    if not sharded:
        torch.save(sd, folder / "pytorch_model.bin")
        return
    keys = list(sd)
    half = len(keys) // 2
    weight_map = {}
    for j, part in enumerate((keys[:half], keys[half:]), start=1):
        fname = f"pytorch_model-{j:05d}-of-00002.bin"
        torch.save({k: sd[k] for k in part}, folder / fname)
        weight_map |= {k: fname for k in part}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def rewrite_config(path: Path, spec: TinySpec) -> None:
    """Write exactly one config style, whatever the installed transformers produced."""
    cfg = json.loads(path.read_text())
    for k in ("rotary_pct", "rotary_emb_base", "rope_theta", "rope_parameters", "partial_rotary_factor", "torch_dtype", "dtype", "rope_scaling"):
        cfg.pop(k, None)
    if spec.config_style == "hf4":
        cfg |= {
            "rotary_pct": spec.rotary_pct,
            "rotary_emb_base": 10000,
            "torch_dtype": spec.dtype,
            "rope_scaling": None,
            "transformers_version": "4.24.0",
        }
    else:
        cfg |= {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": spec.rotary_pct}, "dtype": spec.dtype}
    cfg |= spec.extra
    path.write_text(json.dumps(cfg, indent=2))


def build_random(folder: Path, spec: TinySpec | None = None, text: str | None = None) -> Path:
    """Tokenizer + randomly initialised (scaled) GPT-NeoX saved in `folder`."""
    spec = spec or TinySpec()
    n_tok = train_tokenizer(folder, text if text is not None else stdlib_text(150_000))
    model = random_model(spec, n_tok + spec.vocab_pad)
    return save_checkpoint(model, folder, spec)


def add_outlier_channels(model, n: int = 4, scale: float = 24.0, seed: int = 0) -> None:
    """Give the activations a few outlier channels, as real LLMs have, without changing the function:
    a LayerNorm's channel is multiplied by `scale` and the next matmul's input column divided by it.
    This is what makes importance matrices matter (small weights that meet large activations)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.gpt_neox.layers:
            for norm, linear in ((layer.input_layernorm, layer.attention.query_key_value), (layer.post_attention_layernorm, layer.mlp.dense_h_to_4h)):
                ch = torch.randperm(norm.weight.numel(), generator=g)[:n]
                norm.weight[ch] *= scale
                norm.bias[ch] *= scale
                linear.weight[:, ch] /= scale


def build_trained(
    folder: Path,
    spec: TinySpec | None = None,
    text: str | None = None,
    steps: int = 200,
    ctx: int = 128,
    batch: int = 16,
    lr: float = 3e-3,
    log=None,
    outliers: bool = True,
) -> Path:
    """A briefly trained model (seconds to a minute on 2 cores): quality numbers mean something."""
    import torch

    spec = spec or TinySpec(hidden_size=128, num_hidden_layers=4, intermediate_size=512, scale=1.0)
    text = text if text is not None else stdlib_text()
    n_tok = train_tokenizer(folder, text)
    from tokenizers import Tokenizer

    ids = torch.tensor(Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text).ids)
    model = random_model(spec, n_tok + spec.vocab_pad).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(spec.seed)
    for step in range(steps):
        loss = _train_step(model, opt, ids, ctx, batch, gen)
        sched.step()
        if log and (step % 50 == 0 or step == steps - 1):
            log(step, loss)
    model.eval()
    if outliers:
        add_outlier_channels(model, seed=spec.seed)
    return save_checkpoint(model, folder, spec)


def build_training_run(
    root: Path, spec: TinySpec, text: str, save_steps: list[int], ctx: int = 64, batch: int = 8, lr: float = 3e-3, log=None
) -> dict[int, Path]:
    """One training run saving checkpoints at `save_steps` (0 = the initialisation), each a complete
    checkpoint folder sharing one tokenizer: a Pythia-like training dimension, in seconds."""
    import torch
    from tokenizers import Tokenizer

    tok_dir = root / "tokenizer"
    n_tok = train_tokenizer(tok_dir, text)
    ids = torch.tensor(Tokenizer.from_file(str(tok_dir / "tokenizer.json")).encode(text).ids)
    model = random_model(spec, n_tok + spec.vocab_pad).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(spec.seed)
    saved: dict[int, Path] = {}

    def save(step: int) -> None:
        folder = root / f"step{step}"
        for f in ("tokenizer.json", "tokenizer_config.json"):
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(tok_dir / f, folder / f)
        model.eval()
        save_checkpoint(model, folder, spec)
        model.train()
        saved[step] = folder

    for step in range(max(save_steps) + 1):
        if step in save_steps:
            save(step)
        if step == max(save_steps):
            break
        loss = _train_step(model, opt, ids, ctx, batch, gen)
        if log and step % 25 == 0:
            log(step, loss)
    return saved


def _train_step(model, opt, ids, ctx: int, batch: int, gen) -> float:
    """One AdamW step of next-token prediction on `batch` random windows of `ctx` tokens."""
    import torch

    starts = torch.randint(0, len(ids) - ctx - 1, (batch,), generator=gen)
    x = torch.stack([ids[s : s + ctx] for s in starts])
    loss = model(input_ids=x, labels=x).loss
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()
