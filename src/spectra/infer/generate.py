"""Streaming generation over any engine (native packed or PyTorch): prefill, decode, stop rules, timing."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from spectra.errors import SpectraError
from spectra.infer.sampling import Sampler, SamplingConfig
from spectra.store.tokenizer import load_tokenizer  # noqa: F401  (the one tokenizer loader; generate's callers use it)


@dataclass
class GenerationResult:
    prompt_tokens: int = 0
    tokens: list[int] = field(default_factory=list)  # generated token ids (after stop handling)
    text: str = ""
    stop_reason: str = "length"  # length | eos | stop
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s > 0 else 0.0

    def summary(self) -> str:
        return (f"prefill {self.prompt_tokens} tokens in {self.prefill_s:.3f}s ({self.prefill_tps:.1f} tok/s); "
                f"decode {self.decode_steps} tokens in {self.decode_s:.3f}s ({self.decode_tps:.1f} tok/s); "
                f"stop: {self.stop_reason}")


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of a stop string (not yet safe to emit)."""
    n = 0
    for s in stops:
        for i in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:i]):
                n = max(n, i)
                break
    return n


def stream(engine, prompt_ids: Sequence[int], max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
           tokenizer=None, stop: Sequence[str] = (), eos_id: int | None = None,
           result: GenerationResult | None = None) -> Iterator[tuple[int | None, str]]:
    """Yield (token_id, new_text) as tokens are generated; fills ``result`` (timings, stop reason).

    Text is emitted only when it is final: an incomplete UTF-8 sequence or a possible
    start of a stop string is held back until resolved. Stop strings end generation and
    are not included in the output. Without a tokenizer, new_text is ''.
    """
    res = result if result is not None else GenerationResult()
    prompt_ids = [int(t) for t in prompt_ids]
    if not prompt_ids:
        raise SpectraError("the prompt is empty: give at least one token")
    if max_new_tokens < 0:
        raise SpectraError("max_new_tokens must be >= 0")
    if stop and tokenizer is None:
        raise SpectraError("stop strings need a tokenizer (the model directory has no tokenizer.json)")
    if len(prompt_ids) + max_new_tokens > engine.max_len:
        raise SpectraError(f"prompt ({len(prompt_ids)}) + max_new_tokens ({max_new_tokens}) exceeds the context "
                           f"length {engine.max_len}; lower --max-new-tokens or raise --max-len")
    sampler = Sampler(sampling)
    res.prompt_tokens = len(prompt_ids)
    engine.reset()
    t0 = time.perf_counter()
    logits = engine.forward(prompt_ids)
    res.prefill_s = time.perf_counter() - t0
    emitted = 0
    for i in range(max_new_tokens):
        tok = sampler(logits)
        if eos_id is not None and tok == eos_id:
            res.stop_reason = "eos"
            break
        res.tokens.append(tok)
        piece = ""
        if tokenizer is not None:
            text = tokenizer.decode(res.tokens)
            hit = min((text.find(s) for s in stop if s and s in text), default=-1)
            if hit >= 0:
                res.text, res.stop_reason = text[:hit], "stop"
                if hit > emitted:
                    yield tok, text[emitted:hit]
                break
            safe = len(text) - (1 if text.endswith("\ufffd") else 0)
            safe = min(safe, len(text) - _held_back(text, stop))
            if safe > emitted:
                piece, emitted = text[emitted:safe], safe
            res.text = text
        yield tok, piece
        if i + 1 < max_new_tokens:
            t1 = time.perf_counter()
            logits = engine.forward([tok])
            res.decode_s += time.perf_counter() - t1
            res.decode_steps += 1
    if tokenizer is not None and res.stop_reason != "stop":
        text = tokenizer.decode(res.tokens)
        res.text = text
        if len(text) > emitted:
            yield None, text[emitted:]


def generate(engine, prompt_ids: Sequence[int], max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
             tokenizer=None, stop: Sequence[str] = (), eos_id: int | None = None,
             on_text: Callable[[str], None] | None = None) -> GenerationResult:
    """Run :func:`stream` to the end; ``on_text`` receives text pieces as they become final."""
    res = GenerationResult()
    for _, piece in stream(engine, prompt_ids, max_new_tokens, sampling, tokenizer, stop, eos_id, res):
        if piece and on_text is not None:
            on_text(piece)
    return res
