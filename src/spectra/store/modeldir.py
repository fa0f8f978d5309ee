"""Model directories: save and load, in the Hugging Face ``LlamaForCausalLM`` layout.

A spectra model directory (``config.json``, ``model.safetensors``,
``generation_config.json``, ``tokenizer.json`` when known) is a Hugging Face
directory: transformers loads it with no custom code. A TriLM stores the unpacked
weights gamma*W_hat. :func:`load_model` reads ours and any Llama-architecture HF
directory (single or sharded safetensors, or ``.bin`` files loaded with
``weights_only=True``). :func:`build_model` is the one way a state dict becomes a
:class:`~spectra.model.Transformer` (meta build -> ``to_empty`` -> load -> RoPE).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from spectra.config import ModelConfig
from spectra.errors import SpectraError
from spectra.fsutil import atomic_dir, atomic_write_json, save_safetensors
from spectra.model import Transformer
from spectra.store.hfconfig import (
    CONFIG_FILE, FAMILIES, GENERATION_CONFIG, family_of, generation_config, hf_config, read_model_config,
)
from spectra.store.tokenizer import TOKENIZER_CONFIG, TOKENIZER_FILE, find_tokenizer

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


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
        save_safetensors(to_hf_names(sd), tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        atomic_write_json(tmp / CONFIG_FILE, hf_config(model.cfg, family, dtype, meta))
        atomic_write_json(tmp / GENERATION_CONFIG, generation_config())
        copy_tokenizer(tokenizer, tmp, model.cfg.max_seq_len)
    return out


def copy_tokenizer(tokenizer, out_dir: Path, max_len: int) -> None:
    """Put ``tokenizer.json`` (from a file or a directory holding one) and a HF tokenizer_config in ``out_dir``."""
    tok = find_tokenizer(tokenizer)
    if tok is None:
        return
    shutil.copyfile(tok, out_dir / TOKENIZER_FILE)
    atomic_write_json(out_dir / TOKENIZER_CONFIG, {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": None,
        "model_max_length": max_len, "clean_up_tokenization_spaces": False})


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a HF-layout directory (safetensors, sharded or not; or .bin safely), HF names."""
    from spectra.validate import load_safetensors as load_file  # every header field checked first
    from spectra.validate import read_json_object

    path = Path(path)
    idx = path / WEIGHTS_INDEX
    if (path / WEIGHTS_FILE).exists():
        return load_file(str(path / WEIGHTS_FILE))
    if idx.exists():
        wm = read_json_object(idx, WEIGHTS_INDEX, required=("weight_map",))["weight_map"]
        if not isinstance(wm, dict) or not all(isinstance(f, str) and "/" not in f for f in wm.values()):
            raise SpectraError(f"{idx}: 'weight_map' must map tensor names to shard file names in this directory")
        files = sorted(set(wm.values()))
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
    raise SpectraError(f"'{path}' holds no weights ({WEIGHTS_FILE}, {WEIGHTS_INDEX} or pytorch_model*.bin)")


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


def build_model(cfg: ModelConfig, sd: dict[str, torch.Tensor], *, dtype: torch.dtype | None = None,
                device: str = "cpu", source: str = "checkpoint") -> Transformer:
    """A Transformer holding exactly ``sd`` (HF or spectra names), in ``dtype`` (None: fp32), in eval mode.

    Built on the meta device and materialised once (no random init of weights that are
    overwritten anyway); the RoPE tables are then computed in fp32 whatever ``dtype`` is.
    """
    from spectra.model import rope_tables

    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=device)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    load_state(model, sd, source)
    if dtype is not None:
        model = model.to(dtype)
    model.rope_cos, model.rope_sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, device)
    return model.eval()


def load_model(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
               ternary: bool = False) -> tuple[Transformer, dict]:
    """Load a model directory. Returns (model, config dict).

    With ``ternary=True`` a TriLM is rebuilt with TernaryLinear layers whose latent
    weights reproduce the stored gamma*W_hat exactly (for continued training or
    packing); otherwise the unpacked weights are used as a plain dense model, which
    computes the same function.
    """
    cfg, d = read_model_config(path)
    model = build_model(cfg, read_weights(path), dtype=dtype, device=device, source=str(path))
    if ternary:
        _make_ternary(model, path, d)
    model.eval()
    return model, d


def _make_ternary(model: Transformer, path, d: dict) -> None:
    from spectra.ternary import latent_from_ternary, recover_ternary, split_of, to_ternary

    if family_of(d) not in ("trilm",):
        raise SpectraError(f"{path}: family '{family_of(d)}' is not a TriLM; ternary=True needs a TriLM checkpoint")
    mp = model.cfg.mp
    to_ternary(model, mp)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                split = split_of(name)
                try:
                    q, g = recover_ternary(p, mp, split)
                except SpectraError as e:
                    raise SpectraError(f"{path}: tensor '{name}': {e}") from None
                p.copy_(latent_from_ternary(q, g, split).to(p.dtype))
