"""Packed formats t2/t1: exact round trips for every shard layout, sizes, q8 head, bad input."""

import json

import numpy as np
import pytest
import torch

from spectra.checkpoint import from_hf_names, read_weights, save_model
from spectra.config import ModelConfig, get_preset
from spectra.errors import SpectraError
from spectra.infer import packing
from spectra.infer.packed_model import PackedModel, write_packed
from spectra.model import Transformer
from spectra.ternary import to_ternary


def _trilm_dir(tmp_path, cfg, seed=0, dtype=None, name="ck"):
    m = to_ternary(Transformer(cfg).init_weights(seed), cfg.mp)
    return save_model(m, tmp_path / name, "trilm", dtype=dtype)


def _cfg(mp):
    # widths divisible by mp; per-shard k of the row-parallel matrices is NOT a multiple of 256 for
    # mp=3/6 (384/3=128, 768/6=128), so the exact per-segment padding is exercised too.
    return ModelConfig(dim=384, n_layers=1, n_heads=6, ffn_dim=768, vocab_size=384, mp=mp, max_seq_len=64).validate()


@pytest.mark.parametrize("fmt", ["t2", "t1"])
@pytest.mark.parametrize("mp", [1, 2, 3, 6])
def test_matrix_roundtrip_numpy(fmt, mp):
    rng = np.random.default_rng(mp)
    for split, (rows, k) in (("col", (6 * 40, 1536)), ("row", (64, 6 * 300))):
        q = rng.integers(-1, 2, (rows, k)).astype(np.int8)
        p = packing.pack_ternary(q, mp, split, fmt)
        assert p.dtype == np.uint8 and p.shape == (rows, packing.row_bytes(k, mp, split, fmt))
        assert np.array_equal(packing.unpack_ternary(p, k, mp, split, fmt), q)


@pytest.mark.parametrize("fmt", ["t2", "t1"])
@pytest.mark.parametrize("mp", [1, 2, 3, 6])
def test_checkpoint_pack_is_exact(tmp_path, fmt, mp):
    ck = _trilm_dir(tmp_path, _cfg(mp), seed=mp)
    meta = write_packed(ck, tmp_path / "p", fmt, "f16", progress=False)
    assert meta["weights"] == fmt and meta["model"]["mp"] == mp
    pm = PackedModel.load(tmp_path / "p")
    sd = from_hf_names(read_weights(ck))
    for m in pm.matrices():
        assert m.gamma.shape == (mp,) and m.gamma.dtype == np.float32
        assert torch.equal(m.dequantize(), sd[f"{m.name}.weight"].float()), m.name
    # embedding f16, norms exact
    assert pm.arrays["embed_tokens.weight"].dtype == np.float16
    assert np.array_equal(pm.arrays["layers.0.input_layernorm.weight"], sd["layers.0.input_layernorm.weight"].numpy())


def test_fp16_checkpoint_exact(tmp_path):
    ck = _trilm_dir(tmp_path, _cfg(2), dtype=torch.float16)
    write_packed(ck, tmp_path / "p", "t1", "q8", progress=False)
    pm = PackedModel.load(tmp_path / "p")
    sd = from_hf_names(read_weights(ck))
    for m in pm.matrices():
        assert torch.equal(m.dequantize(), sd[f"{m.name}.weight"].float())
    # f16 embedding of an f16 checkpoint is bit-exact
    assert np.array_equal(pm.arrays["embed_tokens.weight"], sd["embed_tokens.weight"].numpy())


def test_base3_digits_exhaustive():
    for n, P in ((5, 243), (4, 81)):
        for v in range(P):
            digits = [(v // 3 ** (n - 1 - i)) % 3 for i in range(n)]
            b = (v * 256 + P - 1) // P
            assert [(((b * 3**k) & 255) * 3) >> 8 for k in range(n)] == digits


def test_bits_per_weight_at_spectra_shapes():
    for preset in ("99m", "390m", "1.1b", "3.9b"):
        c = get_preset(preset).model
        for k, rows, split in ((c.dim, c.dim, "col"), (c.dim, c.ffn_dim, "col"), (c.ffn_dim, c.dim, "row")):
            assert packing.bits_per_weight(k, rows, c.mp, split, "t2") <= 2.07
            assert packing.bits_per_weight(k, rows, c.mp, split, "t1") <= 1.7


def test_padding_is_exact_and_documented_size():
    # nano: dim 128 (< one 256 block): rows padded with zero weights, unpack is still exact
    rng = np.random.default_rng(0)
    q = rng.integers(-1, 2, (8, 128)).astype(np.int8)
    for fmt in ("t2", "t1"):
        p = packing.pack_ternary(q, 1, "col", fmt)
        assert p.shape[1] == packing.FORMATS[fmt]
        assert np.array_equal(packing.unpack_ternary(p, 128, 1, "col", fmt), q)


def test_q8_head_error_and_file(tmp_path):
    w = np.random.default_rng(1).normal(size=(50, 64)).astype(np.float32)
    q, s = packing.quantize_head_q8(w)
    assert q.dtype == np.int8 and s.shape == (50,) and np.abs(q).max() <= 127
    assert np.all(np.abs(packing.dequantize_head_q8(q, s) - w) <= s[:, None] / 2 * (1 + 1e-6))
    ck = _trilm_dir(tmp_path, get_preset("nano").model)
    write_packed(ck, tmp_path / "p", "t2", "q8", progress=False)
    pm = PackedModel.load(tmp_path / "p")
    assert "lm_head.q8" in pm.arrays and "lm_head.weight" not in pm.arrays
    assert pm.head_weight().shape == (4096, 128)


def test_non_ternary_checkpoint_names_matrix(tmp_path):
    ck = save_model(Transformer(get_preset("nano").model).init_weights(0), tmp_path / "float", "floatlm")
    with pytest.raises(SpectraError, match=r"layers\.0\.self_attn\.q_proj.*\d+ distinct values"):
        write_packed(ck, tmp_path / "p", "t2", progress=False)
    assert not (tmp_path / "p").exists()


def test_corrupted_and_truncated_files(tmp_path):
    ck = _trilm_dir(tmp_path, get_preset("nano").model)
    write_packed(ck, tmp_path / "p", "t2", progress=False)
    f = tmp_path / "p" / "model.safetensors"
    data = bytearray(f.read_bytes())
    meta = json.loads((tmp_path / "p" / "packed.json").read_text())
    # flip one byte inside the packed trits of one matrix
    header_len = int.from_bytes(data[:8], "little")
    hdr = json.loads(data[8:8 + header_len])
    b, _ = hdr["layers.2.mlp.up_proj.trits"]["data_offsets"]
    data[8 + header_len + b + 5] ^= 0x55
    f.write_bytes(bytes(data))
    with pytest.raises(SpectraError, match=r"checksum mismatch in tensor 'layers\.2\.mlp\.up_proj\.trits'"):
        PackedModel.load(tmp_path / "p")
    PackedModel.load(tmp_path / "p", verify=False)  # size still right: loads when asked not to verify
    f.write_bytes(bytes(data[:-100]))
    with pytest.raises(SpectraError, match=r"size .* does not match"):
        PackedModel.load(tmp_path / "p", verify=False)
    assert meta["file"]["bytes"] == len(data)
    (tmp_path / "p" / "packed.json").write_text("{")
    with pytest.raises(SpectraError, match="not valid JSON"):
        PackedModel.load(tmp_path / "p")
    with pytest.raises(SpectraError, match="not a packed model directory"):
        PackedModel.load(tmp_path)


def test_bad_format_names():
    with pytest.raises(SpectraError, match="unknown packed format 't3'"):
        packing.check_format("t3")


def test_pack_cli(tmp_path, capsys):
    from spectra.cli import main

    ck = _trilm_dir(tmp_path, get_preset("nano").model)
    assert main(["pack", str(ck), "--format", "t1", "--head", "q8", "--out", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert "verified exact" in out and "bits/weight" in out
    float_ck = save_model(Transformer(get_preset("nano").model).init_weights(0), tmp_path / "f", "floatlm")
    assert main(["pack", str(float_ck), "--out", str(tmp_path / "q")]) == 2
    assert "distinct values" in capsys.readouterr().err
