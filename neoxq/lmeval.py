"""An lm-evaluation-harness model class backed directly by neoxq's runtime (no server): GGUF files
evaluated the way Pythia was, with the same tokenisation and windows as lm-eval's `hf` backend.

- tokens: the GPT-NeoX tokenizer's (NFC, no BOS) through `NeoxModel.tokenize`; the context/
  continuation split, empty contexts and trailing spaces are lm-eval's own (`TemplateLM`);
- loglikelihood: as HFLM: (context + continuation)[-(max_length+1):][:-1], the continuation's
  log-probs summed, greedy when every continuation token is the argmax. Requests whose (truncated)
  contexts are the same token for token, such as a multiple-choice question's choices, are scored
  in one batch: the context decoded once, its KV cells shared by the choices' sequences (up to
  SHARED_SEQUENCES at a time), each choice's continuation in its own sequence
  (`capi.WindowDecoder.decode_shared`). llama.cpp's sums depend on how many tokens a batch holds,
  so the log-likelihoods equal those of scoring each request alone (`batched=false`) to rounding,
  not bit for bit (docs/benchmarks.md measures both);
- loglikelihood_rolling: lm-eval's `get_rolling_token_windows` + `make_disjoint_window` with the EOT
  token as prefix and max_length = the model's context, as HFLM;
- generate_until: greedy decoding until a stop string or max_gen_toks.

Registration: importing this module registers the class as `neoxq` in lm-eval's model registry
(lm-eval's `register_model`), and the package declares it under the `lm_eval.models` entry-point
group for lm-eval versions that discover plugins. `python -m neoxq.lmeval …` runs lm-eval's own CLI
with the class registered: `python -m neoxq.lmeval run --model neoxq --model_args model=X.gguf --tasks …`.
"""

from __future__ import annotations

import lm_eval.models  # noqa: F401  lm-eval's own models first: it registers them only into an empty registry
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from collections import defaultdict

from neoxq.core.gguf_info import read_info
from neoxq.runtime.generate import SamplingOptions, generate
from neoxq.runtime.model import NeoxModel, RuntimeOptions
from neoxq.runtime.score import RowReducer


SHARED_SEQUENCES = 16  # choices scored together after one context (llama.cpp sequences)


@register_model("neoxq")
class NeoxqLM(TemplateLM):
    """lm-eval model over a GGUF file: `--model neoxq --model_args model=X.gguf[,ctx=N,threads=N,n_gpu_layers=N,batched=false]`."""

    backend = "causal"

    def __init__(
        self,
        model: str,
        ctx: int | None = None,
        threads: int | None = None,
        n_gpu_layers: int | None = None,
        max_gen_toks: int = 256,
        batched: bool | str = True,
        **kwargs,
    ):
        super().__init__()
        self.path = str(model)

        info = read_info(self.path)
        self._max_length = int(ctx or info.context_length or 2048)
        self.batched = str(batched).lower() not in ("false", "0", "no")
        options = RuntimeOptions(n_ctx=self._max_length, n_batch=self._max_length, n_threads=threads, n_gpu_layers=n_gpu_layers)
        if self.batched:
            options.n_seq, options.kv_unified = SHARED_SEQUENCES, True
        self.model = NeoxModel(self.path, options, info=info)
        self.reducer = RowReducer(self.model.n_vocab, threads)
        eos = info.metadata.get("tokenizer.ggml.eos_token_id")
        self._eot = int(eos) if eos is not None else 0
        self.max_gen_toks = int(max_gen_toks)

    def close(self) -> None:
        self.model.close()
        self.reducer.close()

    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.model.tokenize(string)

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.model.detokenize(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probs, greedy) per request, in the requests' order."""
        split = [self._split(context_enc, continuation_enc) for _, context_enc, continuation_enc in requests]
        out: list = [None] * len(split)
        if not self.batched:
            for i, (prefix, cont) in enumerate(split):
                inp = prefix + cont[:-1]
                rows = self.model.eval_logits(inp, range(len(prefix) - 1, len(inp)))
                out[i] = self._verdicts(rows, [(np.arange(len(cont)), cont)])[0]
            return out
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, (prefix, _) in enumerate(split):
            groups[tuple(prefix)].append(i)
        for prefix, members in groups.items():
            for chunk in self._chunks(len(prefix), members, split):
                conts = [split[i][1] for i in chunk]
                rows = self.model.decoder.decode_shared(np.asarray(prefix, dtype=np.int32), [np.asarray(c[:-1], dtype=np.int32) for c in conts])
                starts = np.cumsum([1] + [len(c) - 1 for c in conts])
                spans = [(np.r_[0, np.arange(a, a + len(c) - 1)], c) for a, c in zip(starts, conts)]
                for i, v in zip(chunk, self._verdicts(rows, spans)):
                    out[i] = v
        return out

    def _verdicts(self, rows: np.ndarray, spans: list[tuple[np.ndarray, list[int]]]) -> list[tuple[float, bool]]:
        """lm-eval's answer per continuation: the log-probs of its tokens summed (each from the row
        that predicts it, `spans` giving the rows), and whether each token is its row's argmax."""
        shift = np.zeros(len(rows), dtype=np.int64)
        for idx, cont in spans:
            shift[idx] = cont
        lse, _, arg = self.reducer(rows, shift_at=shift, argmax=True)
        out = []
        for idx, cont in spans:
            t = np.asarray(cont)
            out.append((float((rows[idx, t] - lse[idx]).sum()), bool((arg[idx] == t).all())))
        return out

    def _split(self, context_enc: list[int], continuation_enc: list[int]) -> tuple[list[int], list[int]]:
        """HFLM's window: (context + continuation)[-(max_length+1):], as (the context part, the
        continuation); the last token is never an input."""
        whole = (context_enc + continuation_enc)[-(self.max_length + 1) :]
        n_cont = min(len(continuation_enc), len(whole) - 1)
        return whole[:-n_cont], whole[-n_cont:]

    def _chunks(self, n_prefix: int, members: list[int], split) -> list[list[int]]:
        """Members in groups that fit one batch: the prefix and their tails within the batch (and
        the context's cells), at most SHARED_SEQUENCES of them."""
        chunks, cur, used = [], [], n_prefix
        for i in members:
            tail = len(split[i][1]) - 1
            if cur and (used + tail > self.model.n_batch or len(cur) == SHARED_SEQUENCES):
                chunks.append(cur)
                cur, used = [], n_prefix
            cur.append(i)
            used += tail
        return chunks + [cur]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils

        out = []
        for (string,) in (r.args for r in requests):
            windows = map(
                utils.make_disjoint_window,
                utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1
                ),
            )
            out.append(sum(ll for ll, _ in self._loglikelihood_tokens([(None, c, t) for c, t in windows])))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for context, kwargs in (r.args for r in requests):
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            n = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            ids = self.tok_encode(context)[-(self.max_length - n) :]
            opts = SamplingOptions(max_tokens=n, temperature=0.0, top_k=1, repeat_penalty=1.0, stop=until)
            text = "".join(generate(self.model, ids, opts))  # the truncated tokens as they are, as HFLM does
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out


def main() -> None:
    """lm-eval's own command line, with the `neoxq` model class registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
