"""The ASGI app (FastAPI): OpenAI-compatible routes over a :class:`~spectra.serve.scheduler.Scheduler`.

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (SSE
with ``stream=true``), ``POST /tokenize``, ``POST /detokenize``, ``GET /health`` (503 while
the model loads or the server drains), ``GET /metrics`` (Prometheus text).

Request bodies are read whole by :class:`Gate` before any parsing (413 past the
limit, by Content-Length or by the bytes actually sent) and parsed by hand so that every
error has the OpenAI body. With an API key every route but /health needs
``Authorization: Bearer KEY``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from spectra.serve.metrics import Metrics
from spectra.serve.protocol import (APIError, bad, chat_logprobs, check_model, completion_logprobs, parse_chat,
                                    parse_completion, tokenize_prompt, usage)
from spectra.serve.scheduler import Draining, FinishEvent, QueueFull, Request, TokenEvent

DEFAULT_MAX_BODY = 2 * 1024 * 1024
_DISCARD_CAP = 64 * 1024 * 1024  # past this, answer 413 without reading the rest (and drop the connection)


@dataclass
class ServerState:
    model_id: str
    max_body: int = DEFAULT_MAX_BODY
    api_key: str | None = None
    metrics: Metrics = field(default_factory=Metrics)
    # set once the model is loaded
    engine: object = None
    scheduler: object = None
    tokenizer: object = None
    template: object = None
    ready: bool = False
    created: int = field(default_factory=lambda: int(time.time()))


def error_response(e: APIError, metrics: Metrics | None = None) -> JSONResponse:
    if metrics is not None:
        metrics.http_errors.inc(label=str(e.status))
    return JSONResponse(e.body(), status_code=e.status)


class Gate:
    """ASGI middleware in front of the app: the API key, then the body read whole (at most ``max_body`` bytes).

    A pure ASGI layer (not BaseHTTPMiddleware) so streaming responses and the client's
    http.disconnect pass through untouched.
    """

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def _refuse(self, send, status: int, message: str, code: str) -> None:
        e = APIError(status, message, "invalid_request_error", None, code)
        self.state.metrics.http_errors.inc(label=str(status))
        body = json.dumps(e.body()).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        key = self.state.api_key
        if key and scope.get("path") != "/health":
            got = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(got, f"Bearer {key}".encode()):
                return await self._refuse(send, 401, "missing or wrong API key (Authorization: Bearer KEY)",
                                          "invalid_api_key")
        limit = self.state.max_body
        cl = dict(scope.get("headers") or []).get(b"content-length")
        declared = int(cl) if cl is not None and cl.isdigit() else None
        if cl is not None and declared is None:
            return await self._refuse(send, 400, "invalid Content-Length header", "invalid_request")
        too_big = f"request body too large (limit {limit} bytes)"
        if declared is not None and declared > _DISCARD_CAP:
            return await self._refuse(send, 413, too_big, "body_too_large")
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            size += len(msg.get("body", b""))
            if size <= limit:
                chunks.append(msg.get("body", b""))
            elif size > _DISCARD_CAP:
                return await self._refuse(send, 413, too_big, "body_too_large")
            if not msg.get("more_body"):
                break
        if size > limit:  # read to the end so the client sees the 413 rather than a reset mid-upload
            return await self._refuse(send, 413, too_big, "body_too_large")
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards: http.disconnect reaches the app (a client hang-up)

        await self.app(scope, replay, send)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="spectra serve", docs_url=None, redoc_url=None, openapi_url=None)
    m = state.metrics

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e, m)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return error_response(APIError(e.status_code, str(e.detail), "invalid_request_error", None, code), m)

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        return error_response(APIError(500, f"internal error: {type(e).__name__}", "server_error", None, None), m)

    def ready():
        if not state.ready:
            raise APIError(503, "the model is still loading; retry shortly (GET /health)", "service_unavailable")
        if state.scheduler.draining:
            raise APIError(503, "the server is shutting down", "service_unavailable")

    async def json_body(request: HTTPRequest) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad(f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object")
        return body

    @app.get("/health")
    async def health():
        if not state.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        if state.scheduler.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(m.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        ready()
        return {"object": "list", "data": [{"id": state.model_id, "object": "model", "created": state.created,
                                            "owned_by": "spectra", "max_model_len": state.engine.max_len}]}

    @app.post("/tokenize")
    async def tokenize(request: HTTPRequest):
        ready()
        body = await json_body(request)
        check_model(body, state.model_id)
        if "messages" in body:
            if state.tokenizer is None:
                raise bad("this model has no tokenizer (tokenizer.json)", "messages")
            from spectra.errors import SpectraError

            try:
                text = state.template.render(body["messages"])
            except SpectraError as e:
                raise bad(str(e), "messages") from None
            ids = tokenize_prompt(text, state.tokenizer, state.engine.vocab_size, "messages")[0]
        else:
            if not isinstance(body.get("prompt"), str):
                raise bad("'prompt' must be a string (or send 'messages')", "prompt")
            if state.tokenizer is None:
                raise bad("this model has no tokenizer (tokenizer.json)", "prompt")
            ids = state.tokenizer.encode(body["prompt"]).ids
        return {"tokens": ids, "count": len(ids), "max_model_len": state.engine.max_len}

    @app.post("/detokenize")
    async def detokenize(request: HTTPRequest):
        ready()
        body = await json_body(request)
        check_model(body, state.model_id)
        toks = body.get("tokens")
        if not isinstance(toks, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in toks):
            raise bad("'tokens' must be a list of token ids", "tokens")
        if state.tokenizer is None:
            raise bad("this model has no tokenizer (tokenizer.json)", "tokens")
        badtok = next((t for t in toks if not 0 <= t < state.engine.vocab_size), None)
        if badtok is not None:
            raise bad(f"token id {badtok} is outside the vocabulary (0..{state.engine.vocab_size - 1})", "tokens")
        return {"prompt": state.tokenizer.decode(toks)}

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        ready()
        body = await json_body(request)
        check_model(body, state.model_id)
        p = parse_completion(body, tokenizer=state.tokenizer, vocab_size=state.engine.vocab_size,
                             max_len=state.engine.max_len)
        return await run_request(state, request, p, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: HTTPRequest):
        ready()
        body = await json_body(request)
        check_model(body, state.model_id)
        p = parse_chat(body, template=state.template, tokenizer=state.tokenizer,
                       vocab_size=state.engine.vocab_size, max_len=state.engine.max_len)
        return await run_request(state, request, p, chat=True)

    return app


async def run_request(state: ServerState, request: HTTPRequest, p, chat: bool):
    """Submit every prompt of a parsed request; a JSON body, or an SSE stream with ``stream=true``."""
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()
    reqs = []
    try:
        for i, ids in enumerate(p.prompts):
            cb = (lambda ev, i=i: loop.call_soon_threadsafe(q.put_nowait, (i, ev)))
            reqs.append(state.scheduler.submit(Request(ids, p.params, cb)))
    except QueueFull as e:
        for r in reqs:
            r.cancel()
        raise APIError(429, str(e), "rate_limit_exceeded", None, "rate_limit_exceeded") from None
    except Draining as e:
        for r in reqs:
            r.cancel()
        raise APIError(503, str(e), "service_unavailable") from None
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    if p.stream:
        return StreamingResponse(_stream(state, q, reqs, p, chat, rid), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _collect(state, request, q, reqs, p, chat, rid)

async def _collect(state: ServerState, request: HTTPRequest, q, reqs, p, chat: bool, rid: str):
    n = len(reqs)
    events: list[list[TokenEvent]] = [[] for _ in range(n)]
    texts: list[list[str]] = [[] for _ in range(n)]
    fins: list[FinishEvent | None] = [None] * n
    try:
        while any(f is None for f in fins):
            try:
                i, ev = await asyncio.wait_for(q.get(), 0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return JSONResponse({}, status_code=499)
                continue
            if isinstance(ev, TokenEvent):
                events[i].append(ev)
                texts[i].append(ev.text)
            else:
                texts[i].append(ev.text)
                fins[i] = ev
    finally:
        for r in reqs:
            r.cancel()  # no-op for finished ones; frees the slots of a vanished client
    err = next((f for f in fins if f.reason == "error"), None)
    if err is not None:
        raise APIError(503 if "shutting down" in (err.error or "") else 500, err.error or "generation failed",
                       "server_error")
    choices = []
    for i in range(n):
        text, fin = "".join(texts[i]), fins[i]
        ch = {"index": i, "finish_reason": fin.reason}
        lp = None
        if p.params.logprobs is not None:
            lp = chat_logprobs(state.tokenizer, events[i]) if chat else completion_logprobs(state.tokenizer, events[i])
        if chat:
            ch["message"] = {"role": "assistant", "content": text}
        else:
            ch["text"] = text
        ch["logprobs"] = lp
        if p.return_token_ids:
            ch["token_ids"] = [ev.token for ev in events[i]]
            ch["prompt_token_ids"] = reqs[i].prompt
        choices.append(ch)
    pt = sum(f.prompt_tokens for f in fins)
    ct = sum(f.completion_tokens for f in fins)
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": state.model_id, "choices": choices, "usage": usage(pt, ct)}

async def _stream(state: ServerState, q, reqs, p, chat: bool, rid: str):
    obj = "chat.completion.chunk" if chat else "text_completion"
    created = int(time.time())
    base = {"id": rid, "object": obj, "created": created, "model": state.model_id}
    n, done, pt, ct = len(reqs), 0, 0, 0
    offsets = [0] * n

    def chunk(i, text, lp_events=None, finish=None, token_ids=None, first=False):
        ch = {"index": i, "finish_reason": finish}
        lp = None
        if p.params.logprobs is not None and lp_events:
            lp = (chat_logprobs(state.tokenizer, lp_events) if chat
                  else completion_logprobs(state.tokenizer, lp_events, offsets[i]))
        if chat:
            ch["delta"] = ({"role": "assistant", "content": text} if first else
                           ({"content": text} if text or finish is None else {}))
        else:
            ch["text"] = text
        ch["logprobs"] = lp
        if token_ids is not None:
            ch["token_ids"] = token_ids
        return dict(base, choices=[ch])

    try:
        if chat:
            for i in range(n):
                yield _sse(chunk(i, "", first=True))
        while done < n:
            i, ev = await q.get()
            if isinstance(ev, TokenEvent):
                if not ev.text and p.params.logprobs is None and not p.return_token_ids:
                    continue  # held-back text: nothing to show yet
                yield _sse(chunk(i, ev.text, [ev], token_ids=[ev.token] if p.return_token_ids else None))
                offsets[i] += len(ev.text)
                continue
            done += 1
            if ev.reason == "error":
                err = APIError(503, ev.error or "generation failed", "server_error")
                yield _sse(err.body())
                for r in reqs:
                    r.cancel()
                break
            pt += ev.prompt_tokens
            ct += ev.completion_tokens
            yield _sse(chunk(i, ev.text, finish=ev.reason))
        else:
            if p.include_usage:
                yield _sse(dict(base, choices=[], usage=usage(pt, ct)))
        yield "data: [DONE]\n\n"
    finally:
        for r in reqs:
            r.cancel()  # a client that hung up frees its slot at the next step


def build_asgi(state: ServerState):
    """The app behind its :class:`Gate` (what uvicorn runs)."""
    return Gate(create_app(state), state)


__all__ = ["Gate", "ServerState", "build_asgi", "create_app", "error_response"]
