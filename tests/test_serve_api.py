"""spectra serve over HTTP, driven by the real openai client: routes, streaming, typed errors, batch invariance."""

import json
import threading

import numpy as np
import pytest

openai = pytest.importorskip("openai", reason="the openai client (dev extra) drives these tests")
httpx = pytest.importorskip("httpx", reason="httpx (dev extra) sends the raw-HTTP cases")
pytest.importorskip("fastapi", reason="spectra serve needs the serve extra (fastapi, uvicorn)")

from serve_fixtures import LiveServer, make_models, native_batch_available  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
NATIVE = native_batch_available()
BACKENDS = ["torch", pytest.param("native", marks=pytest.mark.skipif(NATIVE is not None, reason=str(NATIVE)))]
RNG = np.random.default_rng(2)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("serve_api"))


@pytest.fixture(scope="module", params=BACKENDS)
def srv(request, models):
    path = models["packed"] if request.param == "native" else models["ck"]
    s = LiveServer(path, request.param, parallel=16, max_len=128, max_queue=64)
    yield s
    s.close()


def test_models_health_metrics(srv):
    c = srv.client()
    ms = c.models.list()
    assert [m.id for m in ms.data] == ["tiny"]
    r = httpx.get(srv.base + "/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    c.completions.create(model="tiny", prompt="the cat", max_tokens=3, temperature=0)
    text = httpx.get(srv.base + "/metrics").text
    for name in ("spectra_requests_total", "spectra_generation_tokens_total", "spectra_queue_length",
                 "spectra_time_to_first_token_seconds_bucket", "spectra_inter_token_latency_seconds_count",
                 "spectra_active_sequences"):
        assert name in text
    assert 'spectra_requests_total{reason="length"}' in text


def test_completion_text_and_token_ids(srv):
    c = srv.client()
    r = c.completions.create(model="tiny", prompt="the cat sat", max_tokens=8, temperature=0,
                             extra_body={"return_token_ids": True})
    ch = r.choices[0]
    assert ch.finish_reason == "length" and r.usage.completion_tokens == 8
    ids = srv.state.tokenizer.encode("the cat sat").ids
    assert r.usage.prompt_tokens == len(ids)
    assert ch.text == srv.state.tokenizer.decode(ch.model_extra["token_ids"])
    r2 = c.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0,
                              extra_body={"return_token_ids": True})
    assert r2.choices[0].model_extra["token_ids"] == ch.model_extra["token_ids"] and r2.choices[0].text == ch.text
    multi = c.completions.create(model="tiny", prompt=["the cat sat", [5, 6, 7]], max_tokens=4, temperature=0)
    assert [x.index for x in multi.choices] == [0, 1] and multi.usage.completion_tokens == 8
    assert multi.choices[0].text == srv.state.tokenizer.decode(ch.model_extra["token_ids"][:4])


def test_completion_logprobs(srv):
    c = srv.client()
    r = c.completions.create(model="tiny", prompt="the dog", max_tokens=5, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == 5 and len(lp.top_logprobs) == 5
    for tok_lp, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert tok_lp <= 0 and len(top) <= 3  # greedy: the sampled token is the most likely one
        assert abs(max(top.values()) - tok_lp) < 1e-9
    assert "".join(lp.tokens) == r.choices[0].text


def test_chat(srv):
    c = srv.client()
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat?"}]
    r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0, logprobs=True,
                                  top_logprobs=2)
    ch = r.choices[0]
    assert ch.message.role == "assistant" and ch.finish_reason in ("length", "stop")
    expect = srv.state.tokenizer.encode("System: be brief\n\nUser: the cat?\n\nAssistant:").ids
    assert r.usage.prompt_tokens == len(expect)
    assert len(ch.logprobs.content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 for t in ch.logprobs.content)
    assert httpx.post(srv.base + "/tokenize", json={"messages": msgs}).json()["tokens"] == expect


def test_streaming_completion_and_chat(srv):
    c = srv.client()
    kw = dict(model="tiny", prompt="birds sang", max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    full = c.completions.create(**kw)
    chunks = list(c.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    texts = [ch.choices[0].text for ch in chunks if ch.choices]
    assert texts[0] != "" or len(texts) > 1
    assert "".join(texts) == full.choices[0].text
    fin = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert fin[-1] == "length" and all(f is None for f in fin[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    # raw SSE: the stream ends with [DONE]
    with httpx.stream("POST", srv.base + "/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 3, "stream": True},
                      timeout=30) as resp:
        lines = [ln for ln in resp.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)
    chat = list(c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                          temperature=0, stream=True))
    assert chat[0].choices[0].delta.role == "assistant"
    assert chat[-1].choices[0].finish_reason in ("length", "stop")


def test_tokenize_detokenize(srv):
    ids = httpx.post(srv.base + "/tokenize", json={"prompt": "the park"}).json()["tokens"]
    assert ids == srv.state.tokenizer.encode("the park").ids
    assert httpx.post(srv.base + "/detokenize", json={"tokens": ids}).json()["prompt"] == "the park"


def test_typed_errors(srv):
    c = srv.client()
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="gpt-9", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt="x", max_tokens=-1)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt="x", max_tokens=10**9)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt=[1] * 200, max_tokens=1)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "prompt"
    for bad in ({"top_p": 0}, {"top_p": 1.5}, {"temperature": -1}, {"n": 2}, {"logprobs": 99}, {"stop": [""]}):
        with pytest.raises(openai.BadRequestError):
            c.completions.create(model="tiny", prompt="x", max_tokens=2, **bad)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="tiny", prompt=[srv.engine.vocab_size], max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="tiny", messages=[], max_tokens=2)
    assert c.completions.create(model="tiny", prompt="x", max_tokens=1).usage.completion_tokens == 1


def test_raw_http_errors(srv):
    r = httpx.post(srv.base + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(srv.base + "/v1/completions", content=b"[1, 2]")
    assert r.status_code == 400
    big = b'{"prompt": "' + b"a" * (10 * 1024 * 1024) + b'"}'
    r = httpx.post(srv.base + "/v1/completions", content=big, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

    def chunked():  # no Content-Length: the limit counts the bytes as they arrive
        for _ in range(40):
            yield b"x" * (256 * 1024)

    r = httpx.post(srv.base + "/v1/completions", content=chunked(), timeout=30)
    assert r.status_code == 413
    r = httpx.get(srv.base + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    assert httpx.get(srv.base + "/health").status_code == 200  # still serving


def test_rate_limit_is_typed(models):
    s = LiveServer(models["ck"], "torch", parallel=1, max_queue=1)
    try:
        c = s.client()
        out, errs = [], []

        def go():
            try:
                out.append(c.completions.create(model="tiny", prompt=[1, 2, 3], max_tokens=40, temperature=0))
            except openai.RateLimitError as e:
                errs.append(e)

        ts = [threading.Thread(target=go) for _ in range(6)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        assert errs and out and len(errs) + len(out) == 6
        assert errs[0].status_code == 429
        assert s.wait_idle() and s.engine_active() == 0
    finally:
        s.close()


def test_api_key_required(models):
    s = LiveServer(models["ck"], "torch", api_key="sekret")
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").models.list()
        assert s.client().models.list().data[0].id == "tiny"
        assert httpx.get(s.base + "/health").status_code == 200  # no key needed
        assert httpx.get(s.base + "/metrics").status_code == 401
    finally:
        s.close()


def test_binding_beyond_loopback_needs_a_key(models):
    from spectra.errors import SpectraError
    from spectra.serve.server import ServeConfig, is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")
    with pytest.raises(SpectraError, match="api-key"):
        ServeConfig(str(models["ck"]), host="0.0.0.0").validate()
    ServeConfig(str(models["ck"]), host="0.0.0.0", api_key="k").validate()


def _greedy(c, prompt, n=12):
    r = c.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0, logprobs=1,
                             extra_body={"return_token_ids": True, "ignore_eos": True})
    ch = r.choices[0]
    return ch.model_extra["token_ids"], ch.logprobs.token_logprobs


def test_batch_invariance_16_concurrent(srv):
    """16 concurrent greedy requests (prompt lengths 1..61) return exactly what each returns alone.

    Native engine: bitwise (tokens and logprobs). Torch engine: bitwise when its GEMMs are
    batch-invariant on this machine (``batch_invariant``), else same tokens and logprobs to 1e-4.
    """
    c = srv.client()
    prompts = [[int(t) for t in RNG.integers(1, 500, 1 + 4 * i)] for i in range(16)]
    alone = [_greedy(c, p) for p in prompts]
    together = [None] * 16
    barrier = threading.Barrier(16)

    def go(i):
        barrier.wait()
        together[i] = _greedy(c, prompts[i])

    ts = [threading.Thread(target=go, args=(i,)) for i in range(16)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    exact = srv.engine.batch_invariant
    for (ta, la), (tb, lb) in zip(alone, together):
        assert ta == tb
        if exact:
            assert la == lb
        else:
            np.testing.assert_allclose(la, lb, atol=1e-4)
    assert srv.wait_idle() and srv.engine_active() == 0


def test_prometheus_text_is_parseable(srv):
    text = httpx.get(srv.base + "/metrics").text
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            float(value)
    assert json.dumps(text)  # plain text, no binary


def test_non_streaming_client_that_hangs_up_is_cancelled(models):
    """A queued non-streaming request whose client disconnects is cancelled (its slot/queue place freed)."""
    import asyncio

    from spectra.infer.torch_batch import TorchBatchEngine
    from spectra.serve.app import ServerState, build_asgi
    from spectra.serve.chat import ChatTemplate
    from spectra.serve.scheduler import Scheduler

    eng = TorchBatchEngine.from_path(models["ck"], max_seqs=1, max_len=32, max_step_tokens=32)
    state = ServerState("tiny")
    state.engine, state.template = eng, ChatTemplate()
    state.scheduler = Scheduler(eng, None, None, 1, metrics=state.metrics)  # never started: the request stays queued
    state.ready = True
    app = build_asgi(state)
    body = json.dumps({"prompt": [1, 2, 3], "max_tokens": 4}).encode()
    sent = []

    async def call():
        msgs = [{"type": "http.request", "body": body, "more_body": False}]
        gone_at = asyncio.get_running_loop().time() + 0.3  # the client hangs up a moment after sending

        async def receive():  # like uvicorn's: waits until something happens, then answers at once
            if msgs:
                return msgs.pop(0)
            wait = gone_at - asyncio.get_running_loop().time()
            if wait > 0:
                await asyncio.sleep(wait)
            return {"type": "http.disconnect"}

        async def send(m):
            sent.append(m)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"",
                 "root_path": "", "headers": [(b"content-type", b"application/json"),
                                               (b"content-length", str(len(body)).encode())],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}
        await asyncio.wait_for(app(scope, receive, send), 10)

    asyncio.run(call())
    assert state.scheduler.queue_len == 1
    queued = state.scheduler._waiting[0]
    assert queued.cancelled  # the scheduler drops it at its next step boundary
    state.scheduler._iteration()
    assert state.scheduler.queue_len == 0 and eng.active == 0
    assert state.metrics.requests.value("abort") == 1


def test_model_without_tokenizer_serves_token_ids(models, tmp_path):
    import shutil

    d = tmp_path / "notok"
    shutil.copytree(models["ck"], d)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (d / f).unlink(missing_ok=True)
    s = LiveServer(d, "torch")
    try:
        c = s.client()
        r = c.completions.create(model="tiny", prompt=[3, 4, 5], max_tokens=3, temperature=0, logprobs=1,
                                 extra_body={"return_token_ids": True, "ignore_eos": True})
        assert r.choices[0].text == "" and len(r.choices[0].model_extra["token_ids"]) == 3
        assert r.choices[0].logprobs.tokens[0].startswith("token_id:")
        with pytest.raises(openai.BadRequestError, match="no tokenizer"):
            c.completions.create(model="tiny", prompt="text", max_tokens=3)
        with pytest.raises(openai.BadRequestError, match="no tokenizer"):
            c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=3)
    finally:
        s.close()
