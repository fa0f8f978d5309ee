"""HF import / export / verify-ternary on synthetic SpectraSuite-style directories."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from spectra.checkpoint import load_model, read_weights
from spectra.cli import main
from spectra.config import ModelConfig
from spectra.errors import SpectraError
from spectra.interop.hf import export_hf, import_hf
from spectra.interop.verify import format_table, verify_dir
from spectra.ternary import dequantize, recover_ternary, split_of

from helpers.release_dirs import release_state, write_release_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def small_cfg(mp: int) -> ModelConfig:
    # mp = 6 must divide dim, ffn and heads: 192 / 384 / 6 heads of 32.
    return ModelConfig(dim=192, n_layers=2, n_heads=6, ffn_dim=384, vocab_size=768, mp=mp, max_seq_len=64).validate()


@pytest.fixture(scope="module", params=[1, 2, 6])
def release(request, tmp_path_factory):
    mp = request.param
    d = tmp_path_factory.mktemp(f"release_mp{mp}")
    # MP = 2 is written sharded (two safetensors + index), like the larger released models.
    src = write_release_dir(d / "hf", small_cfg(mp), seed=mp, shards=2 if mp == 2 else 1)
    return mp, src


def test_import_verify_roundtrip_bit_exact(release, tmp_path):
    mp, src = release
    conv = import_hf(src, tmp_path / "ours")
    assert conv.family == "trilm" and conv.cfg.mp == mp and conv.mp_source == "config"
    cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert cfg["pretraining_model_parallel"] == mp and cfg["spectra"]["family"] == "trilm"
    assert cfg["torch_dtype"] == "float16"  # source dtype kept
    layout = json.loads((tmp_path / "ours" / "ternary_layout.json").read_text())
    assert layout["mp"] == mp and len(layout["matrices"]) == 2 * 7
    assert all(len(m["gammas"]) == mp for m in layout["matrices"].values())

    rep = verify_dir(tmp_path / "ours")
    assert rep.ok and rep.mp == mp and all(r.layout.distinct <= 1 + mp for r in rep.rows)

    export_hf(tmp_path / "ours", tmp_path / "back")
    orig, back = read_weights(src), load_file(str(tmp_path / "back" / "model.safetensors"))
    assert set(orig) == set(back)
    for k in orig:
        assert back[k].dtype == torch.float16 and torch.equal(orig[k], back[k]), k
    hf_cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert hf_cfg["pretraining_model_parallel"] == mp and hf_cfg["architectures"] == ["LlamaForCausalLM"]
    gen = json.loads((tmp_path / "back" / "generation_config.json").read_text())
    assert gen["bos_token_id"] == 0 and gen["eos_token_id"] == 0


def test_recovered_states_match_the_source_ternarization(release, tmp_path):
    mp, src = release
    import_hf(src, tmp_path / "ours")
    model, _ = load_model(tmp_path / "ours", ternary=True)
    sd = read_weights(src)
    for name, m in model.named_modules():
        if hasattr(m, "ternary_state"):
            q, g = m.ternary_state()
            q0, g0 = recover_ternary(sd[f"model.{name}.weight"], mp, split_of(name))
            assert torch.equal(q, q0), name
            # latent weights re-ternarize to the stored fp16 gammas within fp32 rounding
            torch.testing.assert_close(g, g0, rtol=4e-6, atol=0)  # an ulp or two
            assert torch.equal(dequantize(q0, g0, split_of(name)), sd[f"model.{name}.weight"].float())


def test_mp_inferred_when_config_key_absent(tmp_path):
    src = write_release_dir(tmp_path / "hf", small_cfg(6), seed=3)
    cfg = json.loads((src / "config.json").read_text())
    del cfg["pretraining_model_parallel"]
    (src / "config.json").write_text(json.dumps(cfg))
    conv = import_hf(src, tmp_path / "ours")  # detected by magnitude counting
    assert conv.family == "trilm" and conv.cfg.mp == 6 and conv.mp_source == "inferred"
    rep = verify_dir(src)
    assert rep.ok and rep.mp == 6 and rep.mp_source == "inferred"


def test_tampered_matrix_fails_verify_naming_it(tmp_path, capsys):
    sd = release_state(small_cfg(6), seed=6)
    name = "model.layers.1.mlp.down_proj.weight"
    w = sd[name].clone()
    # one entry of shard 0 (row-parallel: first 64 input columns) gets a 7th non-zero magnitude
    w[0, 0] = w[0, 0].sign().clamp(min=1) * 0.123
    sd[name] = w
    src = write_release_dir(tmp_path / "hf", small_cfg(6), state=sd)
    assert len(torch.unique(w.float().abs())) - 1 == 7  # 7 non-zero magnitudes (+ zero) > 1 + MP
    rep = verify_dir(src)
    assert not rep.ok and [r.layout.name for r in rep.failed] == ["layers.1.mlp.down_proj.weight"]
    assert "layers.1.mlp.down_proj.weight" in format_table(rep)
    assert main(["verify-ternary", str(src)]) == 1
    out = capsys.readouterr().out
    assert "FAIL layers.1.mlp.down_proj.weight" in out and "13 pass, 1 fail" in out
    with pytest.raises(SpectraError, match="layers.1.mlp.down_proj.weight"):
        import_hf(src, tmp_path / "ours")


def test_floatlm_auto_detected_and_verify_fails(tmp_path):
    src = write_release_dir(tmp_path / "hf", small_cfg(1), trilm=False, seed=1)
    conv = import_hf(src, tmp_path / "ours", dtype="float32")
    assert conv.family == "floatlm"
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["torch_dtype"] == "float32"
    assert not verify_dir(src).ok


def test_bin_weights_loaded_safely(tmp_path):
    src = write_release_dir(tmp_path / "hf", small_cfg(2), seed=2)
    sd = load_file(str(src / "model.safetensors"))
    torch.save(sd, src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    conv = import_hf(src, tmp_path / "ours")
    assert conv.family == "trilm" and conv.cfg.mp == 2


@pytest.mark.parametrize("trilm", [True, False])
def test_hf_export_loads_in_transformers_with_equal_logits(tmp_path, trilm):
    transformers = pytest.importorskip("transformers", reason="transformers not installed (the hf extra; scripts/setup.sh installs it)")
    src = write_release_dir(tmp_path / "hf", small_cfg(2), trilm=trilm, seed=4)
    import_hf(src, tmp_path / "ours", dtype="float32")
    export_hf(tmp_path / "ours", tmp_path / "out", dtype="float16")
    ours, _ = load_model(tmp_path / "out")
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
    idx = torch.randint(0, 768, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = ours(idx)
        b = hf(idx).logits
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


# ---- bad input -------------------------------------------------------------------------------

def _edit_config(src, **kw):
    cfg = json.loads((src / "config.json").read_text())
    for k, v in kw.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (src / "config.json").write_text(json.dumps(cfg))


def test_bad_inputs_name_the_problem(tmp_path, capsys):
    cfg = small_cfg(2)
    src = write_release_dir(tmp_path / "a", cfg, seed=5)
    _edit_config(src, architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox")
    with pytest.raises(SpectraError, match="not a Llama architecture"):
        import_hf(src, tmp_path / "o1")
    assert main(["import", str(src), "--out", str(tmp_path / "o1")]) == 2
    assert "not a Llama architecture" in capsys.readouterr().err

    src = write_release_dir(tmp_path / "b", cfg, seed=5)
    _edit_config(src, intermediate_size=None)
    with pytest.raises(SpectraError, match="missing required key 'intermediate_size'"):
        import_hf(src, tmp_path / "o2")

    src = write_release_dir(tmp_path / "c", cfg, seed=5)
    _edit_config(src, intermediate_size=256)  # tensors say 384
    with pytest.raises(SpectraError, match="gate_proj.weight' has shape"):
        import_hf(src, tmp_path / "o3")

    # declared TriLM whose matrices are float: the first offending tensor is named
    src = write_release_dir(tmp_path / "d", cfg, trilm=False, seed=5, extra_config={"pretraining_model_parallel": 2})
    with pytest.raises(SpectraError, match=r"tensor 'layers.0.self_attn.q_proj.weight' not ternary at mp=2"):
        import_hf(src, tmp_path / "o4")
    # asserting trilm on a float directory fails the same way
    src = write_release_dir(tmp_path / "e", cfg, trilm=False, seed=5)
    with pytest.raises(SpectraError, match="q_proj.weight' not ternary"):
        import_hf(src, tmp_path / "o5", family="trilm")

    # a missing tensor and an extra one
    src = write_release_dir(tmp_path / "f", cfg, seed=5)
    sd = load_file(str(src / "model.safetensors"))
    sd.pop("lm_head.weight")
    sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(192, dtype=torch.float16)
    from safetensors.torch import save_file
    save_file(sd, str(src / "model.safetensors"))
    with pytest.raises(SpectraError, match="missing tensor 'lm_head.weight'"):
        import_hf(src, tmp_path / "o6")
    sd["lm_head.weight"] = torch.zeros(768, 192, dtype=torch.float16)
    save_file(sd, str(src / "model.safetensors"))
    with pytest.raises(SpectraError, match="unexpected tensor 'layers.0.self_attn.q_proj.bias'"):
        import_hf(src, tmp_path / "o7")
    assert not (tmp_path / "o7").exists()  # nothing half-written


def test_cli_import_export_verify(tmp_path, capsys):
    src = write_release_dir(tmp_path / "hf", small_cfg(6), seed=7)
    assert main(["import", str(src), "--out", str(tmp_path / "ours")]) == 0
    assert "mp=6 (config)" in capsys.readouterr().out
    assert main(["verify-ternary", str(tmp_path / "ours")]) == 0
    out = capsys.readouterr().out
    assert "14 pass, 0 fail -> PASS" in out and "mp=6" in out
    assert main(["verify-ternary", str(tmp_path / "ours"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    assert main(["export", str(tmp_path / "ours"), "--to", "hf", "--out", str(tmp_path / "back")]) == 0
    assert "pretraining_model_parallel=6" in capsys.readouterr().out
