"""``config.json`` of a model directory: write ours, read ours and any Hugging Face Llama config.

A spectra model directory *is* a Hugging Face ``LlamaForCausalLM`` directory.
Spectra-specific metadata (family, model-parallel degree, training step, tokens
seen) lives under the ``"spectra"`` key; a TriLM also carries
``pretraining_model_parallel`` as the released SpectraSuite checkpoints do.
Nothing here imports torch.
"""

from __future__ import annotations

from pathlib import Path

from spectra import __version__
from spectra.config import ModelConfig
from spectra.errors import SpectraError

CONFIG_FILE = "config.json"
GENERATION_CONFIG = "generation_config.json"
FAMILIES = ("floatlm", "trilm", "bilm", "quantlm")
TERNARY_FAMILIES = ("trilm", "bilm")


def hf_config(cfg: ModelConfig, family: str, dtype="float32", meta: dict | None = None) -> dict:
    """The config.json of a model of shape ``cfg`` (``dtype``: a torch dtype or its name)."""
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
    if family in TERNARY_FAMILIES:
        d["pretraining_model_parallel"] = cfg.mp
    d["spectra"] = {"version": __version__, "family": family, "mp": cfg.mp, **(meta or {})}
    return d


def generation_config() -> dict:
    return {"bos_token_id": 0, "eos_token_id": 0, "_from_model_config": True}


def read_config(path: str | Path) -> dict:
    """The config.json dict of a model directory (or the file itself)."""
    path = Path(path)
    if not path.exists():
        raise SpectraError(f"checkpoint '{path}' does not exist")
    cfg_file = path / CONFIG_FILE if path.is_dir() else path
    if not cfg_file.exists():
        raise SpectraError(f"'{path}' is not a model directory: no config.json (expected a spectra or Hugging Face Llama checkpoint)")
    from spectra.validate import read_json_object  # UTF-8, JSON (any depth), an object: else one line

    return read_json_object(cfg_file, "config.json")


def model_config_from_hf(d: dict, source: str = "config.json") -> ModelConfig:
    """The architecture of a Llama config dict, refusing what spectra's model cannot represent."""
    from spectra.validate import check_hf_config

    check_hf_config(d, source)  # types and size limits of every key read below
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
    try:
        return cfg.validate(require_padded_vocab=False)
    except SpectraError as e:  # name the file: the field names alone do not say where
        raise SpectraError(f"{source}: {e}") from None


def read_model_config(path: str | Path) -> tuple[ModelConfig, dict]:
    """(architecture, config dict) of a model directory: :func:`read_config` + :func:`model_config_from_hf`."""
    d = read_config(path)
    src = Path(path) / CONFIG_FILE if Path(path).is_dir() else Path(path)
    return model_config_from_hf(d, str(src)), d


def family_of(d: dict) -> str:
    """floatlm | trilm | bilm | quantlm of a config dict (a release without our key: TriLM iff it records its MP)."""
    fam = (d.get("spectra") or {}).get("family")
    if fam:
        return fam
    return "trilm" if "pretraining_model_parallel" in d else "floatlm"
