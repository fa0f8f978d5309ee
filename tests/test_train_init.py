"""--init-from: continue a released-style TriLM (stored as gamma*W_hat) exactly, and turn a FloatLM into a TriLM."""

import pytest
import torch

from spectra.checkpoint import load_model, save_model
from spectra.config import ModelConfig
from spectra.model import Transformer
from spectra.ternary import TernaryLinear, quantize_weight, recover_ternary, ternary_linears, to_ternary
from spectra.train import read_metrics, train
from spectra.train.trainer import init_model, plan_run

from tests.test_train_run import cfg_for, data_dir  # noqa: F401

MC = ModelConfig(dim=64, n_layers=2, n_heads=2, ffn_dim=192, vocab_size=512, max_seq_len=128)


def _released_trilm(path, mp):
    m = to_ternary(Transformer(MC.replace(mp=mp)).init_weights(3), mp)
    save_model(m, path, "trilm")  # unpacked gamma*W_hat + pretraining_model_parallel, as released
    return m


@pytest.mark.parametrize("mp", [1, 2])
def test_released_trilm_first_forward_is_exact(data_dir, tmp_path, mp):  # noqa: F811
    src = tmp_path / "released"
    _released_trilm(src, mp)
    dense, conf = load_model(src)  # the released model as a plain dense network
    assert conf["pretraining_model_parallel"] == mp
    cfg = cfg_for(data_dir, tmp_path / "run", **{"model.init_from": str(src), "model.family": "trilm",
                                                  "schedule.steps": 1, "optim.lr": 1e-3})
    plan = plan_run(cfg, 512, None, 1, "cpu")
    model = init_model(plan, cfg)
    assert model.cfg.mp == mp and len(ternary_linears(model)) == 14
    stored = dense.state_dict()
    for name, lin in ternary_linears(model):
        q, g = lin.ternary_state()
        q0, g0 = quantize_weight(stored[f"{name}.weight"], mp, lin.split)  # W_hat of the released weight
        assert torch.equal(q, q0)
        assert torch.allclose(g, recover_ternary(stored[f"{name}.weight"], mp, lin.split)[1], rtol=1e-6, atol=0)
        assert torch.allclose(lin.effective_weight(), stored[f"{name}.weight"], rtol=1e-6, atol=0)
    x = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(x) - dense(x)).abs().max().item() <= 1e-5
        # The pitfall this avoids: re-quantizing gamma*W_hat as if it were latent shrinks gamma.
        naive = to_ternary(load_model(src)[0], mp)
        assert (naive(x) - dense(x)).abs().max().item() > 1e-2
    # and through a real training run: the first step's loss is the released model's loss on batch 0
    from spectra.data import DataLoader

    run = train(cfg)
    bx, by = next(iter(DataLoader(cfg.data.dir, 64, 8, seed=0)))
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(dense(bx).flatten(0, 1), by.flatten()).item()
    assert abs(read_metrics(run)[0]["loss"] - ref) <= 1e-5


def test_floatlm_to_trilm_qat(data_dir, tmp_path):  # noqa: F811
    src = tmp_path / "float"
    f = Transformer(MC).init_weights(5)
    save_model(f, src, "floatlm")
    cfg = cfg_for(data_dir, tmp_path / "run", **{"model.init_from": str(src), "model.family": "trilm",
                                                  "schedule.steps": 3, "optim.lr": 1e-3})
    model = init_model(plan_run(cfg, 512, None, 1, "cpu"), cfg)
    lins = ternary_linears(model)
    assert len(lins) == 14 and all(isinstance(m, TernaryLinear) for _, m in lins)
    fsd = f.state_dict()
    assert all(torch.equal(p, fsd[n]) for n, p in model.named_parameters())  # latent = the float weights
    run = train(cfg)
    from spectra.checkpoint import read_config

    assert read_config(run / "final")["spectra"]["family"] == "trilm"


def test_init_from_vocab_mismatch(data_dir, tmp_path):  # noqa: F811
    from spectra.errors import SpectraError

    src = tmp_path / "small"
    save_model(Transformer(MC.replace(vocab_size=256)).init_weights(0), src, "floatlm")
    cfg = cfg_for(data_dir, tmp_path / "run", **{"model.init_from": str(src), "schedule.steps": 1, "optim.lr": 1e-3})
    with pytest.raises(SpectraError, match="vocab_size 256 but the data tokenizer has 512"):
        train(cfg)
