"""Embed a Hugging Face byte-level BPE ``tokenizer.json`` into GGUF metadata.

llama.cpp's conventions (see its ``convert_hf_to_gguf.py``, ``_set_vocab_gpt2``):
``tokenizer.ggml.model = "gpt2"`` for byte-level BPE, a pre-tokenizer name that
selects the split regex (``"gpt-2"``: the GPT-2 / GPT-NeoX regex, which both the
GPT-NeoX-20B tokenizer of Spectra and our trained BPEs use), the token strings in
id order (ids the tokenizer lacks up to the padded vocab become ``[PAD<i>]`` with type
UNUSED), token types (NORMAL, CONTROL for special added tokens, USER_DEFINED for
other added tokens), the merges as ``"a b"`` strings, and bos/eos ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from spectra.errors import SpectraError

# Split regexes of HF byte-level tokenizers -> llama.cpp pre-tokenizer names.
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_KNOWN_SPLITS = {
    _GPT2_REGEX: "gpt-2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
}


@dataclass
class GGUFVocab:
    tokens: list[str]
    types: list[int]  # gguf.TokenType values
    merges: list[str]
    pre: str


def _pre_name(pre: dict | None, source: str) -> str:
    if not pre:
        raise SpectraError(f"{source}: no pre_tokenizer; only byte-level BPE tokenizers (GPT-2 / GPT-NeoX style) can be embedded in GGUF")
    if pre.get("type") == "ByteLevel":
        if pre.get("use_regex", True):
            return "gpt-2"
        raise SpectraError(f"{source}: ByteLevel pre-tokenizer without a split regex is not supported by llama.cpp")
    if pre.get("type") == "Sequence":
        splits = [p for p in pre.get("pretokenizers", []) if p.get("type") == "Split"]
        bl = [p for p in pre.get("pretokenizers", []) if p.get("type") == "ByteLevel"]
        if len(splits) == 1 and bl:
            pat = splits[0].get("pattern", {})
            regex = pat.get("Regex") or pat.get("String")
            if regex in _KNOWN_SPLITS:
                return _KNOWN_SPLITS[regex]
            raise SpectraError(f"{source}: pre-tokenizer split regex {regex!r} is not one llama.cpp knows "
                               f"(supported: GPT-2/GPT-NeoX, Llama-3)")
        if not splits and len(bl) == 1:
            return _pre_name(bl[0], source)
    raise SpectraError(f"{source}: pre_tokenizer {pre.get('type')!r} is not supported; only byte-level BPE "
                       "tokenizers (GPT-2 / GPT-NeoX style) can be embedded in GGUF")


def load_vocab(path: str | Path, vocab_size: int) -> GGUFVocab:
    """Read ``tokenizer.json`` and lay it out as llama.cpp expects for ``vocab_size`` embedding rows."""
    import gguf

    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise SpectraError(f"{path}: cannot read tokenizer ({e})") from None
    model = d.get("model") or {}
    if model.get("type") != "BPE":
        raise SpectraError(f"{path}: tokenizer model {model.get('type')!r} is not BPE; only byte-level BPE can be embedded in GGUF")
    pre = _pre_name(d.get("pre_tokenizer"), str(path))
    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    types = {i: gguf.TokenType.NORMAL for i in by_id}
    for a in d.get("added_tokens", []):
        by_id[a["id"]] = a["content"]
        types[a["id"]] = gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED
    top = max(by_id)
    if top >= vocab_size:
        raise SpectraError(f"{path}: token id {top} does not fit the model's {vocab_size} embedding rows; "
                           "the tokenizer does not belong to this checkpoint")
    tokens, ttypes = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            ttypes.append(int(types[i]))
        else:  # padding rows (e.g. 50277 -> 50304)
            tokens.append(f"[PAD{i}]")
            ttypes.append(int(gguf.TokenType.UNUSED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return GGUFVocab(tokens, ttypes, merges, pre)


def add_vocab(writer, vocab: GGUFVocab, bos: int, eos: int) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)
    # GPT-NeoX-style training puts no BOS in front of documents (they are separated by EOS).
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
