"""The LLaMA-style decoder shared by FloatLM, TriLM and QuantLM.

Pure by design: it is built from a :class:`~spectra.config.ModelConfig` and a
``linear`` factory, and knows nothing of ternary weights, parallelism or files.
TriLM is obtained by swapping the linear layers afterwards
(:func:`spectra.ternary.to_ternary`). Parameter names follow Hugging Face
``LlamaForCausalLM`` (minus its ``model.`` prefix) so conversion is a rename.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from spectra.config import ModelConfig

LinearFactory = Callable[[int, int, str], nn.Module]
# (hidden states [..., dim], output head module, targets [...], ignore_index) -> mean loss.
# spectra.losses.head_cross_entropy is the fused one the trainer passes in.
LossFn = Callable[[torch.Tensor, nn.Module, torch.Tensor, int], torch.Tensor]


def default_linear(in_features: int, out_features: int, name: str) -> nn.Module:
    return nn.Linear(in_features, out_features, bias=False)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the scale, exactly as HF Llama does.
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rope_tables(head_dim: int, max_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    t = torch.arange(max_len, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)  # HF "rotate_half" layout
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, H, T, D]; cos/sin: [T, D] (shared positions) or [B, 1, T, D] (per-row positions)
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rot * sin).to(x.dtype)


@dataclass
class KVCache:
    """Pre-allocated per-layer key/value tensors for incremental decoding."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    pos: int = 0

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=torch.float32, device=None) -> "KVCache":
        shape = (batch, cfg.n_heads, max_len, cfg.head_dim)
        return cls(
            [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)],
            [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)],
        )

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, linear: LinearFactory):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        d = cfg.dim
        self.q_proj = linear(d, d, "q_proj")
        self.k_proj = linear(d, d, "k_proj")
        self.v_proj = linear(d, d, "v_proj")
        self.o_proj = linear(d, d, "o_proj")

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Queries, keys, values [B, H, T, head_dim] of ``x`` [B, T, dim], RoPE applied to q and k."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def out(self, o: torch.Tensor) -> torch.Tensor:
        """Merge heads of the attention output [B, H, T, head_dim] and apply o_proj."""
        b, _, t, _ = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(b, t, -1))

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0, mask: torch.Tensor | None = None):
        """``mask``: bool [B or 1, 1, T, keys] (True = attend) replacing the causal mask; keys = T
        without a cache, cache.pos + T with one."""
        b, t, _ = x.shape
        q, k, v = self.qkv(x, cos, sin)
        if cache is not None:
            p = cache.pos
            cache.k[layer][:b, :, p : p + t] = k
            cache.v[layer][:b, :, p : p + t] = v
            k = cache.k[layer][:b, :, : p + t]
            v = cache.v[layer][:b, :, : p + t]
        if mask is not None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif t == 1:
            out = F.scaled_dot_product_attention(q, k, v)
        elif cache.pos == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # chunked prefill on top of an existing cache
            p = cache.pos
            causal = torch.ones(t, p + t, dtype=torch.bool, device=x.device).tril(diagonal=p)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal)
        return self.out(out)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, linear: LinearFactory):
        super().__init__()
        self.gate_proj = linear(cfg.dim, cfg.ffn_dim, "gate_proj")
        self.up_proj = linear(cfg.dim, cfg.ffn_dim, "up_proj")
        self.down_proj = linear(cfg.ffn_dim, cfg.dim, "down_proj")

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, linear: LinearFactory):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, linear)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg, linear)

    def forward(self, x, cos, sin, cache=None, layer=0, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """Decoder-only LM: embeddings -> N pre-norm blocks -> RMSNorm -> untied head."""

    def __init__(self, cfg: ModelConfig, linear: LinearFactory = default_linear):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, linear) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if torch.empty(0).device.type == "meta":
            # Shape-only build (counting, deferred init): skip the table maths, which is
            # slow to trace on the meta device; to_empty() users recompute it.
            cos = sin = torch.empty(cfg.max_seq_len, cfg.head_dim)
        else:
            cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> "Transformer":
        """Seeded init on CPU (same seed -> same weights whatever the device/rank count).

        Normal(0, init_std) everywhere; output projections (o, down) scaled by
        1/sqrt(2 * n_layers) as in GPT-2 / GPT-NeoX so the residual stream stays O(1).
        """
        g = torch.Generator().manual_seed(seed)
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.fill_(1.0)
                continue
            s = std / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else std
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(s).to(p.dtype))
        return self

    def rope(self, start: int, t: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE cos/sin [t, head_dim] for positions start .. start+t-1 (tables extended past max_seq_len)."""
        if start + t > self.rope_cos.shape[0]:
            cos, sin = rope_tables(self.cfg.head_dim, start + t, self.cfg.rope_theta, device)
        else:
            cos, sin = self.rope_cos, self.rope_sin
        return cos[start : start + t].to(device), sin[start : start + t].to(device)

    def rope_at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE cos/sin [B, 1, T, head_dim] at explicit per-row positions [B, T]."""
        cos, sin = self.rope_cos, self.rope_sin
        top = int(positions.max()) + 1 if positions.numel() else 0
        if top > cos.shape[0]:
            cos, sin = rope_tables(self.cfg.head_dim, top, self.cfg.rope_theta, positions.device)
        return cos[positions][:, None], sin[positions][:, None]

    def hidden(self, idx: torch.Tensor, cache: KVCache | None = None, *, positions: torch.Tensor | None = None,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states [B, T, dim] (before the head).

        Defaults: positions continue from ``cache.pos`` (0 without a cache) and attention is
        causal. ``positions`` [B, T] and a bool ``mask`` [B, 1, T, keys] (True = attend) give
        each row its own layout, e.g. several sequences packed into one row that share a
        prefix (eval's prefix-tree batching) or padded rows.
        """
        b, t = idx.shape
        x = self.embed_tokens(idx)
        if positions is None:
            cos, sin = self.rope(cache.pos if cache is not None else 0, t, idx.device)
        else:
            cos, sin = self.rope_at(positions)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i, mask)
        if cache is not None:
            cache.pos += t
        return self.norm(x)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, targets: torch.Tensor | None = None,
                ignore_index: int = -100, loss_fn: LossFn | None = None) -> torch.Tensor:
        """Logits [B, T, vocab]; or, given ``targets`` [B, T], the mean next-token loss.

        ``loss_fn(hidden, lm_head, targets, ignore_index)`` replaces the plain head + fp32
        cross-entropy: training passes :func:`spectra.losses.head_cross_entropy`, which fuses
        them so the logits are never materialized. Training calls the module this way so
        that DDP/FSDP hooks see the head weight used inside ``forward``.
        """
        h = self.hidden(idx, cache)
        if targets is None:
            return self.lm_head(h)
        if loss_fn is not None:
            return loss_fn(h, self.lm_head, targets, ignore_index)
        logits = self.lm_head(h)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=ignore_index)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
             loss_fn: LossFn | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy (fp32 reduction)."""
        return self(idx, targets=targets, ignore_index=ignore_index, loss_fn=loss_fn)


def param_counts(model: nn.Module) -> dict[str, int]:
    """Counts by kind: embedding, head, linear (inside blocks), norm, total, non_embedding.

    Works on meta-device models (nothing allocated).
    """
    c = {"embedding": 0, "head": 0, "linear": 0, "norm": 0}
    for name, p in model.named_parameters():
        n = p.numel()
        if name.startswith("embed_tokens"):
            c["embedding"] += n
        elif name.startswith("lm_head"):
            c["head"] += n
        elif name.endswith("proj.weight"):
            c["linear"] += n
        else:
            c["norm"] += n
    c["total"] = sum(c.values())
    c["non_embedding"] = c["total"] - c["embedding"]
    # The paper's count: linear + embedding + head weights, no norms.
    c["paper"] = c["linear"] + c["embedding"] + c["head"]
    return c


def build_meta(cfg: ModelConfig) -> Transformer:
    with torch.device("meta"):
        return Transformer(cfg)
