"""AdamW with weight decay on matrices only, and per-step LR/WD updates."""

from __future__ import annotations

import torch
from torch import nn


def param_groups(model: nn.Module, decay_embeddings: bool = False, decay_norms: bool = False) -> list[dict]:
    """Two groups: "decay" (block matrices, plus embedding/head/norms when asked) and "no_decay".

    Works on DDP/FSDP-wrapped models (names may carry a ``module.`` prefix).
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        n = name.removeprefix("module.")
        is_embed = n.startswith(("embed_tokens", "lm_head"))
        is_norm = p.ndim < 2 or "norm" in n
        if is_norm:
            (decay if decay_norms else no_decay).append(p)
        elif is_embed:
            (decay if decay_embeddings else no_decay).append(p)
        else:
            decay.append(p)
    return [{"params": decay, "name": "decay", "wd_scale": 1.0},
            {"params": no_decay, "name": "no_decay", "wd_scale": 0.0}]


def build_optimizer(model: nn.Module, cfg, lr: float) -> torch.optim.AdamW:
    o = cfg.optim
    groups = param_groups(model, o.decay_embeddings, o.decay_norms)
    for g in groups:
        g["weight_decay"] = o.weight_decay * g["wd_scale"]
    # The fused kernel (one pass over param, grad and both moments) exists on CPU and CUDA
    # since torch 2.4; on CPU it is ~5x faster than foreach (99m: 40 vs 230 ms per step).
    return torch.optim.AdamW(groups, lr=lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=True)


def set_lr_wd(opt: torch.optim.Optimizer, lr: float, wd: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr
        g["weight_decay"] = wd * g.get("wd_scale", 1.0)
