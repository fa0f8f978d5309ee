"""Hugging Face import and export.

Import: any Llama-architecture HF directory (single or sharded safetensors, or
``pytorch_model*.bin`` loaded with ``weights_only=True``) becomes a spectra model
directory. For a TriLM (declared by ``pretraining_model_parallel`` / our
``spectra.family``, asserted with ``family="trilm"``, or detected because its
block matrices have a handful of distinct magnitudes) every block matrix is
decomposed into (W_hat, per-shard gamma) with :func:`spectra.ternary.recover_ternary`
and the decomposition is checked to reproduce the stored tensor bit for bit.

Export: a directory transformers loads with no custom code (``LlamaForCausalLM``,
``generation_config.json`` with bos/eos 0); a TriLM is written unpacked
(gamma*W_hat, fp16 by default) with ``pretraining_model_parallel``, exactly like
the SpectraSuite release.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from spectra.store import (DTYPE_NAMES, family_of, from_hf_names, read_model_config, read_weights, save_model,
                           torch_dtype)
from spectra.config import ModelConfig
from spectra.errors import SpectraError
from spectra.interop.layout import MAX_MP, MatrixLayout, analyse, distinct_magnitudes, is_block_linear, model_mp

# Buffers some older HF Llama checkpoints carry; they are recomputed, never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass
class Converted:
    """A checked, in-memory model: config, family and spectra-named tensors."""

    cfg: ModelConfig
    family: str
    state: dict[str, torch.Tensor]  # spectra names (no "model." prefix)
    config: dict  # the source config.json
    layouts: list[MatrixLayout] = field(default_factory=list)  # TriLM only
    mp_source: str = ""  # "config", "asserted", "inferred" (TriLM only)

    @property
    def gammas(self) -> dict[str, list[float]]:
        return {lay.name: lay.gammas for lay in self.layouts}


def check_tensors(sd: dict[str, torch.Tensor], cfg: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    """Exactly the tensors the config implies, with the shapes it implies (errors name the tensor)."""
    from spectra.model import build_meta

    sd = {k: v for k, v in from_hf_names(sd).items() if not k.endswith(_IGNORED_SUFFIXES)}
    want = {k: tuple(v.shape) for k, v in build_meta(cfg).state_dict().items()}
    for k, shape in want.items():
        if k not in sd:
            hf = k if k.startswith("lm_head") else f"model.{k}"
            raise SpectraError(f"{source}: missing tensor '{hf}' (the config implies it with shape {shape})")
        if tuple(sd[k].shape) != shape:
            raise SpectraError(f"{source}: tensor '{k}' has shape {tuple(sd[k].shape)}, but config.json implies {shape}")
        if not sd[k].is_floating_point():
            raise SpectraError(f"{source}: tensor '{k}' has dtype {sd[k].dtype}; expected floating point weights")
    extra = sorted(set(sd) - set(want))
    if extra:
        raise SpectraError(f"{source}: unexpected tensor '{extra[0]}' ({len(extra)} in all) that a Llama model "
                           "of this config does not have (biases? another architecture?)")
    return {k: sd[k] for k in want}


def looks_ternary(sd: dict[str, torch.Tensor], max_mp: int = MAX_MP) -> bool:
    """Detection by magnitude counting: the first block matrix has <= 1 + max_mp distinct |w|."""
    name = next((k for k in sd if is_block_linear(k)), None)
    return name is not None and distinct_magnitudes(sd[name]) <= 1 + max_mp


def decompose(sd: dict[str, torch.Tensor], mp: int | None, source: str, max_mp: int = MAX_MP,
              strict: bool = True) -> tuple[list[MatrixLayout], int]:
    """Per-matrix (W_hat, gamma) recovery at ``mp`` (or inferred); returns (layouts, model mp).

    With ``strict`` the first non-ternary matrix raises a SpectraError naming it.
    After inference, every matrix is re-checked at the model-level MP (the LCM of
    the per-matrix counts) so one consistent layout describes the whole model.
    """
    from spectra.ternary import dequantize

    layouts = []
    for name in [k for k in sd if is_block_linear(k)]:
        lay, q = analyse(name, sd[name], mp, max_mp)
        if lay.error is None:
            back = dequantize(q, torch.tensor(lay.gammas), lay.split)
            if not torch.equal(back, sd[name].float()):  # defensive: recovery must be exact
                lay.error = "recovered gamma*W_hat does not reproduce the stored tensor bit for bit"
        if lay.error and strict:
            raise SpectraError(f"{source}: tensor '{name}' {lay.error}")
        layouts.append(lay)
    m = mp if mp is not None else model_mp(layouts)
    if mp is None and any(lay.mp != m for lay in layouts if lay.ternary):
        relaid = []
        for lay in layouts:
            if lay.ternary and lay.mp != m:
                lay2, _ = analyse(lay.name, sd[lay.name], m, max_mp)
                if lay2.error and strict:
                    raise SpectraError(f"{source}: tensor '{lay.name}': matrices disagree on the shard layout "
                                       f"(model-level mp={m}): {lay2.error}")
                lay = lay2
            relaid.append(lay)
        layouts = relaid
    return layouts, m


def convert(src: str | Path, family: str = "auto", mp: int | None = None, max_mp: int = MAX_MP) -> Converted:
    """Read and check any Llama HF directory (or ours); decompose a TriLM's ternary matrices."""
    src = Path(src)
    cfg, d = read_model_config(src)
    source = str(src)
    sd = check_tensors(read_weights(src), cfg, source)

    declared = "pretraining_model_parallel" in d or (d.get("spectra") or {}).get("family") in ("trilm", "bilm")
    if family == "auto":
        family = family_of(d) if declared else ("trilm" if looks_ternary(sd, max_mp) else "floatlm")
    if family == "bilm":
        raise SpectraError(f"{source}: importing BiLM (binary) checkpoints is not supported; use --family floatlm to load it as dense")
    if family not in ("trilm", "floatlm", "quantlm"):
        raise SpectraError(f"unknown family '{family}'; allowed: auto, trilm, floatlm, quantlm")
    out = Converted(cfg, family, sd, d)
    if family != "trilm":
        return out
    if mp is not None:
        out.mp_source = "asserted"
    elif "pretraining_model_parallel" in d:
        mp, out.mp_source = int(d["pretraining_model_parallel"]), "config"
    else:
        out.mp_source = "inferred"
    out.layouts, m = decompose(sd, mp, source, max_mp)
    try:
        out.cfg = dataclasses.replace(cfg, mp=m).validate(require_padded_vocab=False)
    except SpectraError as e:
        raise SpectraError(f"{source}: shard layout mp={m} does not fit the model shape: {e}") from None
    return out


def _dtype(name: str, default: torch.dtype) -> torch.dtype:
    if name in (None, "keep"):
        return default
    if name not in DTYPE_NAMES:
        raise SpectraError(f"unknown dtype '{name}'; allowed: keep, {', '.join(DTYPE_NAMES)}")
    return torch_dtype(name)


def _copy_tokenizer(src: Path, dst: Path) -> None:
    from spectra.fsutil import atomic_write_bytes

    for f in TOKENIZER_FILES:
        if (src / f).exists():
            atomic_write_bytes(dst / f, (src / f).read_bytes())


def _write(conv: Converted, out: Path, dtype: torch.dtype, meta: dict, tok_src: Path | None,
           extra_json: dict | None = None, before_swap=None) -> Path:
    from spectra.fsutil import atomic_dir, atomic_write_json
    from spectra.model import build_meta

    changed = any(v.dtype != dtype for v in conv.state.values())
    sd = {k: v.to(dtype) for k, v in conv.state.items()}
    if conv.family == "trilm" and changed:
        # fp16/bf16 may round gamma: the result is still gamma'*W_hat, check it stays ternary.
        decompose(sd, conv.cfg.mp, f"{out} ({str(dtype).removeprefix('torch.')})")
    model = build_meta(conv.cfg)  # only its config is used by save_model when state_dict is given
    # Every file goes into the new tree BEFORE it is swapped in: a kill never leaves a model
    # directory without its tokenizer or ternary_layout.json (docs/security.md).
    with atomic_dir(out) as tmp:
        save_model(model, tmp, conv.family, dtype=dtype, meta=meta, state_dict=sd)
        if tok_src is not None:
            _copy_tokenizer(tok_src, tmp)  # keep the source's tokenizer files verbatim
        for name, obj in (extra_json or {}).items():
            atomic_write_json(tmp / name, obj)
        if before_swap is not None:  # e.g. the model card: also part of the new tree
            before_swap(tmp)
    return out


def import_hf(src: str | Path, out: str | Path, *, family: str = "auto", mp: int | None = None,
              dtype: str = "keep", max_mp: int = MAX_MP) -> Converted:
    """``spectra import``: HF directory -> spectra model directory (writes ``ternary_layout.json`` for a TriLM)."""
    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve():
        raise SpectraError(f"import destination '{out}' is the source itself; choose another --out")
    conv = convert(src, family, mp, max_mp)
    src_dtype = next(iter(conv.state.values())).dtype
    meta = {"imported_from": str(src.resolve()), "source_dtype": str(src_dtype).removeprefix("torch.")}
    prev = conv.config.get("spectra") or {}
    meta.update({k: v for k, v in prev.items() if k not in ("version", "family", "mp")})
    extra = {}
    if conv.family == "trilm":
        meta["mp_source"] = conv.mp_source
        extra["ternary_layout.json"] = {
            "mp": conv.cfg.mp, "mp_source": conv.mp_source,
            "matrices": {lay.name: {"split": lay.split, "distinct_abs": lay.distinct, "gammas": lay.gammas}
                         for lay in conv.layouts}}
    _write(conv, out, _dtype(dtype, src_dtype), meta, src, extra)
    return conv


def export_hf(ckpt: str | Path, out: str | Path, *, dtype: str = "float16", before_swap=None) -> Converted:
    """``spectra export --to hf``: a plain LlamaForCausalLM directory (TriLM unpacked + pretraining_model_parallel).

    ``before_swap(tmp)`` may add files (a model card) to the new tree before it replaces ``out``."""
    ckpt, out = Path(ckpt), Path(out)
    if out.resolve() == ckpt.resolve():
        raise SpectraError(f"export destination '{out}' is the checkpoint itself; choose another --out")
    conv = convert(ckpt)
    meta = {k: v for k, v in (conv.config.get("spectra") or {}).items() if k not in ("version", "family", "mp")}
    _write(conv, out, _dtype(dtype, torch.float16), meta, ckpt, before_swap=before_swap)
    return conv

