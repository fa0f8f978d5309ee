"""Perplexity of raw text (sliding window) and validation loss on token shards.

Sliding window (the Hugging Face "perplexity of fixed-length models" recipe, with
lm-eval's convention for the first token): the text is tokenized once, the prefix
token (BOS/EOS) is put in front, and every token is predicted exactly once. Targets
advance ``stride`` tokens at a time; each chunk is scored with as much preceding
context as fits in ``seq_len`` input tokens. ``stride == seq_len`` is lm-eval's
``loglikelihood_rolling`` (disjoint windows, cheapest); a smaller stride gives every
token more context (lower perplexity, ``seq_len / stride`` times the compute).

Reported per file: tokens, UTF-8 bytes, total NLL (nats), NLL per token, perplexity
``exp(NLL / tokens)`` and bits per byte ``NLL / (ln 2 * bytes)`` (tokenizer-independent).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from tqdm import tqdm

from spectra.errors import SpectraError
from spectra.eval import scoring


def window_requests(ids: list[int], prefix_token: int, seq_len: int, stride: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) token pairs covering ``ids`` once each (see module doc)."""
    if stride < 1 or stride > seq_len:
        raise SpectraError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    t = [prefix_token] + list(ids)
    reqs, a = [], 1
    while a < len(t):
        b = min(a + stride, len(t))
        c = max(0, b - 1 - seq_len)
        reqs.append((t[c:a], t[a:b]))
        a = b
    return reqs


def _loaded(ckpt_or_model, tokenizer):
    from spectra.eval.loading import Loaded, load_for_eval

    if isinstance(ckpt_or_model, Loaded):
        return ckpt_or_model
    return load_for_eval(ckpt_or_model, tokenizer=tokenizer)


def perplexity(ckpt_or_model, files, seq_len: int | None = None, stride: int | None = None, *, tokenizer=None,
               batch_size: int = 8, max_tokens: int | None = None, progress: bool = True) -> dict:
    """{file: {tokens, bytes, nll, nll_per_token, ppl, bits_per_byte, seq_len, stride}} for raw text files."""
    for name, v in (("seq_len", seq_len), ("stride", stride), ("max_tokens", max_tokens)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise SpectraError(f"perplexity {name} must be a positive integer or None (= default), got {v!r}")
    ld = _loaded(ckpt_or_model, tokenizer)
    seq_len = ld.max_length if seq_len is None else seq_len
    if seq_len > ld.max_length:
        raise SpectraError(f"seq_len {seq_len} exceeds the model's context length {ld.max_length}")
    stride = seq_len if stride is None else stride
    prefix = ld.bos_token_id if ld.bos_token_id is not None else ld.eos_token_id
    out = {}
    for f in [files] if isinstance(files, (str, Path)) else files:
        p = Path(f)
        if not p.is_file():
            raise SpectraError(f"--ppl file '{p}' not found (expected a UTF-8 text file)")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise SpectraError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        ids = ld.tokenizer.encode(text, add_special_tokens=False)
        if max_tokens is not None:
            ids = ids[:max_tokens]
            text = ld.tokenizer.decode(ids)  # bytes of what was scored, for bits/byte
        if not ids:
            raise SpectraError(f"{p}: no tokens (empty text)")
        reqs = window_requests(ids, int(prefix), seq_len, stride)
        bar = tqdm(total=len(reqs), desc=f"ppl {p.name}", unit="win", disable=not progress)
        res = scoring.score(ld.model, reqs, max_length=seq_len, batch_size=batch_size,
                           max_batch_tokens=max(seq_len * batch_size, seq_len), pbar=bar)
        bar.close()
        nll = -sum(ll for ll, _ in res)
        nbytes = len(text.encode("utf-8"))
        out[str(f)] = {"tokens": len(ids), "bytes": nbytes, "nll": nll, "nll_per_token": nll / len(ids),
                       "ppl": math.exp(nll / len(ids)), "bits_per_byte": nll / (math.log(2) * nbytes),
                       "seq_len": seq_len, "stride": stride}
    return out


def _token_array(f: Path) -> np.ndarray:
    """A 1-D integer token array from ``f`` (memory-mapped; never unpickled)."""
    try:
        a = np.load(f, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:  # object arrays, bad headers, truncated files
        why = str(e).split(".")[0][:120]  # numpy's first sentence (not its advice to unpickle)
        raise SpectraError(f"{f}: not a plain .npy token array ({why}); spectra never loads pickled data") from None
    if not isinstance(a, np.ndarray) or a.ndim != 1 or a.dtype.kind not in "iu":
        raise SpectraError(f"{f}: expected a 1-D integer token array, got {getattr(a, 'dtype', type(a))} "
                           f"with shape {getattr(a, 'shape', '?')}")
    return a


def _windows(data_dir, seq_len: int, max_windows: int | None, split: str) -> tuple[list[list[int]], dict]:
    """Disjoint (seq_len + 1)-token windows, in order, and what identifies the data.

    A data directory of ``spectra data`` (with its manifest) is read through
    :class:`spectra.data.TokenDataset` (its ``split``, validation by default); a
    bare directory of ``*.npy`` token arrays also works.
    """
    d = Path(data_dir)
    if not d.is_dir():
        raise SpectraError(f"validation data '{d}' is not a directory of token shards")
    if any(d.glob("*.npy")) and not (d / "manifest.json").exists():
        wins = []
        for f in sorted(d.glob("*.npy")):
            a = _token_array(f)
            for w in range((len(a) - 1) // seq_len):
                wins.append(np.asarray(a[w * seq_len:(w + 1) * seq_len + 1]).astype(np.int64).tolist())
                if max_windows and len(wins) >= max_windows:
                    return wins, {"dir": str(d.resolve()), "format": "npy"}
        return wins, {"dir": str(d.resolve()), "format": "npy"}
    from spectra.data import TokenDataset

    ds = TokenDataset(d, split=split)
    wins = []
    for x, y in ds.eval_windows(seq_len, max_windows, batch_size=16):
        for xi, yi in zip(x.tolist(), y.tolist()):
            wins.append(xi[:1] + yi)
    return wins, {"dir": str(d.resolve()), "split": split, "fingerprint": ds.fingerprint, "tokens": ds.num_tokens}


def validation_loss(model, data_dir, seq_len: int = 512, max_windows: int | None = 64, *, split: str = "validation",
                    batch_size: int = 8, progress: bool = True, info: dict | None = None) -> float:
    """Mean next-token cross-entropy (nats) over the first ``max_windows`` disjoint windows.

    Each window has ``seq_len + 1`` tokens (``seq_len`` predictions), in order, exactly
    as :meth:`spectra.data.TokenDataset.eval_windows` defines them (the trainer's eval).
    ``info``, if given, receives the data identity (dir, split, fingerprint, windows).
    """
    m = getattr(model, "model", model)  # a Loaded or a bare Transformer
    ctx = getattr(getattr(m, "cfg", None), "max_seq_len", None)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1 or (ctx and seq_len > ctx):
        raise SpectraError(f"validation seq_len (--val-seq-len) must be in [1, {ctx or 'the context'}] "
                           f"(the model's context length), got {seq_len!r}")
    wins, ident = _windows(data_dir, seq_len, max_windows, split)
    if not wins:
        raise SpectraError(f"'{data_dir}': fewer than {seq_len + 1} tokens; nothing to score")
    vocab = m.lm_head.weight.shape[0] if hasattr(m, "lm_head") else None
    if vocab is not None and (max(max(w) for w in wins) >= vocab or min(min(w) for w in wins) < 0):
        raise SpectraError(f"'{data_dir}': token ids outside the model vocabulary [0, {vocab}); wrong tokenizer/shards?")
    reqs = [(w[:1], w[1:]) for w in wins]
    bar = tqdm(total=len(reqs), desc="val loss", unit="win", disable=not progress)
    res = scoring.score(m, reqs, max_length=seq_len, batch_size=batch_size, max_batch_tokens=seq_len * batch_size, pbar=bar)
    bar.close()
    if info is not None:
        info.update(ident, windows=len(reqs), seq_len=seq_len)
    return -sum(ll for ll, _ in res) / (len(reqs) * seq_len)
