"""GPTQ / RTN on single random layers: error, grid, groups, act-order, damping, bad input."""

import warnings

import pytest
import torch

from spectra.errors import SpectraError
from spectra.quant.gptq import Hessian, gptq_quantize, output_error
from spectra.quant.rtn import SUPPORTED_BITS, dequantize, find_scale, fake_quant, rtn_quantize, zero_point


def correlated_inputs(cols: int, n: int = 8, t: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5
    scale = torch.rand(cols, generator=g) * 2 + 0.1  # unequal channel energies (act-order has work to do)
    return (torch.randn(n, t, cols, generator=g) @ mix) * scale + 0.3 * torch.randn(cols, generator=g)


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    h = Hessian(x.shape[-1])
    h.add(x)
    return h.finalize()


@pytest.fixture(scope="module")
def layer():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(192, 256, generator=g) * 0.02
    x = correlated_inputs(256)
    return w, x, hessian_of(x)


def test_hessian_is_2xxt_over_nsamples():
    x = torch.randn(3, 10, 16)
    h = Hessian(16)
    h.add(x[:2])
    h.add(x[2])  # a single 2-D sequence counts as one sample
    flat = x.reshape(-1, 16)
    torch.testing.assert_close(h.finalize(), 2 * flat.t() @ flat / 3)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_output_error(layer, bits, act_order):
    w, x, H = layer
    g = gptq_quantize(w, H.clone(), bits, 128, act_order=act_order)
    r = rtn_quantize(w, bits, 128)
    e_g, e_r = output_error(w, g.dequantize(), x), output_error(w, r.dequantize(), x)
    assert e_g < 0.8 * e_r, (e_g, e_r)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("act_order", [False, True])
def test_grid_levels_and_scales(layer, bits, act_order):
    w, _, H = layer
    gs = 64
    res = gptq_quantize(w, H.clone(), bits, gs, act_order=act_order)
    assert res.codes.dtype == torch.uint8 and int(res.codes.max()) <= 2 ** bits - 1
    assert res.scales.shape == (w.shape[0], w.shape[1] // gs)
    assert torch.equal(res.scales, res.scales.half().float())  # what the packed format stores
    wq = res.dequantize()
    z = zero_point(bits)
    for grp in range(res.scales.shape[1]):
        cols = (res.g_idx == grp).nonzero().flatten()
        assert len(cols) == gs  # group size honoured, whatever the order
        vals = wq[:, cols] / res.scales[:, grp : grp + 1]
        assert torch.equal(vals, vals.round())  # on the grid of the stored scale
        assert vals.min() >= -z and vals.max() <= z - 1  # symmetric grid, 2^bits levels
        for row in range(0, w.shape[0], 37):
            assert len(torch.unique(wq[row, cols])) <= 2 ** bits


def test_error_decreases_with_bits(layer):
    w, x, H = layer
    errs = [output_error(w, gptq_quantize(w, H.clone(), b, 128).dequantize(), x) for b in (2, 3, 4, 6, 8)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs


def test_group_size_honoured_and_per_row(layer):
    w, _, H = layer
    for gs in (32, 128, 256):
        res = gptq_quantize(w, H.clone(), 4, gs)
        assert res.scales.shape[1] == 256 // gs
        assert torch.equal(res.g_idx, torch.arange(256, dtype=torch.int32) // gs)
    res = gptq_quantize(w, H.clone(), 4, -1)
    assert res.scales.shape == (192, 1) and int(res.g_idx.max()) == 0
    torch.testing.assert_close(res.scales[:, 0], find_scale(w, 4))


def test_rtn_is_round_to_nearest_per_group():
    w = torch.randn(64, 256)
    res = rtn_quantize(w, 4, 64)
    for gi in range(4):
        blk = w[:, gi * 64 : (gi + 1) * 64]
        s = find_scale(blk, 4)
        assert torch.equal(res.scales[:, gi], s)
        assert torch.equal(res.dequantize()[:, gi * 64 : (gi + 1) * 64], fake_quant(blk, s, 4))
    # The max-magnitude weight of each group lands on the grid's edge.
    assert (res.codes == 0).any() or (res.codes == 15).any()


def test_diagonal_hessian_reduces_to_rtn_and_act_order_unpermutes():
    """With a diagonal H nothing propagates: GPTQ == RTN on its groups, whatever the column order."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 128, generator=g)
    H = torch.diag(torch.rand(128, generator=g) + 0.5)
    plain = gptq_quantize(w, H.clone(), 4, 32)
    assert torch.equal(plain.dequantize(), rtn_quantize(w, 4, 32).dequantize())
    # act-order + static groups: groups on the original columns -> identical to RTN.
    st = gptq_quantize(w, H.clone(), 4, 32, act_order=True, static_groups=True)
    assert torch.equal(st.dequantize(), rtn_quantize(w, 4, 32).dequantize())
    assert torch.equal(st.g_idx, torch.arange(128, dtype=torch.int32) // 32)
    # act-order alone: groups are consecutive in the permuted order (decreasing H_jj).
    ao = gptq_quantize(w, H.clone(), 4, 32, act_order=True)
    perm = torch.argsort(torch.diag(H), descending=True)
    for grp in range(4):
        members = perm[grp * 32 : (grp + 1) * 32]
        assert torch.equal(torch.sort((ao.g_idx == grp).nonzero().flatten()).values, torch.sort(members).values)
        s = find_scale(w[:, members], 4)
        assert torch.equal(ao.dequantize()[:, members], fake_quant(w[:, members], s, 4))


def test_dead_columns_are_zeroed():
    x = correlated_inputs(64, n=2, t=64)
    x[..., 5] = 0
    x[..., 17] = 0
    w = torch.randn(32, 64)
    res = gptq_quantize(w, hessian_of(x), 4, 32)
    wq = res.dequantize()
    assert torch.all(wq[:, [5, 17]] == 0)
    assert res.extra["dead_columns"] == 2


def test_singular_hessian_retries_damping_with_warning():
    x = torch.randn(4, 64)  # rank 4 in 64 dims: no dead column, but singular
    w = torch.randn(32, 64)
    with pytest.warns(RuntimeWarning, match="not positive definite"):
        res = gptq_quantize(w, x.t() @ x, 4, 32, damp=0.0)
    assert res.damp > 0 and torch.isfinite(res.dequantize()).all()


def test_hopeless_hessian_is_a_clear_error():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(SpectraError, match="singular"):
            gptq_quantize(torch.randn(8, 32), -torch.eye(32), 4, 32)
    H = torch.eye(32)
    H[0, 0] = float("nan")
    with pytest.raises(SpectraError, match="NaN"):
        gptq_quantize(torch.randn(8, 32), H, 4, 32)


@pytest.mark.parametrize("bits", [0, 1, 5, 7, 16])
def test_unsupported_bits(bits):
    with pytest.raises(SpectraError, match="unsupported bits"):
        gptq_quantize(torch.randn(8, 64), torch.eye(64), bits, 32)
    with pytest.raises(SpectraError, match="unsupported bits"):
        rtn_quantize(torch.randn(8, 64), bits, 32)


def test_group_size_must_divide_input_dim():
    with pytest.raises(SpectraError, match="does not divide the input dimension 96"):
        gptq_quantize(torch.randn(8, 96), torch.eye(96), 4, 64)
    with pytest.raises(SpectraError, match="group size"):
        rtn_quantize(torch.randn(8, 96), 4, 0)


def test_dequantize_matches_codes():
    codes = torch.tensor([[0, 15, 8, 7]], dtype=torch.uint8)
    scales = torch.tensor([[0.5, 0.25]])
    g_idx = torch.tensor([0, 0, 1, 1], dtype=torch.int32)
    assert dequantize(codes, scales, g_idx, 4).tolist() == [[-4.0, 3.5, 0.0, -0.25]]
