"""Acceptance (slow): trained micro TriLM / FloatLM -> GGUF -> llama.cpp greedy == ours for 32 tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spectra.checkpoint import load_model
from spectra.interop.ggml_ref import greedy_llama_cpp, model_from_gguf
from spectra.interop.gguf_export import export_gguf

pytestmark = pytest.mark.slow
N = 32
PROMPTS = ["ROMEO:\nWhat light through yonder window", "KING HENRY:\nNow, lords, for France",
           "First Citizen:\nBefore we proceed any further, hear me speak.", "JULIET:\nO Romeo, Romeo!"]


@pytest.fixture(scope="module")
def trained(trained_ckpt):
    """Checkpoints by family: conftest's micro runs (40 x 2048 tokens of tinyshakespeare, own BPE), trained lazily."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    return lambda fam: trained_ckpt("micro", fam)


@torch.no_grad()
def _ours(model, prompt):
    """Greedy tokens and the smallest top-1/top-2 logit margin along the way (fp32, full recompute)."""
    ids, margin = list(prompt), float("inf")
    for _ in range(N):
        logits = model(torch.tensor([ids]))[0, -1]
        top = logits.topk(2).values
        margin = min(margin, float(top[0] - top[1]))
        ids.append(int(logits.argmax()))
    return ids[len(prompt):], margin


def _llama_cpp_greedy(path, prompt):
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=256, n_threads=2, logits_all=True, verbose=False, flash_attn=False)
    try:
        llm.eval(list(prompt))
        out = []
        for _ in range(N):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(nxt)
            llm.eval([nxt])
        return out
    finally:
        llm.close()


def _prompt(model, ck):
    """The prompt (fixed list) whose fp32 greedy continuation has the largest smallest margin:
    chosen from our model alone, before llama.cpp is run."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ck / "tokenizer.json"))
    best = max(((_ours(model, tok.encode(p).ids), tok.encode(p).ids) for p in PROMPTS), key=lambda x: x[0][1])
    (ref, margin), prompt = best
    return prompt, ref, margin


@pytest.mark.parametrize("fam,qt", [("trilm", "tq2_0"), ("trilm", "tq1_0"), ("trilm", "f16"),
                                    ("floatlm", "f16"), ("floatlm", "q8_0")])
def test_llama_cpp_greedy_equals_ours(trained, fam, qt, tmp_path, capsys):
    ck = trained(fam)
    model, _ = load_model(ck)
    prompt, ref, margin = _prompt(model, ck)
    res = export_gguf(ck, tmp_path / f"{fam}-{qt}.gguf", qtype=qt)
    assert not res.fallbacks
    got = _llama_cpp_greedy(tmp_path / f"{fam}-{qt}.gguf", prompt)
    emu = greedy_llama_cpp(model_from_gguf(tmp_path / f"{fam}-{qt}.gguf")[0], prompt, N)
    same = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), N)
    with capsys.disabled():
        print(f"\n{fam} {qt}: llama.cpp == ours for {same}/{N} tokens (min fp32 margin {margin:.3f}); "
              f"llama.cpp == emulated reference: {got == emu}")
    assert got == ref


@pytest.mark.parametrize("fam,qt", [("trilm", "tq2_0"), ("trilm", "tq1_0"), ("floatlm", "q8_0"), ("floatlm", "f16")])
def test_llama_cpp_teacher_forced_argmax_and_logits(trained, fam, qt, tmp_path, capsys):
    """Over 200 positions of held-out text: llama.cpp's next-token argmax equals ours, and for
    8-bit-activation types the llama.cpp-numerics reference is closer to it than fp32 is."""
    import llama_cpp
    from conftest import shared_data
    from tokenizers import Tokenizer

    from spectra.interop.ggml_ref import llama_cpp_forward

    ck = trained(fam)
    model, _ = load_model(ck)
    tok = Tokenizer.from_file(str(ck / "tokenizer.json"))
    ids = tok.encode(shared_data("text", "tinyshakespeare.txt").read_text()[-4000:]).ids[:200]
    export_gguf(ck, tmp_path / "m.gguf", qtype=qt)
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=256, n_threads=2, logits_all=True, verbose=False,
                          flash_attn=False)
    try:
        llm.eval(ids)
        got = torch.tensor(np.array(llm.scores[: len(ids)]))
    finally:
        llm.close()
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0]
    emu = llama_cpp_forward(model_from_gguf(tmp_path / "m.gguf")[0], torch.tensor(ids))
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    scale = ref.abs().max().item()
    e_ours, e_emu = (got - ref).abs().max().item() / scale, (got - emu).abs().max().item() / scale
    with capsys.disabled():
        print(f"\n{fam} {qt}: argmax agreement {agree:.3f} over {len(ids)} positions; max |dlogit|/max|logit| "
              f"vs ours {e_ours:.2e}, vs llama.cpp-numerics reference {e_emu:.2e}")
    assert agree >= 0.98
    assert e_emu < e_ours
