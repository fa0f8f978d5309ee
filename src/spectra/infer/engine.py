"""Inference engines with one interface: ``reset()``, ``forward(tokens, all_logits) -> logits``, ``pos``.

* :class:`NativeBatchEngine` runs a packed TriLM entirely in the C kernel for many
  sequences at once: one call per step (all layers, per-slot KV caches, attention, head)
  over a ragged batch of rows, threads inside C. It imports no torch, so a serving
  process stays small. :class:`NativeEngine` is its one-sequence view (slot 0).
* :class:`TorchEngine` runs any spectra / HF Llama checkpoint through
  ``spectra.model.Transformer`` with its KV cache - and, via :func:`reference_model`,
  the PyTorch reference of a packed model (gamma*W_hat dequantized exactly through
  ``spectra.ternary``, embedding/head as stored).

The kernel differs from the reference only by the int8 quantization of the
activations entering ternary matrices (and the q8 head). :func:`quantize_activations`
is that quantizer in torch, bit for bit, and :func:`activation_error_bound` the
resulting worst-case error of a matmul (docs/packed-format.md, "Error bound").
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

import numpy as np

from spectra.errors import SpectraError
from spectra.infer import packing
from spectra.infer.packed_model import PackedMatrix, PackedModel, linear_names


ACTIVATIONS = {"int8": 1, "int8x2": 2}  # int8x2: int8 + int8 residual (~15-bit activations)


def act_levels(act: str) -> int:
    if act not in ACTIVATIONS:
        raise SpectraError(f"unknown activation mode '{act}'; allowed: int8 (fastest), int8x2 (int8 + residual, ~15 bits)")
    return ACTIVATIONS[act]


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def rope_tables_np(head_dim: int, max_len: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """fp32 RoPE tables in the HF rotate_half layout (same formula as spectra.model.rope_tables)."""
    inv = (np.float32(1.0) / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)))).astype(np.float32)
    t = np.arange(max_len, dtype=np.float32)
    f = np.outer(t, inv).astype(np.float32)
    emb = np.concatenate([f, f], axis=-1)
    return np.ascontiguousarray(np.cos(emb), dtype=np.float32), np.ascontiguousarray(np.sin(emb), dtype=np.float32)


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def _mat_struct(m: PackedMatrix, keep: list):
    from spectra.infer.kernels.build import Mat

    trits = m.trits if m.trits.flags.c_contiguous else np.ascontiguousarray(m.trits)
    gamma = np.ascontiguousarray(m.gamma, dtype=np.float32)
    keep += [trits, gamma]
    return Mat(_ptr(trits), _ptr(gamma), m.rows, m.k, m.kp, m.mp, 1 if m.split == "row" else 0,
               packing.FMT_ID[m.fmt], trits.shape[1])


def _model_struct(pm: PackedModel, max_len: int, keep: list):
    """The C spx_model of a packed model (pointers into its memory-mapped arrays; `keep` holds the rest alive)."""
    from spectra.infer.kernels.build import Layer, Model

    c, a = pm.cfg, pm.arrays
    layers = (Layer * c.n_layers)()
    for i in range(c.n_layers):
        L = layers[i]
        for leaf, part in (("q", "self_attn"), ("k", "self_attn"), ("v", "self_attn"), ("o", "self_attn"),
                           ("gate", "mlp"), ("up", "mlp"), ("down", "mlp")):
            setattr(L, leaf, _mat_struct(pm.matrix(f"layers.{i}.{part}.{leaf}_proj"), keep))
        L.attn_norm = _ptr(a[f"layers.{i}.input_layernorm.weight"])
        L.ffn_norm = _ptr(a[f"layers.{i}.post_attention_layernorm.weight"])
    cos, sin = rope_tables_np(c.head_dim, max_len, c.rope_theta)
    keep += [cos, sin, layers]
    m = Model(dim=c.dim, n_layers=c.n_layers, n_heads=c.n_heads, head_dim=c.head_dim, ffn=c.ffn_dim,
              vocab=c.vocab_size, norm_eps=c.norm_eps, embed=_ptr(a["embed_tokens.weight"]),
              final_norm=_ptr(a["norm.weight"]), head_kp=packing.padded_k(c.dim), layers=layers,
              rope_cos=_ptr(cos), rope_sin=_ptr(sin), rope_len=max_len)
    if pm.head == "f16":
        m.head_fmt, m.head = 0, _ptr(a["lm_head.weight"])
    else:
        m.head_fmt, m.head, m.head_scale = 1, _ptr(a["lm_head.q8"]), _ptr(a["lm_head.scale"])
    return m


def _positive(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise SpectraError(f"native engine: {name} must be a positive integer (got {v!r})")
    return int(v)


KV_DTYPES = {"f32": 0, "f16": 1}  # KV-cache element type: f32 (default, exact) or f16 (half the memory traffic)


def _check_kv_memory(cfg, max_seqs: int, max_len: int, kv: str = "f32") -> None:
    """Refuse before allocating: the K and V caches of every slot must fit in this machine's memory."""
    need = 2 * (2 if kv == "f16" else 4) * max_seqs * cfg.n_layers * cfg.n_heads * cfg.head_dim * max_len
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return
    if need > have:
        raise SpectraError(f"native engine: the KV cache of {max_seqs} slots x {max_len} positions needs "
                           f"{need / 2**30:.1f} GiB, more than this machine's {have / 2**30:.1f} GiB; lower max_seqs "
                           f"(--parallel) or max_len (--max-len)")


# C error codes of spx_step / spx_slot_* (spectra_infer.c, SPX_E*); Python checks first, so these
# only surface if the two ever disagree
_C_ERRORS = {-1: "too many rows in one step", -2: "context full", -3: "token id out of range",
             -6: "bad slot", -7: "slot listed twice in one step", -8: "bad argument"}


class NativeBatchEngine:
    """Packed TriLM on the native kernel, many sequences at once (``spectra.infer.batch.BatchEngine``).

    ``max_seqs`` slots, each a fixed KV cache of ``max_len`` positions; a :meth:`step` runs the new
    tokens of any set of slots as one ragged batch (one pass over the weights for all rows). The
    logits of an item are bitwise independent of the other items of the step and of the thread
    count (docs/packed-format.md, "Multi-sequence engine"). Weights stay memory-mapped.
    Calls are serialized by a lock (one C step at a time)."""

    backend = "native"
    batch_invariant = True

    def __init__(self, pm: PackedModel, max_seqs: int = 16, max_len: int | None = None, n_threads: int | None = None,
                 max_step_tokens: int = 512, kernel: str | None = None, act: str = "int8x2", kv: str = "f32"):
        from spectra.infer.kernels.build import check_threads, kernel_id, load_library, pool_error, resolve_kernel

        self.act = act
        levels = act_levels(act)
        self.lib = load_library()
        self.pm, self.cfg = pm, pm.cfg
        self.kernel = resolve_kernel(kernel)
        self.n_threads = check_threads(_positive("n_threads", n_threads or default_threads()))
        self.max_len = _positive("max_len", max_len or self.cfg.max_seq_len)
        self.max_seqs = _positive("max_seqs", max_seqs)
        self.max_step_tokens = _positive("max_step_tokens", max_step_tokens)
        self.vocab_size = int(self.cfg.vocab_size)
        if kv not in KV_DTYPES:
            raise SpectraError(f"unknown KV-cache type '{kv}'; allowed: f32 (exact, default), f16 (half the memory traffic)")
        self.kv = kv
        _check_kv_memory(self.cfg, self.max_seqs, self.max_len, kv)
        self._keep: list = []
        self._model = _model_struct(pm, self.max_len, self._keep)
        self._state = None
        self._state = self.lib.spx_state_new(ctypes.byref(self._model), self.max_step_tokens, self.max_len,
                                             self.max_seqs, self.n_threads, kernel_id(self.kernel), levels,
                                             KV_DTYPES[kv])
        if not self._state and pool_error(self.lib):
            raise SpectraError(f"native engine: cannot start {self.n_threads} threads: {pool_error(self.lib)}")
        if not self._state:
            raise SpectraError(f"native engine: cannot allocate the state (max_seqs={self.max_seqs}, "
                               f"max_len={self.max_len}, max_step_tokens={self.max_step_tokens}, "
                               f"threads={self.n_threads}); lower them")
        self._logits = np.empty((self.max_step_tokens, self.vocab_size), dtype=np.float32)
        self._free = list(range(self.max_seqs - 1, -1, -1))  # pop() hands out the lowest slot first
        self._used: set[int] = set()
        self._lock = threading.Lock()

    @classmethod
    def from_dir(cls, path: str | Path, max_seqs: int = 16, max_len: int | None = None, n_threads: int | None = None,
                 max_step_tokens: int = 512, kernel: str | None = None, act: str = "int8x2",
                 verify: bool = True, kv: str = "f32") -> "NativeBatchEngine":
        return cls(PackedModel.load(path, verify=verify), max_seqs=max_seqs, max_len=max_len, n_threads=n_threads,
                   max_step_tokens=max_step_tokens, kernel=kernel, act=act, kv=kv)

    # ---------------------------------------------------------------- slots
    def _check_slot(self, slot) -> int:
        if isinstance(slot, bool) or not isinstance(slot, (int, np.integer)) or not 0 <= slot < self.max_seqs:
            raise SpectraError(f"bad slot {slot!r}: slots are 0..{self.max_seqs - 1}")
        if int(slot) not in self._used:
            raise SpectraError(f"slot {slot} is not in use (acquire() it first)")
        return int(slot)

    def _c(self, rc: int, what: str) -> int:
        if rc < 0:
            raise SpectraError(f"native {what} failed: {_C_ERRORS.get(rc, 'error')} (code {rc})")
        return rc

    def acquire(self) -> int:
        """A free slot, emptied (length 0). Raises SpectraError when every slot is in use."""
        with self._lock:
            self._alive()
            if not self._free:
                raise SpectraError(f"all {self.max_seqs} sequence slots are in use; release one or raise max_seqs")
            slot = self._free.pop()
            self._c(self.lib.spx_slot_set_len(self._state, slot, 0), "acquire")
            self._used.add(slot)
            return slot

    def release(self, slot: int) -> None:
        """Give a slot back (its cache is dropped and its memory returned to the OS)."""
        with self._lock:
            self._alive()
            slot = self._check_slot(slot)
            self._c(self.lib.spx_slot_release(self._state, slot), "release")
            self._used.discard(slot)
            self._free.append(slot)
            self._free.sort(reverse=True)

    def length(self, slot: int) -> int:
        """Tokens already in the slot's cache."""
        self._alive()
        return self._c(self.lib.spx_slot_len(self._state, self._check_slot(slot)), "length")

    def truncate(self, slot: int, n: int) -> None:
        """Rewind a slot's cache to its first ``n`` tokens (0 <= n <= length): shared-prefix reuse."""
        with self._lock:
            self._alive()
            slot = self._check_slot(slot)
            cur = self.lib.spx_slot_len(self._state, slot)
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 <= n <= cur:
                raise SpectraError(f"truncate: n={n!r} must be within 0..{cur} (the slot's length)")
            self._c(self.lib.spx_slot_set_len(self._state, slot, int(n)), "truncate")

    @property
    def active(self) -> int:
        """Slots in use."""
        return len(self._used)

    # ---------------------------------------------------------------- steps
    def _validate(self, items) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not items:
            raise SpectraError("step needs at least one (slot, tokens) item")
        n = len(items)
        slots, counts, parts, seen = np.empty(n, np.int32), np.empty(n, np.int32), [], set()
        for i, (slot, toks) in enumerate(items):
            slot = self._check_slot(slot)
            if slot in seen:
                raise SpectraError(f"slot {slot} appears twice in one step")
            seen.add(slot)
            t = np.asarray(toks).reshape(-1)
            if t.size == 0:
                raise SpectraError(f"slot {slot}: an item needs at least one token")
            if t.dtype.kind not in "iu":
                raise SpectraError(f"slot {slot}: token ids must be integers (got {t.dtype})")
            if t.min() < 0 or t.max() >= self.vocab_size:
                raise SpectraError(f"slot {slot}: token id out of range [0, {self.vocab_size})")
            cur = self.lib.spx_slot_len(self._state, slot)
            if cur + t.size > self.max_len:
                raise SpectraError(f"slot {slot}: context full: {cur} + {t.size} tokens exceed max_len={self.max_len}")
            slots[i], counts[i] = slot, t.size
            parts.append(t)
        total = int(counts.sum())
        if total > self.max_step_tokens:
            raise SpectraError(f"step of {total} tokens exceeds max_step_tokens={self.max_step_tokens}; split the prompt into chunks")
        return slots, counts, np.ascontiguousarray(np.concatenate(parts), dtype=np.int32)

    def step(self, items, all_logits: bool = False) -> np.ndarray:
        """Run every (slot, tokens) item as one batch: fp32 logits [len(items), vocab] of each item's
        last token (or [total tokens, vocab] of every token, item after item, with ``all_logits``).
        Raises SpectraError with nothing changed on a bad slot, token id, row count or a full context."""
        with self._lock:
            self._alive()
            slots, counts, toks = self._validate(items)
            rc = self.lib.spx_step(self._state, slots.size, _ptr(slots), _ptr(counts), _ptr(toks),
                                   _ptr(self._logits), int(bool(all_logits)))
            self._c(rc, "step")
            return self._logits[: toks.size if all_logits else slots.size].copy()

    # ---------------------------------------------------------------- lifetime
    def _alive(self) -> None:
        if not self._state:
            raise SpectraError("native engine is closed")

    def close(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is None:
            return self._free_state()
        with lock:
            self._free_state()

    def _free_state(self) -> None:
        if getattr(self, "_state", None):
            self.lib.spx_state_free(self._state)
            self._state = None

    def __del__(self):
        self._free_state()

    def describe(self) -> str:
        return (f"native ({self.kernel}, {self.n_threads} threads, {self.pm.fmt}, head {self.pm.head}, act {self.act}, "
                f"{self.max_seqs} slots x {self.max_len}, kv {self.kv})")


class NativeEngine:
    """One sequence on the native kernel: slot 0 of a one-slot :class:`NativeBatchEngine`
    (the same C step; weights stay memory-mapped, nothing is copied)."""

    backend = "native"

    def __init__(self, pm: PackedModel, max_len: int | None = None, n_threads: int | None = None,
                 kernel: str | None = None, max_batch: int = 128, act: str = "int8x2", kv: str = "f32"):
        self.batch = NativeBatchEngine(pm, max_seqs=1, max_len=max_len, n_threads=n_threads,
                                       max_step_tokens=max_batch, kernel=kernel, act=act, kv=kv)
        b = self.batch
        self.act, self.lib, self.pm, self.cfg, self.kernel = b.act, b.lib, b.pm, b.cfg, b.kernel
        self.n_threads, self.max_len, self.max_batch = b.n_threads, b.max_len, b.max_step_tokens
        self.slot = b.acquire()

    @property
    def pos(self) -> int:
        return self.batch.length(self.slot)

    def reset(self) -> None:
        self.batch.truncate(self.slot, 0)

    def set_pos(self, n: int) -> None:
        """Rewind the KV cache to its first n tokens (0 <= n <= pos): reuse of a shared prefix."""
        self.batch.truncate(self.slot, n)

    truncate = set_pos

    def forward(self, tokens, all_logits: bool = False) -> np.ndarray:
        """Feed tokens (prefill in chunks of max_batch); logits [vocab] of the last, or [n, vocab] for all."""
        toks = np.asarray(tokens).reshape(-1)
        if toks.size == 0:
            raise SpectraError("forward needs at least one token")
        if self.pos + toks.size > self.max_len:
            raise SpectraError(f"context full: {self.pos} + {toks.size} tokens exceed max_len={self.max_len}")
        if toks.dtype.kind not in "iu" or toks.min() < 0 or toks.max() >= self.cfg.vocab_size:
            raise SpectraError(f"token id out of range [0, {self.cfg.vocab_size})")
        outs = []
        for s in range(0, toks.size, self.max_batch):
            out = self.batch.step([(self.slot, toks[s: s + self.max_batch])], all_logits=all_logits)
            if all_logits:
                outs.append(out)
        return np.concatenate(outs) if all_logits else out[0]

    def close(self) -> None:
        self.batch.close()

    def describe(self) -> str:
        return f"native ({self.kernel}, {self.n_threads} threads, {self.pm.fmt}, head {self.pm.head}, act {self.act})"


class TorchEngine:
    """Any spectra Transformer (fp32 CPU by default) with a KV cache."""

    backend = "torch"

    def __init__(self, model, max_len: int | None = None, n_threads: int | None = None):
        import torch

        self.torch, self.model, self.cfg = torch, model.eval(), model.cfg
        if n_threads:
            torch.set_num_threads(n_threads)
        self.n_threads = torch.get_num_threads()
        self.max_len = int(max_len or self.cfg.max_seq_len)
        self.max_batch = 1 << 30
        self.reset()

    @property
    def pos(self) -> int:
        return self.cache.pos

    def reset(self) -> None:
        from spectra.model import KVCache

        p = next(self.model.parameters())
        self.cache = KVCache.empty(self.cfg, 1, self.max_len, dtype=p.dtype, device=p.device)

    def forward(self, tokens, all_logits: bool = False) -> np.ndarray:
        torch = self.torch
        toks = list(np.asarray(tokens).reshape(-1))
        if not toks:
            raise SpectraError("forward needs at least one token")
        if self.pos + len(toks) > self.max_len:
            raise SpectraError(f"context full: {self.pos} + {len(toks)} tokens exceed max_len={self.max_len}")
        from spectra.validate import check_token_ids

        toks = check_token_ids(toks, self.cfg.vocab_size)  # an id past the embedding is an IndexError in torch
        with torch.inference_mode():
            idx = torch.tensor([toks], dtype=torch.long)
            if all_logits:
                return self.model(idx, self.cache)[0].float().numpy()
            h = self.model.hidden(idx, self.cache)[:, -1:]
            return self.model.lm_head(h)[0, -1].float().numpy()

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return f"torch ({next(self.model.parameters()).dtype}, {self.n_threads} threads)"


def reference_model(pm: PackedModel):
    """The PyTorch reference of a packed model: a Transformer holding exactly what the file stores."""
    from spectra.store.modeldir import build_model

    return build_model(pm.cfg, pm.state_dict(), source=str(pm.path))


def load_engine(path: str | Path, backend: str = "auto", *, max_len: int | None = None,
                n_threads: int | None = None, kernel: str | None = None, max_batch: int = 128, verify: bool = True,
                act: str = "int8x2"):
    """An engine for a packed directory (native, or its torch reference) or any checkpoint (torch):
    :func:`spectra.infer.backends.open_engine` (the backend table decides and falls back)."""
    from spectra.infer.backends import open_engine

    return open_engine(path, backend, verify=verify, max_len=max_len, n_threads=n_threads, kernel=kernel,
                       max_batch=max_batch, act=act)


# ------------------------------------------------------------------ kernel reference math (torch)
def _quant1(x, k: int, nseg: int, kp: int):
    import torch

    T = x.shape[0]
    seg, segp = k // nseg, kp // nseg
    xp = torch.zeros(T, nseg, segp)
    xp[:, :, :seg] = x.reshape(T, nseg, seg)
    b = xp.reshape(T, kp // packing.BLOCK, packing.BLOCK)
    d = b.abs().amax(dim=-1) / 127.0
    inv = torch.where(d > 0, 1.0 / torch.where(d > 0, d, torch.ones_like(d)), torch.zeros_like(d))
    q = torch.round(b * inv[..., None]).to(torch.int8)
    return q.reshape(T, kp), d, q.to(torch.int32).sum(-1)


def _dequant1(q, d, k: int, nseg: int, kp: int, dtype):
    T = q.shape[0]
    xh = (q.to(dtype).reshape(T, -1, packing.BLOCK) * d.to(dtype)[..., None]).reshape(T, nseg, kp // nseg)
    return xh[:, :, : k // nseg].reshape(T, k)


def quantize_activations(x, k: int, nseg: int, kp: int, levels: int = 1):
    """Torch twin of the kernel's quant_act, bit for bit: x [T, k] -> list of ``levels`` (q int8 [T, kp], d fp32 [T, nb], isum int32 [T, nb]).

    Per 256-block of each (padded) segment: d = absmax/127, q = round_half_even(x * (1/d)).
    Level 2 quantizes the fp32 residual x - d*q the same way."""
    import torch

    x = x.float()
    out = [_quant1(x, k, nseg, kp)]
    if levels == 2:
        q, d, _ = out[0]
        r = x - _dequant1(q, d, k, nseg, kp, torch.float32)
        out.append(_quant1(r, k, nseg, kp))
    return out


def dequantized_activations(x, k: int, nseg: int, kp: int, levels: int = 1):
    """x as the kernel sees it after quantization: [T, k] fp64."""
    import torch

    return sum(_dequant1(q, d, k, nseg, kp, torch.float64) for q, d, _ in quantize_activations(x, k, nseg, kp, levels))


def reference_matmul(x, m: PackedMatrix, levels: int = 1):
    """What the kernel computes for x [T, k] @ (gamma W_hat)^T, evaluated in fp64 (its exact value)."""
    nseg = packing.segments(m.k, m.mp, m.split)
    return dequantized_activations(x, m.k, nseg, m.kp, levels) @ m.dequantize().double().T


def activation_error_bound(x, m: PackedMatrix, levels: int = 1):
    """Worst-case |kernel - x @ W^T| per output: sum_k |W_rk| * d_b(k) / 2, d of the last level
    (rounding to the int8 grid; the fp32 accumulation adds ~1e-6 relative on top)."""
    import torch

    nseg = packing.segments(m.k, m.mp, m.split)
    _, d, _ = quantize_activations(x, m.k, nseg, m.kp, levels)[-1]
    T = d.shape[0]
    half = (d.double() / 2)[..., None].expand(T, d.shape[1], packing.BLOCK).reshape(T, nseg, m.kp // nseg)
    half = half[:, :, : m.k // nseg].reshape(T, m.k)
    return half @ m.dequantize().double().abs().T + torch.zeros(())


def native_matmul(x: np.ndarray, m: PackedMatrix, kernel: str | None = None, n_threads: int | None = None,
                  levels: int = 1) -> np.ndarray:
    """One kernel matmul x [T, k] -> [T, rows] (tests and benchmarks)."""
    from spectra.infer.kernels.build import check_threads, kernel_id, load_library, pool_error, resolve_kernel

    lib = load_library()
    n_threads = check_threads(n_threads or default_threads())
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty((x.shape[0], m.rows), dtype=np.float32)
    keep: list = []
    st = _mat_struct(m, keep)
    rc = lib.spx_matmul(ctypes.byref(st), _ptr(x), x.shape[0], _ptr(out), n_threads,
                        kernel_id(resolve_kernel(kernel)), levels)
    if rc:
        raise SpectraError(f"native matmul failed (code {rc}{': ' + pool_error(lib) if pool_error(lib) else ''})")
    return out


def matrix_from_ternary(q: np.ndarray, gamma: np.ndarray, split: str, fmt: str, name: str = "m") -> PackedMatrix:
    """A PackedMatrix built in memory (tests, benchmarks)."""
    mp = int(np.asarray(gamma).size)
    trits = packing.pack_ternary(np.asarray(q, dtype=np.int8), mp, split, fmt)
    return PackedMatrix(name, trits, np.asarray(gamma, dtype=np.float32).reshape(mp), q.shape[0], q.shape[1], mp, split, fmt)


__all__ = ["NativeBatchEngine", "NativeEngine", "TorchEngine", "reference_model", "load_engine", "quantize_activations",
           "reference_matmul", "activation_error_bound", "native_matmul", "matrix_from_ternary", "linear_names"]
