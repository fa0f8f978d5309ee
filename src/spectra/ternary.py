"""The TriLM math, in one place.

Everything that turns a latent weight into ternary values goes through
:func:`quantize_weight`: training (the STE forward), packing, export and the
checks on released checkpoints. See SPEC.md, "TriLM linear layer":

* model parallelism of degree ``mp`` splits a *column-parallel* matrix (q, k, v,
  gate, up: ``W`` of shape [out, in]) into ``mp`` blocks of output rows, and a
  *row-parallel* matrix (o, down) into ``mp`` blocks of input columns;
* each block gets its own scale ``gamma = 1e-5 + mean(|W_block|)``;
* ``W_hat = round(clip(W / gamma, -1, 1))`` and the layer computes ``x (gamma W_hat)^T``;
* the backward pass is the straight-through estimator: the latent weight receives
  the gradient a dense layer with weight ``gamma W_hat`` would receive.

The binary ablation (BiLM) uses ``alpha = mean|W|`` and ``W_hat = sign(W - mean(W))``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from spectra.config import COLUMN_PARALLEL, ROW_PARALLEL, split_of  # noqa: F401  (split_of re-exported)
from spectra.errors import SpectraError

EPS = 1e-5
Split = Literal["col", "row"]  # "col": column-parallel (split output rows); "row": split input columns
Mode = Literal["ternary", "binary"]


def _blocks(w: torch.Tensor, mp: int, split: Split) -> torch.Tensor:
    """View W [out, in] as [mp, out/mp, in] (col) or [out, mp, in/mp] (row)."""
    out, inp = w.shape
    if split == "col":
        if out % mp:
            raise SpectraError(f"mp={mp} does not divide the {out} output rows of a column-parallel matrix")
        return w.view(mp, out // mp, inp)
    if inp % mp:
        raise SpectraError(f"mp={mp} does not divide the {inp} input columns of a row-parallel matrix")
    return w.view(out, mp, inp // mp)


def _expand(s: torch.Tensor, w: torch.Tensor, mp: int, split: Split) -> torch.Tensor:
    """Broadcast per-shard values s [mp] to the block view of w."""
    return s.view(mp, 1, 1) if split == "col" else s.view(1, mp, 1)


def shard_scales(w: torch.Tensor, mp: int = 1, split: Split = "col", mode: Mode = "ternary") -> torch.Tensor:
    """Per-shard scale [mp], fp32: 1e-5 + absmean (ternary) or absmean (binary)."""
    b = _blocks(w.float(), mp, split)
    dims = (1, 2) if split == "col" else (0, 2)
    a = b.abs().mean(dim=dims)
    return a + EPS if mode == "ternary" else a


def quantize_weight(
    w: torch.Tensor, mp: int = 1, split: Split = "col", mode: Mode = "ternary"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_hat as int8 [out, in] in {-1,0,1} (or {-1,1}), scale per shard [mp] fp32)."""
    wf = w.detach().float()
    scale = shard_scales(wf, mp, split, mode)
    b = _blocks(wf, mp, split)
    if mode == "ternary":
        q = torch.round(torch.clamp(b / _expand(scale, wf, mp, split), -1.0, 1.0))
    else:
        dims = (1, 2) if split == "col" else (0, 2)
        centred = b - b.mean(dim=dims, keepdim=True)
        q = torch.where(centred >= 0, 1.0, -1.0)
    return q.reshape(w.shape).to(torch.int8), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, split: Split = "col", dtype=torch.float32) -> torch.Tensor:
    """gamma * W_hat as a dense tensor (the 'unpacked' weight)."""
    mp = scale.numel()
    b = _blocks(q.to(torch.float32), mp, split)
    return (b * _expand(scale.float(), q, mp, split)).reshape(q.shape).to(dtype)


def fake_quant(w: torch.Tensor, mp: int = 1, split: Split = "col", mode: Mode = "ternary") -> torch.Tensor:
    """gamma * W_hat with the straight-through gradient to ``w`` (identity backward)."""
    with torch.no_grad():
        q, s = quantize_weight(w, mp, split, mode)
        wq = dequantize(q, s, split, dtype=w.dtype)
    return w + (wq - w).detach()


class TernaryLinear(nn.Linear):
    """nn.Linear whose forward uses the per-shard ternary (or binary) weight.

    The parameter ``weight`` holds the latent full-precision weights that the
    optimizer updates; ``gamma * W_hat`` is recomputed every forward in training.
    """

    def __init__(self, in_features: int, out_features: int, mp: int = 1, split: Split = "col",
                 mode: Mode = "ternary", device=None, dtype=None):
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        self.mp, self.split, self.mode = mp, split, mode
        _blocks(torch.empty(out_features, in_features, device="meta"), mp, split)  # validate shape

    def effective_weight(self) -> torch.Tensor:
        return fake_quant(self.weight, self.mp, self.split, self.mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.effective_weight())

    def ternary_state(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_hat int8, gamma per shard) for packing/export."""
        return quantize_weight(self.weight, self.mp, self.split, self.mode)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mp={self.mp}, split={self.split}, mode={self.mode}"


def to_ternary(model: nn.Module, mp: int | None = None, mode: Mode = "ternary") -> nn.Module:
    """Swap every block linear (q/k/v/o/gate/up/down) for a TernaryLinear, in place.

    The latent weights are the existing weights (so a trained FloatLM becomes the
    start of ternary quantization-aware training). Embedding, norms and head are
    not touched. ``mp`` defaults to ``model.cfg.mp``.
    """
    if mp is None:
        mp = model.cfg.mp
    targets = [(n, m) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and not isinstance(m, TernaryLinear)
               and n.rsplit(".", 1)[-1] in COLUMN_PARALLEL + ROW_PARALLEL]
    for name, lin in targets:
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        leaf = name.rsplit(".", 1)[-1]
        t = TernaryLinear(lin.in_features, lin.out_features, mp=mp, split=split_of(leaf), mode=mode,
                          device=lin.weight.device, dtype=lin.weight.dtype)
        t.weight = lin.weight  # share the parameter: no copy, optimizer-friendly
        setattr(parent, leaf, t)
    return model


def ternary_linears(model: nn.Module):
    """(name, TernaryLinear) pairs of a converted model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TernaryLinear)]


def unpacked_state_dict(model: nn.Module, dtype=None) -> dict[str, torch.Tensor]:
    """State dict with every TernaryLinear weight replaced by gamma * W_hat (the released 'Unpacked' form)."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    for name, m in ternary_linears(model):
        q, s = m.ternary_state()
        sd[f"{name}.weight"] = dequantize(q, s, m.split, dtype=m.weight.dtype)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    return sd


def recover_ternary(w: torch.Tensor, mp: int, split: Split) -> tuple[torch.Tensor, torch.Tensor]:
    """From an unpacked weight gamma*W_hat, recover (W_hat int8, gamma [mp]).

    gamma of each shard is its largest magnitude (every shard holds at least one
    non-zero in a trained model; an all-zero shard gets gamma 0). Raises when a shard
    holds more than one non-zero magnitude, naming the count.
    """
    wf = w.detach().float()
    b = _blocks(wf, mp, split)
    dims = (1, 2) if split == "col" else (0, 2)
    gamma = b.abs().amax(dim=dims)
    g = _expand(gamma, wf, mp, split)
    q = torch.where(g > 0, torch.sign(b) * (b.abs() >= g * 0.5), torch.zeros_like(b))
    back = q * g
    if not torch.equal(back, b):
        bad = int((back != b).sum())
        raise SpectraError(f"weight is not ternary at mp={mp} ({split} split): {bad} entries are not 0 or +-gamma of their shard")
    return q.reshape(w.shape).to(torch.int8), gamma


def latent_from_ternary(q: torch.Tensor, gamma: torch.Tensor, split: Split, iters: int = 4) -> torch.Tensor:
    """Latent weights W whose ternarization reproduces (W_hat, gamma).

    Naively re-quantizing gamma*W_hat would give a new gamma = 1e-5 + p*gamma (p =
    fraction of non-zeros) and change the model. Instead zeros stay 0 and each
    shard's non-zeros get magnitude a with 1e-5 + p*a = gamma, i.e.
    a = (gamma - 1e-5) / p (> gamma/2 so they round back to +-1). A few fixed-point
    corrections absorb fp32 rounding in the mean so the recomputed gamma matches to
    within an ulp or two.
    """
    mp = gamma.numel()
    qf = q.float()
    b = _blocks(qf, mp, split)
    dims = (1, 2) if split == "col" else (0, 2)
    nz = b.abs().mean(dim=dims)  # p per shard
    target = gamma.float()
    a = torch.where(nz > 0, (target - EPS).clamp_min(0) / nz.clamp_min(1e-12), torch.zeros_like(target))
    for _ in range(iters):
        w = (b * _expand(a, qf, mp, split)).reshape(q.shape)
        got = shard_scales(w, mp, split)
        a = torch.where(nz > 0, a + (target - got) / nz.clamp_min(1e-12), a)
    return (b * _expand(a, qf, mp, split)).reshape(q.shape)
