import pytest
import torch

from spectra.checkpoint import load_model, save_model
from spectra.config import ModelConfig
from spectra.errors import SpectraError
from spectra.model import Transformer
from spectra.ternary import (EPS, TernaryLinear, dequantize, latent_from_ternary, quantize_weight, recover_ternary,
                             shard_scales, ternary_linears, to_ternary)

CFG = ModelConfig(dim=96, n_layers=2, n_heads=6, ffn_dim=192, vocab_size=384, max_seq_len=32, mp=1)


@pytest.mark.parametrize("mp", [1, 2, 3, 6])
@pytest.mark.parametrize("split", ["col", "row"])
def test_per_shard_scales_and_levels(mp, split):
    torch.manual_seed(mp)
    w = torch.randn(48, 96) * torch.linspace(0.1, 3.0, 96)  # shards with very different scales
    q, g = quantize_weight(w, mp, split)
    assert set(q.unique().tolist()) <= {-1, 0, 1}
    assert g.shape == (mp,)
    blocks = w.view(mp, -1, 96) if split == "col" else w.view(48, mp, -1).transpose(0, 1)
    for i in range(mp):
        assert torch.allclose(g[i], EPS + blocks[i].abs().mean(), rtol=1e-6)
    wq = dequantize(q, g, split)
    assert len(wq.abs().unique()) <= 1 + mp
    # round(clip(W/gamma)) per element
    gam = g.repeat_interleave(48 // mp).view(48, 1) if split == "col" else g.repeat_interleave(96 // mp).view(1, 96)
    assert torch.equal(q.float(), torch.round(torch.clamp(w / gam, -1, 1)))


def test_ste_gradient_equals_dense_gradient():
    torch.manual_seed(0)
    lin = TernaryLinear(32, 16, mp=2, split="row")
    x = torch.randn(5, 32)
    y = torch.randn(5, 16)
    ((lin(x) - y) ** 2).sum().backward()
    q, g = lin.ternary_state()
    dense = dequantize(q, g, "row").requires_grad_(True)
    ((x @ dense.t() - y) ** 2).sum().backward()
    assert torch.allclose(lin.weight.grad, dense.grad, atol=1e-6)


def test_converter_keeps_other_params():
    m = Transformer(CFG).init_weights(0)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    to_ternary(m, mp=3)
    assert len(ternary_linears(m)) == 7 * CFG.n_layers
    for k, v in m.state_dict().items():
        if "proj" not in k:
            assert torch.equal(v, before[k]), k
        else:
            assert torch.equal(v, before[k])  # latent weights are the float weights
    splits = {n.rsplit(".", 1)[-1]: t.split for n, t in ternary_linears(m)}
    assert splits == {"q_proj": "col", "k_proj": "col", "v_proj": "col", "o_proj": "row",
                      "gate_proj": "col", "up_proj": "col", "down_proj": "row"}


def test_binary_variant():
    w = torch.randn(8, 16)
    q, a = quantize_weight(w, 1, "col", mode="binary")
    assert set(q.unique().tolist()) <= {-1, 1}
    assert torch.allclose(a, w.abs().mean().view(1))
    assert torch.equal(q.float(), torch.where(w - w.mean() >= 0, 1.0, -1.0))


@pytest.mark.parametrize("mp", [1, 2, 3, 6])
@pytest.mark.parametrize("split", ["col", "row"])
def test_recover_and_latent_reproduce_exactly(mp, split):
    torch.manual_seed(0)
    w = torch.randn(36, 72)
    q, g = quantize_weight(w, mp, split)
    unpacked = dequantize(q, g, split)
    q2, g2 = recover_ternary(unpacked, mp, split)
    assert torch.equal(q2, q) and torch.equal(g2, g)
    latent = latent_from_ternary(q, g, split)
    q3, g3 = quantize_weight(latent, mp, split)
    assert torch.equal(q3, q)
    assert torch.allclose(g3, g, rtol=1e-6, atol=0)
    # naive re-quantization of the unpacked weight changes gamma (the trap the docs warn about)
    _, naive = quantize_weight(unpacked, mp, split)
    assert not torch.allclose(naive, g, rtol=1e-3)


def test_recover_rejects_non_ternary():
    with pytest.raises(SpectraError, match="not ternary"):
        recover_ternary(torch.randn(8, 8), 1, "col")


def test_trilm_checkpoint_roundtrip(tmp_path):
    m = to_ternary(Transformer(CFG.replace(mp=3)).init_weights(0))
    save_model(m, tmp_path / "tri", "trilm")
    dense, d = load_model(tmp_path / "tri")
    assert d["pretraining_model_parallel"] == 3
    tri, _ = load_model(tmp_path / "tri", ternary=True)
    idx = torch.randint(0, 384, (2, 12))
    with torch.no_grad():
        ref = m.eval()(idx)
        assert torch.allclose(dense(idx), ref, atol=1e-6)
        assert torch.allclose(tri(idx), ref, atol=1e-5)
    for (n, a), (_, b) in zip(ternary_linears(m), ternary_linears(tri)):
        qa, ga = a.ternary_state()
        qb, gb = b.ternary_state()
        assert torch.equal(qa, qb), n
        assert torch.allclose(ga, gb, rtol=1e-6)


def test_shard_validation():
    with pytest.raises(SpectraError, match="mp=4"):
        shard_scales(torch.randn(6, 8), 4, "col")
