"""An lm-evaluation-harness model class backed directly by neoxq's runtime (no server): GGUF files
evaluated the way Pythia was, with the same tokenisation and windows as lm-eval's `hf` backend.

- tokens: the GPT-NeoX tokenizer's (NFC, no BOS) through `NeoxModel.tokenize`; the context/
  continuation split, empty contexts and trailing spaces are lm-eval's own (`TemplateLM`);
- loglikelihood: as HFLM: (context + continuation)[-(max_length+1):][:-1], the continuation's
  log-probs summed, greedy when every continuation token is the argmax;
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

from neoxq.core.gguf_info import read_info
from neoxq.runtime.generate import SamplingOptions, generate
from neoxq.runtime.model import NeoxModel, RuntimeOptions
from neoxq.runtime.score import log_softmax


@register_model("neoxq")
class NeoxqLM(TemplateLM):
    """lm-eval model over a GGUF file: `--model neoxq --model_args model=X.gguf[,ctx=N,threads=N,n_gpu_layers=N]`."""

    backend = "causal"

    def __init__(
        self, model: str, ctx: int | None = None, threads: int | None = None, n_gpu_layers: int | None = None, max_gen_toks: int = 256, **kwargs
    ):
        super().__init__()
        self.path = str(model)

        info = read_info(self.path)
        self._max_length = int(ctx or info.context_length or 2048)
        self.model = NeoxModel(
            self.path, RuntimeOptions(n_ctx=self._max_length, n_batch=self._max_length, n_threads=threads, n_gpu_layers=n_gpu_layers), info=info
        )
        eos = info.metadata.get("tokenizer.ggml.eos_token_id")
        self._eot = int(eos) if eos is not None else 0
        self.max_gen_toks = int(max_gen_toks)

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
        out = []
        for _, context_enc, continuation_enc in requests:
            whole = (context_enc + continuation_enc)[-(self.max_length + 1) :]
            inp, n_cont = whole[:-1], len(continuation_enc)
            targets = np.asarray(whole[-n_cont:])
            positions = range(len(inp) - n_cont, len(inp))
            lp = log_softmax(self.model.eval_logits(inp, positions))
            rows = np.arange(n_cont)
            out.append((float(lp[rows, targets].sum()), bool((lp.argmax(-1) == targets).all())))
        return out

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
