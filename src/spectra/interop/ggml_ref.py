"""A torch reference of what llama.cpp computes from a GGUF file (CPU backend).

llama.cpp does not multiply fp32 activations by the stored weights: each matmul first
converts the activation row to the weight type's "vec_dot_type": Q8_K (256-value blocks,
scale = absmax/127) for TQ1_0/TQ2_0, Q8_0 (32-value blocks) for Q8_0, fp16 for F16 and
nothing for F32 (see ggml-cpu's type_traits and ``quantize_row_q8_K_ref``). The integer
dot products are exact, so a dense matmul of the *dequantized* activations with the
*dequantized* weights reproduces llama.cpp up to fp32 summation order. This module
reads a GGUF back into our :class:`~spectra.model.Transformer` (weights dequantized,
Q/K un-permuted) and swaps every linear for one that quantizes its input that way.
Use it to predict llama.cpp's greedy output for 8-bit-activation formats and to read
our GGUF files back for round-trip checks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from spectra.errors import SpectraError

QK_K, QK8_0 = 256, 32


def quant_q8_k(x: torch.Tensor) -> torch.Tensor:
    """Dequantized Q8_K of x along the last dim (256-blocks): q = round(127 x / absmax) (ties even), <= 127."""
    return _block_absmax_q8(x, QK_K)


def quant_q8_0(x: torch.Tensor) -> torch.Tensor:
    """Dequantized Q8_0 of x along the last dim (32-blocks, fp16 scale absmax/127)."""
    return _block_absmax_q8(x, QK8_0, fp16_scale=True)


def _block_absmax_q8(x: torch.Tensor, block: int, fp16_scale: bool = False) -> torch.Tensor:
    shape = x.shape
    if shape[-1] % block:
        raise SpectraError(f"activation length {shape[-1]} is not a multiple of {block}")
    b = x.float().reshape(-1, shape[-1] // block, block)
    amax = b.abs().amax(-1, keepdim=True)
    if fp16_scale:  # Q8_0: d = absmax/127 stored as fp16, id = 1/d computed before rounding d
        d = amax / 127
        q = torch.round(b * torch.where(d > 0, 1 / d, torch.zeros_like(d)))
        return (q * d.half().float()).reshape(shape).to(x.dtype)
    # Q8_K: iscale = -127/max (max = the signed value of largest magnitude), d = 1/iscale
    mx = torch.gather(b, -1, b.abs().argmax(-1, keepdim=True))
    iscale = torch.where(amax > 0, -127.0 / mx, torch.zeros_like(mx))
    q = torch.round(iscale * b).clamp(max=127)
    d = torch.where(amax > 0, 1.0 / iscale, torch.zeros_like(iscale))
    return (q * d).reshape(shape).to(x.dtype)


ACT_QUANT = {
    "TQ1_0": quant_q8_k, "TQ2_0": quant_q8_k, "Q8_0": quant_q8_0,
    "F16": lambda x: x.half().to(x.dtype), "F32": lambda x: x, "BF16": lambda x: x.bfloat16().to(x.dtype),
}


class GGMLLinear(nn.Module):
    """y = act_quant(x) @ W^T with W the dequantized GGUF weight."""

    def __init__(self, weight: torch.Tensor, wtype: str):
        super().__init__()
        if wtype not in ACT_QUANT:
            raise SpectraError(f"no llama.cpp activation model for tensor type {wtype}")
        self.register_buffer("weight", weight)
        self.wtype = wtype
        self._q = ACT_QUANT[wtype]

    def forward(self, x):
        return nn.functional.linear(self._q(x), self.weight)


def read_gguf(path: str | Path) -> tuple[dict, dict[str, tuple[np.ndarray, str]]]:
    """(metadata {key: value}, {tensor name: (dequantized fp32 array [rows, cols], type name)})."""
    import gguf

    r = gguf.GGUFReader(str(path))
    meta = {}
    for k, f in r.fields.items():
        if k.startswith("tokenizer.ggml.") and k not in ("tokenizer.ggml.model", "tokenizer.ggml.pre",
                                                          "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
            continue
        try:
            meta[k] = f.contents()
        except Exception:  # noqa: BLE001 - unreadable exotic field: skip
            pass
    tensors = {}
    for t in r.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # ggml order is reversed
        arr = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        tensors[t.name] = (np.asarray(arr, dtype=np.float32), t.tensor_type.name)
    return meta, tensors


def model_from_gguf(path: str | Path, emulate: bool = True):
    """Our Transformer holding a llama-arch GGUF's weights. With ``emulate`` every linear
    (blocks and head) quantizes its input as llama.cpp does for that weight type."""
    from spectra.config import ModelConfig
    from spectra.interop.gguf_export import gguf_name, unpermute_qk
    from spectra.model import Transformer

    meta, tensors = read_gguf(path)
    if meta.get("general.architecture") != "llama":
        raise SpectraError(f"{path}: architecture {meta.get('general.architecture')!r} is not llama")
    cfg = ModelConfig(dim=int(meta["llama.embedding_length"]), n_layers=int(meta["llama.block_count"]),
                      n_heads=int(meta["llama.attention.head_count"]), ffn_dim=int(meta["llama.feed_forward_length"]),
                      vocab_size=int(tensors["token_embd.weight"][0].shape[0]),
                      mp=int(meta.get("spectra.pretraining_model_parallel", 1)),
                      max_seq_len=int(meta["llama.context_length"]),
                      norm_eps=float(meta["llama.attention.layer_norm_rms_epsilon"]),
                      rope_theta=float(meta["llama.rope.freq_base"])).validate(require_padded_vocab=False)
    model = Transformer(cfg)
    types = {}
    with torch.no_grad():
        for name, p in list(model.named_parameters()):
            gname = gguf_name(name)
            if gname not in tensors:
                raise SpectraError(f"{path}: missing tensor '{gname}'")
            arr, tname = tensors[gname]
            w = torch.from_numpy(arr.copy()).reshape(p.shape)
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                w = unpermute_qk(w, cfg.n_heads)
            types[name] = tname
            p.copy_(w)
        if emulate:
            for mname, mod in list(model.named_modules()):
                if isinstance(mod, nn.Linear):
                    parent = model.get_submodule(mname.rsplit(".", 1)[0]) if "." in mname else model
                    setattr(parent, mname.rsplit(".", 1)[-1], GGMLLinear(mod.weight.detach().clone(), types[f"{mname}.weight"]))
    model.eval()
    return model, meta, types


@torch.no_grad()
def llama_cpp_forward(model, idx: torch.Tensor) -> torch.Tensor:
    """Logits [T, vocab] for one sequence as llama.cpp's CPU graph computes them
    (non-flash attention, F16 KV cache): the linears of ``model`` (a :func:`model_from_gguf`
    model with ``emulate=True``) quantize their inputs; K and V are stored as fp16; Q is
    rounded to fp16 for the Q.K^T product against the fp16 keys; the softmax weights are
    rounded to fp16 for the product with the fp16 values. Everything else is the model's
    own code (norms, projections, RoPE, MLP); only the attention core differs."""
    cfg = model.cfg
    t = idx.shape[-1]
    x = model.embed_tokens(idx.reshape(1, t)).float()
    cos, sin = model.rope(0, t, x.device)
    mask = torch.full((t, t), float("-inf")).triu(1)
    for layer in model.layers:
        a = layer.self_attn
        q, k, v = a.qkv(layer.input_layernorm(x), cos, sin)
        k, v = k.half().float(), v.half().float()
        s = q.half().float() @ k.transpose(-1, -2) / cfg.head_dim ** 0.5 + mask
        p = torch.softmax(s, -1).half().float()
        x = x + a.out(p @ v)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.lm_head(model.norm(x))[0]


@torch.no_grad()
def greedy_llama_cpp(model, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens predicted with :func:`llama_cpp_forward` (full recompute per step)."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(llama_cpp_forward(model, torch.tensor(ids))[-1].argmax()))
    return ids[len(prompt):]


@torch.no_grad()
def greedy(model, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens after ``prompt`` (full recompute each step: no cache effects)."""
    ids = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([ids]))[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt):]
