"""Tokenizer lookup: which file a model or data directory's tokenizer is, and loading it.

A directory's tokenizer is its ``tokenizer.json`` (the Hugging Face fast-tokenizer
file; every directory spectra writes carries one when the tokenizer is known).
:func:`load_tokenizer` returns a ``tokenizers.Tokenizer`` (data building,
generation) or, with ``hf=True``, a transformers tokenizer (evaluation: encoding
must be byte-for-byte what lm-eval's ``hf`` model does with the same directory).
"""

from __future__ import annotations

import os
from pathlib import Path

from spectra.errors import SpectraError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"


def find_tokenizer(path, required: bool = False) -> Path | None:
    """The tokenizer.json of ``path`` (a directory holding one, or the file itself).

    None when there is none, or with ``required`` a :class:`SpectraError` naming where it was looked for.
    """
    p = Path(path) if path is not None else None
    if p is not None and p.is_dir():
        p = p / TOKENIZER_FILE
    if p is not None and p.is_file():
        return p
    if required:
        raise SpectraError(f"tokenizer file not found: {p} (give a tokenizer.json file or a directory that holds one)")
    return None


def load_tokenizer(path, required: bool = True, *, hf: bool = False):
    """The tokenizer of ``path`` (a directory or a tokenizer.json file).

    ``required=False`` returns None when there is none (e.g. generation from token ids);
    otherwise a missing or unreadable tokenizer is a :class:`SpectraError`.
    """
    if hf:
        return _load_hf(path, required)
    p = find_tokenizer(path, required)
    if p is None:
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON / unknown model
        raise SpectraError(f"cannot load tokenizer {p}: {e}") from None


def _load_hf(path, required: bool):
    """transformers tokenizer: the directory's tokenizer_config.json when present (AutoTokenizer), else tokenizer.json."""
    if path is None:
        if not required:
            return None
        raise SpectraError("no tokenizer: pass tokenizer=DIR|tokenizer.json")
    src = Path(path)
    if src.is_file() and src.suffix != ".json":
        raise SpectraError(f"tokenizer file '{src}' must be a Hugging Face tokenizer.json")
    if not src.exists():
        raise SpectraError(f"tokenizer '{src}' does not exist (pass tokenizer=DIR or tokenizer=FILE.json)")
    has_cfg = src.is_dir() and (src / TOKENIZER_CONFIG).exists()
    file = find_tokenizer(src)
    if not has_cfg and file is None:
        if not required:
            return None
        raise SpectraError(
            f"'{src}' has no tokenizer ({TOKENIZER_FILE} or {TOKENIZER_CONFIG}); "
            f"pass tokenizer=PATH (e.g. the tokenizer.json of the data directory the model was trained on)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local directory: never reach for the network
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        if has_cfg:
            return AutoTokenizer.from_pretrained(str(src))
        return PreTrainedTokenizerFast(tokenizer_file=str(file), clean_up_tokenization_spaces=False)
    except Exception as e:  # noqa: BLE001 - transformers/tokenizers raise bare Exceptions on junk files
        raise SpectraError(f"cannot load tokenizer {src}: {e}") from None
