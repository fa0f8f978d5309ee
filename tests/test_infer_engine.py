"""Engines and generation: native packed engine vs the PyTorch model, KV cache, sampling, stop strings, CLI."""

import json

import numpy as np
import pytest
import torch

from spectra.checkpoint import load_model, save_model
from spectra.config import get_preset
from spectra.errors import SpectraError
from spectra.infer.engine import TorchEngine, load_engine, reference_model
from spectra.infer.generate import generate, stream
from spectra.infer.packed_model import PackedModel, write_packed
from spectra.infer.sampling import Sampler, SamplingConfig
from spectra.model import Transformer
from spectra.ternary import to_ternary

from spectra.infer import kernels  # noqa: E402  (our own module: an import error must fail)
try:
    AVAILABLE = kernels.available_kernels()
except kernels.KernelUnavailable as e:
    AVAILABLE = []
    NO_KERNEL = str(e)
needs_kernel = pytest.mark.skipif(not AVAILABLE, reason="native kernel unavailable (no C compiler)")


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """A random micro TriLM (fp32 checkpoint) packed as t2/f16 and t1/q8."""
    d = tmp_path_factory.mktemp("micro")
    ck = save_model(to_ternary(Transformer(get_preset("micro").model).init_weights(3), 1), d / "ck", "trilm")
    write_packed(ck, d / "t2", "t2", "f16", progress=False)
    write_packed(ck, d / "t1", "t1", "q8", progress=False)
    return {"ck": ck, "t2": d / "t2", "t1": d / "t1"}


PROMPT = [int(t) for t in np.random.default_rng(0).integers(1, 8192, 24)]


@needs_kernel
@pytest.mark.parametrize("fmt", ["t2", "t1"])
def test_native_logits_match_pytorch(micro, fmt):
    pm = PackedModel.load(micro[fmt])
    ref = TorchEngine(reference_model(pm), max_len=64).forward(PROMPT, all_logits=True)
    for kern in sorted({"scalar", kernels.best_kernel()}):
        eng = load_engine(micro[fmt], "native", kernel=kern, max_len=64)
        got = eng.forward(PROMPT, all_logits=True)
        assert got.shape == (len(PROMPT), 8192)
        assert np.abs(got - ref).max() < 1e-3, kern
    if fmt == "t2":  # against the original fp32 checkpoint too (difference: f16 embedding/head storage)
        orig = TorchEngine(load_model(micro["ck"])[0], max_len=64).forward(PROMPT, all_logits=True)
        assert np.abs(got - orig).max() < 1e-2


@needs_kernel
def test_int8_activation_mode_is_close(micro):
    pm = PackedModel.load(micro["t2"])
    ref = TorchEngine(reference_model(pm), max_len=64).forward(PROMPT, all_logits=True)
    got = load_engine(micro["t2"], "native", act="int8", max_len=64).forward(PROMPT, all_logits=True)
    err = np.abs(got - ref).max()
    assert 1e-4 < err < 0.1 * np.abs(ref).max()


@needs_kernel
def test_greedy_64_tokens_identical(micro):
    pm = PackedModel.load(micro["t2"])
    native = generate(load_engine(micro["t2"], "native", max_len=128), PROMPT[:8], 64)
    torch_ref = generate(TorchEngine(reference_model(pm), max_len=128), PROMPT[:8], 64)
    assert len(native.tokens) == 64 and native.tokens == torch_ref.tokens
    assert native.decode_steps == 63 and native.decode_tps > 0 and native.prefill_tps > 0


@needs_kernel
def test_kv_cache_chunked_prefill_and_reset(micro):
    whole = load_engine(micro["t1"], "native", max_len=64).forward(PROMPT, all_logits=True)
    chunked = load_engine(micro["t1"], "native", max_len=64, max_batch=5)
    a = chunked.forward(PROMPT[:11], all_logits=True)
    b = chunked.forward(PROMPT[11:], all_logits=True)
    assert chunked.pos == len(PROMPT)
    np.testing.assert_allclose(np.concatenate([a, b]), whole, atol=1e-4)
    chunked.reset()
    np.testing.assert_allclose(chunked.forward(PROMPT), whole[-1], atol=1e-4)
    with pytest.raises(SpectraError, match="context full"):
        chunked.forward(list(range(64)))
    with pytest.raises(SpectraError, match="out of range"):
        chunked.forward([8192])


def test_torch_reference_without_kernel(micro):
    """The packed model runs through PyTorch too (what a machine without a compiler uses)."""
    eng = load_engine(micro["t2"], "torch", max_len=64)
    assert eng.backend == "torch"
    full = eng.forward(PROMPT, all_logits=True)
    eng.reset()
    eng.forward(PROMPT[:-1])
    np.testing.assert_allclose(eng.forward(PROMPT[-1:]), full[-1], atol=1e-4)


def test_sampling_rules():
    logits = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    assert Sampler(SamplingConfig())(logits) == 4
    p = Sampler(SamplingConfig(temperature=1.0, top_k=2)).probs(logits)
    assert np.count_nonzero(p) == 2 and p[4] > p[3] > 0
    p = Sampler(SamplingConfig(temperature=1.0, top_p=0.7)).probs(logits)
    full = np.exp(logits - 4) / np.exp(logits - 4).sum()
    assert np.count_nonzero(p) == 2 and full[4] < 0.7 <= full[3:].sum()
    p = Sampler(SamplingConfig(temperature=0.5)).probs(logits)
    np.testing.assert_allclose(p, np.exp(2 * logits - 8) / np.exp(2 * logits - 8).sum())
    a = [Sampler(SamplingConfig(temperature=1.0, seed=7))(logits) for _ in range(3)]
    s = Sampler(SamplingConfig(temperature=1.0, seed=7))
    assert a[0] == s(logits)
    draws = [s(logits) for _ in range(2000)]
    assert abs(np.mean(np.array(draws) == 4) - full[4]) < 0.05
    for bad in (dict(temperature=-1), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(SpectraError):
            SamplingConfig(**bad).validate()


class ScriptedEngine:
    """Emits a fixed token script (greedy) - tests the streaming/stop logic in isolation."""

    max_len = 1000

    def __init__(self, script, vocab):
        self.script, self.vocab, self.i = script, vocab, 0

    def reset(self):
        self.i = 0

    def forward(self, tokens, all_logits=False):
        logits = np.zeros(self.vocab, np.float32)
        logits[self.script[min(self.i, len(self.script) - 1)]] = 1.0
        self.i += 1
        return logits


def test_stop_strings_and_streaming(shared):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(shared("tokenizer", "gpt-neox-20b.json")))
    text = "Hello world, caf\u00e9 is open. STOP after this"
    script = tok.encode(text).ids
    eng = ScriptedEngine(script, tok.get_vocab_size())
    pieces = []
    res = generate(eng, [1], 50, tokenizer=tok, stop=["STOP", "never"], on_text=pieces.append)
    assert res.stop_reason == "stop"
    assert res.text == "Hello world, caf\u00e9 is open. " == "".join(pieces)
    assert all("S" not in p for p in pieces)  # the held-back prefix of the stop string never leaked
    res = generate(ScriptedEngine(script, tok.get_vocab_size()), [1], 5, tokenizer=tok)
    assert res.stop_reason == "length" and len(res.tokens) == 5 and res.text == tok.decode(script[:5])
    res = generate(ScriptedEngine(script, tok.get_vocab_size()), [1], 50, eos_id=script[3])
    assert res.stop_reason == "eos" and res.tokens == script[:3]
    events = list(stream(ScriptedEngine(script, tok.get_vocab_size()), [1], 4))
    assert [t for t, _ in events] == script[:4]
    with pytest.raises(SpectraError, match="exceeds the context"):
        generate(eng, [1] * 990, 20)


@needs_kernel
def test_generate_cli(micro, capsys):
    from spectra.cli import main

    assert main(["generate", str(micro["t1"]), "--prompt-ids", "5,6,7", "--max-new-tokens", "6", "--ignore-eos",
                 "--threads", "2", "--act", "int8"]) == 0
    cap = capsys.readouterr()
    assert len(cap.out.strip().split(",")) == 6 and "decode" in cap.err and "tok/s" in cap.err
    assert main(["generate", str(micro["ck"]), "--prompt-ids", "5,6,7", "--max-new-tokens", "4", "--json",
                 "--ignore-eos", "--temperature", "0.8", "--top-k", "20", "--seed", "1"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert len(rec["tokens"]) == 4 and rec["engine"].startswith("torch")
    assert main(["generate", str(micro["ck"]), "--backend", "native", "--prompt-ids", "1"]) == 2
    assert "not a packed model" in capsys.readouterr().err
    assert main(["generate", str(micro["t2"]), "--prompt", "hi"]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err


# ------------------------------------------------------------------ trained micro TriLM (acceptance)
@pytest.fixture(scope="module")
def trained(tmp_path_factory, trained_ckpt):
    """conftest's micro TriLM (trained briefly on tinyshakespeare, own small BPE), packed t2/f16."""
    ck = trained_ckpt("micro", "trilm")
    d = tmp_path_factory.mktemp("trained")
    write_packed(ck, d / "packed", "t2", "f16", progress=False)
    return {"ck": ck, "packed": d / "packed"}


@pytest.mark.slow
@needs_kernel
def test_trained_micro_logits_and_greedy(trained):
    from spectra.infer.generate import load_tokenizer

    model, _ = load_model(trained["ck"])
    tok = load_tokenizer(trained["packed"])
    prompt = tok.encode("ROMEO:\nWhat light through yonder window").ids if tok else PROMPT[:8]
    ref = TorchEngine(model, max_len=128)
    nat = load_engine(trained["packed"], "native", max_len=128)
    lr, ln = ref.forward(prompt, all_logits=True), nat.forward(prompt, all_logits=True)
    assert np.abs(lr).max() > 3  # trained: peaked logits, not the near-uniform ones of an init
    assert np.abs(ln - lr).max() < 1e-2
    a, b = generate(nat, prompt, 64), generate(ref, prompt, 64)
    assert len(a.tokens) == 64 and a.tokens == b.tokens
