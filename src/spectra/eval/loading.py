"""Load any model kind for evaluation, with its tokenizer and its provenance.

One entry point, :func:`load_for_eval`, accepts every kind :mod:`spectra.store`
recognises (a local path or a Hub id):

* spectra / Hugging Face ``LlamaForCausalLM`` directories (FloatLM, TriLM unpacked,
  QuantLM unpacked) and packed GPTQ QuantLMs (dequantized on load): a dense
  :class:`~spectra.model.Transformer` from :func:`spectra.store.load_dense` (an
  unpacked TriLM's gamma*W_hat weights compute exactly the ternary function);
* packed TriLM directories, through an engine of :mod:`spectra.infer` (the native
  C engine, or its PyTorch reference).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from spectra.errors import SpectraError
from spectra.store.kinds import Kind


@dataclass
class Loaded:
    """A model ready for scoring plus what the results JSON records about it."""

    model: object  # spectra Transformer (or a packed model with the same module layout)
    tokenizer: object  # a transformers PreTrainedTokenizerBase
    path: str | None
    family: str
    step: int | None = None
    tokens: int | None = None
    kind: str = "dense"  # dense | packed-quantlm | packed-trilm-<backend>
    max_length: int = 2048
    eos_token_id: int = 0
    bos_token_id: int | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        # A tokenizer with more ids than the model's embedding rows would index past them (IndexError
        # deep in torch, or worse in C): refuse the pair once, here.
        cfg = getattr(self.model, "cfg", None)
        n = len(self.tokenizer) if hasattr(self.tokenizer, "__len__") else None
        if cfg is not None and n is not None and n > cfg.vocab_size:
            raise SpectraError(f"the tokenizer has {n} tokens but the model's vocabulary is {cfg.vocab_size} "
                               f"({self.path}): wrong --tokenizer for this model?")


def _tokenizer(path: Path | None, tokenizer):
    """``tokenizer`` as given (an object), or loaded from it (a path) or from the model directory."""
    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        return tokenizer
    from spectra.store.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer or path, required=True, hf=True)


def _token_id(tok_id, fallback):
    """The tokenizer's special-token id when it has one, else the model files' (a list: its first)."""
    v = tok_id if tok_id is not None else fallback
    return v[0] if isinstance(v, list) else v


def _load_packed_trilm(path: Path, tokenizer, backend: str = "auto", threads: int | None = None) -> Loaded:
    """A ``spectra pack`` directory through spectra.infer: the native C engine (or its torch reference)."""
    from spectra.infer.backends import open_engine
    from spectra.store import load

    eng = open_engine(path, backend=backend, n_threads=threads)
    meta = load(path, "meta")  # packed.json
    model = eng if getattr(eng, "backend", None) == "native" else eng.model
    tok = _tokenizer(path, tokenizer)
    src = meta.get("source") or {}
    return Loaded(model=model, tokenizer=tok, path=str(path.resolve()), family=meta.get("family", "trilm"),
                  kind=f"packed-trilm-{eng.backend}", step=src.get("step"), tokens=src.get("tokens"),
                  max_length=int(eng.cfg.max_seq_len), eos_token_id=int(_token_id(tok.eos_token_id, meta.get("eos_token_id", 0))),
                  bos_token_id=_token_id(tok.bos_token_id, meta.get("bos_token_id")),
                  extra={"spectra": {"packed": {k: meta.get(k) for k in ("weights", "head", "linear_bits_per_weight")},
                                     "engine": eng.describe()},
                         "fingerprint": checkpoint_fingerprint(path)})


def _in_memory(model, tokenizer) -> Loaded:
    """An in-memory model (training loop, tests)."""
    model = model.eval()
    cfg = getattr(model, "cfg", None)
    if tokenizer is None:
        raise SpectraError("an in-memory model needs tokenizer=DIR|tokenizer.json")
    tok = _tokenizer(None, tokenizer)
    return Loaded(model, tok, None, family="floatlm", max_length=getattr(cfg, "max_seq_len", 2048),
                  eos_token_id=tok.eos_token_id if tok.eos_token_id is not None else 0,
                  bos_token_id=tok.bos_token_id)


def load_for_eval(pretrained, *, tokenizer=None, dtype="float32", device: str = "cpu", packed_backend: str = "auto",
                  threads: int | None = None, revision: str | None = None) -> Loaded:
    """Load a checkpoint directory or Hub id (or wrap an in-memory model) for evaluation."""
    from torch import nn

    from spectra.store import family_of, read_config, resolve, torch_dtype
    from spectra.store.loader import load_dense, usable_kind

    if isinstance(pretrained, nn.Module):
        return _in_memory(pretrained, tokenizer)
    if pretrained is None:
        raise SpectraError("no model: pass pretrained=DIR (a spectra or Hugging Face Llama checkpoint directory)")
    path = resolve(pretrained, revision)
    kind = usable_kind(path)
    if kind is Kind.PACKED_TRILM:
        return _load_packed_trilm(path, tokenizer, backend=packed_backend, threads=threads)
    dt = torch_dtype(dtype)
    model = load_dense(path, kind, dtype=dt, device=device)
    cfg = read_config(path)
    tok = _tokenizer(path, tokenizer)
    sp = cfg.get("spectra") or {}
    return Loaded(
        model=model, tokenizer=tok, path=str(path.resolve()), family=family_of(cfg),
        kind="packed-quantlm" if kind is Kind.QUANTLM else "dense",
        step=sp.get("step"), tokens=sp.get("tokens", sp.get("tokens_seen")),
        max_length=int(cfg.get("max_position_embeddings", 2048)),
        eos_token_id=int(_token_id(tok.eos_token_id, cfg.get("eos_token_id", 0)) or 0),
        bos_token_id=_token_id(tok.bos_token_id, cfg.get("bos_token_id")),
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
