"""Continuous batching over a :class:`~spectra.infer.batch.BatchEngine`, in one thread of its own.

Each loop iteration is one engine step. At a step boundary the scheduler

1. drops requests whose client went away (``Request.cancel``) and frees their slots;
2. admits waiting requests (FIFO) while a slot is free and fewer than ``parallel`` run;
3. builds the step under the token budget (``engine.max_step_tokens``): first one token
   for every decoding sequence, so running streams keep their pace, then chunks of the
   prompts still being prefilled, oldest first, with whatever budget is left;
4. runs the step, samples each finished-prefill/decode item, runs stop rules and sends
   events to the request's ``on_event`` callback (called from this thread; the server
   hands them to its event loop).

A bounded waiting queue makes :meth:`Scheduler.submit` raise :class:`QueueFull` (HTTP 429).
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from spectra.errors import SpectraError
from spectra.infer.sampling import Sampler, SamplingConfig
from spectra.serve.metrics import Metrics


class QueueFull(SpectraError):
    """The waiting queue is at its bound."""


class Draining(SpectraError):
    """The server is shutting down and takes no new requests."""


@dataclass
class Params:
    max_tokens: int
    sampling: SamplingConfig = SamplingConfig()
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: off; k >= 0: the sampled token's logprob plus k alternatives
    ignore_eos: bool = False


@dataclass
class TokenEvent:
    token: int
    text: str  # text that became final with this token ('' while held back)
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


@dataclass
class FinishEvent:
    reason: str  # stop | length | abort | error
    text: str = ""  # any remaining final text (held back until the end)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


def held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that could start a stop string (not yet safe to send)."""
    n = 0
    for s in stops:
        for i in range(min(len(s) - 1, len(text)), n, -1):
            if text.endswith(s[:i]):
                n = i
                break
    return n


class Detokenizer:
    """Incremental decoding: text becomes final once a token completes it (vLLM's prefix-window method).

    Decoding a window that starts a few tokens back keeps the cost per token constant and
    keeps tokenizers' context-dependent spacing right; a trailing U+FFFD (a UTF-8 sequence
    cut in the middle) is held until the next token completes it.
    """

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0
        self.text = ""

    def add(self, token: int) -> str:
        self.ids.append(int(token))
        if self.tok is None:
            return ""
        before = self.tok.decode(self.ids[self.prefix:self.read])
        now = self.tok.decode(self.ids[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            delta = now[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is still held (a dangling partial character decodes as U+FFFD)."""
        if self.tok is None or self.read == len(self.ids):
            return ""
        before = self.tok.decode(self.ids[self.prefix:self.read])
        now = self.tok.decode(self.ids[self.prefix:])
        delta = now[len(before):] if now.startswith(before) else ""
        self.prefix = self.read = len(self.ids)
        self.text += delta
        return delta


_ids = itertools.count()


@dataclass(eq=False)
class Request:
    prompt: list[int]
    params: Params
    on_event: Callable[[object], None]
    id: int = field(default_factory=lambda: next(_ids))
    arrival: float = field(default_factory=time.perf_counter)
    # scheduler-side state
    slot: int | None = None
    prefilled: int = 0
    tokens: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of detok.text already sent
    last_token_t: float = 0.0
    cancelled: bool = False
    done: bool = False
    sampler: Sampler | None = None
    detok: Detokenizer | None = None

    def cancel(self) -> None:
        """Thread-safe: the scheduler frees the slot at the next step boundary."""
        self.cancelled = True


def logprobs_of(logits: np.ndarray, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """Log-probability of ``token`` under the model's raw distribution and the top ``k`` (id, logprob)."""
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    zmax = z.max()
    lse = zmax + np.log(np.exp(z - zmax).sum())
    top: list[tuple[int, float]] = []
    if k > 0:
        k = min(k, z.size)
        idx = np.argpartition(-z, k - 1)[:k]
        idx = idx[np.lexsort((idx, -z[idx]))]  # by logit, ties by id: deterministic
        top = [(int(i), float(z[i] - lse)) for i in idx]
    return float(z[token] - lse), top


class Scheduler:
    def __init__(self, engine, tokenizer=None, eos_id: int | None = None, parallel: int | None = None,
                 max_queue: int = 64, metrics: Metrics | None = None):
        self.engine, self.tok, self.eos_id = engine, tokenizer, eos_id
        self.parallel = max(1, min(int(parallel or engine.max_seqs), engine.max_seqs, engine.max_step_tokens))
        self.max_queue = int(max_queue)
        self.metrics = metrics or Metrics()
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: list[Request] = []
        self._cv = threading.Condition()
        self._stop = False
        self._draining = False
        self._deadline: float | None = None
        self._thread: threading.Thread | None = None
        self.steps = 0

    # ------------------------------------------------------------------ client side (any thread)
    def submit(self, req: Request) -> Request:
        n = len(req.prompt)
        if n == 0:
            raise SpectraError("the prompt is empty: give at least one token")
        if n + req.params.max_tokens > self.engine.max_len:
            raise SpectraError(f"prompt ({n}) + max_tokens ({req.params.max_tokens}) exceeds the context length {self.engine.max_len}")
        with self._cv:
            if self._draining or self._stop:
                raise Draining("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} waiting); retry later")
            self._waiting.append(req)
            self.metrics.queue_len.set(len(self._waiting))
            self._cv.notify()
        return req

    @property
    def queue_len(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._running)

    @property
    def draining(self) -> bool:
        return self._draining

    def start(self) -> "Scheduler":
        self._thread = threading.Thread(target=self._loop, name="spectra-scheduler", daemon=True)
        self._thread.start()
        return self

    def drain(self, grace_s: float) -> None:
        """Stop taking requests; waiting ones fail now, running ones get ``grace_s`` seconds to finish."""
        with self._cv:
            self._draining = True
            self._deadline = time.perf_counter() + grace_s
            waiting, self._waiting = list(self._waiting), collections.deque()
            self.metrics.queue_len.set(0)
            self._cv.notify()
        for r in waiting:
            self._send(r, FinishEvent("error", error="the server is shutting down"))

    def idle(self) -> bool:
        with self._cv:
            return not self._waiting and not self._running

    def stop(self, timeout: float = 5.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ scheduler thread
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._waiting and not self._running:
                    self._cv.wait(0.5)
                if self._stop:
                    break
            try:
                self._iteration()
            except Exception as e:  # never let one bad step kill the server: fail what ran in it
                for r in list(self._running):
                    self._finish(r, "error", error=f"internal error: {type(e).__name__}: {e}")
        for r in list(self._running):
            self._finish(r, "error", error="the server stopped")

    def _iteration(self) -> None:
        for r in [r for r in self._running if r.cancelled]:
            self._finish(r, "abort")
        if self._draining and self._deadline is not None and time.perf_counter() > self._deadline:
            for r in list(self._running):
                self._finish(r, "error", error="the server is shutting down")
        self._admit()
        items, reqs = self._plan()
        if not items:
            return
        logits = self.engine.step(items)
        self.steps += 1
        now = time.perf_counter()
        for r, (_, toks), row in zip(reqs, items, logits):
            if r.prefilled < len(r.prompt):
                r.prefilled += len(toks)
                if r.prefilled < len(r.prompt):
                    continue  # more prompt chunks to go
            self._emit(r, row, now)

    def _admit(self) -> None:
        with self._cv:
            if any(r.cancelled for r in self._waiting):  # hung-up clients give their queue places back
                gone = [r for r in self._waiting if r.cancelled]
                self._waiting = collections.deque(r for r in self._waiting if not r.cancelled)
                for r in gone:
                    r.done = True
                    self._send(r, FinishEvent("abort", prompt_tokens=len(r.prompt)))
                    self.metrics.requests.inc(label="abort")
            while self._waiting and len(self._running) < self.parallel:
                r = self._waiting[0]
                try:
                    r.slot = self.engine.acquire()
                except SpectraError:
                    break  # no free slot (engine shared or smaller): wait for a release
                self._waiting.popleft()
                self._running.append(r)
            self.metrics.queue_len.set(len(self._waiting))
        self.metrics.active.set(len(self._running))

    def _plan(self) -> tuple[list[tuple[int, list[int]]], list[Request]]:
        budget = self.engine.max_step_tokens
        items, reqs = [], []
        for r in self._running:  # decoders first: one token each
            if r.prefilled >= len(r.prompt) and budget > 0:
                items.append((r.slot, [r.tokens[-1]]))
                reqs.append(r)
                budget -= 1
        for r in self._running:  # then prompt chunks, oldest first
            if r.prefilled < len(r.prompt) and budget > 0:
                chunk = r.prompt[r.prefilled : r.prefilled + budget]
                items.append((r.slot, chunk))
                reqs.append(r)
                budget -= len(chunk)
        return items, reqs

    def _emit(self, r: Request, logits: np.ndarray, now: float) -> None:
        p = r.params
        if r.sampler is None:
            r.sampler, r.detok = Sampler(p.sampling), Detokenizer(self.tok)
        tok = r.sampler(logits)
        if self.eos_id is not None and tok == self.eos_id and not p.ignore_eos:
            self._finish(r, "stop")
            return
        lp, top = logprobs_of(logits, tok, p.logprobs) if p.logprobs is not None else (None, None)
        r.tokens.append(tok)
        if len(r.tokens) == 1:
            self.metrics.ttft.observe(now - r.arrival)
        else:
            self.metrics.itl.observe(now - r.last_token_t)
        r.last_token_t = now
        self.metrics.generation_tokens.inc()
        r.detok.add(tok)
        text = r.detok.text
        stops = p.stop
        hit = -1
        if stops:
            lo = max(0, r.emitted - max(len(s) for s in stops))
            hits = [i for i in (text.find(s, lo) for s in stops) if i >= 0]
            hit = min(hits) if hits else -1
        if hit >= 0:
            piece = text[r.emitted:hit] if hit > r.emitted else ""
            r.emitted = max(r.emitted, hit)
            self._send(r, TokenEvent(tok, piece, lp, top))
            self._finish(r, "stop", final_text=False)
            return
        safe = len(text) - (held_back(text, stops) if stops else 0)
        piece = text[r.emitted:safe] if safe > r.emitted else ""
        r.emitted = max(r.emitted, safe)
        self._send(r, TokenEvent(tok, piece, lp, top))
        if len(r.tokens) >= p.max_tokens or self.engine.length(r.slot) + 1 > self.engine.max_len:
            self._finish(r, "length")

    def _finish(self, r: Request, reason: str, error: str | None = None, final_text: bool = True) -> None:
        if r.done:
            return
        r.done = True
        rest = ""
        if final_text and reason in ("stop", "length") and r.detok is not None:
            r.detok.flush()
            rest = r.detok.text[r.emitted:]
        if r.slot is not None:
            self.engine.release(r.slot)
            r.slot = None
        if r in self._running:
            self._running.remove(r)
        self.metrics.active.set(len(self._running))
        self.metrics.requests.inc(label=reason)
        self.metrics.prompt_tokens.inc(len(r.prompt))
        self._send(r, FinishEvent(reason, rest, len(r.prompt), len(r.tokens), error))

    @staticmethod
    def _send(r: Request, ev) -> None:
        try:
            r.on_event(ev)
        except Exception:  # the client's loop is gone (shutdown): nothing left to tell
            pass


def run_to_completion(sched: Scheduler, prompts: Sequence[list[int]], params: Params, timeout: float = 60.0):
    """Submit ``prompts`` together and collect (tokens, text, finish) per prompt (tests, benchmarks)."""
    import queue

    qs = [queue.Queue() for _ in prompts]
    reqs = [sched.submit(Request(list(p), params, q.put)) for p, q in zip(prompts, qs)]
    out = []
    for r, q in zip(reqs, qs):
        toks, text, lps = [], [], []
        while True:
            ev = q.get(timeout=timeout)
            if isinstance(ev, TokenEvent):
                toks.append(ev.token)
                text.append(ev.text)
                lps.append(ev.logprob)
            else:
                text.append(ev.text)
                out.append({"tokens": toks, "text": "".join(text), "logprobs": lps, "finish": ev})
                break
    return out


__all__ = ["Detokenizer", "Draining", "FinishEvent", "Params", "QueueFull", "Request", "Scheduler", "TokenEvent",
           "logprobs_of", "run_to_completion"]
