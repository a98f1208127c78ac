"""The BPE tokenizer (tokenizer.json) → llama.cpp's gpt2-style vocabulary in GGUF: the token list
and types here (gguf's TokenType), merges and special token ids by gguf's own SpecialVocab, as
llama.cpp's convert_hf_to_gguf.py reads them."""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from gguf import SpecialVocab, TokenType

from neoxq.core.errors import CorruptFileError, SourceError, UnsupportedModelError

# llama.cpp recognises the GPT-NeoX-20B tokenizer (Pythia's, also OLMo's) under this pre-tokenizer
# name: GPT-2's split regex, no prefix space.
PRE_TOKENIZER = "olmo"
SPECIAL_TYPES = ("bos", "eos", "unk", "pad")


@dataclass
class Vocab:
    tokens: list[str]
    types: list[TokenType]
    special: SpecialVocab  # merges, special token ids, add_bos/add_eos: written by its add_to_gguf
    n_real: int  # tokens the tokenizer knows; the rest pad the embedding to vocab_size

    @property
    def merges(self) -> list[str]:
        return self.special.merges

    def special_id(self, kind: str) -> int | None:
        return self.special.special_token_ids.get(kind)


def load_vocab(folder: Path, vocab_size: int) -> Vocab:
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
    types: dict[int, TokenType] = {i: TokenType.NORMAL for i in by_id}
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
    n_real = max(by_id) + 1
    if n_real > vocab_size:
        raise CorruptFileError(
            f"the tokenizer has {n_real} tokens but the model only {vocab_size} embedding rows; the tokenizer belongs to another model"
        )

    tokens, tok_types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            tok_types.append(types[i])
        else:  # embedding rows past the tokenizer (Pythia pads 50277 → 50304 …): never produced
            tokens.append(f"[PAD{i}]")
            tok_types.append(TokenType.UNUSED)
    return Vocab(tokens, tok_types, _special(folder, vocab_size), n_real=n_real)


def _special(folder: Path, n_vocab: int) -> SpecialVocab:
    """gguf's SpecialVocab over the checkpoint's tokenizer files and config.json (bad files: one line);
    GPT-NeoX adds no BOS or EOS to a prompt, whatever the files say."""
    try:
        with _quiet_gguf():
            special = SpecialVocab(folder, load_merges=True, special_token_types=SPECIAL_TYPES, n_vocab=n_vocab)
    except (ValueError, TypeError, AttributeError, KeyError, IndexError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise CorruptFileError(
            f"{folder}: a tokenizer file is not valid ({type(exc).__name__}: {str(exc)[:80]}); re-download the tokenizer files"
        ) from exc
    special.add_special_token.update(bos=False, eos=False)
    return special


@contextlib.contextmanager
def _quiet_gguf():
    """gguf logs what it skips (an id out of range) as warnings; neoxq's output is its own."""
    log = logging.getLogger("gguf")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)
