"""Shard-layout inference for unpacked ternary weights (gamma * W_hat).

A released TriLM stores each block matrix as gamma_s * W_hat with one gamma per
model-parallel shard s. Given only the dense tensor, the shard count is the
smallest ``mp`` for which :func:`spectra.ternary.recover_ternary` succeeds (a
finer split of a valid layout is also valid, so the smallest one is the layout
the model was trained with, unless two shards happen to share a gamma). The math
itself lives in :mod:`spectra.ternary`; this module only searches over ``mp``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from spectra.config import COLUMN_PARALLEL, ROW_PARALLEL
from spectra.errors import SpectraError

MAX_MP = 64  # Megatron / GPT-NeoX runs use far fewer model-parallel ranks than this
BLOCK_LINEARS = COLUMN_PARALLEL + ROW_PARALLEL


def is_block_linear(name: str) -> bool:
    """True for q/k/v/o/gate/up/down weights (HF or spectra names)."""
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in BLOCK_LINEARS


def distinct_magnitudes(w: torch.Tensor) -> int:
    """Number of distinct |w| values, zero included (the SpectraSuite README check counts these)."""
    return int(torch.unique(w.detach().float().abs()).numel())


def _split_dim(shape, split: str) -> int:
    return shape[0] if split == "col" else shape[1]


@dataclass
class MatrixLayout:
    """What we learned about one block matrix."""

    name: str
    split: str  # "col" (q,k,v,gate,up: output rows split) or "row" (o,down: input columns split)
    shape: tuple[int, int]
    distinct: int  # distinct |w| incl. zero
    mp: int | None = None  # inferred or asserted shard count; None when not ternary
    gammas: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def ternary(self) -> bool:
        return self.mp is not None and self.error is None


def recover_at(w: torch.Tensor, mp: int, split: str):
    """(W_hat, gamma) or None when ``w`` is not gamma*W_hat with ``mp`` shards."""
    from spectra.ternary import recover_ternary

    if _split_dim(w.shape, split) % mp:
        return None
    try:
        return recover_ternary(w, mp, split)
    except SpectraError:
        return None


def infer_mp(w: torch.Tensor, split: str, max_mp: int = MAX_MP, distinct: int | None = None):
    """Smallest mp (dividing the split dimension) at which ``w`` is per-shard ternary.

    Returns (mp, W_hat, gamma) or None. A matrix with k distinct non-zero magnitudes
    needs at least k shards, so the search starts there.
    """
    if distinct is None:
        distinct = distinct_magnitudes(w)
    nonzero = distinct - (1 if bool((w == 0).any()) else 0)
    n = _split_dim(w.shape, split)
    for mp in range(max(1, nonzero), min(max_mp, n) + 1):
        if n % mp:
            continue
        got = recover_at(w, mp, split)
        if got is not None:
            return mp, got[0], got[1]
    return None


def analyse(name: str, w: torch.Tensor, mp: int | None = None, max_mp: int = MAX_MP) -> tuple[MatrixLayout, torch.Tensor | None]:
    """Layout of one matrix: at the asserted ``mp`` if given, else inferred. Returns (layout, W_hat)."""
    from spectra.ternary import split_of

    split = split_of(name)
    d = distinct_magnitudes(w)
    lay = MatrixLayout(name, split, tuple(w.shape), d)
    if mp is not None:
        got = recover_at(w, mp, split)
        if got is None:
            found = infer_mp(w, split, max_mp, d)
            hint = (f"; it is ternary with {found[0]} shards instead" if found else
                    "; it is not gamma*W_hat for any shard layout")
            lay.error = f"not ternary at mp={mp} ({split} split, {d} distinct |w|){hint}"
            return lay, None
        lay.mp, (q, g) = mp, got
    else:
        found = infer_mp(w, split, max_mp, d)
        if found is None:
            lay.error = f"not ternary: {d} distinct |w| and no shard layout with one gamma per shard (mp <= {max_mp})"
            return lay, None
        lay.mp, q, g = found
    lay.gammas = [float(x) for x in g]
    return lay, q


def model_mp(layouts: list[MatrixLayout]) -> int:
    """Model-level MP: the least common multiple of the per-matrix shard counts."""
    m = 1
    for lay in layouts:
        if lay.mp:
            m = m * lay.mp // math.gcd(m, lay.mp)
    return m
