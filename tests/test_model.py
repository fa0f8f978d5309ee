import pytest
import torch

from spectra.checkpoint import load_model, save_model
from spectra.config import ModelConfig
from spectra.model import KVCache, Transformer

CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, ffn_dim=160, vocab_size=256, max_seq_len=64)


def _model(seed=0, cfg=CFG):
    return Transformer(cfg).init_weights(seed).eval()


def test_matches_hf_llama():
    transformers = pytest.importorskip("transformers", reason="transformers not installed (the hf extra; scripts/setup.sh installs it)")
    from spectra.checkpoint import hf_config, to_hf_names

    torch.manual_seed(0)
    m = _model()
    with torch.no_grad():  # make norms non-trivial too
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    d = hf_config(CFG, "floatlm")
    d.pop("spectra")
    hf_cfg = transformers.LlamaConfig(**d)
    hf_cfg._attn_implementation = "eager"
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    missing = hf.load_state_dict(to_hf_names(m.state_dict()), strict=False)
    assert not missing.missing_keys and not missing.unexpected_keys
    idx = torch.randint(0, CFG.vocab_size, (3, 40))
    with torch.no_grad():
        ours = m(idx)
        ref = hf(idx).logits
    assert (ours - ref).abs().max().item() <= 1e-5


def test_kv_cache_matches_full_forward():
    m = _model()
    idx = torch.randint(0, CFG.vocab_size, (2, 20))
    with torch.no_grad():
        full = m(idx)
        cache = KVCache.empty(CFG, 2, 32)
        a = m(idx[:, :7], cache)  # prefill
        b = m(idx[:, 7:12], cache)  # chunked prefill on a cache
        steps = [m(idx[:, i : i + 1], cache) for i in range(12, 20)]  # decode
    inc = torch.cat([a, b, *steps], dim=1)
    assert torch.allclose(inc, full, atol=1e-5)


def test_explicit_positions_and_mask_pack_two_sequences_in_one_row():
    # Eval's prefix-tree batching: prefix | branch a | branch b in one row; each branch sees the
    # prefix and itself, with positions continuing from the prefix (as two separate sequences).
    m = _model()
    g = torch.Generator().manual_seed(0)
    pre, a, b = (torch.randint(0, CFG.vocab_size, (n,), generator=g) for n in (5, 3, 4))
    tok = torch.cat([pre, a, b])[None]
    pos = torch.cat([torch.arange(5), torch.arange(5, 8), torch.arange(5, 9)])[None]
    branch = torch.tensor([0] * 5 + [1] * 3 + [2] * 4)
    L = tok.shape[1]
    causal = torch.arange(L)[None, :] <= torch.arange(L)[:, None]
    mask = (causal & ((branch[None, :] == 0) | (branch[None, :] == branch[:, None])))[None, None]
    with torch.no_grad():
        h = m.hidden(tok, positions=pos, mask=mask)[0]
        ha = m.hidden(torch.cat([pre, a])[None])[0]
        hb = m.hidden(torch.cat([pre, b])[None])[0]
        plain = m.hidden(tok, positions=torch.arange(L)[None])  # explicit default positions, causal
    torch.testing.assert_close(h[:8], ha, rtol=0, atol=1e-5)
    torch.testing.assert_close(h[8:], hb[5:], rtol=0, atol=1e-5)
    assert torch.equal(plain, m.hidden(tok))
    assert (h[8:] - m.hidden(tok)[0, 8:]).abs().max() > 1e-3  # the mask really changed branch b


def test_mask_with_cache_and_positions_past_the_table():
    m = _model()
    idx = torch.randint(0, CFG.vocab_size, (1, 12))
    with torch.no_grad():
        cache = KVCache.empty(CFG, 1, 16)
        m(idx[:, :8], cache)
        causal = torch.ones(4, 12, dtype=torch.bool).tril(diagonal=8)[None, None]
        got = m(idx[:, 8:], cache)[:, -1]  # the chunked-prefill causal mask, built inside
        cache2 = KVCache.empty(CFG, 1, 16)
        m(idx[:, :8], cache2)
        masked = m.lm_head(m.hidden(idx[:, 8:], cache2, mask=causal))[:, -1]
        assert torch.equal(got, masked)
        far = torch.arange(CFG.max_seq_len, CFG.max_seq_len + 12)[None]  # beyond the RoPE table
        cos, sin = m.rope_at(far)
        ref_cos, ref_sin = m.rope(CFG.max_seq_len, 12)
        assert torch.equal(cos[0, 0], ref_cos) and torch.equal(sin[0, 0], ref_sin)


def test_model_imports_only_torch_and_config():
    import ast

    import spectra.model

    tree = ast.parse(open(spectra.model.__file__).read())
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            mods.add(node.module)
    assert {m for m in mods if m.startswith("spectra")} == {"spectra.config"}
    assert {m.split(".")[0] for m in mods} <= {"torch", "spectra", "__future__", "math", "dataclasses", "typing"}


def test_init_is_seeded():
    a, b, c = _model(1), _model(1), _model(2)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_save_load_roundtrip(tmp_path):
    m = _model()
    save_model(m, tmp_path / "ckpt", "floatlm", meta={"step": 3})
    m2, d = load_model(tmp_path / "ckpt")
    assert d["spectra"]["step"] == 3
    idx = torch.randint(0, CFG.vocab_size, (1, 10))
    with torch.no_grad():
        assert torch.equal(m(idx), m2(idx))


def test_loss_is_finite_and_backprops():
    m = Transformer(CFG).init_weights(0)
    idx = torch.randint(0, CFG.vocab_size, (2, 17))
    loss = m.loss(idx[:, :-1], idx[:, 1:])
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.5
    assert all(p.grad is not None for p in m.parameters())


def test_atomic_writes_keep_previous_and_use_normal_permissions(tmp_path):
    import os
    import stat

    from spectra.fsutil import atomic_dir, atomic_write_text

    from spectra.fsutil import atomic_path

    f = tmp_path / "a.txt"
    atomic_write_text(f, "one")
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_dir(tmp_path / "d") as d:
            (d / "x").write_text("partial")
            raise RuntimeError("interrupted")
    assert not (tmp_path / "d").exists() and not list(tmp_path.glob(".d.*"))
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_path(f) as tmp:
            tmp.write_text("two")
            raise RuntimeError("interrupted")
    assert f.read_text() == "one"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask
    with atomic_dir(tmp_path / "d") as d:
        (d / "x").write_text("ok")
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o777 & ~umask
