"""TorchBatchEngine (ragged batched steps, per-slot caches) and the continuous-batching scheduler, without HTTP."""

import queue
import threading
import time

import numpy as np
import pytest
import torch

from serve_fixtures import make_models, native_batch_available
from spectra.errors import SpectraError
from spectra.infer.batch import load_batch_engine
from spectra.infer.engine import TorchEngine
from spectra.infer.generate import generate, load_tokenizer
from spectra.infer.sampling import SamplingConfig
from spectra.infer.torch_batch import TorchBatchEngine, probe_batch_invariance
from spectra.serve.scheduler import (Detokenizer, Draining, FinishEvent, Params, QueueFull, Request, Scheduler,
                                     TokenEvent, held_back, logprobs_of, run_to_completion)

pytestmark = pytest.mark.usefixtures("one_thread")
RNG = np.random.default_rng(1)
PROMPTS = [[int(t) for t in RNG.integers(1, 500, n)] for n in (5, 17, 1, 30)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("serve_engine"))


@pytest.fixture(scope="module")
def eng(models):
    return TorchBatchEngine.from_path(models["packed"], max_seqs=4, max_len=96, max_step_tokens=64)


def _alone(model, prompt, extra=()):
    ref = TorchEngine(model, max_len=96)
    out = ref.forward(prompt)
    for t in extra:
        out = ref.forward([t])
    return out


def test_ragged_step_matches_single_sequence(eng):
    slots = [eng.acquire() for _ in PROMPTS]
    try:
        out = eng.step(list(zip(slots, PROMPTS)))
        assert out.shape == (4, eng.vocab_size) and out.dtype == np.float32
        nxt = [int(np.argmax(o)) for o in out]
        for p, o in zip(PROMPTS, out):
            np.testing.assert_allclose(o, _alone(eng.model, p), atol=1e-4, rtol=0)
        # a decode step for two slots and a second prompt chunk for another, in one step
        more = [7, 8, 9]
        out2 = eng.step([(slots[0], [nxt[0]]), (slots[3], more), (slots[1], [nxt[1]])])
        np.testing.assert_allclose(out2[0], _alone(eng.model, PROMPTS[0], [nxt[0]]), atol=1e-4, rtol=0)
        np.testing.assert_allclose(out2[1], _alone(eng.model, PROMPTS[3] + more), atol=1e-4, rtol=0)
        np.testing.assert_allclose(out2[2], _alone(eng.model, PROMPTS[1], [nxt[1]]), atol=1e-4, rtol=0)
        assert [eng.length(s) for s in slots] == [6, 18, 1, 33]
    finally:
        for s in slots:
            eng.release(s)


def test_step_errors_change_nothing(eng):
    a, b = eng.acquire(), eng.acquire()
    try:
        eng.step([(a, [1, 2, 3])])
        bad_steps = [
            [(a, [1]), (a, [2])],                   # slot twice
            [(a, [1]), (3, [1])],                   # slot not acquired
            [(a, [eng.vocab_size])],                # token out of range
            [(b, [])],                              # empty item
            [(b, list(range(1, 66)))],              # more rows than max_step_tokens
            [(b, [1, 2]), (a, [eng.vocab_size])],   # the second item is bad: the first must not advance
        ]
        for items in bad_steps:
            with pytest.raises(SpectraError):
                eng.step(items)
            assert eng.length(a) == 3 and eng.length(b) == 0
        eng.step([(a, [1] * 60)])
        with pytest.raises(SpectraError, match="context full"):
            eng.step([(a, [1] * 40)])
        assert eng.length(a) == 63
    finally:
        eng.release(a)
        eng.release(b)


def test_slots_acquire_release(eng):
    slots = [eng.acquire() for _ in range(eng.max_seqs)]
    assert sorted(slots) == list(range(eng.max_seqs))
    with pytest.raises(SpectraError, match="in use"):
        eng.acquire()
    eng.step([(slots[0], [5, 6])])
    eng.release(slots[0])
    with pytest.raises(SpectraError):
        eng.length(slots[0])
    s = eng.acquire()
    assert s == slots[0] and eng.length(s) == 0
    for s in slots:
        eng.release(s)
    assert eng.active == 0


def test_batch_invariant_flag_is_measured(eng):
    """The flag says what this machine's GEMMs do: compare one row alone and inside a batch directly."""
    lin = eng.model.layers[0].mlp.gate_proj
    x = torch.randn(16, lin.weight.shape[1], generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        same = all(torch.equal(lin(x[i : i + 1]), lin(x)[i : i + 1]) for i in range(16))
    if not same:
        assert probe_batch_invariance(eng) is False and eng.batch_invariant is False
    if eng.batch_invariant:
        assert same


def test_load_batch_engine_dispatch(models):
    e = load_batch_engine(models["ck"], "auto", max_seqs=2, max_len=32, max_step_tokens=16)
    assert isinstance(e, TorchBatchEngine) and e.backend == "torch" and e.eos_token_id == 0
    with pytest.raises(SpectraError, match="not a packed model"):
        load_batch_engine(models["ck"], "native")
    with pytest.raises(SpectraError, match="unknown backend"):
        load_batch_engine(models["ck"], "cuda")


# ------------------------------------------------------------------ scheduler
@pytest.fixture(scope="module")
def tok(models):
    return load_tokenizer(models["packed"])


def _sched(eng, tok=None, **kw):
    return Scheduler(eng, tok, None, **kw).start()


def test_scheduler_greedy_matches_generate(eng, tok):
    s = _sched(eng, tok)
    try:
        outs = run_to_completion(s, PROMPTS, Params(12, SamplingConfig(), logprobs=0))
    finally:
        s.stop()
    for p, o in zip(PROMPTS, outs):
        ref = generate(TorchEngine(eng.model, max_len=96), p, 12, tokenizer=tok)
        assert o["tokens"] == ref.tokens
        assert o["text"] == ref.text
        assert o["finish"].reason == "length" and o["finish"].completion_tokens == 12
        assert all(lp <= 0 for lp in o["logprobs"])
    assert eng.active == 0


def test_chunked_prefill_keeps_decoders_going(eng):
    """A 60-token prompt under an 8-token budget takes 8 steps; a running stream decodes in each of them."""
    eng.max_step_tokens, saved = 8, eng.max_step_tokens
    s = Scheduler(eng, None, None)
    q1, q2 = queue.Queue(), queue.Queue()
    long_prompt = [int(t) for t in RNG.integers(1, 500, 60)]
    try:
        s.submit(Request(PROMPTS[0], Params(30), q1.put))
        s._iteration()  # prefill of the short prompt -> first token
        s.submit(Request(long_prompt, Params(4), q2.put))
        steps = 0
        while q2.empty():
            s._iteration()
            steps += 1
        assert steps == -(-60 // 7)  # 7 prompt tokens per step next to the one decode row
        assert q1.qsize() == 1 + steps  # one token per step: never stalled by the long prefill
        alone = _alone(eng.model, long_prompt)
        assert int(np.argmax(alone)) == q2.get_nowait().token
    finally:
        eng.max_step_tokens = saved
        s.stop()
        for r in list(s._running):
            s._finish(r, "abort")


def test_stop_strings_eos_and_max_tokens(eng, tok):
    s = _sched(eng, tok)
    try:
        p = PROMPTS[2]
        free = run_to_completion(s, [p], Params(24))[0]
        text = free["text"]
        assert len(text) > 6 and free["finish"].reason == "length"
        stop = text[3:6]
        cut = run_to_completion(s, [p], Params(24, stop=(stop, "\x00never")))[0]
        assert cut["finish"].reason == "stop" and cut["text"] == text[: text.find(stop)]
        toks = free["tokens"]
        j = next(i for i in range(2, len(toks)) if toks[i] not in toks[:i])
        s.eos_id = toks[j]
        e = run_to_completion(s, [p], Params(24))[0]
        assert e["finish"].reason == "stop" and e["tokens"] == toks[:j]
        ign = run_to_completion(s, [p], Params(24, ignore_eos=True))[0]
        assert ign["tokens"] == toks
        s.eos_id = None
        short = run_to_completion(s, [p], Params(3))[0]
        assert short["tokens"] == toks[:3] and short["finish"].reason == "length"
    finally:
        s.eos_id = None
        s.stop()


def test_seeded_sampling_is_reproducible(eng):
    s = _sched(eng)
    try:
        cfg = Params(10, SamplingConfig(temperature=1.0, top_k=50, top_p=0.9, seed=123))
        a, b = run_to_completion(s, [PROMPTS[0], PROMPTS[0]], cfg)
        c = run_to_completion(s, [PROMPTS[0]], Params(10, SamplingConfig(temperature=1.0, seed=7)))[0]
    finally:
        s.stop()
    assert a["tokens"] == b["tokens"] and c["tokens"] != a["tokens"]


def test_cancel_queue_full_and_drain(eng):
    s = Scheduler(eng, None, None, parallel=2, max_queue=2)
    events = queue.Queue()
    rs = [s.submit(Request(PROMPTS[0], Params(50), events.put)) for _ in range(2)]
    s._iteration()
    assert s.active == 2 and eng.active == 2
    q = [s.submit(Request(PROMPTS[0], Params(5), events.put)) for _ in range(2)]
    with pytest.raises(QueueFull):
        s.submit(Request(PROMPTS[0], Params(5), events.put))
    with pytest.raises(SpectraError, match="context length"):
        s.submit(Request(PROMPTS[0], Params(96), events.put))
    rs[0].cancel()
    s._iteration()  # the cancelled request leaves, its slot goes to the first waiting one
    assert s.active == 2 and s.queue_len == 1 and rs[0].done and eng.active == 2
    extra = s.submit(Request(PROMPTS[0], Params(5), events.put))
    extra.cancel()  # a waiting client hangs up: its queue place is free at the next step
    s._iteration()
    assert s.queue_len == 1 and extra.done
    s.drain(0.0)
    with pytest.raises(Draining):
        s.submit(Request(PROMPTS[0], Params(5), events.put))
    assert q[1].done is False and s.queue_len == 0  # waiting request got its error event at once
    s._iteration()  # past the (zero) grace: running ones end with an error
    assert s.active == 0 and eng.active == 0
    fins = [e for e in iter(lambda: events.get_nowait() if not events.empty() else None, None)
            if isinstance(e, FinishEvent)]
    assert sorted(f.reason for f in fins) == ["abort", "abort", "error", "error", "error"]


def test_scheduler_thread_survives_concurrent_clients(eng):
    s = _sched(eng, parallel=3)
    results, errors = {}, []

    def client(i):
        try:
            results[i] = run_to_completion(s, [PROMPTS[i % 4]], Params(6))[0]["tokens"]
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=client, args=(i,)) for i in range(10)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    s.stop()
    assert not errors and len(results) == 10
    for i in range(10):
        assert results[i] == results[i % 4]
    assert eng.active == 0 and s.steps > 0


def test_detokenizer_and_helpers(tok):
    text = "the cat sat on a mat; ternary weights pack — naïve ünïcödé ✓"
    ids = tok.encode(text).ids
    d = Detokenizer(tok)
    pieces = [d.add(t) for t in ids]
    pieces.append(d.flush())
    assert "".join(pieces) == tok.decode(ids) == d.text
    assert held_back("abc Us", ["User:"]) == 2 and held_back("abc", ["User:"]) == 0
    z = np.array([1.0, 3.0, 2.0, 3.0])
    lp, top = logprobs_of(z, 2, 3)
    lse = np.log(np.exp(z).sum())
    assert abs(lp - (2.0 - lse)) < 1e-12
    assert [t for t, _ in top] == [1, 3, 2]  # ties by id


@pytest.mark.skipif(native_batch_available() is not None, reason=str(native_batch_available()))
def test_native_batch_engine_is_batch_invariant(models):
    """The contract's promise, bit for bit: an item's logits alone == inside a ragged batch."""
    e = load_batch_engine(models["packed"], "native", max_seqs=4, max_len=96, max_step_tokens=64)
    try:
        assert e.batch_invariant
        alone = []
        for p in PROMPTS:
            s = e.acquire()
            alone.append(e.step([(s, p)])[0])
            e.release(s)
        slots = [e.acquire() for _ in PROMPTS]
        together = e.step(list(zip(slots, PROMPTS)))
        for a, b in zip(alone, together):
            assert np.array_equal(a, b)
    finally:
        e.close()


def test_quantlm_and_floatlm_dirs_serve_on_torch(tmp_path, tok):
    """A packed GPTQ-layout QuantLM (RTN 4-bit here: the same file format) and a FloatLM load behind the same contract."""
    import dataclasses

    from serve_fixtures import VOCAB

    from spectra.checkpoint import load_model, save_model
    from spectra.config import get_preset
    from spectra.model import Transformer
    from safetensors.torch import load_file

    from spectra.quant.api import load_quantized, quantize_model, save_packed, spec_of

    cfg = dataclasses.replace(get_preset("nano").model, vocab_size=VOCAB)
    fl = save_model(Transformer(cfg).init_weights(1), tmp_path / "float", "floatlm")
    model, _ = load_model(fl)
    qm, qstate, report = quantize_model(model, None, 4, group_size=128, method="rtn")
    qdir = save_packed(qm, qstate, tmp_path / "q4", spec_of(report))
    qref, _ = load_quantized(qdir)  # fp16 storage: the reference is what the loader reads back
    assert any(k.endswith(".qweight") for k in load_file(next(qdir.glob("*.safetensors"))))
    for d, ref_model in ((fl, model), (qdir, qref)):
        e = load_batch_engine(d, "auto", max_seqs=2, max_len=32, max_step_tokens=32)
        assert e.backend == "torch"
        s = e.acquire()
        got = e.step([(s, PROMPTS[1])])[0]
        np.testing.assert_allclose(got, TorchEngine(ref_model, max_len=32).forward(PROMPTS[1]), atol=1e-4)
        e.release(s)
