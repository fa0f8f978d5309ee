"""The multi-sequence engine interface: what ``spectra.serve`` schedules over.

One engine holds ``max_seqs`` sequence slots, each with its own KV cache of up to
``max_len`` positions. A *step* takes, for any subset of slots, the next tokens of
that slot (a chunk of a prompt, or one decode token), runs them all as one batch
(every ternary matrix and the head see all rows at once) and returns the logits of
the last token of each item. Attention of an item sees only its own slot.

Batch invariance: the logits of an item depend only on its own slot's history and
tokens, never on the other items of the step (per-row activation scales, a fixed
reduction order). The native engine guarantees it bit for bit; the PyTorch engine
says in ``batch_invariant`` whether its kernels do.

Backends (the table in :mod:`spectra.infer.backends`):
* native  - packed TriLM directories, the C kernel (``spectra.infer.engine``);
* torch   - any spectra / HF Llama / QuantLM checkpoint (``spectra.infer.torch_batch``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np


@runtime_checkable
class BatchEngine(Protocol):
    backend: str            # "native" | "torch"
    vocab_size: int
    max_len: int            # positions per slot (prompt + generated)
    max_seqs: int           # slots
    max_step_tokens: int    # rows one step may carry (sum of all items' tokens)
    batch_invariant: bool   # True when an item's logits never depend on the other items

    def acquire(self) -> int:
        """A free slot, emptied (length 0). Raises SpectraError when every slot is in use."""

    def release(self, slot: int) -> None:
        """Give a slot back (its cache is dropped)."""

    def length(self, slot: int) -> int:
        """Tokens already in the slot's cache."""

    def step(self, items: Sequence[tuple[int, Sequence[int]]]) -> np.ndarray:
        """Run every (slot, tokens) item as one batch; fp32 logits [len(items), vocab] of each item's last token.

        Each slot appears at most once; tokens are appended to the slot's cache. Raises SpectraError
        (nothing changed) for a bad slot, an out-of-range token id, too many rows or a full context."""

    def close(self) -> None:
        """Free native memory and threads."""

    def describe(self) -> str:
        """One line: backend, kernel, threads."""


def load_batch_engine(path: str | Path, backend: str = "auto", *, max_seqs: int = 16, max_len: int | None = None,
                      n_threads: int | None = None, max_step_tokens: int = 512, **kw) -> BatchEngine:
    """A batch engine for a packed TriLM directory (native, or torch with backend='torch') or any checkpoint (torch):
    :func:`spectra.infer.backends.open_batch_engine` (the backend table decides and falls back)."""
    from spectra.infer.backends import open_batch_engine

    return open_batch_engine(path, backend, max_seqs=max_seqs, max_len=max_len, n_threads=n_threads,
                             max_step_tokens=max_step_tokens, **kw)


__all__ = ["BatchEngine", "load_batch_engine"]
