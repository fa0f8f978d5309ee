"""Intermediate checkpoints: schedule, atomic save, discovery, pruning, resume.

Layout of one checkpoint (``RUN/checkpoints/step-0000100/``)::

    config.json, model.safetensors, generation_config.json, tokenizer*.json
        a model directory (Hugging Face LlamaForCausalLM; TriLM as unpacked gamma*W_hat)
    train_state/dcp/            model (latent fp32 weights) + optimizer state, written with
                                torch.distributed.checkpoint: any rank count can reload it
    train_state/rng-rank<r>.safetensors   torch RNG states per rank
    train_state/state.json      step, tokens, loader state, loss scaler, counters, kind, and
                                the size of every other file; written last = the "complete" mark

The whole directory is assembled as ``.step-0000100.tmp`` and renamed into place, so a
crash leaves only a temporary directory, which discovery ignores and the next run removes.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import warnings
from pathlib import Path

import torch

from spectra.errors import SpectraError
from spectra.fsutil import atomic_write_json, fsync_tree, recover, swap_dir
from spectra.store.hfconfig import CONFIG_FILE
from spectra.store.kinds import CHECKPOINTS_DIR, FINAL_DIR
from spectra.store.modeldir import WEIGHTS_FILE


def step_name(step: int) -> str:
    return f"step-{step:07d}"


def checkpoint_kind(step: int, total: int, c) -> str | None:
    """'permanent', 'ephemeral' or None for the checkpoint (CheckpointSection) after ``step``."""
    if step == total and c.final:
        return "permanent"
    if c.log_spaced and step <= c.log_spaced_until and step & (step - 1) == 0:
        return "permanent"  # 1, 2, 4, 8, ... (Pythia's log-spaced early checkpoints)
    if c.every and step % c.every == 0:
        return "permanent"
    if c.ephemeral_every and step % c.ephemeral_every == 0:
        return "ephemeral"
    return None


def planned_steps(total: int, c) -> list[tuple[int, str]]:
    out = []
    for s in range(1, total + 1):
        k = checkpoint_kind(s, total, c)
        if k:
            out.append((s, k))
    return out


def _state_file(path: Path) -> Path:
    return path / "train_state" / "state.json"


def read_state(path: str | Path) -> dict:
    f = _state_file(Path(path))
    try:
        st = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SpectraError(f"cannot read '{f}': {e}; pick another checkpoint") from None
    if not isinstance(st, dict):
        raise SpectraError(f"'{f}' is not a JSON object; pick another checkpoint")
    return st


def is_complete(path: str | Path) -> bool:
    """state.json present and every file it lists (inside the checkpoint) has the recorded size."""
    path = Path(path)
    try:
        st = read_state(path)
    except SpectraError:
        return False
    files = st.get("files")
    if not isinstance(files, dict) or not files:
        return False
    for rel, size in files.items():
        f = path / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute() or not isinstance(size, int):
            return False
        if not f.is_file() or f.stat().st_size != size:
            return False
    return True


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first, as (step, path)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    out = []
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit() and is_complete(p):
                out.append((int(p.name[5:]), p))
    return sorted(out)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ck = list_checkpoints(run_dir)
    return ck[-1][1] if ck else None


def final_checkpoint(run_dir: str | Path) -> Path:
    """The run's last model directory: RUN/final when present, else the newest checkpoint."""
    run_dir = Path(run_dir)
    fin = run_dir / FINAL_DIR
    if (fin / CONFIG_FILE).exists() and (fin / WEIGHTS_FILE).exists():
        return fin
    last = latest_checkpoint(run_dir)
    if last is None:
        raise SpectraError(f"run '{run_dir}' has no final model and no complete checkpoint (did training finish?)")
    return last


def clean_temporaries(run_dir: Path) -> None:
    """Leftovers of a killed save: temporary trees go; a checkpoint parked as '.NAME.old' by an
    interrupted fallback swap is restored (or dropped when NAME is complete), never lost."""
    root = run_dir / CHECKPOINTS_DIR
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".") and p.name.endswith(".old"):
                recover(root / p.name[1:-4])
        for p in root.iterdir():
            if p.name.startswith(".") and p.name.endswith(".tmp"):
                shutil.rmtree(p, ignore_errors=True)


def _rng_state() -> dict[str, torch.Tensor]:
    s = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        s["cuda"] = torch.cuda.get_rng_state()
    return s


def _full_unpacked_state(model, family: str, mp: int, d) -> dict[str, torch.Tensor] | None:
    """Full (gathered) state dict with TriLM linears as gamma*W_hat; on rank 0 only."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from spectra.ternary import dequantize, quantize_weight, split_of

    if d.distributed:
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        sd = {k.removeprefix("module."): v.detach() for k, v in model.state_dict().items()}
    if not d.is_main:
        return None
    if family in ("trilm", "bilm"):
        mode = "binary" if family == "bilm" else "ternary"
        for k in list(sd):
            if k.endswith("proj.weight"):
                split = split_of(k)
                q, g = quantize_weight(sd[k], mp, split, mode)
                sd[k] = dequantize(q, g, split, dtype=sd[k].dtype)
    return {k: v.cpu() for k, v in sd.items()}


def save_checkpoint(run_dir: Path, step: int, kind: str, *, model, base_model, optimizer, family: str,
                    trainer_state: dict, meta: dict, tokenizer, dtype: torch.dtype, d) -> Path:
    """Write RUN/checkpoints/step-N atomically (all ranks call this). Returns the path."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from spectra.store.modeldir import save_model
    from spectra.fsutil import save_safetensors

    from .parallel import barrier

    root = run_dir / CHECKPOINTS_DIR
    final = root / step_name(step)
    tmp = root / f".{final.name}.tmp"
    err: BaseException | None = None
    try:
        full = _full_unpacked_state(model, family, base_model.cfg.mp, d)
        if d.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            root.mkdir(parents=True, exist_ok=True)
            # save_model builds its own temp dir and renames it to `tmp`; train_state goes in after.
            save_model(base_model, tmp, family, dtype=dtype, meta=meta, tokenizer=tokenizer, state_dict=full)
        barrier(d)
        msd, osd = get_state_dict(model, optimizer)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / "train_state" / "dcp"))
        save_safetensors(_rng_state(), tmp / "train_state" / f"rng-rank{d.rank}.safetensors")
        barrier(d)
        if d.is_main:
            files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            atomic_write_json(_state_file(tmp), {**trainer_state, "step": step, "kind": kind, "world_size": d.world,
                                                 "files": files})
            fsync_tree(tmp)
            swap_dir(tmp, final)  # atomic, also when re-saving the same step (e.g. after a resume)
    except OSError as e:
        err = e
    if err is not None:
        shutil.rmtree(tmp, ignore_errors=True)
        prev = latest_checkpoint(run_dir)
        why = "disk full" if getattr(err, "errno", None) == errno.ENOSPC else f"{type(err).__name__}: {err}"
        raise SpectraError(f"saving checkpoint step {step} to '{final}' failed ({why}); "
                           f"previous checkpoint {'intact: ' + str(prev) if prev else 'none'}; free space and resume with --resume auto") from None
    barrier(d)
    return final


def prune(run_dir: Path, keep_last: int) -> list[Path]:
    """Delete ephemeral checkpoints except the newest ``keep_last``; permanent ones stay."""
    eph = [(s, p) for s, p in list_checkpoints(run_dir) if read_state(p).get("kind") == "ephemeral"]
    removed = []
    for _, p in eph[:-keep_last] if len(eph) > keep_last else []:
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def load_train_state(path: Path, model, optimizer, d) -> dict:
    """Restore model (latent weights) + optimizer from DCP and the RNG; returns state.json."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from spectra.validate import load_safetensors

    from . import safe_dcp

    if not is_complete(path):
        raise SpectraError(f"checkpoint '{path}' is incomplete (no valid train_state/state.json); pick another or use --resume auto")
    st = read_state(path)
    step = st.get("step")
    if not (isinstance(step, int) and step >= 0 and isinstance(st.get("loader"), dict)
            and isinstance(st.get("scaler"), dict)):
        raise SpectraError(f"'{_state_file(Path(path))}' lacks a valid step/loader/scaler; pick another checkpoint")
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    safe_dcp.load(state, path / "train_state" / "dcp")  # never dcp.load: it unpickles the index (docs/security.md)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng = path / "train_state" / f"rng-rank{d.rank}.safetensors"
    if not rng.exists():
        rng = path / "train_state" / "rng-rank0.safetensors"
    if rng.exists():
        r = load_safetensors(rng)  # header checked by our own code before safetensors maps it
        torch.set_rng_state(_rng_tensor(r, "cpu", torch.get_rng_state(), rng))
        if "cuda" in r and torch.cuda.is_available():
            torch.cuda.set_rng_state(_rng_tensor(r, "cuda", torch.cuda.get_rng_state(), rng))
    return st


def _rng_tensor(r: dict, key: str, like: torch.Tensor, path: Path) -> torch.Tensor:
    """``r[key]`` if it has the dtype and shape of this torch's RNG state ``like``, else a one-line error."""
    t = r.get(key)
    if t is None or t.dtype != like.dtype or tuple(t.shape) != tuple(like.shape):
        got = "missing" if t is None else f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}"
        raise SpectraError(f"'{path}': tensor '{key}' is {got}, not the {str(like.dtype).removeprefix('torch.')}"
                           f"{list(like.shape)} RNG state this torch uses; pick another checkpoint")
    return t


def link_or_copy_model(src: Path, dst: Path) -> Path:
    """RUN/final: the model files of the last checkpoint (hard links when possible), atomically."""
    from spectra.fsutil import atomic_dir

    with atomic_dir(dst) as tmp:
        for f in src.iterdir():
            if f.is_file():
                try:
                    os.link(f, tmp / f.name)
                except OSError:
                    shutil.copyfile(f, tmp / f.name)
    return dst


def log_steps_until(n: int) -> list[int]:
    return [2**i for i in range(int(math.log2(max(n, 1))) + 1)]
