"""GGUF export: layout, lossless ternary blocks, tokenizer, llama.cpp loading (fast, random models)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from spectra.checkpoint import load_model, save_model
from spectra.cli import main
from spectra.config import ModelConfig
from spectra.errors import SpectraError
from spectra.interop.ggml_ref import llama_cpp_forward, model_from_gguf, read_gguf
from spectra.interop.gguf_export import export_gguf, gguf_name, permute_qk, unpermute_qk
from spectra.model import Transformer
from spectra.ternary import dequantize, recover_ternary, split_of, to_ternary


def _cfg(mp=1, dim=256, ffn=512) -> ModelConfig:
    # rows of 256 (dim) and 512 (ffn): TQ blocks of 256 fit every matrix
    return ModelConfig(dim=dim, n_layers=2, n_heads=4, ffn_dim=ffn, vocab_size=512, mp=mp, max_seq_len=128).validate()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from conftest import shared_data
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = shared_data("text", "tinyshakespeare.txt").read_text()[:200_000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    p = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(p))
    return p


def _ckpt(path, tokenizer, family="trilm", mp=1, seed=0, **kw):
    cfg = _cfg(mp, **kw)
    m = Transformer(cfg).init_weights(seed)
    with torch.no_grad():  # larger head so logits (and greedy margins) are not tiny
        m.lm_head.weight.mul_(20)
    if family == "trilm":
        to_ternary(m)
    save_model(m, path, family, tokenizer=tokenizer)
    return path


@pytest.fixture(scope="module")
def trilm(tmp_path_factory, tokenizer):
    return _ckpt(tmp_path_factory.mktemp("ck") / "trilm", tokenizer)


def test_permutation_is_the_llama_cpp_one():
    w = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3)  # 2 heads of dim 4
    p = permute_qk(w, 2)
    # per head, rows (0, 2, 1, 3): first half and second half interleaved
    assert torch.equal(p[:4], w[[0, 2, 1, 3]]) and torch.equal(p[4:], w[[4, 6, 5, 7]])
    assert torch.equal(unpermute_qk(p, 2), w)
    assert gguf_name("layers.3.mlp.down_proj.weight") == "blk.3.ffn_down.weight"
    assert gguf_name("lm_head.weight") == "output.weight"


@pytest.mark.parametrize("qt", ["tq2_0", "tq1_0"])
def test_ternary_gguf_is_lossless_with_gamma_block_scales(trilm, tmp_path, qt):
    res = export_gguf(trilm, tmp_path / "m.gguf", qtype=qt)
    assert not res.fallbacks and 0 < res.gamma_max_rel_rounding < 1e-3
    meta, tensors = read_gguf(tmp_path / "m.gguf")
    model, _ = load_model(trilm)
    cfg = model.cfg
    for name, p in model.named_parameters():
        arr, t = tensors[gguf_name(name)]
        if name.endswith("proj.weight"):
            assert t == qt.upper(), name
            w = torch.from_numpy(arr.copy())
            if "q_proj" in name or "k_proj" in name:
                w = unpermute_qk(w, cfg.n_heads)
            q, g = recover_ternary(p, cfg.mp, split_of(name))
            assert torch.equal(w, dequantize(q, g.half().float(), split_of(name))), name  # trits exact, gamma fp16
        elif "norm" in name:
            assert t == "F32" and np.array_equal(arr.reshape(-1), p.detach().numpy())
        else:
            assert t == "F16", name
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == 2 and meta["llama.embedding_length"] == 256
    assert meta["llama.feed_forward_length"] == 512 and meta["llama.attention.head_count"] == 4
    assert meta["llama.attention.head_count_kv"] == 4 and meta["llama.rope.dimension_count"] == 64
    assert meta["llama.context_length"] == 128 and meta["llama.rope.freq_base"] == 10000.0
    assert abs(meta["llama.attention.layer_norm_rms_epsilon"] - 1e-5) < 1e-12
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.bos_token_id"] == 0 and meta["tokenizer.ggml.eos_token_id"] == 0
    assert meta["spectra.family"] == "trilm" and meta["spectra.pretraining_model_parallel"] == 1
    import gguf

    ft = {"tq2_0": gguf.LlamaFileType.MOSTLY_TQ2_0, "tq1_0": gguf.LlamaFileType.MOSTLY_TQ1_0}[qt]
    assert meta["general.file_type"] == ft
    r = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    toks = r.fields["tokenizer.ggml.tokens"].contents()
    assert len(toks) == 512 and toks[0] == "<|endoftext|>" and toks[511] == "[PAD511]"
    assert len(r.fields["tokenizer.ggml.merges"].contents()) > 200


def test_mp2_shards_narrower_than_a_block_fall_back_to_f16_exactly(tmp_path, tokenizer):
    ck = _ckpt(tmp_path / "mp2", tokenizer, mp=2)  # row-parallel shards: o 128 columns, down 256
    res = export_gguf(ck, tmp_path / "m.gguf", qtype="tq2_0")
    _, tensors = read_gguf(tmp_path / "m.gguf")
    model, _ = load_model(ck)
    for i, layer in enumerate(model.layers):
        q, g = recover_ternary(layer.self_attn.o_proj.weight, 2, "row")
        g16 = g.half().float()
        name = f"blk.{i}.attn_output.weight"
        # a 256-block spans both 128-wide shards: exact in TQ2_0 only if their fp16 gammas coincide
        assert (name in res.fallbacks) == bool(g16[0] != g16[1])
        assert torch.equal(torch.from_numpy(tensors[name][0].copy()), dequantize(q, g16, "row"))
        assert res.types[f"blk.{i}.ffn_down.weight"] == "TQ2_0"  # 256-wide shards: aligned
    assert "blk.0.attn_output.weight" in res.fallbacks and res.types["blk.0.attn_output.weight"] == "F16"
    assert "straddle shards" in res.fallbacks["blk.0.attn_output.weight"]
    # with shards of 256 columns (dim 512 / mp 2) every block sits inside one shard: all TQ2_0
    ck = _ckpt(tmp_path / "mp2w", tokenizer, mp=2, dim=512, ffn=512)
    assert not export_gguf(ck, tmp_path / "w.gguf", qtype="tq2_0").fallbacks


def test_types_and_head_selection(tmp_path, tokenizer, trilm):
    fl = _ckpt(tmp_path / "float", tokenizer, family="floatlm")
    res = export_gguf(fl, tmp_path / "q8.gguf", qtype="q8_0")
    assert {res.types[k] for k in res.types if "norm" not in k} == {"Q8_0"}
    res = export_gguf(fl, tmp_path / "f16.gguf", qtype="f16", head_type="q8_0", embed_type="f32")
    assert res.types["output.weight"] == "Q8_0" and res.types["token_embd.weight"] == "F32"
    assert res.types["blk.1.ffn_up.weight"] == "F16"
    res = export_gguf(trilm, tmp_path / "t.gguf", head_type="q8_0")  # default type for a TriLM: tq2_0
    assert res.qtype == "tq2_0" and res.types["output.weight"] == "Q8_0"
    assert res.nbytes == (tmp_path / "t.gguf").stat().st_size


def test_bad_inputs(tmp_path, tokenizer, trilm):
    fl = _ckpt(tmp_path / "float", tokenizer, family="floatlm")
    with pytest.raises(SpectraError, match="--type tq2_0 stores ternary weights, but this checkpoint is a floatlm"):
        export_gguf(fl, tmp_path / "x.gguf", qtype="tq2_0")
    with pytest.raises(SpectraError, match="should end in .gguf"):
        export_gguf(trilm, tmp_path / "x.bin")
    m = Transformer(_cfg()).init_weights(0)
    save_model(m, tmp_path / "notok", "floatlm")
    with pytest.raises(SpectraError, match="no tokenizer"):
        export_gguf(tmp_path / "notok", tmp_path / "x.gguf")
    wl = tmp_path / "wordlevel.json"
    from tokenizers import Tokenizer, models, pre_tokenizers

    t = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.save(str(wl))
    with pytest.raises(SpectraError, match="is not BPE"):
        export_gguf(tmp_path / "notok", tmp_path / "x.gguf", tokenizer=wl)
    big = json.loads(tokenizer.read_text())
    big["added_tokens"].append({"id": 9999, "content": "<x>", "special": True})
    (tmp_path / "big.json").write_text(json.dumps(big))
    with pytest.raises(SpectraError, match="token id 9999 does not fit"):
        export_gguf(tmp_path / "notok", tmp_path / "x.gguf", tokenizer=tmp_path / "big.json")
    # a TriLM checkpoint whose matrix was tampered with is refused, naming the tensor
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(trilm, bad)
    sd = load_file(str(bad / "model.safetensors"))
    sd["model.layers.1.self_attn.v_proj.weight"][0, :3] = torch.tensor([0.1, 0.2, 0.3])
    save_file(sd, str(bad / "model.safetensors"))
    with pytest.raises(SpectraError, match="layers.1.self_attn.v_proj.weight"):
        export_gguf(bad, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
    assert main(["export", str(bad), "--to", "gguf", "--out", str(tmp_path / "x.gguf")]) == 2


def test_cli_export_gguf(trilm, tmp_path, capsys):
    assert main(["export", str(trilm), "--to", "gguf", "--type", "tq1_0", "--out", str(tmp_path / "m.gguf")]) == 0
    out = capsys.readouterr().out
    assert "TQ1_0" in out and "gamma rounded to fp16" in out


def test_readback_matches_our_model(trilm, tmp_path):
    """F32 GGUF read back (names, Q/K permutation undone) computes exactly our logits."""
    export_gguf(trilm, tmp_path / "f32.gguf", qtype="f32")
    ours, _ = load_model(trilm)
    back, _, _ = model_from_gguf(tmp_path / "f32.gguf", emulate=False)
    idx = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(back(idx), ours(idx), rtol=0, atol=1e-5)


# ---- llama.cpp ------------------------------------------------------------------------------

def _llama(path, **kw):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    return llama_cpp.Llama(str(path), n_ctx=128, n_threads=2, logits_all=True, verbose=False, flash_attn=False, **kw)


def _scores(llm, ids):
    llm.reset()
    llm.eval(ids)
    return torch.tensor(np.array(llm.scores[: len(ids)]))


@pytest.mark.parametrize("qt", ["f16", "tq2_0", "tq1_0"])
def test_llama_cpp_loads_and_matches_reference(trilm, tmp_path, qt, tokenizer):
    export_gguf(trilm, tmp_path / "m.gguf", qtype=qt)
    llm = _llama(tmp_path / "m.gguf")
    try:
        from tokenizers import Tokenizer

        text = "ROMEO:\nBut soft, what light through yonder window breaks? 1234"
        ids = Tokenizer.from_file(str(tokenizer)).encode(text).ids
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids  # embedded tokenizer agrees
        assert llm.n_vocab() == 512 and llm.token_bos() == 0 and llm.token_eos() == 0
        got = _scores(llm, ids)
    finally:
        llm.close()
    ours, _ = load_model(trilm)
    with torch.no_grad():
        ref = ours(torch.tensor([ids]))[0]
    emu = llama_cpp_forward(model_from_gguf(tmp_path / "m.gguf")[0], torch.tensor(ids))
    scale = ref.abs().max().item()
    err_ours = (got - ref).abs().max().item() / scale
    err_emu = (got - emu).abs().max().item() / scale
    if qt == "f16":  # fp16 rounding of activations and KV only
        assert err_ours < 2e-3 and err_emu < 5e-4
    else:  # 8-bit activations (Q8_K): the emulation models them, so it is closer than fp32 is
        assert err_ours < 3e-2 and err_emu < err_ours
