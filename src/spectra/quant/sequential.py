"""Layer-by-layer GPTQ over a :class:`~spectra.model.Transformer`.

As the reference ``llama_sequential``: the calibration tokens are embedded once, then
each block is quantized in turn and the *quantized* block's outputs become the next
block's inputs. Only one block's activations are alive at a time: two fp32 buffers
of ``n x seqlen x dim`` (the block input and the post-attention residual), filled in
chunks of about ``chunk_tokens`` tokens, so memory is bounded by the calibration set
size, not by the model depth.

True-sequential order inside a block (the default, as the reference
``--true-sequential``): (q, k, v) -> o -> (gate, up) -> down; each group's Hessian is
accumulated from inputs computed with the groups before it already quantized. We run
each stage once over the calibration set (the reference reruns the whole block per
stage; the inputs it collects are the same). Without true-sequential, all Hessians
come from one pass of the float block. Linears that share an input (q/k/v, gate/up)
share one Hessian accumulation.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from spectra.errors import SpectraError
from spectra.quant.gptq import Hessian, gptq_quantize
from spectra.quant.rtn import QuantResult, check_bits, check_group_size, rtn_quantize

METHODS = ("gptq", "rtn")
# The reference's true-sequential groups for Llama.
SEQUENTIAL = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize: GPTQ reference defaults except where the Spectra paper says otherwise."""

    bits: int
    group_size: int = 128  # -1 = one scale per output row
    method: str = "gptq"  # gptq | rtn
    act_order: bool = False  # desc_act
    static_groups: bool = False
    damp: float = 0.01  # fraction of mean(diag H)
    blocksize: int = 128  # GPTQ lazy-batch block
    true_sequential: bool = True

    def validate(self, dims: dict[str, int] | None = None) -> "QuantSpec":
        check_bits(self.bits)
        if self.method not in METHODS:
            raise SpectraError(f"unknown quantization method '{self.method}'; allowed: {', '.join(METHODS)}")
        if not (self.damp >= 0):
            raise SpectraError(f"damping must be >= 0, got {self.damp}")
        if self.blocksize <= 0:
            raise SpectraError(f"GPTQ blocksize must be positive, got {self.blocksize}")
        if self.static_groups and self.group_size == -1:
            raise SpectraError("static groups need a group size (not -1)")
        for name, in_features in (dims or {}).items():
            check_group_size(in_features, self.group_size, name)
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def input_dims(model) -> dict[str, int]:
    cfg = model.cfg
    return {"q/k/v/o/gate/up (dim)": cfg.dim, "down_proj (ffn_dim)": cfg.ffn_dim}


def _linear(block: nn.Module, name: str) -> nn.Linear:
    mod = block.get_submodule(name)
    if type(mod) is not nn.Linear:
        raise SpectraError(f"'{name}' is a {type(mod).__name__}, not a plain Linear; only FloatLMs can be quantized "
                           "(a TriLM is already ternary)")
    return mod


def _quantize_one(lin: nn.Linear, H: torch.Tensor | None, spec: QuantSpec, name: str) -> QuantResult:
    if spec.method == "rtn":
        res = rtn_quantize(lin.weight, spec.bits, spec.group_size, name)
    else:
        res = gptq_quantize(lin.weight, H, spec.bits, spec.group_size, blocksize=spec.blocksize, damp=spec.damp,
                            act_order=spec.act_order, static_groups=spec.static_groups, name=name)
    with torch.no_grad():
        lin.weight.copy_(res.dequantize(torch.float32).to(lin.weight.dtype))
    return res


def _record(name: str, layer: int, lin: nn.Linear, res: QuantResult) -> dict:
    w = lin.weight
    return {"name": name, "layer": layer, "shape": list(w.shape), "bits": res.bits, "group_size": res.group_size,
            "method": res.method, "loss": res.loss, "seconds": round(res.seconds, 4), "damp": res.damp,
            **res.extra}


@torch.no_grad()
def quantize_layers(model, calib: torch.Tensor | None, spec: QuantSpec, *, chunk_tokens: int = 16384,
                    progress: bool = False, on_linear=None) -> tuple[dict[str, QuantResult], list[dict]]:
    """Quantize every linear in the blocks of ``model`` in place (weights := dequantized).

    ``calib``: LongTensor [n, seqlen] (ignored by RTN). Returns (qstate keyed by
    parameter-module name such as ``layers.0.self_attn.q_proj``, per-linear records).
    ``on_linear(record)`` is called after each linear (progress logs).
    """
    spec.validate(input_dims(model))
    model.eval()
    qstate: dict[str, QuantResult] = {}
    records: list[dict] = []

    def done(i, sub, lin, res):
        name = f"layers.{i}.{sub}"
        qstate[name] = res
        rec = _record(name, i, lin, res)
        records.append(rec)
        if on_linear:
            on_linear(rec)

    layers = model.layers
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(layers), desc=f"{spec.method} {spec.bits}-bit", unit="layer")

    if spec.method == "rtn":
        for i, blk in enumerate(layers):
            for group in SEQUENTIAL:
                for sub in group:
                    lin = _linear(blk, sub)
                    done(i, sub, lin, _quantize_one(lin, None, spec, f"layers.{i}.{sub}"))
            if bar:
                bar.update(1)
        if bar:
            bar.close()
        return qstate, records

    if calib is None or calib.dim() != 2 or calib.dtype not in (torch.int64, torch.int32):
        raise SpectraError("GPTQ needs calibration tokens: an integer tensor [nsamples, seqlen]")
    n, T = calib.shape
    cfg = model.cfg
    if T > cfg.max_seq_len:
        raise SpectraError(f"calibration seqlen {T} exceeds the model context {cfg.max_seq_len}; use --seqlen <= {cfg.max_seq_len}")
    if int(calib.max()) >= cfg.vocab_size or int(calib.min()) < 0:
        raise SpectraError(f"calibration token ids must be in [0, {cfg.vocab_size}); got max {int(calib.max())} "
                           "(a dataset built with another tokenizer?)")
    dev = next(model.parameters()).device
    cs = max(1, chunk_tokens // T)
    chunks = [slice(a, min(a + cs, n)) for a in range(0, n, cs)]
    x = torch.empty(n, T, cfg.dim, dtype=torch.float32, device=dev)
    for c in chunks:
        x[c] = model.embed_tokens(calib[c].to(dev)).float()
    cos, sin = model.rope(0, T, dev)
    buf = torch.empty_like(x) if spec.true_sequential else None

    def hess_hook(h: Hessian, store=None, cur=None):
        def hook(mod, args):
            h.add(args[0])
            if store is not None:
                store[cur[0]] = args[0]
        return hook

    def quantize_group(i, blk, group, H):
        Hf = H.finalize()
        for k, sub in enumerate(group):
            lin = _linear(blk, sub)
            Hk = Hf if k == len(group) - 1 else Hf.clone()  # gptq consumes its H
            done(i, sub, lin, _quantize_one(lin, Hk, spec, f"layers.{i}.{sub}"))

    for i, blk in enumerate(layers):
        t0 = time.perf_counter()
        attn, mlp = blk.self_attn, blk.mlp
        for g in SEQUENTIAL:
            for sub in g:
                _linear(blk, sub)
        if spec.true_sequential:
            # (q, k, v) from the block input.
            H = Hessian(cfg.dim, dev)
            for c in chunks:
                H.add(blk.input_layernorm(x[c]))
            quantize_group(i, blk, SEQUENTIAL[0], H)
            # o from the attention context of the quantized q/k/v (kept in buf).
            H, cur = Hessian(cfg.dim, dev), [None]
            hk = attn.o_proj.register_forward_pre_hook(hess_hook(H, buf, cur))
            try:
                for c in chunks:
                    cur[0] = c
                    attn(blk.input_layernorm(x[c]), cos, sin)
            finally:
                hk.remove()
            quantize_group(i, blk, SEQUENTIAL[1], H)
            # (gate, up) from the residual after the quantized attention (buf := h).
            H = Hessian(cfg.dim, dev)
            for c in chunks:
                h = x[c] + attn.o_proj(buf[c])
                buf[c] = h
                H.add(blk.post_attention_layernorm(h))
            quantize_group(i, blk, SEQUENTIAL[2], H)
            # down from the SwiGLU activations of the quantized gate/up.
            H = Hessian(cfg.ffn_dim, dev)
            hk = mlp.down_proj.register_forward_pre_hook(hess_hook(H))
            try:
                for c in chunks:
                    mlp(blk.post_attention_layernorm(buf[c]))
            finally:
                hk.remove()
            quantize_group(i, blk, SEQUENTIAL[3], H)
            # Block output with every linear quantized -> next block's input.
            for c in chunks:
                h = buf[c]
                x[c] = h + mlp(blk.post_attention_layernorm(h))
        else:
            Hs = [Hessian(cfg.dim, dev), Hessian(cfg.dim, dev), Hessian(cfg.dim, dev), Hessian(cfg.ffn_dim, dev)]
            firsts = [blk.get_submodule(g[0]) for g in SEQUENTIAL]
            hooks = [m.register_forward_pre_hook(hess_hook(h)) for m, h in zip(firsts, Hs)]
            try:
                for c in chunks:
                    blk(x[c], cos, sin)
            finally:
                for hk in hooks:
                    hk.remove()
            for g, H in zip(SEQUENTIAL, Hs):
                quantize_group(i, blk, g, H)
            for c in chunks:
                x[c] = blk(x[c], cos, sin)
        if not torch.isfinite(x).all():
            raise SpectraError(f"block {i} produced non-finite activations on the calibration data")
        if bar:
            bar.set_postfix(block_s=f"{time.perf_counter() - t0:.1f}")
            bar.update(1)
    if bar:
        bar.close()
    return qstate, records
