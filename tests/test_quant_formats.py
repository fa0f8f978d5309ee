"""Packed GPTQ layout: bit packing vs AutoGPTQ's, packed <-> unpacked exactness, configs."""

import json

import numpy as np
import pytest
import torch

from spectra.config import get_preset
from spectra.errors import SpectraError
from spectra.model import Transformer
from spectra.quant import QuantSpec, is_packed_gptq, load_quantized, quantize_model, save_quantized
from spectra.quant.formats import dequantize_packed, pack_bits, pack_linear, unpack_bits, unpack_linear
from spectra.quant.rtn import SUPPORTED_BITS, rtn_quantize


pytestmark = pytest.mark.usefixtures("one_thread")


def autogptq_pack_reference(intweight: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ's pack loop (written out independently), intweight [K, N] -> uint32 [K*bits/32, N]."""
    K, N = intweight.shape
    iw = intweight.astype(np.uint32)
    q = np.zeros((K // 32 * bits, N), dtype=np.uint32)
    i = row = 0
    while row < q.shape[0]:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                q[row] |= iw[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        else:  # 3 bits: 32 values over 3 words
            for j in range(i, i + 10):
                q[row] |= iw[j] << (3 * (j - i))
            i += 10
            q[row] |= iw[i] << 30
            row += 1
            q[row] |= (iw[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                q[row] |= iw[j] << (3 * (j - i) + 1)
            i += 10
            q[row] |= iw[i] << 31
            row += 1
            q[row] |= (iw[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                q[row] |= iw[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return q


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_matches_autogptq_layout(bits):
    g = torch.Generator().manual_seed(bits)
    v = torch.randint(0, 2 ** bits, (128, 48), generator=g)
    ours = pack_bits(v, bits).numpy().view(np.uint32)
    assert np.array_equal(ours, autogptq_pack_reference(v.numpy(), bits))


def test_autogptq_shift_unpack_of_4bit():
    """How the AutoGPTQ torch kernel unpacks 2/4/8 bits: (qweight >> [0, b, 2b..]) & maxq."""
    v = torch.randint(0, 16, (64, 8))
    q = pack_bits(v, 4)
    wf = torch.arange(0, 32, 4, dtype=torch.int32)
    w = torch.bitwise_and(torch.bitwise_right_shift(q.unsqueeze(1).expand(-1, 8, -1), wf[None, :, None]), 15)
    assert torch.equal(w.reshape(64, 8), v.to(torch.int32))


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_pack_roundtrip(bits):
    v = torch.randint(0, 2 ** bits, (96, 40))
    p = pack_bits(v, bits)
    assert p.dtype == torch.int32 and p.shape == (96 * bits // 32, 40)
    assert torch.equal(unpack_bits(p, bits), v.to(torch.int32))


def test_six_bit_layout_is_a_bit_stream():
    """Documented 6-bit layout: 32 values -> 6 words, LSB-first, value 5 straddles words 0/1."""
    v = torch.zeros(32, 1, dtype=torch.int64)
    v[5, 0] = 0b101011  # bits 30..35 of the stream
    p = pack_bits(v, 6).numpy().view(np.uint32)[:, 0]
    assert p[0] == (0b11 << 30) and p[1] == 0b1010 and not p[2:].any()


def test_pack_rejects_bad_shapes():
    with pytest.raises(SpectraError, match="multiple of 32"):
        pack_bits(torch.zeros(40, 4, dtype=torch.int64), 4)
    with pytest.raises(SpectraError, match="out of range"):
        pack_bits(torch.full((32, 1), 16), 4)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_pack_linear_roundtrip_and_zero_convention(bits, fmt):
    res = rtn_quantize(torch.randn(64, 128), bits, 32)
    t = pack_linear(res, fmt)
    assert t["qweight"].shape == (128 * bits // 32, 64) and t["qzeros"].shape == (4, 64 * bits // 32)
    assert t["scales"].dtype == torch.float16 and t["g_idx"].dtype == torch.int32
    stored = unpack_bits(t["qzeros"].t().contiguous(), bits)
    assert int(stored.unique()) == 2 ** (bits - 1) - (1 if fmt == "gptq" else 0)  # v1 stores zero - 1
    codes, scales, zeros, g_idx = unpack_linear(t, bits, fmt)
    assert torch.equal(codes, res.codes.to(torch.int32)) and torch.equal(scales, res.scales)
    assert int(zeros.unique()) == 2 ** (bits - 1)
    assert torch.equal(dequantize_packed(t, bits, fmt), res.dequantize())


@pytest.fixture(scope="module")
def nano_and_calib():
    cfg = get_preset("nano").model.replace(n_layers=2, vocab_size=512)
    model = Transformer(cfg).init_weights(0).eval()
    calib = torch.randint(0, cfg.vocab_size, (8, 64), generator=torch.Generator().manual_seed(0))
    return model, calib


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_packed_equals_unpacked_exactly(tmp_path, nano_and_calib, bits):
    model, calib = nano_and_calib
    act = bits == 3  # exercise act-order g_idx through the files too
    mq, qstate, report = quantize_model(model, calib, bits, 64, act_order=act)
    spec = QuantSpec(bits, 64, act_order=act)
    paths = save_quantized(mq, qstate, tmp_path / f"q{bits}", spec, meta={"seed": 0}, report=report)
    assert is_packed_gptq(paths["packed"]) and not is_packed_gptq(paths["unpacked"])
    from spectra.checkpoint import load_model, read_weights

    a, cfg_a = load_model(paths["unpacked"])
    b, cfg_b = load_quantized(paths["packed"])
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    # unpacked weights are the fp16 dequantization of the codes
    w = read_weights(paths["unpacked"])["model.layers.1.mlp.down_proj.weight"]
    assert w.dtype == torch.float16
    assert torch.equal(w, qstate["layers.1.mlp.down_proj"].dequantize(torch.float16))
    assert cfg_a["spectra"]["family"] == "quantlm" and cfg_a["spectra"]["bits"] == bits
    qc = json.loads((paths["packed"] / "quantize_config.json").read_text())
    assert qc["bits"] == bits and qc["group_size"] == 64 and qc["sym"] is True and qc["desc_act"] == act
    assert qc["checkpoint_format"] == "gptq" and qc["quant_method"] == "gptq"
    assert cfg_b["quantization_config"]["bits"] == bits
    rep = json.loads((paths["packed"] / "quant_report.json").read_text())
    assert len(rep["linears"]) == 7 * model.cfg.n_layers
    # embedding/head untouched (16-bit copies of the float ones)
    assert torch.equal(sb["lm_head.weight"], model.lm_head.weight.half().float())


def test_load_quantized_falls_back_to_plain_dirs(tmp_path, nano_and_calib):
    model, _ = nano_and_calib
    from spectra.checkpoint import save_model

    save_model(model, tmp_path / "f", "floatlm")
    m, d = load_quantized(tmp_path / "f")
    assert torch.equal(m.lm_head.weight, model.lm_head.weight)
    assert not is_packed_gptq(tmp_path / "nope")
