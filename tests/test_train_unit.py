"""Unit tests of the training engine's parts: config, schedules, optimizer groups, loss scaler,
checkpoint schedule/discovery. No data pipeline, no training loop."""

import json
import math

import pytest
import torch

from spectra.errors import SpectraError
from spectra.train import checkpointing as ck
from spectra.train.config import CheckpointSection, TrainConfig, load_config_file, validate
from spectra.train.optim import build_optimizer, param_groups, set_lr_wd
from spectra.train.precision import LossScaler
from spectra.train.schedule import Schedule, build_schedule


# -- config ------------------------------------------------------------------------------

def test_override_dotted_and_types():
    cfg = TrainConfig().override(["optim.lr=1e-3", "schedule.steps=300", "model.family=floatlm",
                                  "schedule.lr_drop=false", "checkpoint.every=50"])
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.schedule.steps == 300 and cfg.schedule.lr_drop is False
    assert cfg.model.family == "floatlm" and cfg.checkpoint.every == 50
    assert TrainConfig().optim.lr is None  # the original is unchanged


def test_unknown_key_suggests_closest():
    with pytest.raises(SpectraError, match=r"optim\.weight_decy.*did you mean 'weight_decay'"):
        TrainConfig().override(["optim.weight_decy=0.1"])
    with pytest.raises(SpectraError, match=r"did you mean 'schedule'"):
        TrainConfig().override(["schedul.steps=3"])
    with pytest.raises(SpectraError, match="must be an integer"):
        TrainConfig().override(["schedule.steps=abc"])


def test_config_files_toml_yaml_json(tmp_path):
    (tmp_path / "a.toml").write_text('out = "r"\n[model]\npreset = "micro"\nfamily = "floatlm"\n[optim]\nlr = 5e-4\n')
    (tmp_path / "b.yaml").write_text("model:\n  preset: micro\nschedule:\n  steps: 7\n  lr_drop_at: 0.4\n")
    a = load_config_file(tmp_path / "a.toml")
    b = load_config_file(tmp_path / "b.yaml")
    assert (a.out, a.model.preset, a.model.family, a.optim.lr) == ("r", "micro", "floatlm", 5e-4)
    assert (b.schedule.steps, b.schedule.lr_drop_at) == (7, 0.4)
    (tmp_path / "c.json").write_text(json.dumps(a.to_dict()))
    assert load_config_file(tmp_path / "c.json") == a
    (tmp_path / "bad.toml").write_text("[optim]\nbetas = 1\n")
    with pytest.raises(SpectraError, match=r"bad\.toml.*optim\.betas.*did you mean 'beta[12]'"):
        load_config_file(tmp_path / "bad.toml")


def test_validate_messages():
    with pytest.raises(SpectraError, match="schedule.steps or schedule.tokens"):
        validate(TrainConfig())
    with pytest.raises(SpectraError, match="did you mean 'trilm'"):
        validate(TrainConfig().override(["model.family=trilmm", "schedule.steps=1"]))
    with pytest.raises(SpectraError, match="unknown preset 'nanoo'.*did you mean 'nano'"):
        validate(TrainConfig().override(["model.preset=nanoo", "schedule.steps=1"]))


# -- schedules ---------------------------------------------------------------------------

def _sched(family, steps=300, **kw):
    cfg = TrainConfig().override({"model.family": family, "schedule.steps": steps, **kw})
    return build_schedule(cfg, family, steps, 2.4e-3, 1.5e-3)


def test_trilm_schedule_matches_formulas():
    s = _sched("trilm", 300, **{"schedule.warmup": 10})
    assert s.decay == "linear" and s.warmup_steps == 10
    assert s.lr(5) == pytest.approx(2.4e-3 * 5 / 10)
    assert s.lr(10) == pytest.approx(2.4e-3)
    p = (150 - 10) / 290
    assert s.lr(150) == pytest.approx(2.4e-3 * (1 - 0.9 * p))  # last step before the drop
    p = (151 - 10) / 290
    assert s.lr(151) == pytest.approx(1.5e-3 * (1 - 0.9 * p))  # peak dropped at 1/2, same line
    assert s.lr(300) == pytest.approx(1.5e-3 * 0.1)
    assert s.wd(200) == 0.1 and s.wd(201) == 0.0 and s.wd(300) == 0.0  # WD off from 2/3
    assert s.wd(1) == 0.1


def test_interventions_can_be_moved_or_disabled():
    s = _sched("trilm", 100, **{"schedule.lr_drop": False, "schedule.wd_off_at": 0.9})
    assert s.peak(99) == 2.4e-3 and s.wd(90) == 0.1 and s.wd(91) == 0.0
    s = _sched("trilm", 100, **{"schedule.lr_drop_at": 0.25, "schedule.wd_off": False})
    assert s.peak(25) == 2.4e-3 and s.peak(26) == 1.5e-3 and s.wd(100) == 0.1


def test_floatlm_cosine():
    s = _sched("floatlm", 1000)
    assert s.decay == "cosine" and s.warmup_steps == 10 and s.drop_after_step is None and s.wd(1000) == 0.1
    mid = 10 + (1000 - 10) / 2
    assert Schedule(1000, 10, 1.0, "cosine", 0.1).lr(int(mid)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (int(mid) - 10) / 990)))
    assert s.lr(1000) == pytest.approx(2.4e-3 * 0.1)
    assert all(s.lr(i) >= s.lr(i + 1) for i in range(10, 1000))


# -- optimizer ---------------------------------------------------------------------------

def test_weight_decay_only_on_matrices():
    from spectra.config import get_preset
    from spectra.model import Transformer
    from spectra.ternary import to_ternary

    m = to_ternary(Transformer(get_preset("nano").model.replace(n_layers=1, vocab_size=256)))
    names = {id(p): n for n, p in m.named_parameters()}
    g = param_groups(m)
    decay = sorted(names[id(p)] for p in g[0]["params"])
    assert all(n.endswith("proj.weight") for n in decay) and len(decay) == 7
    assert {"embed_tokens.weight", "lm_head.weight", "norm.weight"} <= {names[id(p)] for p in g[1]["params"]}
    g2 = param_groups(m, decay_embeddings=True)
    assert "lm_head.weight" in {names[id(p)] for p in g2[0]["params"]}
    cfg = TrainConfig()
    opt = build_optimizer(m, cfg, 1e-3)
    assert opt.defaults["betas"] == (0.9, 0.95)
    set_lr_wd(opt, 5e-4, 0.0)
    assert [gr["weight_decay"] for gr in opt.param_groups] == [0.0, 0.0]
    set_lr_wd(opt, 5e-4, 0.1)
    assert [gr["weight_decay"] for gr in opt.param_groups] == [0.1, 0.0]


# -- loss scaler ---------------------------------------------------------------------------

def test_loss_scaler_skips_and_regrows():
    s = LossScaler(enabled=True, scale=1024.0, window=3, min_scale=1.0)
    assert s.update(False) is False and s.scale == 512.0 and s.overflows == 1
    assert s.update(True) and s.update(True) and s.scale == 512.0
    assert s.update(True) and s.scale == 1024.0
    off = LossScaler(enabled=False)
    assert off.update(True) and not off.update(False) and off.loss_multiplier() == 1.0
    st = s.state_dict()
    t = LossScaler(enabled=True)
    t.load_state_dict(st)
    assert t.state_dict() == st


# -- checkpoint schedule / discovery ---------------------------------------------------------

def test_checkpoint_schedule_log_spaced_then_every():
    c = CheckpointSection(log_spaced=True, log_spaced_until=64, every=100, ephemeral_every=25)
    plan = dict(ck.planned_steps(350, c))
    assert [s for s, k in plan.items() if k == "permanent"] == [1, 2, 4, 8, 16, 32, 64, 100, 200, 300, 350]
    assert [s for s, k in plan.items() if k == "ephemeral"] == [25, 50, 75, 125, 150, 175, 225, 250, 275, 325]


def test_incomplete_checkpoints_are_ignored(tmp_path):
    root = tmp_path / "checkpoints"
    good = root / ck.step_name(10)
    (good / "train_state").mkdir(parents=True)
    (good / "model.safetensors").write_bytes(b"x" * 10)
    (good / "train_state" / "state.json").write_text(json.dumps({"step": 10, "files": {"model.safetensors": 10}}))
    torn = root / ck.step_name(20)  # a newer dir whose file was cut short
    (torn / "train_state").mkdir(parents=True)
    (torn / "model.safetensors").write_bytes(b"x" * 3)
    (torn / "train_state" / "state.json").write_text(json.dumps({"step": 20, "files": {"model.safetensors": 10}}))
    nostate = root / ck.step_name(30)  # no state.json: never finished
    nostate.mkdir()
    (nostate / "config.json").write_text("{}")
    (root / ".step-0000040.tmp").mkdir()
    assert ck.list_checkpoints(tmp_path) == [(10, good)]
    assert ck.latest_checkpoint(tmp_path) == good
    ck.clean_temporaries(tmp_path)
    assert not (root / ".step-0000040.tmp").exists()


def test_mfu_flops_formula():
    from spectra.config import get_preset
    from spectra.model import build_meta, param_counts
    from spectra.train.metrics import flops_per_token

    mc = get_preset("99m").model
    c = param_counts(build_meta(mc))
    assert flops_per_token(mc, 2048) == 6 * c["non_embedding"] + 12 * mc.n_layers * mc.dim * 2048


def test_keep_freed_memory_on_glibc():
    import platform

    from spectra.train.cpu import keep_freed_memory

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    assert keep_freed_memory() is True
    assert keep_freed_memory() is True  # idempotent


def test_tensorboard_scalars_are_written(tmp_path):
    pytest.importorskip("tensorboard", reason="TensorBoard not installed (scripts/setup.sh --test installs it)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from spectra.train.metrics import MetricsLogger

    log = MetricsLogger(tmp_path, tensorboard=True)
    for step in (1, 2, 3):
        log.log({"step": step, "loss": 5.0 - step, "lr": 1e-3 * step, "note": "x", "finite": True})
    log.log({"step": 3, "val_loss": 2.5})
    log.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "val/loss"} <= tags and "train/note" not in tags and "train/finite" not in tags
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 4.0), (2, 3.0), (3, 2.0)]
    assert acc.Scalars("val/loss")[0].value == 2.5
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4


def test_tensorboard_missing_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    from spectra.errors import SpectraError
    from spectra.train.metrics import MetricsLogger

    real = builtins.__import__

    def no_tb(name, *a, **k):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("no tensorboard")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tb)
    with pytest.raises(SpectraError, match="spectra-lm\\[tensorboard\\]"):
        MetricsLogger(tmp_path, tensorboard=True)
    (tmp_path / "auto").mkdir()
    assert MetricsLogger(tmp_path / "auto", tensorboard=None).tb is None  # auto: JSONL only, no error


@pytest.mark.parametrize("precision,fast_bf16,noted", [("auto", True, True), ("fp32", True, True),
                                                        ("bf16", True, False), ("auto", False, False)])
def test_cli_suggests_bf16_only_where_it_is_fast(monkeypatch, tmp_path, capsys, precision, fast_bf16, noted):
    import spectra.train
    import spectra.train.cpu
    from spectra.cli import main

    monkeypatch.setattr(spectra.train.cpu, "cpu_has_fast_bf16", lambda: fast_bf16)
    monkeypatch.setattr(spectra.train, "train", lambda cfg: tmp_path)  # the CLI wiring only
    assert main(["train", "--preset", "nano", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--steps", "1",
                 "--set", f"train.precision={precision}", "train.device=cpu"]) == 0
    assert ("train.precision=bf16" in capsys.readouterr().err) == noted


def test_cli_bad_config_is_one_line_before_the_bf16_note(monkeypatch, tmp_path, capsys):
    import spectra.train.cpu
    from spectra.cli import main

    monkeypatch.setattr(spectra.train.cpu, "cpu_has_fast_bf16", lambda: True)
    assert main(["train", "--preset", "nano", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--steps", "1",
                 "optim.lr=-1", "train.device=cpu"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "optim.lr" in err[0], err


@pytest.mark.parametrize("family", ["floatlm", "trilm"])
def test_activation_checkpointing_same_math_less_memory(family):
    import torch

    from spectra.config import get_preset
    from spectra.losses import head_cross_entropy
    from spectra.model import Transformer
    from spectra.ternary import to_ternary
    from spectra.train.parallel import apply_activation_checkpointing

    cfg = get_preset("nano").model
    models = []
    for _ in range(2):
        m = Transformer(cfg).init_weights(0)
        models.append(to_ternary(m) if family == "trilm" else m)
    keys = list(models[1].state_dict())
    apply_activation_checkpointing(models[1], every=1)
    assert list(models[1].state_dict()) == keys  # names unchanged: checkpoints and HF export unaffected
    x = torch.randint(0, cfg.vocab_size, (4, 64))
    saved, grads, loss = [], [], []
    for m in models:
        n = [0]

        def pack(t, n=n):
            n[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = m(x, targets=x, loss_fn=head_cross_entropy)  # the trainer's loss path
        out.backward()
        saved.append(n[0])
        loss.append(out.item())
        grads.append({k: p.grad for k, p in m.named_parameters()})
    assert loss[0] == pytest.approx(loss[1], abs=1e-6)
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-7, msg=k)
    assert saved[1] < 0.5 * saved[0], saved  # only block inputs are kept for backward
    with pytest.raises(Exception, match=">= 1"):
        apply_activation_checkpointing(models[0], every=0)


def test_activation_checkpoint_config_is_validated():
    from spectra.errors import SpectraError
    from spectra.train.config import validate

    cfg = TrainConfig().override({"model.preset": "nano", "schedule.steps": 1, "train.activation_checkpoint": -1})
    with pytest.raises(SpectraError, match="activation_checkpoint must be an integer >= 0"):
        validate(cfg)
