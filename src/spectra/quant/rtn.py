"""The symmetric per-group integer grid, and round-to-nearest (RTN) on it.

This file is the single definition of the QuantLM grid; GPTQ (gptq.py), the packed
formats (formats.py) and the tests all call it.

Grid (symmetric GPTQ, as the reference ``Quantizer(sym=True)`` of IST-DASLab gptq):
for ``b`` bits, ``maxq = 2^b - 1`` and the zero point is the mid code ``z = 2^(b-1)``.
For one group of weights ``x`` (one output row x ``group_size`` input columns)::

    scale = 2 * max|x| / maxq            (rounded to fp16: the packed format stores fp16)
    code  = clamp(round(x / scale) + z, 0, maxq)        in [0, 2^b - 1]
    x_hat = scale * (code - z)                          in scale * [-2^(b-1), 2^(b-1) - 1]

So each group has at most ``2^b`` levels. Two deliberate details:

* The reference only mirrors ``xmin = -xmax`` when the group has a negative value;
  for an all-non-negative group it keeps ``scale = xmax / maxq`` and then clips every
  value above ``xmax / 2`` (the zero point is still mid-grid). We always use the
  symmetric scale. Identical for any group that has a negative value.
* The scale is rounded to fp16 *before* the codes are chosen, so the codes GPTQ
  picked are exactly the codes a packed checkpoint (fp16 ``scales``) reproduces.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from spectra.errors import SpectraError

SUPPORTED_BITS = (2, 3, 4, 6, 8)
_FP16_TINY = 2.0 ** -24  # smallest fp16 subnormal; keeps a tiny scale from flushing to 0


def check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise SpectraError(f"unsupported bits {bits!r}; allowed: {', '.join(map(str, SUPPORTED_BITS))}")
    return bits


def check_group_size(in_features: int, group_size: int, name: str = "linear") -> int:
    """Group size in columns (-1 = one group per row); must divide the input dimension."""
    if group_size == -1:
        return in_features
    if group_size <= 0:
        raise SpectraError(f"group size must be positive or -1 (per row), got {group_size}")
    if in_features % group_size:
        divs = [g for g in (32, 64, 128, 256, 512, 1024) if in_features % g == 0]
        raise SpectraError(
            f"group size {group_size} does not divide the input dimension {in_features} of '{name}'; "
            f"use one of {divs or [in_features]} or -1 (per row)"
        )
    return group_size


def maxq(bits: int) -> int:
    return 2 ** bits - 1


def zero_point(bits: int) -> int:
    return 2 ** (bits - 1)


def find_scale(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-row symmetric scale of ``x`` [rows, cols] (fp32, fp16-representable)."""
    amax = x.detach().float().abs().amax(dim=1)
    amax = torch.where(amax == 0, torch.ones_like(amax), amax)  # reference: all-zero row -> [-1, 1]
    scale = 2.0 * amax / maxq(bits)
    return scale.clamp_min(_FP16_TINY).half().float()


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (int32) of ``x`` [rows, cols] with per-row ``scale`` [rows]."""
    s = scale.reshape(-1, *([1] * (x.dim() - 1)))
    return torch.clamp(torch.round(x / s) + zero_point(bits), 0, maxq(bits)).to(torch.int32)


def codes_to_values(codes: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """``scale * (code - z)`` in fp32 (exact: fp16 scale times a small integer)."""
    s = scale.float().reshape(-1, *([1] * (codes.dim() - 1)))
    return s * (codes.float() - zero_point(bits))


def fake_quant(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    return codes_to_values(quantize_codes(x, scale, bits), scale, bits)


@dataclass
class QuantResult:
    """One quantized linear: everything the packed and unpacked checkpoints need.

    ``codes`` [out, in] uint8 in [0, 2^bits-1], in the original column order;
    ``scales`` [out, n_groups] fp32 (fp16-representable); ``g_idx`` [in] int32 maps
    each input column to its group (non-trivial only with act-order).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    group_size: int  # -1 = per row
    method: str = "gptq"
    loss: float = 0.0  # GPTQ's sum of (w - q)^2 / d^2 / 2 (RTN: the same with H = I)
    seconds: float = 0.0
    damp: float = 0.0  # damping fraction finally used (after any retries)
    extra: dict = field(default_factory=dict)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.codes, self.scales, self.g_idx, self.bits, dtype)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Weight [out, in] = scales[:, g_idx] * (codes - z), computed in fp32 then cast.

    The one dequantization used by the unpacked checkpoint, the packed reader and the
    in-memory model, so "packed -> dequantized == unpacked" holds bit for bit.
    """
    s = scales.float()[:, g_idx.long()]
    return (s * (codes.float() - zero_point(bits))).to(dtype)


def rtn_quantize(w: torch.Tensor, bits: int, group_size: int = 128, name: str = "linear") -> QuantResult:
    """Round-to-nearest on the same per-group grid (the baseline GPTQ is compared to)."""
    check_bits(bits)
    t0 = time.perf_counter()
    w = w.detach().float()
    rows, cols = w.shape
    gs = check_group_size(cols, group_size, name)
    ng = cols // gs
    wg = w.reshape(rows, ng, gs)
    scales = find_scale(wg.permute(1, 0, 2).reshape(ng * rows, gs), bits).reshape(ng, rows).t().contiguous()
    codes = quantize_codes(wg.permute(1, 0, 2).reshape(ng * rows, gs), scales.t().reshape(-1), bits)
    codes = codes.reshape(ng, rows, gs).permute(1, 0, 2).reshape(rows, cols)
    g_idx = torch.arange(cols, dtype=torch.int32) // gs
    q = dequantize(codes, scales, g_idx, bits)
    loss = float(((w - q) ** 2).sum() / 2)
    return QuantResult(codes.to(torch.uint8), scales, g_idx, bits, group_size, "rtn", loss,
                       time.perf_counter() - t0)
