"""Packed GPTQ checkpoints in the AutoGPTQ / GPTQModel layout (and its 6-bit extension).

Per quantized linear ``<prefix>`` (HF names, e.g. ``model.layers.0.self_attn.q_proj``),
with K = in_features, N = out_features, G = number of groups:

=====================  ========  ==============  ==============================================
tensor                 dtype     shape           content
=====================  ========  ==============  ==============================================
``<prefix>.qweight``   int32     [K*bits/32, N]  codes packed along the *input* dimension
``<prefix>.qzeros``    int32     [G, N*bits/32]  zero points packed along the *output* dimension
``<prefix>.scales``    float16   [G, N]          per-group scales
``<prefix>.g_idx``     int32     [K]             group of each input column (act-order aware)
=====================  ========  ==============  ==============================================

Packing = AutoGPTQ's: every 32 consecutive values form one little-endian bit stream of
``bits`` int32 words (value j occupies bits [j*bits, (j+1)*bits) of the stream). For
2/4/8 bits that is AutoGPTQ's ``word |= v << (bits * (j % (32 // bits)))``; for 3 bits
it is exactly AutoGPTQ's 3-word layout (values straddle word borders at 10/11 and
21/22). **6 bits (our extension; AutoGPTQ/GPTQModel kernels stop at 8/4/3/2)** uses
the same stream: 32 values -> 6 words, values 5, 10, 21 and 26 straddle a border.

Zero points: symmetric GPTQ has ``z = 2^(bits-1)`` for every group. The v1 format
(``checkpoint_format: "gptq"``, what AutoGPTQ, HF transformers/optimum and most hub
checkpoints use) stores ``z - 1``; the kernels add 1 back. GPTQModel's internal v2
format (``"gptq_v2"``) stores ``z``. We write v1 and read both.

Dequantization: ``W[n, k] = scales[g_idx[k], n] * (code[k, n] - z)`` (fp32, then cast),
the same function as :func:`spectra.quant.rtn.dequantize`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from spectra import __version__
from spectra.errors import SpectraError
from spectra.quant.rtn import SUPPORTED_BITS, QuantResult, check_bits, dequantize, zero_point

PACKED_WEIGHTS = "model.safetensors"
from spectra.store.kinds import QUANTIZE_CONFIG  # noqa: E402,F401  (the side file that marks a packed QuantLM)
AUTOGPTQ_BITS = (2, 3, 4, 8)  # what AutoGPTQ/GPTQModel/transformers kernels accept
FORMATS = ("gptq", "gptq_v2")


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``values`` [K, N] (ints in [0, 2^bits)) along dim 0 -> int32 [K*bits/32, N]."""
    check_bits(bits)
    v = values.detach().cpu().numpy().astype(np.uint64)
    K, N = v.shape
    if K % 32:
        raise SpectraError(f"cannot pack {K} values along the packed dimension: it must be a multiple of 32")
    if (v >> np.uint64(bits)).any():
        raise SpectraError(f"value out of range for {bits}-bit packing")
    v = v.reshape(K // 32, 32, N)
    out = np.zeros((K // 32, bits, N), dtype=np.uint64)
    for j in range(32):
        off = j * bits
        word, shift = divmod(off, 32)
        out[:, word] |= (v[:, j] << np.uint64(shift)) & np.uint64(0xFFFFFFFF)
        if shift + bits > 32:  # straddles into the next word
            out[:, word + 1] |= v[:, j] >> np.uint64(32 - shift)
    packed = out.reshape(K // 32 * bits, N).astype(np.uint32).view(np.int32)
    return torch.from_numpy(packed.copy())


def unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: int32 [K*bits/32, N] -> int32 [K, N]."""
    check_bits(bits)
    p = packed.detach().cpu().numpy().astype(np.int32).view(np.uint32).astype(np.uint64)
    R, N = p.shape
    if R % bits:
        raise SpectraError(f"packed tensor has {R} rows, not a multiple of bits={bits}")
    p = p.reshape(R // bits, bits, N)
    mask = np.uint64(2 ** bits - 1)
    out = np.zeros((R // bits, 32, N), dtype=np.uint64)
    for j in range(32):
        word, shift = divmod(j * bits, 32)
        val = p[:, word] >> np.uint64(shift)
        if shift + bits > 32:
            val |= p[:, word + 1] << np.uint64(32 - shift)
        out[:, j] = val & mask
    return torch.from_numpy(out.reshape(R // bits * 32, N).astype(np.int32))


def pack_linear(res: QuantResult, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """QuantResult -> {qweight, qzeros, scales, g_idx} (without the name prefix)."""
    if checkpoint_format not in FORMATS:
        raise SpectraError(f"unknown checkpoint_format '{checkpoint_format}'; allowed: {', '.join(FORMATS)}")
    out_f, in_f = res.codes.shape
    if in_f % 32 or out_f % 32:
        raise SpectraError(f"packed GPTQ needs both dimensions to be multiples of 32, got [{out_f}, {in_f}]")
    n_groups = res.scales.shape[1]
    stored_zero = zero_point(res.bits) - (1 if checkpoint_format == "gptq" else 0)
    zeros = torch.full((out_f, n_groups), stored_zero, dtype=torch.int32)
    return {
        "qweight": pack_bits(res.codes.to(torch.int32).t().contiguous(), res.bits),
        "qzeros": pack_bits(zeros, res.bits).t().contiguous(),  # [N, G] packed along N -> [G, N*bits/32]
        "scales": res.scales.t().contiguous().to(torch.float16),
        "g_idx": res.g_idx.to(torch.int32).contiguous(),
    }


def unpack_linear(t: dict[str, torch.Tensor], bits: int, checkpoint_format: str = "gptq",
                  name: str = "linear") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """{qweight, qzeros, scales, g_idx} -> (codes [N, K], scales [N, G] fp32, zeros [N, G], g_idx [K])."""
    for k in ("qweight", "qzeros", "scales"):
        if k not in t:
            raise SpectraError(f"packed GPTQ tensor '{name}.{k}' is missing")
    codes = unpack_bits(t["qweight"], bits).t().contiguous()
    N, K = codes.shape
    scales = t["scales"].float().t().contiguous()
    zeros = unpack_bits(t["qzeros"].t().contiguous(), bits)
    if checkpoint_format == "gptq":
        zeros = zeros + 1
    G = scales.shape[1]
    if scales.shape[0] != N or tuple(zeros.shape) != (N, G):
        raise SpectraError(f"'{name}': scales {tuple(t['scales'].shape)} / qzeros {tuple(t['qzeros'].shape)} "
                           f"do not match qweight {tuple(t['qweight'].shape)} at {bits} bits")
    g_idx = t.get("g_idx")
    if g_idx is None:  # very old checkpoints: contiguous groups
        g_idx = torch.arange(K, dtype=torch.int32) // (K // G)
    if g_idx.numel() != K or int(g_idx.max()) >= G or int(g_idx.min()) < 0:
        raise SpectraError(f"'{name}.g_idx' is inconsistent with {K} input columns and {G} groups")
    return codes, scales, zeros, g_idx.to(torch.int32)


def dequantize_packed(t: dict[str, torch.Tensor], bits: int, checkpoint_format: str = "gptq",
                      dtype: torch.dtype = torch.float32, name: str = "linear") -> torch.Tensor:
    """Dense weight [out, in] of one packed linear."""
    codes, scales, zeros, g_idx = unpack_linear(t, bits, checkpoint_format, name)
    z = zero_point(bits)
    if not bool((zeros == z).all()):
        # Asymmetric checkpoint (not ours): W = s * (q - zero) per group.
        zc = zeros[:, g_idx.long()].float()
        return (scales[:, g_idx.long()] * (codes.float() - zc)).to(dtype)
    return dequantize(codes, scales, g_idx, bits, dtype)


def quantize_config(bits: int, group_size: int, *, act_order: bool, static_groups: bool, damp: float,
                    true_sequential: bool, checkpoint_format: str = "gptq", extra: dict | None = None) -> dict:
    """quantize_config.json as AutoGPTQ / GPTQModel write it (symmetric, no lm_head)."""
    return {
        "bits": bits,
        "group_size": group_size,
        "damp_percent": damp,
        "desc_act": bool(act_order),
        "static_groups": bool(static_groups),
        "sym": True,
        "true_sequential": bool(true_sequential),
        "lm_head": False,
        "model_name_or_path": None,
        "model_file_base_name": "model",
        "quant_method": "gptq",
        "checkpoint_format": checkpoint_format,
        "pack_dtype": "int32",
        "meta": {"quantizer": [f"spectra-lm:{__version__}"], **(extra or {})},
    }


def read_quantize_config(path: str | Path) -> dict:
    from spectra.validate import read_json_object  # UTF-8 JSON object or one line naming the file

    path = Path(path)
    f = path / QUANTIZE_CONFIG
    if f.exists():
        qc = read_json_object(f, QUANTIZE_CONFIG)
    else:
        cfg = path / "config.json"
        qc = read_json_object(cfg, "config.json").get("quantization_config") if cfg.exists() else None
        if not qc:
            raise SpectraError(f"'{path}' is not a packed GPTQ checkpoint: no {QUANTIZE_CONFIG} "
                               f"and no quantization_config in config.json")
        if not isinstance(qc, dict):
            raise SpectraError(f"{cfg}: 'quantization_config' must be an object")
    bits = qc.get("bits")
    if bits not in SUPPORTED_BITS:
        raise SpectraError(f"{path}: quantize_config bits={bits!r} is not supported; allowed: {SUPPORTED_BITS}")
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in FORMATS:
        raise SpectraError(f"{path}: checkpoint_format '{fmt}' is not supported; allowed: {', '.join(FORMATS)}")
    return qc
