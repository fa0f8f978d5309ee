"""GPTQ on one linear layer (Frantar et al. 2022; the IST-DASLab ``gptq`` reference).

Given the layer's weight ``W`` [out, in] and the Hessian of its layer-wise loss
``H = 2 X X^T / n`` (X = the calibration inputs of this layer, n = number of
calibration sequences, accumulated in fp32 by :class:`Hessian`), GPTQ quantizes the
columns one at a time and pushes each column's rounding error onto the columns not
yet quantized, weighted by the inverse Hessian. Exactly as the reference:

* dead inputs (``H_jj == 0``) get ``H_jj = 1`` and a zero weight column;
* optional act-order (``desc_act``): columns in order of decreasing ``H_jj``;
* damping ``damp * mean(diag H)`` added to the diagonal (1% by default); if the
  Cholesky factorisation still fails the damping is raised 10x with a warning;
* the upper Cholesky factor of ``H^-1`` drives the updates;
* columns in blocks of ``blocksize`` (128) with the lazy batch update: inside a
  block the error is applied column by column, to the rest of the matrix once per
  block;
* group scales are found when the first column of a group is reached, from the
  already-updated weights (or, with ``static_groups``, once from the original
  weights before anything is quantized, so act-order does not change the groups).

The grid (symmetric, fp16 scales) is defined in :mod:`spectra.quant.rtn`.
"""

from __future__ import annotations

import time
import warnings

import torch

from spectra.errors import SpectraError
from spectra.quant.rtn import (
    QuantResult, check_bits, check_group_size, find_scale, quantize_codes, zero_point,
)

MAX_DAMP_TRIES = 5


class Hessian:
    """Running ``H = 2/n * sum_i X_i X_i^T`` over calibration batches, in fp32.

    ``n`` counts sequences (the reference's ``nsamples``: the batch dimension of the
    3-D input), not tokens; only the overall scale of H depends on it (the GPTQ
    solution does not, the reported loss does).
    """

    def __init__(self, columns: int, device=None):
        self.sum = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.nsamples = 0

    def add(self, x: torch.Tensor) -> None:
        """``x`` [batch, tokens, columns] (or [tokens, columns] = one sequence)."""
        n = x.shape[0] if x.dim() == 3 else 1
        a = x.reshape(-1, x.shape[-1]).float()
        self.sum.addmm_(a.t(), a)
        self.nsamples += n

    def finalize(self) -> torch.Tensor:
        if self.nsamples == 0:
            raise SpectraError("no calibration data reached this layer (Hessian is empty)")
        return self.sum.mul_(2.0 / self.nsamples)


def _upper_cholesky_of_inverse(H: torch.Tensor, damp: float, name: str) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp*mean(diag H)*I)^-1, raising damp on failure."""
    mean_diag = torch.mean(torch.diag(H)).item()
    for attempt in range(MAX_DAMP_TRIES):
        Hd = H.clone()
        Hd.diagonal().add_(damp * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        if info.item() == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info.item() == 0 and torch.isfinite(U).all():
                return U, damp
        new = damp * 10 if damp > 0 else 0.01
        if attempt + 1 < MAX_DAMP_TRIES:
            warnings.warn(f"GPTQ '{name}': Hessian is not positive definite with damping {damp:g}; "
                          f"retrying with {new:g}", RuntimeWarning, stacklevel=3)
        damp = new
    raise SpectraError(f"GPTQ '{name}': Hessian stays singular after {MAX_DAMP_TRIES} damping increases "
                       f"(last {damp / 10:g}); check the calibration data (all-identical windows?)")


def gptq_quantize(
    w: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group_size: int = 128,
    *,
    blocksize: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    name: str = "linear",
) -> QuantResult:
    """Quantize ``w`` [out, in] given ``H`` [in, in]. ``H`` is consumed (modified in place)."""
    check_bits(bits)
    t0 = time.perf_counter()
    W = w.detach().float().clone()
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise SpectraError(f"GPTQ '{name}': Hessian shape {tuple(H.shape)} does not match {cols} input columns")
    if not torch.isfinite(H).all():
        raise SpectraError(f"GPTQ '{name}': the Hessian has NaN/Inf (non-finite calibration activations)")
    if damp < 0:
        raise SpectraError(f"damping must be >= 0, got {damp}")
    gs = check_group_size(cols, group_size, name)

    row_scale = find_scale(W, bits) if group_size == -1 else None  # per-row: found once, as the reference

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    static = None
    if static_groups and group_size != -1:
        static = [find_scale(W[:, i:i + gs], bits) for i in range(0, cols, gs)]

    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]

    Hinv, used_damp = _upper_cholesky_of_inverse(H, damp, name)
    del H

    codes = torch.zeros(rows, cols, dtype=torch.int32)
    losses = torch.zeros(rows, dtype=torch.float64)
    group_scales: list[torch.Tensor] = []  # in processing order (non-static)
    scale = row_scale
    threads = torch.get_num_threads()
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        # The column loop is many tiny ops: waking the intra-op thread pool for each one
        # costs more than it saves (30x slower on a busy 2-core machine), so run it on
        # one thread and keep the threads for the block update below.
        torch.set_num_threads(1)
        try:
            scale = _quantize_block(W, W1, Err1, Hinv1, codes, losses, group_scales, i1, gs, group_size, static,
                                    perm, bits, scale)
        finally:
            torch.set_num_threads(threads)
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])

    if group_size == -1:
        scales = row_scale.unsqueeze(1)
        g_idx = torch.zeros(cols, dtype=torch.int32)
    elif static is not None:
        scales = torch.stack(static, dim=1)
        g_idx = torch.arange(cols, dtype=torch.int32) // gs
    else:
        scales = torch.stack(group_scales, dim=1)
        g_idx = torch.arange(cols, dtype=torch.int32) // gs  # group of each *processed* position
    if perm is not None:
        invperm = torch.argsort(perm)
        codes = codes[:, invperm]
        if static is None:
            g_idx = g_idx[invperm]  # column c was processed at position invperm[c]
    return QuantResult(codes.to(torch.uint8), scales.contiguous(), g_idx.to(torch.int32).contiguous(), bits,
                       group_size, "gptq", float(losses.sum()), time.perf_counter() - t0, used_damp,
                       {"act_order": bool(act_order), "static_groups": bool(static is not None),
                        "blocksize": blocksize, "dead_columns": int(dead.sum())})


def _quantize_block(W, W1, Err1, Hinv1, codes, losses, group_scales, i1, gs, group_size, static, perm, bits,
                    scale):
    """The reference's inner loop over the columns of one block (updates W1/Err1/codes in place)."""
    z = zero_point(bits)
    for i in range(W1.shape[1]):
        j = i1 + i
        if group_size != -1:
            if static is not None:
                scale = static[(perm[j].item() if perm is not None else j) // gs]
            elif j % gs == 0:
                # From the global W (updated by earlier blocks, not yet by this one), as the reference.
                scale = find_scale(W[:, j:j + gs], bits)
                group_scales.append(scale)
        wcol = W1[:, i]
        d = Hinv1[i, i]
        c = quantize_codes(wcol, scale, bits)
        q = scale * (c.float() - z)
        codes[:, j] = c
        err = (wcol - q) / d
        losses += (err.double() ** 2) / 2
        W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
        Err1[:, i] = err
    return scale


def output_error(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    """||W X - W_hat X||^2 for inputs ``x`` [..., in] (the quantity GPTQ minimises)."""
    a = x.reshape(-1, x.shape[-1]).float()
    return float(((a @ (w.float() - w_hat.float()).t()) ** 2).sum())


