"""OpenAI request validation and response bodies (completions, chat completions), free of any web framework.

Every invalid field raises :class:`APIError` with the HTTP status and the OpenAI error
body ``{"error": {"message", "type", "param", "code"}}`` that the client libraries map
to their typed exceptions (400 BadRequestError, 404 NotFoundError, 429 RateLimitError).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from spectra.errors import SpectraError
from spectra.infer.sampling import SamplingConfig
from spectra.serve.scheduler import Params

MAX_LOGPROBS = 20
MAX_STOPS = 16


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


@dataclass
class Parsed:
    prompts: list[list[int]]
    params: Params
    stream: bool
    include_usage: bool
    return_token_ids: bool
    chat_logprobs: bool = False  # chat: logprobs=true (content list) vs completions' logprobs=int


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _opt(body: dict, key: str, check, what: str, default=None):
    v = body.get(key)
    if v is None:
        return default
    if not check(v):
        raise bad(f"'{key}' must be {what}, got {v!r}"[:300], key)
    return v


def check_model(body: dict, model_id: str) -> None:
    m = body.get("model")
    if m is None:
        return
    if not isinstance(m, str):
        raise bad("'model' must be a string", "model")
    if m != model_id:
        raise APIError(404, f"The model '{m[:200]}' does not exist; this server serves '{model_id}' (GET /v1/models)",
                       "invalid_request_error", "model", "model_not_found")


def _sampling(body: dict) -> SamplingConfig:
    temperature = float(_opt(body, "temperature", lambda v: _is_num(v) and 0 <= v <= 2, "a number in [0, 2]", 1.0))
    top_p = float(_opt(body, "top_p", lambda v: _is_num(v) and 0 < v <= 1, "a number in (0, 1]", 1.0))
    top_k = int(_opt(body, "top_k", lambda v: _is_int(v) and v >= -1, "an integer >= -1 (-1 or 0: off)", 0))
    seed = _opt(body, "seed", lambda v: _is_int(v) and -(2**63) <= v < 2**64, "an integer", None)
    if seed is not None and seed < 0:
        seed &= (1 << 64) - 1  # numpy seeds are unsigned: keep negative seeds distinct and valid
    return SamplingConfig(temperature, max(top_k, 0), top_p, seed)


def _stops(body: dict, default: tuple[str, ...] = ()) -> tuple[str, ...]:
    s = body.get("stop")
    if s is None:
        return default
    if isinstance(s, str):
        s = [s]
    if not isinstance(s, list) or not all(isinstance(x, str) and x for x in s) or len(s) > MAX_STOPS:
        raise bad(f"'stop' must be a non-empty string or a list of at most {MAX_STOPS} non-empty strings", "stop")
    return tuple(s)


def _unsupported(body: dict) -> None:
    n = body.get("n")
    if n is not None and n != 1:
        raise bad("only n=1 is supported (send several requests, or several prompts)", "n")
    best_of = body.get("best_of")
    if best_of is not None and best_of != 1:
        raise bad("best_of is not supported", "best_of")
    if body.get("echo"):
        raise bad("echo is not supported", "echo")
    for key in ("presence_penalty", "frequency_penalty"):
        v = body.get(key)
        if v not in (None, 0, 0.0):
            raise bad(f"'{key}' is not supported (only 0)", key)
    if body.get("logit_bias"):
        raise bad("logit_bias is not supported", "logit_bias")
    if body.get("tools"):
        raise bad("tools are not supported by this server", "tools")


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = _opt(body, "stream", lambda v: isinstance(v, bool), "true or false", False)
    so = body.get("stream_options")
    if so is None:
        return stream, False
    if not stream:
        raise bad("'stream_options' is only allowed with stream=true", "stream_options")
    if not isinstance(so, dict) or not isinstance(so.get("include_usage", False), bool):
        raise bad("'stream_options' must be an object like {\"include_usage\": true}", "stream_options")
    return stream, bool(so.get("include_usage", False))


def _max_tokens(body: dict, key: str, prompt_lens: list[int], max_len: int, default: int | None) -> int:
    v = body.get(key)
    if v is None:
        if default is None:  # chat: as much as the context leaves
            return max(1, max_len - max(prompt_lens))
        v = default
    elif not _is_int(v) or v < 1:
        raise bad(f"'{key}' must be an integer >= 1, got {v!r}"[:200], key)
    longest = max(prompt_lens)
    if longest + v > max_len:
        raise bad(f"This model's maximum context length is {max_len} tokens. However, you requested "
                  f"{longest + v} tokens ({longest} in the prompt, {v} for the completion). "
                  f"Please reduce the prompt or '{key}'.", key, "context_length_exceeded")
    return int(v)


def check_prompt_fits(prompt_lens: list[int], max_len: int, param: str) -> None:
    longest = max(prompt_lens)
    if longest >= max_len:
        raise bad(f"This model's maximum context length is {max_len} tokens. However, your prompt has "
                  f"{longest} tokens (at least one must be left for the completion).", param, "context_length_exceeded")


def tokenize_prompt(prompt, tokenizer, vocab_size: int, param: str = "prompt") -> list[list[int]]:
    """OpenAI ``prompt``: a string, a list of token ids, or a list of either -> one token list per prompt."""

    def ids(p, where: str) -> list[int]:
        if isinstance(p, str):
            if tokenizer is None:
                raise bad(f"{where}: this model has no tokenizer (tokenizer.json); send token ids instead", param)
            out = tokenizer.encode(p).ids
        elif isinstance(p, list) and all(_is_int(t) for t in p):
            out = list(p)
            badtok = next((t for t in out if not 0 <= t < vocab_size), None)
            if badtok is not None:
                raise bad(f"{where}: token id {badtok} is outside the vocabulary (0..{vocab_size - 1})", param)
        else:
            raise bad(f"{where} must be a string or a list of token ids", param)
        if not out:
            raise bad(f"{where} is empty: give at least one token", param)
        return out

    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        return [ids(p, f"{param}[{i}]") for i, p in enumerate(prompt)]
    if prompt is None:
        raise bad(f"'{param}' is required", param)
    return [ids(prompt, param)]


def parse_completion(body: dict, *, tokenizer, vocab_size: int, max_len: int) -> Parsed:
    _unsupported(body)
    if body.get("suffix"):
        raise bad("suffix is not supported", "suffix")
    prompts = tokenize_prompt(body.get("prompt"), tokenizer, vocab_size)
    if len(prompts) > 64:
        raise bad(f"at most 64 prompts per request, got {len(prompts)}", "prompt")
    lens = [len(p) for p in prompts]
    check_prompt_fits(lens, max_len, "prompt")
    lp = _opt(body, "logprobs", lambda v: _is_int(v) and 0 <= v <= MAX_LOGPROBS,
              f"an integer in [0, {MAX_LOGPROBS}]", None)
    stream, usage = _stream_flags(body)
    params = Params(_max_tokens(body, "max_tokens", lens, max_len, 16), _sampling(body), _stops(body), lp,
                    bool(_opt(body, "ignore_eos", lambda v: isinstance(v, bool), "true or false", False)))
    return Parsed(prompts, params, stream, usage,
                  bool(_opt(body, "return_token_ids", lambda v: isinstance(v, bool), "true or false", False)))


def parse_chat(body: dict, *, template, tokenizer, vocab_size: int, max_len: int) -> Parsed:
    _unsupported(body)
    if tokenizer is None:
        raise bad("this model has no tokenizer (tokenizer.json); chat needs one (use /v1/completions with token ids)",
                  "messages")
    try:
        text = template.render(body.get("messages"))
    except SpectraError as e:
        raise bad(str(e), "messages") from None
    prompts = tokenize_prompt(text, tokenizer, vocab_size, "messages")
    lens = [len(prompts[0])]
    check_prompt_fits(lens, max_len, "messages")
    want_lp = _opt(body, "logprobs", lambda v: isinstance(v, bool), "true or false", False)
    top = _opt(body, "top_logprobs", lambda v: _is_int(v) and 0 <= v <= MAX_LOGPROBS,
               f"an integer in [0, {MAX_LOGPROBS}]", None)
    if top is not None and not want_lp:
        raise bad("'top_logprobs' needs logprobs=true", "top_logprobs")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    stream, usage = _stream_flags(body)
    params = Params(_max_tokens(body, key, lens, max_len, None), _sampling(body), _stops(body, template.default_stop),
                    (top or 0) if want_lp else None,
                    bool(_opt(body, "ignore_eos", lambda v: isinstance(v, bool), "true or false", False)))
    return Parsed(prompts, params, stream, usage,
                  bool(_opt(body, "return_token_ids", lambda v: isinstance(v, bool), "true or false", False)),
                  chat_logprobs=bool(want_lp))


# ------------------------------------------------------------------ response pieces
def token_str(tokenizer, tok: int) -> str:
    return tokenizer.decode([tok]) if tokenizer is not None else f"token_id:{tok}"


def completion_logprobs(tokenizer, events, offset0: int = 0) -> dict:
    """OpenAI legacy completions ``logprobs`` object of a run of TokenEvents."""
    tokens, lps, tops, offs = [], [], [], []
    off = offset0
    for ev in events:
        s = token_str(tokenizer, ev.token)
        tokens.append(s)
        lps.append(ev.logprob)
        tops.append({token_str(tokenizer, t): lp for t, lp in (ev.top or [])})
        offs.append(off)
        off += len(ev.text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}


def chat_logprobs(tokenizer, events) -> dict:
    def entry(t, lp):
        s = token_str(tokenizer, t)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

    return {"content": [dict(entry(ev.token, ev.logprob), top_logprobs=[entry(t, lp) for t, lp in (ev.top or [])])
                        for ev in events]}


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


__all__ = ["APIError", "Parsed", "bad", "chat_logprobs", "check_model", "completion_logprobs", "parse_chat",
           "parse_completion", "token_str", "tokenize_prompt", "usage"]
