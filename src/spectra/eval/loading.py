"""Load any model kind for evaluation, with its tokenizer and its provenance.

One entry point, :func:`load_for_eval`, accepts

* our model directories (FloatLM, TriLM unpacked, QuantLM unpacked) and any
  Hugging Face ``LlamaForCausalLM`` directory: loaded with
  :func:`spectra.checkpoint.load_model` as a dense :class:`~spectra.model.Transformer`
  (an unpacked TriLM's gamma*W_hat weights compute exactly the ternary function);
* packed QuantLM directories, through ``spectra.quant.load_quantized``;
* packed TriLM directories, through the native engine in ``spectra.infer``.

The packed loaders live in other packages; they are imported only when such a
directory is met, so evaluation of ordinary checkpoints never depends on them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from spectra.errors import SpectraError

_DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class Loaded:
    """A model ready for scoring plus what the results JSON records about it."""

    model: object  # spectra Transformer (or a packed model with the same module layout)
    tokenizer: object  # a transformers PreTrainedTokenizerBase
    path: str | None
    family: str
    step: int | None = None
    tokens: int | None = None
    kind: str = "dense"  # dense | packed-trilm | packed-quantlm
    max_length: int = 2048
    eos_token_id: int = 0
    bos_token_id: int | None = None
    extra: dict = field(default_factory=dict)


def _torch_dtype(name):
    import torch

    if name in (None, "auto"):
        return torch.float32  # CPU default: fp32 (deterministic; bf16 only when asked)
    if not isinstance(name, str):
        return name
    if name not in _DTYPES:
        raise SpectraError(f"dtype '{name}' is not supported; allowed: {', '.join(_DTYPES)}")
    return getattr(torch, name)


def load_tokenizer(path: str | Path | None, tokenizer: str | Path | None = None):
    """The tokenizer of a model directory (or ``tokenizer=``: a dir or a tokenizer.json file).

    Loaded with transformers so that encoding is byte-for-byte what lm-eval's ``hf``
    model does with the same directory.
    """
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    src = Path(tokenizer) if tokenizer else (Path(path) if path else None)
    if src is None:
        raise SpectraError("no tokenizer: pass tokenizer=DIR|tokenizer.json")
    if src.is_file():
        if src.suffix != ".json":
            raise SpectraError(f"tokenizer file '{src}' must be a Hugging Face tokenizer.json")
        return PreTrainedTokenizerFast(tokenizer_file=str(src), clean_up_tokenization_spaces=False)
    if not src.is_dir():
        raise SpectraError(f"tokenizer '{src}' does not exist (pass tokenizer=DIR or tokenizer=FILE.json)")
    has_cfg = (src / "tokenizer_config.json").exists()
    if not has_cfg and not (src / "tokenizer.json").exists():
        raise SpectraError(
            f"'{src}' has no tokenizer (tokenizer.json or tokenizer_config.json); "
            f"pass tokenizer=PATH (e.g. the tokenizer.json of the data directory the model was trained on)")
    if has_cfg:
        return AutoTokenizer.from_pretrained(str(src))
    return PreTrainedTokenizerFast(tokenizer_file=str(src / "tokenizer.json"), clean_up_tokenization_spaces=False)


def _packed_kind(path: Path, cfg: dict) -> str:
    """Which loader a directory needs: dense, packed-trilm or packed-quantlm."""
    sp = cfg.get("spectra") or {}
    fmt = str(sp.get("format") or sp.get("packed") or "")
    try:
        from spectra.quant import is_packed_gptq

        if is_packed_gptq(path):
            return "packed-quantlm"
    except ImportError:
        pass
    if cfg.get("quantization_config"):
        return "packed-quantlm"
    if fmt and fmt not in ("unpacked", "False", "false") and sp.get("family") in ("trilm", "bilm"):
        return "packed-trilm"
    if any(path.glob("*.gguf")) and not any(path.glob("*.safetensors")):
        return "packed-trilm"
    return "dense"


def _load_packed(kind: str, path: Path, dtype):
    if kind == "packed-quantlm":
        try:
            from spectra.quant import load_quantized
        except ImportError:
            raise SpectraError(f"{path}: packed QuantLM directory, but spectra.quant.load_quantized is not available "
                               f"in this installation") from None
        out = load_quantized(path, dtype=dtype)  # dequantized on load (GPTQ packed -> dense weights)
        return out[0] if isinstance(out, tuple) else out
    try:
        from spectra import infer
    except ImportError:
        raise SpectraError(f"{path}: packed TriLM directory, but the native engine (spectra.infer) is not available "
                           f"in this installation") from None
    loader = getattr(infer, "load_packed", None) or getattr(infer, "load", None)
    if loader is None:
        raise SpectraError(f"{path}: spectra.infer has no load_packed(); cannot serve a packed TriLM")
    out = loader(path)
    return out[0] if isinstance(out, tuple) else out


def _load_packed_trilm(path: Path, tokenizer, backend: str = "auto", threads: int | None = None) -> Loaded:
    """A ``spectra pack`` directory through spectra.infer: the native C engine (or its torch reference)."""
    try:
        from spectra.infer.engine import load_engine
    except ImportError:
        raise SpectraError(f"{path}: packed TriLM directory, but spectra.infer is not available") from None
    eng = load_engine(path, backend=backend, n_threads=threads)
    meta = json.loads((path / "packed.json").read_text())
    model = eng if getattr(eng, "backend", None) == "native" else eng.model
    tok = tokenizer if (tokenizer is not None and not isinstance(tokenizer, (str, Path))) else load_tokenizer(path, tokenizer)
    src = meta.get("source") or {}
    eos = tok.eos_token_id if tok.eos_token_id is not None else meta.get("eos_token_id", 0)
    return Loaded(model=model, tokenizer=tok, path=str(path.resolve()), family=meta.get("family", "trilm"),
                  kind=f"packed-trilm-{eng.backend}", step=src.get("step"), tokens=src.get("tokens"),
                  max_length=int(eng.cfg.max_seq_len), eos_token_id=int(eos),
                  bos_token_id=tok.bos_token_id if tok.bos_token_id is not None else meta.get("bos_token_id"),
                  extra={"spectra": {"packed": {k: meta.get(k) for k in ("weights", "head", "linear_bits_per_weight")},
                                     "engine": eng.describe()},
                         "fingerprint": checkpoint_fingerprint(path)})


def load_for_eval(pretrained, *, tokenizer=None, dtype="float32", device: str = "cpu", packed_backend: str = "auto",
                  threads: int | None = None) -> Loaded:
    """Load a checkpoint directory (or wrap an in-memory model) for evaluation."""
    from torch import nn

    from spectra.checkpoint import family_of, load_model, read_config

    dt = _torch_dtype(dtype)
    if isinstance(pretrained, nn.Module):  # an in-memory model (training loop, tests)
        model = pretrained.eval()
        cfg = getattr(model, "cfg", None)
        if tokenizer is None:
            raise SpectraError("an in-memory model needs tokenizer=DIR|tokenizer.json")
        tok = tokenizer if not isinstance(tokenizer, (str, Path)) else load_tokenizer(None, tokenizer)
        return Loaded(model, tok, None, family="floatlm", max_length=getattr(cfg, "max_seq_len", 2048),
                      eos_token_id=tok.eos_token_id if tok.eos_token_id is not None else 0,
                      bos_token_id=tok.bos_token_id)
    if pretrained is None:
        raise SpectraError("no model: pass pretrained=DIR (a spectra or Hugging Face Llama checkpoint directory)")
    path = Path(pretrained)
    if not path.is_dir():
        raise SpectraError(f"checkpoint '{path}' is not a directory (expected a spectra or Hugging Face Llama model directory)")
    if (path / "packed.json").is_file():
        return _load_packed_trilm(path, tokenizer, backend=packed_backend, threads=threads)
    cfg = read_config(path)
    kind = _packed_kind(path, cfg)
    if kind == "dense":
        model, cfg = load_model(path, dtype=dt, device=device)
    else:
        model = _load_packed(kind, path, dt)
    model.eval()
    tok = tokenizer if (tokenizer is not None and not isinstance(tokenizer, (str, Path))) else load_tokenizer(path, tokenizer)
    sp = cfg.get("spectra") or {}
    eos = tok.eos_token_id if tok.eos_token_id is not None else cfg.get("eos_token_id", 0)
    if isinstance(eos, list):
        eos = eos[0]
    return Loaded(
        model=model, tokenizer=tok, path=str(path.resolve()), family=family_of(cfg), kind=kind,
        step=sp.get("step"), tokens=sp.get("tokens", sp.get("tokens_seen")),
        max_length=int(cfg.get("max_position_embeddings", 2048)), eos_token_id=int(eos if eos is not None else 0),
        bos_token_id=tok.bos_token_id if tok.bos_token_id is not None else cfg.get("bos_token_id"),
        extra={"spectra": sp, "fingerprint": checkpoint_fingerprint(path)},
    )


def checkpoint_fingerprint(path: str | Path) -> str:
    """sha256 over config.json and the weight files' names and sizes (cheap, stable)."""
    path = Path(path)
    h = hashlib.sha256()
    cfg = path / "config.json"
    if cfg.exists():
        h.update(cfg.read_bytes())
    for f in sorted(path.iterdir()):
        if f.suffix in (".safetensors", ".bin", ".gguf", ".json") and f.is_file():
            h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def describe(loaded: Loaded) -> dict:
    """What results JSON records about the model."""
    return {"model": loaded.path, "family": loaded.family, "kind": loaded.kind, "step": loaded.step,
            "tokens": loaded.tokens, "checkpoint_fingerprint": loaded.extra.get("fingerprint"),
            "spectra": json.loads(json.dumps(loaded.extra.get("spectra", {}), default=str))}
