"""QuantLM public API: quantize a FloatLM, save / load unpacked and packed QuantLMs.

    model_q, qstate, report = quantize_model(model, calib_tokens, bits=4)
    paths = save_quantized(model_q, qstate, "out/q4-g128-s0", spec, meta={...})
    model, cfg = load_quantized("out/q4-g128-s0-packed")   # dequantized on load
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from spectra.errors import SpectraError
from spectra.quant.formats import (
    PACKED_WEIGHTS, QUANTIZE_CONFIG, dequantize_packed, pack_linear, quantize_config, read_quantize_config,
)
from spectra.quant.rtn import QuantResult
from spectra.quant.sequential import QuantSpec, quantize_layers

REPORT_FILE = "quant_report.json"


def refuse_non_float(model=None, config: dict | None = None, source: str = "model") -> None:
    """QuantLMs are made from FloatLMs only: a TriLM/BiLM is already ternary."""
    if config is not None:
        from spectra.store import family_of

        fam = family_of(config)
        if fam in ("trilm", "bilm"):
            raise SpectraError(f"{source} is a {fam.upper() if fam == 'trilm' else 'BiLM'} checkpoint: its linear "
                               "weights are already ternary; GPTQ applies to FloatLMs only")
        if fam == "quantlm" or config.get("quantization_config"):
            raise SpectraError(f"{source} is already a QuantLM; quantize the FloatLM it came from")
    if model is not None:
        from spectra.ternary import TernaryLinear

        if any(isinstance(m, TernaryLinear) for m in model.modules()):
            raise SpectraError(f"{source} has TernaryLinear layers (a TriLM); GPTQ applies to FloatLMs only")


def quantize_model(model, calib_tokens: torch.Tensor | None, bits: int, group_size: int = 128, method: str = "gptq",
                   act_order: bool = False, static_groups: bool = False, damp: float = 0.01,
                   true_sequential: bool = True, *, blocksize: int = 128, inplace: bool = False,
                   chunk_tokens: int = 16384, progress: bool = False, on_linear=None):
    """GPTQ (or RTN) every linear of the blocks; embedding, norms and head untouched.

    Returns ``(model_with_dequantized_weights, qstate, report)``: ``qstate`` maps
    ``layers.i.<sub>`` to :class:`QuantResult` (codes, scales, g_idx); ``report`` has
    the spec, per-linear GPTQ loss / time and the total time. Works in fp32; the
    input model is copied unless ``inplace``.
    """
    spec = QuantSpec(bits, group_size, method, act_order, static_groups, damp, blocksize, true_sequential)
    refuse_non_float(model)
    from spectra.quant.sequential import input_dims

    spec.validate(input_dims(model))
    if not inplace:
        model = copy.deepcopy(model)
    model = model.float()
    t0 = time.perf_counter()
    qstate, records = quantize_layers(model, calib_tokens, spec, chunk_tokens=chunk_tokens, progress=progress,
                                      on_linear=on_linear)
    report = {"spec": spec.to_dict(), "seconds": round(time.perf_counter() - t0, 3),
              "calibration": None if calib_tokens is None or method == "rtn" else list(calib_tokens.shape),
              "total_loss": sum(r["loss"] for r in records), "linears": records}
    return model, qstate, report


def spec_of(report: dict) -> QuantSpec:
    return QuantSpec(**report["spec"])


def _hf(name: str) -> str:
    return f"model.{name}"


def save_packed(model, qstate: dict[str, QuantResult], out_dir: str | Path, spec: QuantSpec, *,
                dtype: torch.dtype = torch.float16, meta: dict | None = None, tokenizer: str | Path | None = None,
                checkpoint_format: str = "gptq", report: dict | None = None) -> Path:
    """Write the AutoGPTQ/GPTQModel-layout directory (atomically)."""
    from spectra.fsutil import atomic_dir, atomic_write_json, save_safetensors
    from spectra.store.hfconfig import CONFIG_FILE, GENERATION_CONFIG, generation_config, hf_config
    from spectra.store.modeldir import copy_tokenizer

    tensors: dict[str, torch.Tensor] = {}
    for name, p in model.state_dict().items():
        mod = name.removesuffix(".weight")
        if mod in qstate:
            for k, v in pack_linear(qstate[mod], checkpoint_format).items():
                tensors[f"{_hf(mod)}.{k}"] = v
        else:
            tensors[name if name.startswith("lm_head") else _hf(name)] = p.detach().to(dtype)
    qc = quantize_config(spec.bits, spec.group_size, act_order=spec.act_order, static_groups=spec.static_groups,
                         damp=spec.damp, true_sequential=spec.true_sequential, checkpoint_format=checkpoint_format,
                         extra={"method": spec.method, "blocksize": spec.blocksize})
    cfg = hf_config(model.cfg, "quantlm", dtype, meta)
    cfg["quantization_config"] = dict(qc)
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        save_safetensors(tensors, tmp / PACKED_WEIGHTS, metadata={"format": "pt", "quant_method": "gptq"})
        atomic_write_json(tmp / CONFIG_FILE, cfg)
        atomic_write_json(tmp / QUANTIZE_CONFIG, qc)
        atomic_write_json(tmp / GENERATION_CONFIG, generation_config())
        if report is not None:
            atomic_write_json(tmp / REPORT_FILE, report)
        copy_tokenizer(tokenizer, tmp, model.cfg.max_seq_len)
    return out


def save_quantized(model, qstate: dict[str, QuantResult], out_dir: str | Path, spec: QuantSpec, *,
                   dtype: torch.dtype = torch.float16, meta: dict | None = None, tokenizer=None,
                   packed: bool = True, checkpoint_format: str = "gptq", report: dict | None = None) -> dict[str, Path]:
    """Unpacked QuantLM at ``out_dir`` and (``packed``) the GPTQ layout at ``out_dir-packed``.

    The unpacked linears are :func:`~spectra.quant.rtn.dequantize` of the codes in
    ``dtype`` (fp16 by default, as the Spectra release), i.e. exactly what the packed
    checkpoint dequantizes to.
    """
    from spectra.store import save_model
    from spectra.store.names import PACKED_SUFFIX
    from spectra.fsutil import atomic_dir, atomic_write_json

    meta = {"bits": spec.bits, "group_size": spec.group_size, "method": spec.method, **(meta or {})}
    sd = {}
    for name, p in model.state_dict().items():
        mod = name.removesuffix(".weight")
        sd[name] = qstate[mod].dequantize(dtype) if mod in qstate else p.detach().to(dtype)
    missing = set(qstate) - {n.removesuffix(".weight") for n in sd}
    if missing:
        raise SpectraError(f"quantized state names unknown to the model: {sorted(missing)[:3]}")
    out = Path(out_dir)
    with atomic_dir(out) as tmp:  # the report goes in before the swap, like every file (docs/security.md)
        save_model(model, tmp, "quantlm", dtype=dtype, meta=meta, tokenizer=tokenizer, state_dict=sd)
        if report is not None:
            atomic_write_json(tmp / REPORT_FILE, report)
    paths = {"unpacked": out}
    if packed:
        paths["packed"] = save_packed(model, qstate, out.parent / f"{out.name}{PACKED_SUFFIX}", spec, dtype=dtype, meta=meta,
                                      tokenizer=tokenizer, checkpoint_format=checkpoint_format, report=report)
    return paths


def is_packed_gptq(path: str | Path) -> bool:
    """True for a directory holding a packed GPTQ checkpoint (ours or AutoGPTQ/GPTQModel's)."""
    from spectra.store.kinds import Kind, detect

    return detect(path) is Kind.QUANTLM


def read_packed_state(path: str | Path, dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Dense HF-named state dict of a packed directory (linears dequantized) and its config dict.

    Linears are dequantized in the checkpoint's stored dtype (``torch_dtype``), then cast
    to ``dtype`` -- so the result equals reading the matching unpacked checkpoint.
    """
    from spectra.store import DTYPE_NAMES, read_config, read_weights, torch_dtype

    path = Path(path)
    d = read_config(path)
    qc = read_quantize_config(path)
    bits, fmt = int(qc["bits"]), qc.get("checkpoint_format", "gptq")
    name = str(d.get("torch_dtype", "float16"))
    stored = torch_dtype(name) if name in DTYPE_NAMES else torch.float16
    raw = read_weights(path)
    out: dict[str, torch.Tensor] = {}
    prefixes = sorted({k.removesuffix(".qweight") for k in raw if k.endswith(".qweight")})
    if not prefixes:
        raise SpectraError(f"{path}: packed GPTQ checkpoint has no '*.qweight' tensors")
    for pre in prefixes:
        t = {s: raw.pop(f"{pre}.{s}") for s in ("qweight", "qzeros", "scales", "g_idx") if f"{pre}.{s}" in raw}
        raw.pop(f"{pre}.bias", None)
        w = dequantize_packed(t, bits, fmt, dtype=stored, name=pre)
        out[f"{pre}.weight"] = w if dtype is None else w.to(dtype)
    for k, v in raw.items():
        out[k] = v if dtype is None or not v.is_floating_point() else v.to(dtype)
    return out, d


def load_quantized(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Load a QuantLM (packed: dequantized on load; unpacked: a plain model dir) -> (Transformer, config dict)."""
    from spectra.store import build_model, load_model, read_model_config

    path = Path(path)
    if not is_packed_gptq(path):
        return load_model(path, dtype=dtype, device=device)
    cfg, _ = read_model_config(path)  # the shape is checked before any weight is read
    sd, d = read_packed_state(path, dtype)
    return build_model(cfg, sd, dtype=dtype, device=device, source=str(path)), d


def calibration_tokens(data_dir: str | Path, nsamples: int, seqlen: int, seed: int, split: str = "train") -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens (one seed per QuantLM), from a token dataset."""
    from spectra.data import TokenDataset

    if nsamples <= 0 or seqlen <= 0:
        raise SpectraError(f"--nsamples and --seqlen must be positive, got {nsamples} and {seqlen}")
    ds = TokenDataset(data_dir, split)
    have, need = int(ds.num_tokens), nsamples * seqlen
    if have < need:
        raise SpectraError(f"calibration data '{data_dir}' (split '{split}') has {have:,} tokens, fewer than the "
                           f"{need:,} asked ({nsamples} x {seqlen}); lower --nsamples/--seqlen or use a larger dataset")
    return ds.random_windows(nsamples, seqlen, seed).long()
