"""The fused head + cross-entropy equals the plain logits path (value and gradients)."""

import pytest
import torch
import torch.nn.functional as F

from spectra.config import get_preset
from spectra.losses import head_cross_entropy, linear_cross_entropy
from spectra.model import Transformer
from spectra.ternary import to_ternary


def _plain(h, w, t, ignore_index=-100):
    return F.cross_entropy((h @ w.t()).float().flatten(0, -2), t.flatten(), ignore_index=ignore_index)


def _grads(fn, h, w, t, **kw):
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    loss = fn(h, w, t, **kw)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk_rows", [0, 1, 7, 64, 1000])
def test_value_and_grads_equal_plain(chunk_rows):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 50, 32, generator=g)
    w = torch.randn(301, 32, generator=g) * 0.3
    t = torch.randint(0, 301, (3, 50), generator=g)
    ref = _grads(_plain, h, w, t)
    got = _grads(linear_cross_entropy, h, w, t, chunk_rows=chunk_rows)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_ignore_index_and_all_ignored():
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(40, 16, generator=g), torch.randn(50, 16, generator=g)
    t = torch.randint(0, 50, (40,), generator=g)
    t[::3] = -100
    ref = _grads(_plain, h, w, t)
    got = _grads(linear_cross_entropy, h, w, t, chunk_rows=8)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    # Nothing to predict: 0 and zero gradients (F.cross_entropy gives NaN here).
    loss, gh, gw = _grads(linear_cross_entropy, h, w, torch.full((40,), -100))
    assert loss.item() == 0.0 and not gh.any() and not gw.any()


def test_scaled_backward_and_no_grad():
    g = torch.Generator().manual_seed(2)
    h, w = torch.randn(20, 8, generator=g), torch.randn(30, 8, generator=g)
    t = torch.randint(0, 30, (20,), generator=g)
    hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
    (_plain(hr, wr, t) * 1024.0).backward()  # a loss scale reaches the gradients
    hf, wf = h.clone().requires_grad_(), w.clone().requires_grad_()
    (linear_cross_entropy(hf, wf, t, chunk_rows=6) * 1024.0).backward()
    torch.testing.assert_close(hf.grad, hr.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(wf.grad, wr.grad, rtol=1e-5, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, t), _plain(h, w, t))


def test_bf16_autocast_close_to_plain():
    g = torch.Generator().manual_seed(3)
    h, w = torch.randn(64, 32, generator=g), torch.randn(200, 32, generator=g) * 0.2
    t = torch.randint(0, 200, (64,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _grads(_plain, h, w, t)
        got = _grads(linear_cross_entropy, h, w, t, chunk_rows=16)
    assert got[1].dtype == torch.float32 and got[2].dtype == torch.float32
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("family", ["floatlm", "trilm"])
def test_model_loss_path_equals_logits_path(family):
    cfg = get_preset("nano").model
    m = Transformer(cfg).init_weights(0)
    if family == "trilm":
        to_ternary(m)
    x = torch.randint(0, cfg.vocab_size, (2, 33))
    y = torch.randint(0, cfg.vocab_size, (2, 33))
    plain = F.cross_entropy(m(x).float().flatten(0, 1), y.flatten())
    plain.backward()
    ref = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    fused = m(x, targets=y, loss_fn=head_cross_entropy)
    fused.backward()
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-4, atol=1e-7, msg=n)


def test_shape_mismatch_is_clear():
    with pytest.raises(ValueError, match="targets hold 5 positions"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(5, dtype=torch.long))


def test_autocast_head_gradient_runs_in_low_precision(monkeypatch):
    """Under autocast the head-weight GEMM must not fall back to fp32 (out= ops skip autocast)."""
    import spectra.losses as L

    seen = []
    real_addmm = torch.addmm

    def spy(*a, **k):
        seen.append(k.get("out") is not None)
        return real_addmm(*a, **k)

    monkeypatch.setattr(L.torch, "addmm", spy)
    h = torch.randn(32, 16, requires_grad=True)
    w = torch.randn(40, 16, requires_grad=True)
    t = torch.randint(0, 40, (32,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        L.linear_cross_entropy(h, w, t, chunk_rows=8).backward()
    assert not seen  # no fp32 out= accumulation under autocast
    L.linear_cross_entropy(h, w, t, chunk_rows=8).backward()
    assert seen and all(seen)  # fp32: accumulated inside the GEMM


def test_empty_batch_gives_zero_loss_and_gradients():
    h = torch.randn(0, 8, requires_grad=True)
    w = torch.randn(12, 8, requires_grad=True)
    loss = linear_cross_entropy(h, w, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and not w.grad.any() and h.grad.shape == (0, 8)
