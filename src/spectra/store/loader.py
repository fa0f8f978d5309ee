"""``load(path, as_=...)``: one entry point from a path (or Hub id) to what a caller works with.

=============  ============================================================================
``as_``        returns
=============  ============================================================================
``config``     the :class:`~spectra.config.ModelConfig` (model dirs, QuantLMs, packed dirs)
``meta``       the metadata dict (config.json, or packed.json for a packed directory)
``model``      a dense :class:`~spectra.model.Transformer` computing what the files store
               (a TriLM's gamma*W_hat, a packed QuantLM dequantized, a packed TriLM's
               PyTorch reference)
``tokenizer``  a ``tokenizers.Tokenizer`` (``hf=True``: a transformers tokenizer;
               ``required=False``: None when there is none)
``packed``     a memory-mapped :class:`~spectra.infer.packed_model.PackedModel`
``engine``     an inference engine (``backend=``: see :mod:`spectra.infer.backends`)
=============  ============================================================================

The loaders of packed formats live in their packages and are imported only when such
a path is met.
"""

from __future__ import annotations

from pathlib import Path

from spectra.errors import SpectraError
from spectra.store.kinds import DENSE_KINDS, PACKED_JSON, Kind, kind_of, resolve

AS = ("config", "meta", "model", "tokenizer", "packed", "engine")


def load(path, as_: str = "model", *, revision: str | None = None, dtype=None, device: str = "cpu", **kw):
    """See the module docstring. ``dtype``: a name or torch dtype for ``model`` (default fp32)."""
    if as_ not in AS:
        raise SpectraError(f"unknown load target '{as_}'; allowed: {', '.join(AS)}")
    p = resolve(path, revision)
    if as_ == "tokenizer":
        from spectra.store.tokenizer import load_tokenizer

        return load_tokenizer(p, kw.pop("required", True), **kw)
    kind = usable_kind(p)
    if as_ in ("config", "meta"):
        return _config(p, kind, as_)
    if as_ == "model":
        return load_dense(p, kind, dtype=dtype, device=device)
    if as_ == "packed":
        if kind is not Kind.PACKED_TRILM:
            raise SpectraError(f"'{p}' is not a packed model directory (no {PACKED_JSON}); create one with 'spectra pack'")
        from spectra.infer.packed_model import PackedModel

        return PackedModel.load(p, verify=kw.get("verify", True))
    from spectra.infer.backends import open_engine

    return open_engine(p, **kw)


def usable_kind(p: Path) -> Kind:
    """:func:`kind_of`, refusing (with the way out) the kinds no loader reads: GGUF files and run directories."""
    kind = kind_of(p)
    if kind is Kind.GGUF:
        raise SpectraError(f"'{p}' is a GGUF file for llama.cpp; spectra loads spectra / Hugging Face model directories "
                           f"and 'spectra pack' output (keep the directory the GGUF was exported from)")
    if kind is Kind.RUN:
        raise SpectraError(f"'{p}' is a training run directory, not a model: pass {p / 'final'} "
                           f"(or a checkpoint under {p / 'checkpoints'})")
    return kind


def _config(p: Path, kind: Kind, as_: str):
    if kind is Kind.PACKED_TRILM:
        from spectra.infer.packed_model import read_packed_meta

        meta, cfg = read_packed_meta(p)  # every field checked (docs/security.md), the tensors not opened
        return cfg if as_ == "config" else meta
    from spectra.store.hfconfig import read_model_config

    cfg, d = read_model_config(p)
    return cfg if as_ == "config" else d


def load_dense(p: Path, kind: Kind, *, dtype=None, device: str = "cpu"):
    """A dense Transformer for any loadable kind (see the module docstring)."""
    from spectra.store.dtypes import torch_dtype

    dt = torch_dtype(dtype)
    if kind in DENSE_KINDS:
        from spectra.store.modeldir import load_model

        return load_model(p, dtype=dt, device=device)[0]
    if kind is Kind.QUANTLM:
        from spectra.quant import load_quantized

        return load_quantized(p, dtype=dt, device=device)[0]
    from spectra.infer.packed_model import PackedModel
    from spectra.store.modeldir import build_model

    pm = PackedModel.load(p)  # the PyTorch reference of the packed file: exactly the tensors it stores
    return build_model(pm.cfg, pm.state_dict(), dtype=dt, device=device, source=str(p))
