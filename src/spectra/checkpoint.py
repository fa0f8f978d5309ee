"""Model directories: save and load, in the Hugging Face ``LlamaForCausalLM`` layout.

A spectra model directory *is* a Hugging Face directory (``config.json``,
``model.safetensors``, ``generation_config.json``, ``tokenizer.json`` when known):
transformers loads it with no custom code. Spectra-specific metadata (family,
model-parallel degree, training step, tokens seen) lives under the ``"spectra"``
key of ``config.json``; a TriLM also carries ``pretraining_model_parallel`` as the
released SpectraSuite checkpoints do, and stores the unpacked weights gamma*W_hat.

:func:`load_model` reads ours and any Llama-architecture HF directory (single or
sharded safetensors, or ``.bin`` files loaded with ``weights_only=True``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from spectra import __version__
from spectra.config import ModelConfig
from spectra.errors import SpectraError
from spectra.fsutil import atomic_dir, atomic_write_json, save_safetensors
from spectra.model import Transformer

FAMILIES = ("floatlm", "trilm", "bilm", "quantlm")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def hf_config(cfg: ModelConfig, family: str, dtype: torch.dtype = torch.float32, meta: dict | None = None) -> dict:
    d = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads,
        "num_hidden_layers": cfg.n_layers,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": cfg.init_std,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if family in ("trilm", "bilm"):
        d["pretraining_model_parallel"] = cfg.mp
    d["spectra"] = {"version": __version__, "family": family, "mp": cfg.mp, **(meta or {})}
    return d


def to_hf_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {(k if k.startswith("lm_head") else f"model.{k}"): v for k, v in sd.items()}


def from_hf_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("model."): v for k, v in sd.items()}


def save_model(
    model: Transformer,
    out_dir: str | Path,
    family: str = "floatlm",
    *,
    dtype: torch.dtype | None = None,
    meta: dict | None = None,
    tokenizer: str | Path | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a loadable model directory atomically.

    A TriLM/BiLM model (with TernaryLinear layers) is saved unpacked (gamma*W_hat).
    ``state_dict`` overrides the tensors taken from the model (e.g. QuantLM weights).
    """
    from spectra.ternary import unpacked_state_dict

    if family not in FAMILIES:
        raise SpectraError(f"unknown family '{family}'; allowed: {', '.join(FAMILIES)}")
    sd = state_dict if state_dict is not None else unpacked_state_dict(model)
    if dtype is None:
        dtype = next(iter(sd.values())).dtype
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        save_safetensors(to_hf_names(sd), tmp / "model.safetensors", metadata={"format": "pt"})
        atomic_write_json(tmp / "config.json", hf_config(model.cfg, family, dtype, meta))
        atomic_write_json(tmp / "generation_config.json", {"bos_token_id": 0, "eos_token_id": 0, "_from_model_config": True})
        copy_tokenizer(tokenizer, tmp, model.cfg.max_seq_len)
    return out


def copy_tokenizer(tokenizer, out_dir: Path, max_len: int) -> None:
    """Put ``tokenizer.json`` (from a file or a directory holding one) and a HF tokenizer_config in ``out_dir``."""
    if tokenizer is None:
        return
    tok = Path(tokenizer)
    if tok.is_dir():
        tok = tok / "tokenizer.json"
    if tok.exists():
        shutil.copyfile(tok, out_dir / "tokenizer.json")
        atomic_write_json(out_dir / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": None,
            "model_max_length": max_len, "clean_up_tokenization_spaces": False})


def read_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise SpectraError(f"checkpoint '{path}' does not exist")
    cfg_file = path / "config.json" if path.is_dir() else path
    if not cfg_file.exists():
        raise SpectraError(f"'{path}' is not a model directory: no config.json (expected a spectra or Hugging Face Llama checkpoint)")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise SpectraError(f"{cfg_file}: not valid JSON ({e})") from None


def model_config_from_hf(d: dict, source: str = "config.json") -> ModelConfig:
    arch = d.get("architectures") or []
    mtype = d.get("model_type")
    if mtype != "llama" and "LlamaForCausalLM" not in arch:
        raise SpectraError(f"{source}: model_type {mtype!r} / architectures {arch} is not a Llama architecture; only LlamaForCausalLM is supported")
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size"):
        if key not in d:
            raise SpectraError(f"{source}: missing required key '{key}'")
    kv = d.get("num_key_value_heads", d["num_attention_heads"])
    if kv != d["num_attention_heads"]:
        raise SpectraError(f"{source}: num_key_value_heads={kv} != num_attention_heads={d['num_attention_heads']}; grouped-query attention is not supported (Spectra models use MHA)")
    if d.get("tie_word_embeddings", False):
        raise SpectraError(f"{source}: tie_word_embeddings=true is not supported (Spectra models have an untied head)")
    if d.get("attention_bias") or d.get("mlp_bias"):
        raise SpectraError(f"{source}: biases are not supported (attention_bias/mlp_bias must be false)")
    if d.get("hidden_act", "silu") != "silu":
        raise SpectraError(f"{source}: hidden_act {d.get('hidden_act')!r} is not supported (only silu)")
    rs = d.get("rope_scaling")
    if rs and (rs.get("rope_type") or rs.get("type")) not in (None, "default"):
        raise SpectraError(f"{source}: rope_scaling {rs} is not supported")
    theta = d.get("rope_theta") or (d.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    mp = int(d.get("pretraining_model_parallel", (d.get("spectra") or {}).get("mp", 1)))
    cfg = ModelConfig(
        dim=d["hidden_size"], n_layers=d["num_hidden_layers"], n_heads=d["num_attention_heads"],
        ffn_dim=d["intermediate_size"], vocab_size=d["vocab_size"], mp=mp,
        max_seq_len=d.get("max_position_embeddings", 2048), norm_eps=d.get("rms_norm_eps", 1e-5),
        rope_theta=float(theta), init_std=d.get("initializer_range", 0.02),
    )
    return cfg.validate(require_padded_vocab=False)


def family_of(d: dict) -> str:
    fam = (d.get("spectra") or {}).get("family")
    if fam:
        return fam
    return "trilm" if "pretraining_model_parallel" in d else "floatlm"


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a HF-layout directory (safetensors, sharded or not; or .bin safely)."""
    from safetensors.torch import load_file

    path = Path(path)
    idx = path / "model.safetensors.index.json"
    if (path / "model.safetensors").exists():
        return load_file(str(path / "model.safetensors"))
    if idx.exists():
        files = sorted(set(json.loads(idx.read_text())["weight_map"].values()))
        out: dict[str, torch.Tensor] = {}
        for f in files:
            if not (path / f).exists():
                raise SpectraError(f"{idx}: shard '{f}' is missing")
            out.update(load_file(str(path / f)))
        return out
    bins = sorted(path.glob("pytorch_model*.bin"))
    if bins:
        out = {}
        for f in bins:
            try:
                out.update(torch.load(f, map_location="cpu", weights_only=True))
            except Exception as e:  # noqa: BLE001 - report the file, not torch's internals
                raise SpectraError(f"{f}: cannot be loaded safely with weights_only=True ({type(e).__name__})") from None
        return out
    raise SpectraError(f"'{path}' holds no weights (model.safetensors, model.safetensors.index.json or pytorch_model*.bin)")


def load_state(model: Transformer, sd: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Copy HF-named tensors into ``model`` with shape checks that name the tensor."""
    sd = from_hf_names(sd)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    if missing:
        raise SpectraError(f"{source}: missing tensor '{missing[0]}' ({len(missing)} missing in all)")
    for k, v in own.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise SpectraError(f"{source}: tensor '{k}' has shape {tuple(sd[k].shape)}, the config implies {tuple(v.shape)}")
    model.load_state_dict({k: sd[k] for k in own}, strict=True)


def load_model(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
               ternary: bool = False) -> tuple[Transformer, dict]:
    """Load a model directory. Returns (model, config dict).

    With ``ternary=True`` a TriLM is rebuilt with TernaryLinear layers whose latent
    weights reproduce the stored gamma*W_hat exactly (for continued training or
    packing); otherwise the unpacked weights are used as a plain dense model, which
    computes the same function.
    """
    d = read_config(path)
    cfg = model_config_from_hf(d, str(Path(path) / "config.json"))
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=device)
    from spectra.model import rope_tables

    model.rope_cos, model.rope_sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, device)
    sd = read_weights(path)
    load_state(model, {k: v.to(dtype) for k, v in sd.items()}, str(path))
    model = model.to(dtype)
    model.rope_cos, model.rope_sin = model.rope_cos.float(), model.rope_sin.float()
    if ternary:
        from spectra.ternary import latent_from_ternary, recover_ternary, split_of, to_ternary

        if family_of(d) not in ("trilm",):
            raise SpectraError(f"{path}: family '{family_of(d)}' is not a TriLM; ternary=True needs a TriLM checkpoint")
        to_ternary(model, cfg.mp)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("proj.weight"):
                    split = split_of(name)
                    try:
                        q, g = recover_ternary(p, cfg.mp, split)
                    except SpectraError as e:
                        raise SpectraError(f"{path}: tensor '{name}': {e}") from None
                    p.copy_(latent_from_ternary(q, g, split).to(p.dtype))
    model.eval()
    return model, d
