"""The PyTorch multi-sequence engine: any checkpoint behind the :class:`~spectra.infer.batch.BatchEngine` contract.

One step runs the new tokens of every item as one ragged batch: the rows of all
items are concatenated (no padding) and go through every linear layer and the MLP
as one matrix product; RoPE takes each row's own position; attention runs per item
against that item's slot cache. Only the last row of each item reaches the head.

Slots hold per-layer K/V tensors ``[heads, capacity, head_dim]`` that grow by
doubling up to ``max_len``, so memory follows what the active sequences use rather
than ``max_seqs x max_len``.

Batch invariance depends on the BLAS: an fp32 GEMM may choose a different blocking
(or a GEMV kernel) for a different number of rows, which changes the summation
order. :func:`probe_batch_invariance` measures it on this machine for this model's
shapes when the engine is built; ``batch_invariant`` reports the result
(docs/serving.md, "Batch invariance").
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from spectra.errors import SpectraError
from spectra.model import Transformer

_MIN_CAPACITY = 64


def load_torch_model(path: str | Path) -> tuple[Transformer, int | None]:
    """(model, eos id) of any loadable directory (spectra.store): a packed TriLM as its exact torch reference,
    a QuantLM dequantized, any spectra / HF Llama checkpoint."""
    from spectra.store import load

    meta = load(path, "meta")  # packed.json or config.json, checked
    eos = meta.get("eos_token_id") if isinstance(meta, dict) else None
    eos = eos[0] if isinstance(eos, list) and eos else eos
    return load(path, "model").eval(), (eos if isinstance(eos, int) and not isinstance(eos, bool) else None)


class TorchBatchEngine:
    """Ragged batched steps over a :class:`~spectra.model.Transformer` with per-slot KV caches."""

    backend = "torch"

    def __init__(self, model: Transformer, *, max_seqs: int = 16, max_len: int | None = None,
                 n_threads: int | None = None, max_step_tokens: int = 512, probe: bool = True):
        if max_seqs < 1 or max_step_tokens < 1:
            raise SpectraError(f"max_seqs ({max_seqs}) and max_step_tokens ({max_step_tokens}) must be >= 1")
        if n_threads:
            torch.set_num_threads(int(n_threads))
        self.model, self.cfg = model.eval(), model.cfg
        self.n_threads = torch.get_num_threads()
        self.max_len = int(max_len or self.cfg.max_seq_len)
        if self.max_len < 1:
            raise SpectraError(f"max_len must be >= 1, got {self.max_len}")
        self.max_seqs, self.max_step_tokens = int(max_seqs), int(max_step_tokens)
        self.vocab_size = self.cfg.vocab_size
        p = next(model.parameters())
        self.dtype, self.device = p.dtype, p.device
        self._k: list[list[torch.Tensor] | None] = [None] * self.max_seqs
        self._v: list[list[torch.Tensor] | None] = [None] * self.max_seqs
        self._len = [0] * self.max_seqs
        self._used = [False] * self.max_seqs
        self.eos_token_id: int | None = None
        self.batch_invariant = probe_batch_invariance(self) if probe else False

    @classmethod
    def from_path(cls, path: str | Path, max_seqs: int = 16, max_len: int | None = None, n_threads: int | None = None,
                  max_step_tokens: int = 512) -> "TorchBatchEngine":
        if n_threads:
            torch.set_num_threads(int(n_threads))  # before loading: the load itself runs torch ops
        model, eos = load_torch_model(path)
        eng = cls(model, max_seqs=max_seqs, max_len=max_len, n_threads=n_threads, max_step_tokens=max_step_tokens)
        eng.eos_token_id = eos
        return eng

    # ------------------------------------------------------------------ slots
    def acquire(self) -> int:
        for s, used in enumerate(self._used):
            if not used:
                self._used[s], self._len[s] = True, 0
                return s
        raise SpectraError(f"all {self.max_seqs} sequence slots are in use")

    def release(self, slot: int) -> None:
        self._check_slot(slot)
        self._used[slot], self._len[slot] = False, 0
        self._k[slot] = self._v[slot] = None  # memory goes back; the next user starts small

    def length(self, slot: int) -> int:
        self._check_slot(slot)
        return self._len[slot]

    @property
    def active(self) -> int:
        """Slots in use."""
        return sum(self._used)

    def _check_slot(self, slot: int) -> None:
        if not (isinstance(slot, (int, np.integer)) and 0 <= slot < self.max_seqs and self._used[slot]):
            raise SpectraError(f"slot {slot} is not an acquired slot (0..{self.max_seqs - 1})")

    def _reserve(self, slot: int, need: int) -> None:
        """Grow the slot's K/V to hold ``need`` positions (doubling, capped at max_len)."""
        cur = self._k[slot]
        cap = cur[0].shape[1] if cur else 0
        if need <= cap:
            return
        new = min(self.max_len, max(_MIN_CAPACITY, 2 * cap, need))
        shape = (self.cfg.n_heads, new, self.cfg.head_dim)
        for store in (self._k, self._v):
            old = store[slot]
            fresh = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.cfg.n_layers)]
            if old:
                n = self._len[slot]
                for f, o in zip(fresh, old):
                    f[:, :n] = o[:, :n]
            store[slot] = fresh

    # ------------------------------------------------------------------ step
    def _validate(self, items) -> list[tuple[int, list[int]]]:
        out, seen, rows = [], set(), 0
        if not items:
            raise SpectraError("step needs at least one (slot, tokens) item")
        for slot, toks in items:
            self._check_slot(slot)
            if slot in seen:
                raise SpectraError(f"slot {slot} appears twice in one step")
            seen.add(slot)
            toks = [int(t) for t in toks]
            if not toks:
                raise SpectraError(f"slot {slot}: an item needs at least one token")
            bad = [t for t in toks if not 0 <= t < self.vocab_size]
            if bad:
                raise SpectraError(f"slot {slot}: token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
            if self._len[slot] + len(toks) > self.max_len:
                raise SpectraError(f"slot {slot}: context full ({self._len[slot]} + {len(toks)} > max_len {self.max_len})")
            rows += len(toks)
            out.append((int(slot), toks))
        if rows > self.max_step_tokens:
            raise SpectraError(f"step carries {rows} tokens; max_step_tokens is {self.max_step_tokens}")
        return out

    def step(self, items: Sequence[tuple[int, Sequence[int]]]) -> np.ndarray:
        items = self._validate(items)
        for slot, toks in items:
            self._reserve(slot, self._len[slot] + len(toks))
        with torch.inference_mode():
            logits = self._forward(items)
        for slot, toks in items:
            self._len[slot] += len(toks)
        return logits

    def _forward(self, items: list[tuple[int, list[int]]]) -> np.ndarray:
        m = self.model
        spans, pos, o = [], [], 0
        for slot, toks in items:
            p = self._len[slot]
            spans.append((slot, o, len(toks), p))
            pos.extend(range(p, p + len(toks)))
            o += len(toks)
        idx = torch.tensor([t for _, toks in items for t in toks], dtype=torch.long, device=self.device)
        pos_t = torch.tensor([pos], dtype=torch.long, device=self.device)
        cos, sin = m.rope_at(pos_t)  # [1, 1, N, D]: each row its own position
        x = m.embed_tokens(idx)[None]  # [1, N, dim]: all rows of the step as one sequence for the matmuls
        for li, layer in enumerate(m.layers):
            a = layer.self_attn
            q, k, v = (z[0] for z in a.qkv(layer.input_layernorm(x), cos, sin))  # [H, N, D]
            att = torch.empty_like(q)
            for slot, off, t, p in spans:
                ck, cv = self._k[slot][li], self._v[slot][li]
                ck[:, p : p + t] = k[:, off : off + t]
                cv[:, p : p + t] = v[:, off : off + t]
                att[:, off : off + t] = _attend(q[:, off : off + t], ck[:, : p + t], cv[:, : p + t], p, t)
            x = x + a.out(att[None])
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        x = x[0]
        last = torch.tensor([off + t - 1 for _, off, t, _ in spans], dtype=torch.long, device=self.device)
        return m.lm_head(m.norm(x[last])).float().cpu().numpy()

    def close(self) -> None:
        self._k = [None] * self.max_seqs
        self._v = [None] * self.max_seqs

    def describe(self) -> str:
        inv = "batch-invariant" if self.batch_invariant else "not batch-invariant"
        return f"torch ({self.dtype}, {self.n_threads} threads, {inv})"


def _attend(q, k, v, p: int, t: int):
    """Causal attention of t new rows at positions p..p+t-1 over the slot's p+t cached keys (as spectra.model)."""
    if t == 1:
        return F.scaled_dot_product_attention(q, k, v)
    if p == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    mask = torch.ones(t, p + t, dtype=torch.bool, device=q.device).tril(diagonal=p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def probe_batch_invariance(eng: TorchBatchEngine, rows: Sequence[int] = (1, 3, 16)) -> bool:
    """Whether this engine's linear layers give each row the same bits whatever the number of rows.

    Runs the model's matrices (every distinct shape: q/k/v/o, gate/up, down, head) on a
    fixed random input with 1 row and with the same row among ``rows`` others, and
    compares bit for bit. Attention, norms and RoPE are per row or per item already.
    """
    g = torch.Generator().manual_seed(0)
    m = eng.model
    mats = [m.layers[0].self_attn.q_proj, m.layers[0].mlp.gate_proj, m.layers[0].mlp.down_proj, m.lm_head]
    rows = sorted({r for r in rows if r <= eng.max_step_tokens} | {1, min(eng.max_step_tokens, 64)})
    with torch.inference_mode():
        for lin in mats:
            k = lin.weight.shape[1]
            x = torch.randn(max(rows), k, generator=g).to(eng.dtype)
            ref = lin(x[:1])
            for r in rows:
                if not torch.equal(lin(x[:r])[:1], ref):
                    return False
    return True


__all__ = ["TorchBatchEngine", "load_torch_model", "probe_batch_invariance"]
