"""What kind of thing a path is: the one place that looks at a path and decides.

=================  ==========================================================  =====================
kind               how it is recognised                                        loaded by
=================  ==========================================================  =====================
``packed-trilm``   a directory with ``packed.json`` (``spectra pack`` output)  spectra.infer
``quantlm``        ``quantize_config.json``, or config.json's                  spectra.quant
                   ``quantization_config.quant_method == "gptq"`` (packed
                   GPTQ, ours or AutoGPTQ/GPTQModel's)
``spectra``        config.json with a ``"spectra"`` key (any family;           store.modeldir
                   an unpacked QuantLM is one of these)
``hf``             any other config.json (a Hugging Face Llama directory)      store.modeldir
``gguf``           a ``.gguf`` file, or a directory whose only model file is   llama.cpp (export
                   one                                                          only here)
``run``            a training run: ``train_config.json``, ``metrics.jsonl``,   store.runs
                   ``checkpoints/`` or ``final/``
=================  ==========================================================  =====================

Nothing here imports torch or numpy.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

from spectra.errors import SpectraError

PACKED_JSON = "packed.json"  # the packed TriLM's metadata file (spectra.infer.packed_model writes it)
QUANTIZE_CONFIG = "quantize_config.json"  # AutoGPTQ's side file (spectra.quant.formats writes it)
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
FINAL_DIR = "final"
RUN_CONFIG = "train_config.json"


class Kind(str, Enum):
    PACKED_TRILM = "packed-trilm"
    QUANTLM = "quantlm"
    SPECTRA = "spectra"
    HF = "hf"
    GGUF = "gguf"
    RUN = "run"

    def __str__(self) -> str:
        return self.value


DENSE_KINDS = (Kind.SPECTRA, Kind.HF)  # one safetensors/bin state dict + config.json


def _config_dict(path: Path) -> dict | None:
    try:
        d = json.loads((path / "config.json").read_text())
    except (OSError, ValueError, RecursionError):  # absent, unreadable, not JSON / UTF-8, too deep: not decided here
        return None
    return d if isinstance(d, dict) else None


def detect(path: str | Path) -> Kind | None:
    """The kind of ``path``, or None when it is none of the known kinds (or does not exist)."""
    p = Path(path)
    if p.is_file():
        return Kind.GGUF if p.suffix == ".gguf" else None
    if not p.is_dir():
        return None
    if (p / PACKED_JSON).is_file():
        return Kind.PACKED_TRILM
    if (p / QUANTIZE_CONFIG).is_file():
        return Kind.QUANTLM
    if (p / "config.json").is_file():
        d = _config_dict(p) or {}
        qc = d.get("quantization_config")
        if isinstance(qc, dict) and qc.get("quant_method") == "gptq":
            return Kind.QUANTLM
        return Kind.SPECTRA if isinstance(d.get("spectra"), dict) else Kind.HF
    if any(p.glob("*.gguf")) and not any(p.glob("*.safetensors")):
        return Kind.GGUF
    if (p / RUN_CONFIG).is_file() or (p / METRICS_FILE).is_file() or (p / CHECKPOINTS_DIR).is_dir() or (p / FINAL_DIR).is_dir():
        return Kind.RUN
    return None


def kind_of(path: str | Path) -> Kind:
    """Like :func:`detect`, but a path of no known kind is a :class:`SpectraError` that says what was expected."""
    k = detect(path)
    if k is None:
        p = Path(path)
        if not p.exists():
            raise SpectraError(f"'{p}' does not exist")
        raise SpectraError(f"'{p}' is not a model directory: no config.json (expected a spectra or Hugging Face Llama "
                           f"checkpoint, a packed directory from 'spectra pack', or a training run)")
    return k


def resolve(path_or_id, revision: str | None = None) -> Path:
    """A local path for a path or a Hub id: an existing path as is; ``owner/name`` through the Hub cache
    (:func:`spectra.store.hub.resolve_model`). A path that is neither comes back as is (callers say it does
    not exist, naming what they expected)."""
    s = str(path_or_id)
    p = Path(s).expanduser()
    if p.exists() and revision is None:
        return p
    try:
        from spectra.store.hub import hub_id, resolve_model
    except ImportError:  # a trimmed installation without the Hub module
        if revision is not None:
            raise SpectraError(f"--revision needs Hub support, which this installation lacks ('{s}')") from None
        return p
    if p.exists() or hub_id(s) is not None:
        return Path(resolve_model(s, revision))
    if revision is not None:
        raise SpectraError(f"--revision applies to Hub ids (OWNER/NAME); '{s}' is neither that nor an existing path")
    return p
