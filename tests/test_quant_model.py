"""QuantLM over whole models: the sequential driver, refusals, calibration, CLI, and
perplexity ordering on a trained FloatLM."""

import json
import math

import pytest
import torch

from spectra.config import get_preset
from spectra.errors import SpectraError
from spectra.model import Transformer
from spectra.quant import quantize_model
from spectra.quant.gptq import Hessian, gptq_quantize
from spectra.quant.sequential import SEQUENTIAL


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg():
    return get_preset("nano").model.replace(n_layers=2, vocab_size=512, max_seq_len=128)


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_cfg()
    model = Transformer(cfg).init_weights(0).eval()
    calib = torch.randint(0, cfg.vocab_size, (6, 48), generator=torch.Generator().manual_seed(1))
    return model, calib


@torch.no_grad()
def reference_sequential(model, calib, bits, gs):
    """The reference llama_sequential, literally: for each subset, rerun the whole block over
    all samples with hooks collecting the subset's inputs, quantize the subset; then
    the block outputs (with everything quantized) feed the next block."""
    import copy

    model = copy.deepcopy(model)
    n, T = calib.shape
    x = model.embed_tokens(calib)
    cos, sin = model.rope(0, T, x.device)
    chunk = 16384 // T
    codes = {}
    for i, blk in enumerate(model.layers):
        for subset in SEQUENTIAL:
            mods = {s: blk.get_submodule(s) for s in subset}
            hs = {s: Hessian(m.in_features) for s, m in mods.items()}
            hooks = [m.register_forward_pre_hook(lambda mod, a, s=s: hs[s].add(a[0])) for s, m in mods.items()]
            for a in range(0, n, chunk):
                blk(x[a:a + chunk], cos, sin)
            for h in hooks:
                h.remove()
            for s, m in mods.items():
                res = gptq_quantize(m.weight, hs[s].finalize(), bits, gs)
                m.weight.copy_(res.dequantize())
                codes[f"layers.{i}.{s}"] = res.codes
        x = torch.cat([blk(x[a:a + chunk], cos, sin) for a in range(0, n, chunk)])
    return codes


def test_staged_true_sequential_matches_reference_loop(tiny):
    model, calib = tiny
    _, qstate, _ = quantize_model(model, calib, 4, 64)
    ref = reference_sequential(model, calib, 4, 64)
    assert qstate.keys() == ref.keys()
    for k in ref:
        same = (qstate[k].codes == ref[k]).float().mean().item()
        assert same > 0.999, (k, same)


def test_only_block_linears_change_and_input_is_kept(tiny):
    model, calib = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mq, qstate, report = quantize_model(model, calib, 3, 64, true_sequential=False, act_order=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])  # not modified in place
    for k, v in mq.state_dict().items():
        if k.endswith("proj.weight"):
            assert not torch.equal(v, before[k])
            assert torch.equal(v, qstate[k.removesuffix(".weight")].dequantize())
        else:
            assert torch.equal(v, before[k]), k  # embedding, norms, head untouched
    assert len(report["linears"]) == 14 and report["spec"]["bits"] == 3
    assert all(r["loss"] >= 0 and r["seconds"] >= 0 for r in report["linears"])


def test_rtn_needs_no_calibration(tiny):
    model, _ = tiny
    mq, qstate, report = quantize_model(model, None, 4, 64, method="rtn")
    assert report["calibration"] is None and all(r["method"] == "rtn" for r in report["linears"])


def test_refuses_trilm_and_bad_calibration(tiny):
    from spectra.ternary import to_ternary

    model, calib = tiny
    import copy

    tri = to_ternary(copy.deepcopy(model), 1)
    with pytest.raises(SpectraError, match="already ternary|TriLM"):
        quantize_model(tri, calib, 4, 64)
    with pytest.raises(SpectraError, match="exceeds the model context"):
        quantize_model(model, torch.zeros(2, 256, dtype=torch.long), 4, 64)
    with pytest.raises(SpectraError, match="token ids"):
        quantize_model(model, torch.full((2, 16), 10_000), 4, 64)
    with pytest.raises(SpectraError, match="calibration tokens"):
        quantize_model(model, None, 4, 64)
    with pytest.raises(SpectraError, match="does not divide"):
        quantize_model(model, calib, 4, 100)
    with pytest.raises(SpectraError, match="unsupported bits"):
        quantize_model(model, calib, 5, 64)
    with pytest.raises(SpectraError, match="unknown quantization method"):
        quantize_model(model, calib, 4, 64, method="awq")


# -- with real data: a token dataset and a trained FloatLM -------------------------------

@pytest.fixture(scope="module")
def shakes(shakes_data):
    return shakes_data(1024)  # conftest: the data the shared nano run trains on


def train_floatlm(data_dir, out, preset, steps, seq=128, batch=16):
    from spectra.train.checkpointing import final_checkpoint
    from spectra.train.config import TrainConfig
    from spectra.train.trainer import train

    cfg = TrainConfig().override({
        "model.preset": preset, "model.family": "floatlm", "schedule.steps": steps, "data.dir": str(data_dir),
        "data.seq_len": seq, "batch.global_tokens": batch * seq, "batch.micro_batch": batch, "optim.lr": 3e-3,
        "out": str(out), "log.progress": False, "checkpoint.log_spaced": False, "checkpoint.every": 0,
        "eval.at_end": False, "log.tensorboard": False, "train.threads": 1})
    return final_checkpoint(train(cfg))


@torch.no_grad()
def val_ppl(model, data_dir, seq=128, windows=96):
    from spectra.data import TokenDataset

    ds = TokenDataset(data_dir, "validation")
    tot, n = 0.0, 0
    for x, y in ds.eval_windows(seq, max_windows=windows, batch_size=16):
        tot += model.loss(x, y).item() * y.numel()
        n += y.numel()
    return math.exp(tot / n)


def check_ordering(data_dir, ckpt, tmp_path):
    from spectra.checkpoint import load_model
    from spectra.quant import calibration_tokens

    model, _ = load_model(ckpt)
    calib = calibration_tokens(data_dir, 32, 128, seed=0)
    ppl = {"float": val_ppl(model, data_dir)}
    for bits in (8, 6, 4, 3):
        mq, _, _ = quantize_model(model, calib, bits, 128)
        ppl[f"q{bits}"] = val_ppl(mq, data_dir)
    mr, _, _ = quantize_model(model, None, 3, 128, method="rtn")
    ppl["rtn3"] = val_ppl(mr, data_dir)
    (tmp_path / "ppl.json").write_text(json.dumps(ppl))
    print("validation perplexity:", {k: round(v, 4) for k, v in ppl.items()})
    order = [ppl[k] for k in ("float", "q8", "q6", "q4", "q3")]
    # Q8/Q6 differ from float by noise-level amounts; allow 0.05% slack there only.
    assert order[0] <= order[1] * 1.0005 and order[1] <= order[2] * 1.0005, ppl
    assert order[2] <= order[3] <= order[4], ppl
    assert ppl["q8"] <= ppl["float"] * 1.01, ppl
    assert ppl["q3"] < ppl["rtn3"], ppl
    return ppl


def test_perplexity_ordering_trained_nano(shakes, trained_ckpt, tmp_path):
    check_ordering(shakes, trained_ckpt("nano", "floatlm"), tmp_path)


@pytest.mark.slow
def test_perplexity_ordering_trained_micro(shakes, tmp_path):
    ckpt = train_floatlm(shakes, tmp_path / "run", "micro", 300)
    check_ordering(shakes, ckpt, tmp_path)


# -- CLI -----------------------------------------------------------------------------

def cli(*args):
    from spectra.cli import main

    return main(["quantize", *map(str, args)])


@pytest.fixture(scope="module")
def float_ckpt(tmp_path_factory, shakes):
    from spectra.checkpoint import save_model
    from spectra.data import TokenDataset

    cfg = get_preset("nano").model.replace(n_layers=2, vocab_size=TokenDataset(shakes).padded_vocab_size)
    d = tmp_path_factory.mktemp("qfloat") / "float"
    save_model(Transformer(cfg).init_weights(0), d, "floatlm")
    return d


def test_cli_end_to_end(float_ckpt, shakes, tmp_path, capsys):
    out = tmp_path / "q"
    assert cli(float_ckpt, "--bits", "4,6", "--group-size", 64, "--calib", shakes, "--nsamples", 8, "--seqlen", 64,
               "--seeds", "0,1", "--out", out, "--no-progress") == 0
    for name in ("q4-g64-s0", "q4-g64-s1", "q6-g64-s0", "q6-g64-s1"):
        assert (out / name / "model.safetensors").exists() and (out / name / "quant_report.json").exists()
        assert (out / f"{name}-packed" / "quantize_config.json").exists()
        cfg = json.loads((out / name / "config.json").read_text())["spectra"]
        assert cfg["family"] == "quantlm" and cfg["method"] == "gptq" and cfg["group_size"] == 64
    s = json.loads((out / "quantize_summary.json").read_text())
    assert [o["name"] for o in s["outputs"]] == ["q4-g64-s0", "q4-g64-s1", "q6-g64-s0", "q6-g64-s1"]
    from spectra.checkpoint import read_weights

    w0 = read_weights(out / "q4-g64-s0")["model.layers.0.self_attn.q_proj.weight"]
    w1 = read_weights(out / "q4-g64-s1")["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(w0, w1)  # different calibration seeds -> different QuantLMs
    lines = (out / "quantize_log.jsonl").read_text().splitlines()
    assert len(lines) == 4 * 14
    assert cli(float_ckpt, "--bits", 3, "--method", "rtn", "--group-size", 64, "--out", out, "--no-progress") == 0
    assert (out / "q3-g64-rtn-packed").is_dir()


def test_cli_bad_input(float_ckpt, shakes, tmp_path, capsys):
    from spectra.checkpoint import save_model
    from spectra.ternary import to_ternary

    def err(*args):
        assert cli(*args, "--out", tmp_path / "o", "--no-progress") == 2
        return capsys.readouterr().err

    assert "unsupported bits 5" in err(float_ckpt, "--bits", "5", "--calib", shakes)
    assert "does not divide the input dimension 128" in err(float_ckpt, "--group-size", 96, "--calib", shakes)
    assert "needs calibration data" in err(float_ckpt, "--bits", 4)
    msg = err(float_ckpt, "--bits", 4, "--calib", shakes, "--nsamples", 100000, "--seqlen", 128)
    assert "fewer than the" in msg and "tokens" in msg
    assert "exceeds the model context" in err(float_ckpt, "--bits", 4, "--calib", shakes, "--seqlen", 4096)
    tri = tmp_path / "tri"
    from spectra.checkpoint import load_model

    m, _ = load_model(float_ckpt)
    save_model(to_ternary(m, 1), tri, "trilm")
    assert "already ternary" in err(tri, "--bits", 4, "--calib", shakes)
