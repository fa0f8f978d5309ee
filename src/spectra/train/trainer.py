"""The training loop: one function, :func:`train`, for one CPU, one GPU or torchrun.

Order of a step (s = 1..T): set LR/WD from the schedule -> accumulate gradients over
the micro-batches of this rank's share of the global batch -> unscale (fp16) -> clip
and measure the global grad norm -> skip the update if anything is non-finite ->
AdamW step -> log -> validate / checkpoint when scheduled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from spectra.errors import SpectraError
from spectra.store.dtypes import torch_dtype
from spectra.store.kinds import FINAL_DIR, METRICS_FILE, RUN_CONFIG

from . import checkpointing as ck
from .config import TrainConfig, profile_range, validate
from .metrics import MetricsLogger, device_peak_flops, flops_per_token, memory_stats, truncate_after
from .optim import build_optimizer, set_lr_wd
from .parallel import Dist, all_reduce_mean, barrier, close_distributed, init_distributed, parallelize, set_grad_sync
from .precision import LossScaler, autocast, resolve_precision
from .schedule import Schedule, build_schedule



@dataclass
class Plan:
    """Everything derived from the config, data and world size (saved in the run dir)."""

    model_cfg: object
    family: str
    preset: str | None
    seq_len: int
    global_tokens: int
    global_batch: int  # sequences
    per_rank_batch: int
    accum: int
    steps: int
    lr: float
    lr_after: float | None
    precision: str
    parallel: str
    vocab_from_data: int
    tokenizer: str | None


def train(cfg: TrainConfig) -> Path:
    """Train (or resume) per ``cfg``; returns the run directory. Raises SpectraError on bad input."""
    validate(cfg)
    if cfg.out is None:
        raise SpectraError("set the run directory: out (CLI --out RUN)")
    if cfg.data.dir is None:
        raise SpectraError("set the data directory: data.dir (CLI --data DIR), built by `spectra data`")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    d = init_distributed(cfg.train.device)
    if d.device.type == "cpu" and cfg.train.keep_freed_memory:
        from .cpu import keep_freed_memory

        keep_freed_memory()
    try:
        with _run_lock(Path(cfg.out), d):
            fresh = not (Path(cfg.out) / RUN_CONFIG).exists()
            try:
                return _train(cfg, d)
            except BaseException:
                if fresh and d.is_main:
                    _forget_failed_start(Path(cfg.out))
                raise
    finally:
        close_distributed(d)


@contextlib.contextmanager
def _run_lock(run: Path, d: Dist):
    """One training job per run directory: rank 0 holds an exclusive lock next to it (docs/security.md);
    a second job fails at once, naming the holder. All ranks learn the outcome, so all stop together."""
    from spectra.fsutil import output_lock

    with contextlib.ExitStack() as stack:
        err = None
        if d.is_main:
            try:
                stack.enter_context(output_lock(run, "spectra train"))
            except SpectraError as e:
                err = e
        (ok,) = all_reduce_mean([0.0 if err else 1.0], d)
        if err is not None:
            raise err
        if ok < 1:
            raise SpectraError(f"run directory '{run}' is in use by another training job; wait for it or choose another --out")
        yield


def _forget_failed_start(run: Path) -> None:
    """A run that failed before its first checkpoint leaves no train_config.json behind: a plain
    rerun must not be refused as 'already holds a run' (issue 15)."""
    if not ck.list_checkpoints(run):
        (run / RUN_CONFIG).unlink(missing_ok=True)


# -- setup ------------------------------------------------------------------------------

def _open_data(cfg: TrainConfig):
    try:
        from spectra.data import TokenDataset
    except ImportError as e:
        raise SpectraError(f"the data pipeline (spectra.data) is not available: {e}") from None
    p = Path(cfg.data.dir)
    if not p.is_dir():
        raise SpectraError(f"data.dir '{p}' does not exist (build it with `spectra data`)")
    return TokenDataset(str(p), "train")


def _model_config(cfg: TrainConfig, ds_vocab: int):
    from spectra.config import get_preset, padded_vocab
    from spectra.store.hfconfig import read_model_config

    m = cfg.model
    preset = get_preset(m.preset) if m.preset else None
    if m.init_from:
        mc, _ = read_model_config(m.init_from)
        if mc.vocab_size < ds_vocab:
            raise SpectraError(f"model.init_from '{m.init_from}' has vocab_size {mc.vocab_size} but the data tokenizer "
                               f"has {ds_vocab} tokens; use a data directory built with that model's tokenizer")
        if m.mp and m.mp != mc.mp:
            mc = mc.replace(mp=m.mp)
        return mc, preset
    mc = preset.model
    shape = {k: getattr(m, k) for k in ("dim", "n_layers", "n_heads", "ffn_dim", "mp", "max_seq_len", "init_std")
             if getattr(m, k) is not None}
    if m.vocab_size is not None:
        if m.vocab_size < ds_vocab:
            raise SpectraError(f"model.vocab_size={m.vocab_size} is smaller than the data tokenizer's {ds_vocab} tokens")
        shape["vocab_size"] = m.vocab_size
    elif preset.spectra:
        mp = shape.get("mp", mc.mp)
        # Spectra sizes use the GPT-NeoX vocabulary (50281 tokens -> 50304 rows).
        if not (ds_vocab <= mc.vocab_size < ds_vocab + 128 * mp):
            raise SpectraError(
                f"data tokenizer has {ds_vocab} tokens but preset '{preset.name}' has the GPT-NeoX vocabulary "
                f"({mc.vocab_size} padded rows); build the data with the GPT-NeoX tokenizer, or set "
                f"model.vocab_size={padded_vocab(ds_vocab, mp)} to train this shape on this tokenizer")
    else:  # small presets take the data tokenizer's vocabulary
        shape["vocab_size"] = padded_vocab(ds_vocab, shape.get("mp", mc.mp))
    return mc.replace(**shape) if shape else mc, preset


def plan_run(cfg: TrainConfig, ds_vocab: int, tokenizer, world: int, device_type: str) -> Plan:
    mc, preset = _model_config(cfg, ds_vocab)
    fam = cfg.model.family
    ternary = fam in ("trilm", "bilm")
    seq = cfg.data.seq_len or min(mc.max_seq_len, 2048)
    if seq > mc.max_seq_len:
        raise SpectraError(f"data.seq_len={seq} exceeds the model's max_seq_len={mc.max_seq_len}; "
                           f"lower data.seq_len or set model.max_seq_len={seq}")
    gt = cfg.batch.global_tokens
    if gt is None:
        if preset is None:
            raise SpectraError("set batch.global_tokens (no preset to take it from)")
        gt = preset.trilm_batch_tokens if ternary else preset.float_batch_tokens
    mb = cfg.batch.micro_batch
    unit = mb * seq * world
    if gt % unit:
        lo, hi = (gt // unit) * unit, (gt // unit + 1) * unit
        raise SpectraError(
            f"batch.global_tokens={gt} is not divisible by micro_batch x seq_len x ranks = {mb} x {seq} x {world} = {unit}; "
            f"use {lo or hi} or {hi}, or change batch.micro_batch")
    gb = gt // seq
    per_rank = gb // world
    steps = cfg.schedule.steps or math.ceil(cfg.schedule.tokens / gt)
    lr, lr_after = cfg.optim.lr, cfg.optim.lr_after
    if lr is None:
        if preset is None:
            raise SpectraError("set optim.lr (no preset to take the peak learning rate from)")
        lr = preset.trilm_lr if ternary else preset.float_lr
    if ternary and lr_after is None:
        lr_after = preset.trilm_lr_after if (preset and cfg.optim.lr is None) else lr * (preset.trilm_lr_after / preset.trilm_lr if preset else 0.625)
    precision = resolve_precision(cfg.train.precision, device_type)
    if device_type == "cpu" and precision == "fp16":
        raise SpectraError("train.precision=fp16 needs a GPU; use fp32 (default) or bf16 on CPU")
    parallel = cfg.train.parallel if cfg.train.parallel != "auto" else ("ddp" if world > 1 else "none")
    return Plan(mc, fam, preset.name if preset else None, seq, gt, gb, per_rank, per_rank // mb, steps, lr,
                lr_after if ternary else None, precision, parallel, ds_vocab, tokenizer)


def resolved_config(cfg: TrainConfig, plan: Plan) -> TrainConfig:
    """The config with every derived value filled in (what the run directory records)."""
    mc = plan.model_cfg
    model = dataclasses.replace(cfg.model, preset=plan.preset, dim=mc.dim, n_layers=mc.n_layers, n_heads=mc.n_heads,
                                ffn_dim=mc.ffn_dim, mp=mc.mp, max_seq_len=mc.max_seq_len, init_std=mc.init_std,
                                vocab_size=mc.vocab_size)
    s = cfg.schedule
    ternary = plan.family in ("trilm", "bilm")
    sched = dataclasses.replace(s, steps=plan.steps, tokens=plan.steps * plan.global_tokens,
                                decay=s.decay if s.decay != "auto" else ("linear" if ternary else "cosine"),
                                lr_drop=ternary if s.lr_drop is None else s.lr_drop,
                                wd_off=ternary if s.wd_off is None else s.wd_off)
    return dataclasses.replace(
        cfg, model=model, schedule=sched,
        data=dataclasses.replace(cfg.data, seq_len=plan.seq_len),
        batch=dataclasses.replace(cfg.batch, global_tokens=plan.global_tokens),
        optim=dataclasses.replace(cfg.optim, lr=plan.lr, lr_after=plan.lr_after),
        train=dataclasses.replace(cfg.train, precision=plan.precision, parallel=plan.parallel))


_IDENTITY = ("model", "data")  # a run with other values here is a different run


def _check_run_dir(run: Path, resolved: TrainConfig, resume: str, cfg: TrainConfig) -> None:
    from spectra.fsutil import check_output

    f = run / RUN_CONFIG
    if not f.exists():
        if run.exists() and resume == "none" and ck.list_checkpoints(run):
            raise SpectraError(f"output directory '{run}' holds checkpoints but no {RUN_CONFIG}; choose another --out")
        # --out policy (docs/security.md): a new, empty or own directory, never inside/around the data
        check_output(run, "train", inputs=[cfg.data.dir, cfg.model.init_from], can_force=False)
        return
    if not ck.list_checkpoints(run):
        return  # a start that died before its first checkpoint (we hold the run lock): nothing to keep
    old = json.loads(f.read_text())
    new = resolved.to_dict()
    diffs = [f"{sec}.{k}: {old.get(sec, {}).get(k)!r} -> {v!r}" for sec in _IDENTITY for k, v in new[sec].items()
             if old.get(sec, {}).get(k) != v and (sec, k) not in (("model", "init_from"), ("data", "allow_change"))]
    if old.get("train", {}).get("seed") != new["train"]["seed"]:
        diffs.append(f"train.seed: {old.get('train', {}).get('seed')} -> {new['train']['seed']}")
    if resume == "none":
        what = "a different run" if diffs else "a run"
        raise SpectraError(f"output directory '{run}' already holds {what}"
                           f"{' (' + '; '.join(diffs[:3]) + ')' if diffs else ''}; pass --resume auto to continue it, "
                           "or choose another --out")
    if diffs:
        raise SpectraError(f"cannot resume '{run}': the config differs from the run's ({'; '.join(diffs[:3])})")


def init_model(plan: Plan, cfg: TrainConfig):
    """Seeded init on CPU in fp32 (same weights whatever the rank count), or init_from."""
    from spectra.model import Transformer
    from spectra.ternary import to_ternary

    fam = plan.family
    mode = "binary" if fam == "bilm" else "ternary"
    src = cfg.model.init_from
    if src:
        from spectra.store.hfconfig import family_of, read_config
        from spectra.store.modeldir import load_model

        src_fam = family_of(read_config(src))
        # A ternary source into a ternary run: latent weights that re-quantize to exactly the
        # stored gamma*W_hat (not gamma*W_hat itself, whose absmean is smaller).
        as_ternary = src_fam == "trilm" and fam == "trilm"
        model, _ = load_model(src, ternary=as_ternary)
        if model.cfg.mp != plan.model_cfg.mp or model.cfg.max_seq_len != plan.model_cfg.max_seq_len:
            sd = {k: v for k, v in model.state_dict().items()}
            model = Transformer(plan.model_cfg)
            model.load_state_dict(sd, strict=True)
            if as_ternary:
                to_ternary(model, plan.model_cfg.mp, mode)
        if fam in ("trilm", "bilm") and not as_ternary:
            to_ternary(model, plan.model_cfg.mp, mode)  # FloatLM -> TriLM: ternary QAT from the float weights
        if model.cfg.vocab_size != plan.model_cfg.vocab_size:
            raise SpectraError(f"init_from vocab {model.cfg.vocab_size} != {plan.model_cfg.vocab_size}")
        model.train()
        return model.float()
    model = Transformer(plan.model_cfg).init_weights(cfg.train.seed)
    if fam in ("trilm", "bilm"):
        to_ternary(model, plan.model_cfg.mp, mode)
    return model


# -- the loop ---------------------------------------------------------------------------

def _loss(model, x, y, fused: bool = True):
    # Call the module (not .loss) so that DDP/FSDP hooks run; the fused head + cross-entropy
    # plugs in as the model's loss_fn (the model itself knows nothing of it).
    if fused:
        from spectra.losses import head_cross_entropy

        return model(x, targets=y, loss_fn=head_cross_entropy)
    return F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())


@torch.no_grad()
def validation_loss(model, batches: list[tuple[torch.Tensor, torch.Tensor]], plan: Plan, device, d: Dist) -> float:
    """Mean next-token loss over fixed validation batches (every rank evaluates all of them)."""
    model.eval()
    tot, n = 0.0, 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast(plan.precision, device.type):
            loss = _loss(model, x, y)
        tot += float(loss) * y.numel()
        n += y.numel()
    model.train()
    return tot / max(n, 1)


def _val_windows(cfg: TrainConfig, plan: Plan) -> list:
    """Fixed validation batches: the first eval.batches x micro_batch windows of the split."""
    from spectra.data import TokenDataset

    try:
        ds = TokenDataset(cfg.data.dir, cfg.data.val_split)
        if ds.num_tokens <= plan.seq_len:
            return []
        mb = cfg.batch.micro_batch
        return list(ds.eval_windows(plan.seq_len, max_windows=cfg.eval.batches * mb, batch_size=mb))
    except SpectraError:
        return []  # no validation split: training continues without val_loss


def _train(cfg: TrainConfig, d: Dist) -> Path:
    plan = _prepare_run(cfg, d)
    lp = _build(cfg, plan, d)
    _resume(lp)
    _loop(lp)
    return lp.run


def _prepare_run(cfg: TrainConfig, d: Dist) -> Plan:
    """The plan; refusals before anything is written; then the run directory with its resolved config."""
    run = Path(cfg.out)
    ds = _open_data(cfg)
    plan = plan_run(cfg, int(ds.vocab_size), getattr(ds, "tokenizer_path", None), d.world, d.device.type)
    if d.device.type == "cpu":  # before the run directory or the model exist (docs/security.md, Limits)
        from spectra.validate import check_training_memory

        check_training_memory(plan.model_cfg)
    res = resolved_config(cfg, plan)
    _check_run_dir(run, res, cfg.resume, cfg)  # on every rank, so all of them raise together
    barrier(d)
    if d.is_main:
        run.mkdir(parents=True, exist_ok=True)
        ck.clean_temporaries(run)
        from spectra.fsutil import atomic_write_json, write_marker

        write_marker(run, "train")
        atomic_write_json(run / RUN_CONFIG, res.to_dict())
    barrier(d)
    return plan


@dataclass
class _Loop:
    """What the loop carries from step to step."""

    cfg: TrainConfig
    plan: Plan
    d: Dist
    run: Path
    base: torch.nn.Module  # the bare model (checkpoints are written from it)
    model: torch.nn.Module  # the parallel wrapper the steps run through
    opt: torch.optim.Optimizer
    sched: Schedule
    scaler: LossScaler
    loader: object
    step: int = 0
    bad_total: int = 0
    consecutive_bad: int = 0


def _build(cfg: TrainConfig, plan: Plan, d: Dist) -> _Loop:
    from spectra.data import DataLoader

    base = init_model(plan, cfg).to(d.device)
    if cfg.train.activation_checkpoint:
        from .parallel import apply_activation_checkpointing

        apply_activation_checkpointing(base, cfg.train.activation_checkpoint)
    if cfg.train.compile:
        from .parallel import apply_compile

        apply_compile(base)
    model = parallelize(base, plan.parallel, d)
    opt = build_optimizer(model, cfg, plan.lr)
    sched: Schedule = build_schedule(cfg, plan.family, plan.steps, plan.lr, plan.lr_after)
    scaler = LossScaler(enabled=plan.precision == "fp16", scale=cfg.train.loss_scale_init,
                        window=cfg.train.loss_scale_window, min_scale=cfg.train.loss_scale_min)
    loader = DataLoader(cfg.data.dir, plan.seq_len, plan.global_batch, rank=d.rank, world_size=d.world,
                        seed=cfg.data.seed, split="train")
    return _Loop(cfg, plan, d, Path(cfg.out), base, model, opt, sched, scaler, loader)


def _resume(lp: _Loop) -> None:
    """Restore from --resume (model, optimizer, RNG, loader, scaler) and drop the metrics of steps to replay."""
    cfg, run = lp.cfg, lp.run
    resume_from = None
    if cfg.resume == "auto":
        resume_from = ck.latest_checkpoint(run)
    elif cfg.resume != "none":
        resume_from = Path(cfg.resume)
    if resume_from is not None:
        st = ck.load_train_state(resume_from, lp.model, lp.opt, lp.d)
        lp.loader.load_state_dict(st["loader"], allow_fingerprint_mismatch=cfg.data.allow_change)
        lp.scaler.load_state_dict(st["scaler"])
        lp.step, lp.bad_total = int(st["step"]), int(st.get("bad_steps", 0))
    if lp.d.is_main:  # drop records of steps that will be replayed (all of them on a fresh start)
        truncate_after(run / METRICS_FILE, lp.step)
    barrier(lp.d)


def _save(lp: _Loop, s: int, kind: str, meta_base: dict) -> Path:
    plan = lp.plan
    state = {"tokens": s * plan.global_tokens, "loader": lp.loader.state_dict(), "scaler": lp.scaler.state_dict(),
             "bad_steps": lp.bad_total, "plan_steps": plan.steps}
    p = ck.save_checkpoint(lp.run, s, kind, model=lp.model, base_model=lp.base, optimizer=lp.opt, family=plan.family,
                           trainer_state=state, meta={**meta_base, "step": s, "tokens": s * plan.global_tokens},
                           tokenizer=plan.tokenizer, dtype=torch_dtype(lp.cfg.checkpoint.dtype, what="checkpoint.dtype"),
                           d=lp.d)
    if lp.d.is_main:
        ck.prune(lp.run, lp.cfg.checkpoint.keep_last)
    return p


def _optimizer_step(lp: _Loop, s: int, it, params: list) -> tuple[float, float, float, float, bool, float]:
    """Step ``s``: gradients over this rank's micro-batches, unscale, clip, skip when non-finite, AdamW.
    Returns (loss, grad norm, lr, wd, applied, seconds)."""
    cfg, plan, d, scaler = lp.cfg, lp.plan, lp.d, lp.scaler
    t0 = time.perf_counter()
    lr, wd = lp.sched.lr(s), lp.sched.wd(s)
    set_lr_wd(lp.opt, lr, wd)
    x, y = next(it)
    x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
    loss_sum = 0.0
    mult = scaler.loss_multiplier() / plan.accum
    mb = cfg.batch.micro_batch
    for i in range(plan.accum):
        with set_grad_sync(lp.model, i == plan.accum - 1):
            with autocast(plan.precision, d.device.type):
                loss = _loss(lp.model, x[i * mb : (i + 1) * mb], y[i * mb : (i + 1) * mb], cfg.train.fused_loss)
            (loss * mult).backward()
        loss_sum += loss.detach().float()
    if scaler.enabled:
        inv = 1.0 / scaler.scale
        for p in params:
            if p.grad is not None:
                p.grad.mul_(inv)
    gn = torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip if cfg.optim.clip > 0 else float("inf"), foreach=True)
    if hasattr(gn, "full_tensor"):
        gn = gn.full_tensor()
    loss_val, gnorm = all_reduce_mean([float(loss_sum) / plan.accum, float(gn)], d)
    loss_ok = math.isfinite(loss_val)
    apply = scaler.update(loss_ok and math.isfinite(gnorm))
    if apply:
        lp.opt.step()
        lp.consecutive_bad = 0
    elif not scaler.enabled or not loss_ok or scaler.scale <= scaler.min_scale:
        lp.consecutive_bad += 1
        lp.bad_total += 1
    lp.opt.zero_grad(set_to_none=True)
    if d.device.type == "cuda":
        torch.cuda.synchronize()
    return loss_val, gnorm, lr, wd, apply, time.perf_counter() - t0


def _step_record(lp: _Loop, loss_val, gnorm, lr, wd, apply: bool, dt: float, fpt: float, peak) -> dict:
    plan, scaler = lp.plan, lp.scaler
    tps = plan.global_tokens / dt
    rec = {"step": lp.step, "tokens": lp.step * plan.global_tokens, "loss": loss_val, "lr": lr, "wd": wd,
           "grad_norm": gnorm, "loss_scale": scaler.scale if scaler.enabled else 1.0, "tok_per_s": tps,
           "mfu": (tps * fpt / (peak * lp.d.world)) if peak else None, "step_time": dt,
           **memory_stats(lp.d.device.type)}
    if not apply:
        rec["skipped"] = True
    if scaler.enabled:
        rec["overflow_skips"] = scaler.overflows
    return rec


def _loop(lp: _Loop) -> None:
    cfg, plan, d, run = lp.cfg, lp.plan, lp.d, lp.run
    start_step = lp.step
    logger = MetricsLogger(run, enabled=d.is_main, tensorboard=cfg.log.tensorboard)
    val = _val_windows(cfg, plan) if (cfg.eval.every or cfg.eval.at_end) else []
    fpt = flops_per_token(plan.model_cfg, plan.seq_len)
    peak = device_peak_flops(d.device.type, plan.precision, cfg.log.peak_flops)
    params = [p for p in lp.model.parameters() if p.requires_grad]
    meta_base = {"preset": plan.preset, "run": str(run.resolve()), "seq_len": plan.seq_len,
                 "global_tokens": plan.global_tokens}
    bar = None
    if d.is_main and cfg.log.progress:
        from tqdm import tqdm

        bar = tqdm(total=plan.steps, initial=lp.step, desc=f"train {plan.family}", unit="step", dynamic_ncols=True)
    it = iter(lp.loader)
    lp.model.train()
    prof_range = profile_range(cfg.log.profile) if cfg.log.profile else None
    prof = None
    try:
        while lp.step < plan.steps:
            s = lp.step + 1
            if prof_range and s == prof_range[0]:
                prof = _start_profiler(d)
            loss_val, gnorm, lr, wd, apply, dt = _optimizer_step(lp, s, it, params)
            step = lp.step = s
            rec = _step_record(lp, loss_val, gnorm, lr, wd, apply, dt, fpt, peak)
            if step % cfg.log.every == 0 or step == plan.steps or not apply:
                logger.log(rec)
            if prof is not None and (step == prof_range[1] or step == plan.steps):
                _stop_profiler(prof, run / "profile", f"steps-{prof_range[0]}-{step}-rank{d.rank}",
                               d.device.type == "cuda")
                prof = None
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{lr:.2e}", tok_s=f"{rec['tok_per_s']:.0f}")
            if lp.consecutive_bad >= cfg.train.max_bad_steps:
                raise SpectraError(
                    f"stopping: {lp.consecutive_bad} consecutive steps with a non-finite loss or gradient (up to step {step}); "
                    f"last good checkpoint: {ck.latest_checkpoint(run) or 'none'}; lower optim.lr, check the data, "
                    "or raise train.max_bad_steps")
            if cfg.eval.every and step % cfg.eval.every == 0 and val and step != plan.steps:
                logger.log({"step": step, "tokens": step * plan.global_tokens,
                            "val_loss": validation_loss(lp.model, val, plan, d.device, d)})
            kind = ck.checkpoint_kind(step, plan.steps, cfg.checkpoint)
            if kind:
                _save(lp, step, kind, meta_base)
        if val and cfg.eval.at_end and lp.step > start_step:
            vl = validation_loss(lp.model, val, plan, d.device, d)
            logger.log({"step": lp.step, "tokens": lp.step * plan.global_tokens, "val_loss": vl})
        last = ck.latest_checkpoint(run)
        if last is None or int(last.name[5:]) != lp.step:
            last = _save(lp, lp.step, "permanent", meta_base)
        if d.is_main:
            ck.link_or_copy_model(last, run / FINAL_DIR)
        barrier(d)
    finally:
        if prof is not None:  # stopped early by an error: no trace
            prof.stop()
        if bar is not None:
            bar.close()
        logger.close()


def _start_profiler(d: Dist):
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if d.device.type == "cuda" else [])
    prof = profile(activities=acts, record_shapes=True)
    prof.start()
    return prof


def _stop_profiler(prof, out_dir: Path, name: str, cuda: bool) -> None:
    """Chrome/Perfetto trace (open in ui.perfetto.dev) + a text table of the top ops, per rank."""
    prof.stop()
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{name}.json.tmp"  # complete or absent, like every other file we write
    prof.export_chrome_trace(str(tmp))
    tmp.replace(out_dir / f"{name}.json")
    from spectra.fsutil import atomic_write_text

    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    atomic_write_text(out_dir / f"{name}.txt", prof.key_averages().table(sort_by=sort, row_limit=40))
