"""Synthetic checkpoints laid out like the SpectraSuite release (for tests and demos).

The release directories are plain HF ``LlamaForCausalLM`` dirs: fp16 safetensors
with ``model.``-prefixed names (optionally sharded with an index json), a
``config.json`` with ``torch_dtype: float16`` and, for TriLM,
``pretraining_model_parallel``; nothing spectra-specific. Weights here come from a
seeded random init, ternarized per shard by :mod:`spectra.ternary`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from spectra.config import ModelConfig


def release_config(cfg: ModelConfig, trilm: bool, dtype: str = "float16") -> dict:
    d = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
        "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "silu", "hidden_size": cfg.dim,
        "initializer_range": cfg.init_std, "intermediate_size": cfg.ffn_dim,
        "max_position_embeddings": cfg.max_seq_len, "num_attention_heads": cfg.n_heads,
        "num_hidden_layers": cfg.n_layers, "num_key_value_heads": cfg.n_heads, "pretraining_tp": 1,
        "rms_norm_eps": cfg.norm_eps, "rope_scaling": None, "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": False, "torch_dtype": dtype, "transformers_version": "4.38.2",
        "use_cache": True, "vocab_size": cfg.vocab_size,
    }
    if trilm:
        d["pretraining_model_parallel"] = cfg.mp
    return d


def release_state(cfg: ModelConfig, trilm: bool = True, seed: int = 0, dtype=torch.float16) -> dict[str, torch.Tensor]:
    """HF-named tensors of a seeded model; TriLM matrices are gamma*W_hat per shard (at cfg.mp)."""
    from spectra.checkpoint import to_hf_names
    from spectra.model import Transformer
    from spectra.ternary import to_ternary, unpacked_state_dict

    model = Transformer(cfg).init_weights(seed)
    with torch.no_grad():  # non-trivial norm scales so a wrong mapping of them shows up
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
    if trilm:
        to_ternary(model, cfg.mp)
    return to_hf_names(unpacked_state_dict(model, dtype=dtype))


def write_release_dir(out: str | Path, cfg: ModelConfig, *, trilm: bool = True, seed: int = 0,
                      shards: int = 1, dtype=torch.float16, state: dict | None = None,
                      extra_config: dict | None = None) -> Path:
    """Write a SpectraSuite-style HF directory (``shards`` > 1: model-0000i-of-0000n.safetensors + index)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sd = state if state is not None else release_state(cfg, trilm, seed, dtype)
    sd = {k: v.contiguous() for k, v in sd.items()}
    cfgd = release_config(cfg, trilm, str(dtype).removeprefix("torch."))
    cfgd.update(extra_config or {})
    (out / "config.json").write_text(json.dumps(cfgd, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 0}))
    if shards <= 1:
        save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
        return out
    names = list(sd)
    per = -(-len(names) // shards)
    wmap = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k] for k in names[i * per:(i + 1) * per]}
        save_file(part, str(out / fname), metadata={"format": "pt"})
        wmap.update({k: fname for k in part})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": wmap}, indent=2))
    return out
