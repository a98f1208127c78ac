"""An OpenAI completion request, validated: every parameter OpenAI defines is honoured or refused
with a 400 naming it (never silently ignored), numbers are checked by SamplingOptions (the one
statement of their ranges, shared with `neoxq run`), and text must be valid Unicode.

Honoured: prompt (one), max_tokens, temperature, top_p, frequency_penalty, presence_penalty, seed,
stop, echo, logprobs, logit_bias, stream (server-sent events) with stream_options.include_usage,
n = 1, best_of = 1; `model` and `user` are accepted (one model is served; `user` is a label).
llama.cpp's extensions top_k, min_p and repeat_penalty are honoured. Refused: n or best_of above 1,
suffix, stream_options without stream or with another key; any other key is unknown.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from pydantic import BaseModel, ConfigDict, ValidationError

from neoxq.core.errors import UsageError
from neoxq.core.numbers import check_number

from .generate import SamplingOptions


class _Body(BaseModel):
    # strict: "5" is not 5 and "true" is not true, as in OpenAI's API; unknown keys are refused
    model_config = ConfigDict(extra="forbid", strict=True)
    model: Optional[str] = None
    prompt: Union[str, list[str]] = ""
    max_tokens: Optional[int] = 16
    temperature: Optional[float] = 1.0
    top_p: Optional[float] = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    frequency_penalty: Optional[float] = 0.0
    presence_penalty: Optional[float] = 0.0
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    echo: Optional[bool] = False
    logprobs: Optional[int] = None
    logit_bias: Optional[dict[str, float]] = None
    n: Optional[int] = 1
    best_of: Optional[int] = None
    suffix: Optional[str] = None
    stream: Optional[bool] = False
    stream_options: Optional[dict] = None
    user: Optional[str] = None


REFUSED = {
    "n": lambda v: v not in (None, 1) and "n={v}: this server returns one choice per request; send n=1 (or none) and repeat the request",
    "best_of": lambda v: v not in (None, 1) and "best_of={v}: this server samples one completion; send best_of=1 (or none)",
    "suffix": lambda v: v is not None and "suffix: a left-to-right model cannot insert text before a suffix; leave it out",
    "stream_options": lambda v: (
        v is not None and set(v) - {"include_usage"} and "stream_options={v}: the one option is include_usage; leave the others out"
    ),
}


@dataclass
class Request:
    prompt: str
    echo: bool
    logprobs: int | None
    sampling: SamplingOptions
    logit_bias: dict[int, float] = field(default_factory=dict)
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage


def parse_request(body, n_vocab: int) -> Request:
    """The request as we run it; a UsageError naming the first thing wrong (the server's 400)."""
    if not isinstance(body, dict):
        raise UsageError("the request body must be a JSON object")
    try:
        b = _Body.model_validate(body)
    except ValidationError as exc:
        raise UsageError(_first_error(exc)) from None
    for key, refuse in REFUSED.items():
        reason = refuse(getattr(b, key))
        if reason:
            raise UsageError(reason.format(v=getattr(b, key)))
    prompt = b.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise UsageError(f"prompt: {len(prompt)} prompts in one request; send one prompt per request")
        prompt = prompt[0]
    stop = [b.stop] if isinstance(b.stop, str) else list(b.stop or [])
    for name, text in [("prompt", prompt)] + [("stop", s) for s in stop]:
        _check_unicode(name, text)
    if b.stream_options is not None and not b.stream:
        raise UsageError("stream_options: only with stream: true; leave it out or ask for a stream")
    include_usage = (b.stream_options or {}).get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise UsageError(f"stream_options.include_usage: must be true or false (got {include_usage!r})")
    if b.logprobs is not None and not 0 <= b.logprobs <= 20:
        raise UsageError(f"logprobs {b.logprobs} is out of range; pass an integer from 0 to 20")
    sampling = SamplingOptions(
        max_tokens=16 if b.max_tokens is None else b.max_tokens,
        temperature=1.0 if b.temperature is None else b.temperature,
        top_k=b.top_k,
        top_p=1.0 if b.top_p is None else b.top_p,
        min_p=b.min_p,
        repeat_penalty=b.repeat_penalty,
        frequency_penalty=b.frequency_penalty or 0.0,
        presence_penalty=b.presence_penalty or 0.0,
        seed=b.seed,
        stop=stop,
    ).checked()
    return Request(prompt, bool(b.echo), b.logprobs, sampling, _logit_bias(b.logit_bias or {}, n_vocab), bool(b.stream), include_usage)


def _logit_bias(raw: dict[str, float], n_vocab: int) -> dict[int, float]:
    out = {}
    for key, value in raw.items():
        if not key.isdigit() or not 0 <= int(key) < n_vocab:
            raise UsageError(f"logit_bias: {key!r} is not a token id of this model (0 to {n_vocab - 1})")
        out[int(key)] = float(check_number(value, f"logit_bias[{key}]", -100.0, 100.0))
    return out


def _check_unicode(name: str, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UsageError(f"{name} holds an unpaired surrogate ({text[exc.start]!a}); send valid Unicode text") from None


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"][:1]) or "body"
    if err["type"] == "extra_forbidden":
        known = ", ".join(_Body.model_fields)
        return f"unknown parameter {where!r}; this server takes {known}"
    return f"{where}: {err['msg'].lower()} (got {err.get('input')!r})"
