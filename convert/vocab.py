"""The BPE tokenizer (tokenizer.json) → llama.cpp's gpt2-style vocabulary in GGUF."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from neoxq.core.errors import CorruptFileError, SourceError, UnsupportedModelError

# llama.cpp recognises the GPT-NeoX-20B tokenizer (Pythia's, also OLMo's) under this pre-tokenizer
# name: GPT-2's split regex, no prefix space.
PRE_TOKENIZER = "olmo"

# gguf.TokenType values, named here so the module imports without gguf's heavy paths.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED = 1, 2, 3, 4, 5


@dataclass
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    n_real: int  # tokens the tokenizer knows; the rest pad the embedding to vocab_size


def load_vocab(folder: Path, vocab_size: int, config: dict) -> Vocab:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise SourceError(f"{folder} has no tokenizer.json; download it with the checkpoint (GPT-NeoX uses a fast BPE tokenizer)")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        model = spec["model"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"{path} is not a valid tokenizer.json; re-download it") from exc
    if model.get("type") != "BPE":
        raise UnsupportedModelError(f"tokenizer model {model.get('type')!r} is not supported; GPT-NeoX uses BPE")

    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    types: dict[int, int] = {i: NORMAL for i in by_id}
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    n_real = max(by_id) + 1
    if n_real > vocab_size:
        raise CorruptFileError(f"the tokenizer has {n_real} tokens but the model only {vocab_size} embedding rows; the tokenizer belongs to another model")

    tokens, tok_types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            tok_types.append(types[i])
        else:  # embedding rows past the tokenizer (Pythia pads 50277 → 50304 …): never produced
            tokens.append(f"[PAD{i}]")
            tok_types.append(UNUSED)

    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    special = _special_ids(folder, config, model["vocab"], spec)
    return Vocab(tokens, tok_types, merges, n_real=n_real, **special)


def _special_ids(folder: Path, config: dict, vocab: dict, spec: dict) -> dict:
    """bos/eos/unk/pad from config.json ids, else tokenizer_config's token strings."""
    ids = {t["content"]: t["id"] for t in spec.get("added_tokens", [])} | vocab
    tok_cfg = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        p = folder / name
        if p.is_file():
            try:
                loaded = json.loads(p.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise CorruptFileError(f"{p} is not valid JSON ({exc}); re-download it") from exc
            if not isinstance(loaded, dict):
                raise CorruptFileError(f"{p} is not a JSON object; re-download it")
            tok_cfg = {**loaded, **tok_cfg}

    def lookup(kind: str) -> int | None:
        if isinstance(config.get(f"{kind}_token_id"), int):
            return config[f"{kind}_token_id"]
        tok = tok_cfg.get(f"{kind}_token")
        if isinstance(tok, dict):
            tok = tok.get("content")
        return ids.get(tok) if isinstance(tok, str) else None

    return {f"{k}_id": lookup(k) for k in ("bos", "eos", "unk", "pad")}
