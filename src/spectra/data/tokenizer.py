"""Tokenizers: train a byte-level BPE, find the end-of-document token (loading is :mod:`spectra.store.tokenizer`).

The GPT-NeoX-20B tokenizer (Spectra's) is an ordinary ``tokenizer.json``. For small
CPU runs we train a byte-level BPE (GPT-2 style pre-tokenization, every byte in the
initial alphabet so any text round-trips) with ``<|endoftext|>`` at id 0, which --
as in GPT-NeoX -- serves as both EOS and BOS.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

from spectra.errors import SpectraError
from spectra.store.tokenizer import TOKENIZER_FILE, find_tokenizer, load_tokenizer  # noqa: F401  (one lookup, in store)

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "[SEP]")


def resolve_tokenizer_file(path_or_dir) -> Path:
    """The tokenizer.json of a file or a directory holding one (a data directory, a checkpoint, a HF snapshot)."""
    return find_tokenizer(path_or_dir, required=True)


def file_hash(path) -> str:
    """sha256 of a file's bytes (the tokenizer identity recorded in manifests)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def vocab_size_of(tok) -> int:
    """Number of embedding rows the tokenizer needs: largest id + 1 (added tokens included)."""
    vocab = tok.get_vocab(with_added_tokens=True)
    return max(vocab.values()) + 1 if vocab else 0


def find_eos(tok, eos_token: str | None = None) -> tuple[int, str]:
    """(id, text) of the end-of-document token: ``eos_token`` if given, else the first known name present."""
    names = [eos_token] if eos_token else list(EOS_CANDIDATES)
    for name in names:
        i = tok.token_to_id(name)
        if i is not None:
            return int(i), name
    if eos_token:
        raise SpectraError(f"eos token {eos_token!r} is not in the tokenizer's vocabulary")
    raise SpectraError(
        f"tokenizer has none of the usual end-of-document tokens {list(EOS_CANDIDATES)}; pass --eos-token NAME"
    )


def train_bpe(docs: Iterable[str], vocab_size: int, min_frequency: int = 2):
    """Train a deterministic byte-level BPE of exactly ``vocab_size`` entries (at most; fewer
    if the corpus has fewer merges). ``<|endoftext|>`` is id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < 257:
        raise SpectraError(f"BPE vocab_size must be >= 257 (256 bytes + <|endoftext|>), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


def word_like_special_tokens(tok) -> list[str]:
    """Added special tokens that are plain words (e.g. 'assistant', 'RWKV' in RWKV's copy of the
    NeoX tokenizer). HF matches added tokens before BPE, so such words are cut out of ordinary
    text -- tokenization then differs from the original tokenizer's. Reported, not changed."""
    out = []
    for t in tok.get_added_tokens_decoder().values():
        if t.special and t.content.isalnum():
            out.append(t.content)
    return sorted(out)
