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

from . import checkpointing as ck
from .config import TrainConfig, profile_range, validate
from .metrics import MetricsLogger, device_peak_flops, flops_per_token, memory_stats, truncate_after
from .optim import build_optimizer, set_lr_wd
from .parallel import Dist, all_reduce_mean, barrier, close_distributed, init_distributed, parallelize, set_grad_sync
from .precision import LossScaler, autocast, resolve_precision
from .schedule import Schedule, build_schedule

CONFIG_FILE = "train_config.json"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
            fresh = not (Path(cfg.out) / CONFIG_FILE).exists()
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
        (run / CONFIG_FILE).unlink(missing_ok=True)


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
    from spectra.checkpoint import model_config_from_hf, read_config
    from spectra.config import get_preset, padded_vocab

    m = cfg.model
    preset = get_preset(m.preset) if m.preset else None
    if m.init_from:
        src = read_config(m.init_from)
        mc = model_config_from_hf(src, str(Path(m.init_from) / "config.json"))
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


def make_plan(cfg: TrainConfig, ds_vocab: int, tokenizer, world: int, device_type: str) -> Plan:
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

    f = run / CONFIG_FILE
    if not f.exists():
        if run.exists() and resume == "none" and ck.list_checkpoints(run):
            raise SpectraError(f"output directory '{run}' holds checkpoints but no {CONFIG_FILE}; choose another --out")
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


def build_model(plan: Plan, cfg: TrainConfig):
    """Seeded init on CPU in fp32 (same weights whatever the rank count), or init_from."""
    from spectra.model import Transformer
    from spectra.ternary import to_ternary

    fam = plan.family
    mode = "binary" if fam == "bilm" else "ternary"
    src = cfg.model.init_from
    if src:
        from spectra.checkpoint import family_of, load_model, read_config

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
def evaluate(model, batches: list[tuple[torch.Tensor, torch.Tensor]], plan: Plan, device, d: Dist) -> float:
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
    from spectra.data import DataLoader

    run = Path(cfg.out)
    ds = _open_data(cfg)
    plan = make_plan(cfg, int(ds.vocab_size), getattr(ds, "tokenizer_path", None), d.world, d.device.type)
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
        atomic_write_json(run / CONFIG_FILE, res.to_dict())
    barrier(d)

    base = build_model(plan, cfg).to(d.device)
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

    step, bad_total, consecutive_bad = 0, 0, 0
    resume_from = None
    if cfg.resume == "auto":
        resume_from = ck.latest_checkpoint(run)
    elif cfg.resume != "none":
        resume_from = Path(cfg.resume)
    if resume_from is not None:
        st = ck.load_train_state(resume_from, model, opt, d)
        loader.load_state_dict(st["loader"], allow_fingerprint_mismatch=cfg.data.allow_change)
        scaler.load_state_dict(st["scaler"])
        step, bad_total = int(st["step"]), int(st.get("bad_steps", 0))
    if d.is_main:  # drop records of steps that will be replayed (all of them on a fresh start)
        truncate_after(run / "metrics.jsonl", step)
    barrier(d)
    start_step = step

    logger = MetricsLogger(run, enabled=d.is_main, tensorboard=cfg.log.tensorboard)
    val = _val_windows(cfg, plan) if (cfg.eval.every or cfg.eval.at_end) else []
    fpt = flops_per_token(plan.model_cfg, plan.seq_len)
    peak = device_peak_flops(d.device.type, plan.precision, cfg.log.peak_flops)
    params = [p for p in model.parameters() if p.requires_grad]
    meta_base = {"preset": plan.preset, "run": str(run.resolve()), "seq_len": plan.seq_len,
                 "global_tokens": plan.global_tokens}
    ckdtype = _DTYPES[cfg.checkpoint.dtype]

    def save(s: int, kind: str) -> Path:
        state = {"tokens": s * plan.global_tokens, "loader": loader.state_dict(), "scaler": scaler.state_dict(),
                 "bad_steps": bad_total, "plan_steps": plan.steps}
        p = ck.save_checkpoint(run, s, kind, model=model, base_model=base, optimizer=opt, family=plan.family,
                               trainer_state=state, meta={**meta_base, "step": s, "tokens": s * plan.global_tokens},
                               tokenizer=plan.tokenizer, dtype=ckdtype, d=d)
        if d.is_main:
            ck.prune(run, cfg.checkpoint.keep_last)
        return p

    bar = None
    if d.is_main and cfg.log.progress:
        from tqdm import tqdm

        bar = tqdm(total=plan.steps, initial=step, desc=f"train {plan.family}", unit="step", dynamic_ncols=True)
    it = iter(loader)
    model.train()
    prof_range = profile_range(cfg.log.profile) if cfg.log.profile else None
    prof = None
    try:
        while step < plan.steps:
            s = step + 1
            if prof_range and s == prof_range[0]:
                prof = _start_profiler(d)
            t0 = time.perf_counter()
            lr, wd = sched.lr(s), sched.wd(s)
            set_lr_wd(opt, lr, wd)
            x, y = next(it)
            x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
            loss_sum = 0.0
            mult = scaler.loss_multiplier() / plan.accum
            mb = cfg.batch.micro_batch
            for i in range(plan.accum):
                last = i == plan.accum - 1
                ctx = set_grad_sync(model, last)
                with ctx:
                    with autocast(plan.precision, d.device.type):
                        loss = _loss(model, x[i * mb : (i + 1) * mb], y[i * mb : (i + 1) * mb], cfg.train.fused_loss)
                    (loss * mult).backward()
                loss_sum += loss.detach().float()
            if scaler.enabled:
                inv = 1.0 / scaler.scale
                for p in params:
                    if p.grad is not None:
                        p.grad.mul_(inv)
            gn = torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip if cfg.optim.clip > 0 else float("inf"),
                                                foreach=True)
            if hasattr(gn, "full_tensor"):
                gn = gn.full_tensor()
            loss_val, gnorm = all_reduce_mean([float(loss_sum) / plan.accum, float(gn)], d)
            loss_ok = math.isfinite(loss_val)
            finite = loss_ok and math.isfinite(gnorm)
            apply = scaler.update(finite)
            if apply:
                opt.step()
                consecutive_bad = 0
            else:
                bad_at_min = not scaler.enabled or not loss_ok or scaler.scale <= scaler.min_scale
                if bad_at_min:
                    consecutive_bad += 1
                    bad_total += 1
            opt.zero_grad(set_to_none=True)
            if d.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            step = s
            tps = plan.global_tokens / dt
            rec = {"step": step, "tokens": step * plan.global_tokens, "loss": loss_val, "lr": lr, "wd": wd,
                   "grad_norm": gnorm, "loss_scale": scaler.scale if scaler.enabled else 1.0, "tok_per_s": tps,
                   "mfu": (tps * fpt / (peak * d.world)) if peak else None, "step_time": dt,
                   **memory_stats(d.device.type)}
            if not apply:
                rec["skipped"] = True
            if scaler.enabled:
                rec["overflow_skips"] = scaler.overflows
            if step % cfg.log.every == 0 or step == plan.steps or not apply:
                logger.log(rec)
            if prof is not None and (step == prof_range[1] or step == plan.steps):
                _stop_profiler(prof, run / "profile", f"steps-{prof_range[0]}-{step}-rank{d.rank}",
                               d.device.type == "cuda")
                prof = None
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}")
            if consecutive_bad >= cfg.train.max_bad_steps:
                last = ck.latest_checkpoint(run)
                raise SpectraError(
                    f"stopping: {consecutive_bad} consecutive steps with a non-finite loss or gradient (up to step {step}); "
                    f"last good checkpoint: {last or 'none'}; lower optim.lr, check the data, or raise train.max_bad_steps")
            if cfg.eval.every and step % cfg.eval.every == 0 and val and step != plan.steps:
                logger.log({"step": step, "tokens": step * plan.global_tokens,
                            "val_loss": evaluate(model, val, plan, d.device, d)})
            kind = ck.checkpoint_kind(step, plan.steps, cfg.checkpoint)
            if kind:
                save(step, kind)
        if val and cfg.eval.at_end and step > start_step:
            vl = evaluate(model, val, plan, d.device, d)
            logger.log({"step": step, "tokens": step * plan.global_tokens, "val_loss": vl})
        last = ck.latest_checkpoint(run)
        if last is None or int(last.name[5:]) != step:
            last = save(step, "permanent")
        if d.is_main:
            ck.link_or_copy_model(last, run / ck.FINAL)
        barrier(d)
    finally:
        if prof is not None:  # stopped early by an error: no trace
            prof.stop()
        if bar is not None:
            bar.close()
        logger.close()
    return run


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
