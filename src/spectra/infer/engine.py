"""Inference engines with one interface: ``reset()``, ``forward(tokens, all_logits) -> logits``, ``pos``.

* :class:`NativeEngine` runs a packed TriLM entirely in the C kernel: one call per
  forward step (all layers, KV cache, attention, head), threads inside C. It imports
  no torch, so a serving process stays small.
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
import warnings
from pathlib import Path

import numpy as np

from spectra.errors import SpectraError
from spectra.infer import packing
from spectra.infer.packed_model import PackedMatrix, PackedModel, is_packed_dir, linear_names


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


class NativeEngine:
    """Packed TriLM on the native kernel (weights stay memory-mapped; nothing is copied)."""

    backend = "native"

    def __init__(self, pm: PackedModel, max_len: int | None = None, n_threads: int | None = None,
                 kernel: str | None = None, max_batch: int = 128, act: str = "int8x2"):
        from spectra.infer.kernels.build import Layer, Model, kernel_id, load_library, resolve_kernel

        self.act = act
        levels = act_levels(act)
        self.lib = load_library()
        self.pm, self.cfg = pm, pm.cfg
        self.kernel = resolve_kernel(kernel)
        self.n_threads = n_threads or default_threads()
        self.max_len = int(max_len or self.cfg.max_seq_len)
        self.max_batch = int(max_batch)
        if self.max_len < 1 or self.max_batch < 1:
            raise SpectraError("max_len and max_batch must be positive")
        c, a, keep = self.cfg, pm.arrays, []
        layers = (Layer * c.n_layers)()
        for i in range(c.n_layers):
            L = layers[i]
            for leaf, part in (("q", "self_attn"), ("k", "self_attn"), ("v", "self_attn"), ("o", "self_attn"),
                               ("gate", "mlp"), ("up", "mlp"), ("down", "mlp")):
                setattr(L, leaf, _mat_struct(pm.matrix(f"layers.{i}.{part}.{leaf}_proj"), keep))
            L.attn_norm = _ptr(a[f"layers.{i}.input_layernorm.weight"])
            L.ffn_norm = _ptr(a[f"layers.{i}.post_attention_layernorm.weight"])
        cos, sin = rope_tables_np(c.head_dim, self.max_len, c.rope_theta)
        keep += [cos, sin, layers]
        m = Model(dim=c.dim, n_layers=c.n_layers, n_heads=c.n_heads, head_dim=c.head_dim, ffn=c.ffn_dim,
                  vocab=c.vocab_size, norm_eps=c.norm_eps, embed=_ptr(a["embed_tokens.weight"]),
                  final_norm=_ptr(a["norm.weight"]), head_kp=packing.padded_k(c.dim), layers=layers,
                  rope_cos=_ptr(cos), rope_sin=_ptr(sin), rope_len=self.max_len)
        if pm.head == "f16":
            m.head_fmt, m.head = 0, _ptr(a["lm_head.weight"])
        else:
            m.head_fmt, m.head, m.head_scale = 1, _ptr(a["lm_head.q8"]), _ptr(a["lm_head.scale"])
        self._model, self._keep = m, keep
        self._state = self.lib.spx_state_new(ctypes.byref(m), self.max_batch, self.max_len, self.n_threads,
                                             kernel_id(self.kernel), levels)
        if not self._state:
            raise SpectraError(f"native engine: cannot allocate state (max_len={self.max_len}, batch={self.max_batch})")
        self._logits = np.empty((self.max_batch, c.vocab_size), dtype=np.float32)

    @property
    def pos(self) -> int:
        return self.lib.spx_state_pos(self._state)

    def reset(self) -> None:
        self.lib.spx_state_set_pos(self._state, 0)

    def forward(self, tokens, all_logits: bool = False) -> np.ndarray:
        """Feed tokens (prefill in chunks of max_batch); logits [vocab] of the last, or [n, vocab] for all."""
        toks = np.ascontiguousarray(np.asarray(tokens, dtype=np.int32).reshape(-1))
        if toks.size == 0:
            raise SpectraError("forward needs at least one token")
        if self.pos + toks.size > self.max_len:
            raise SpectraError(f"context full: {self.pos} + {toks.size} tokens exceed max_len={self.max_len}")
        if toks.min() < 0 or toks.max() >= self.cfg.vocab_size:
            raise SpectraError(f"token id out of range [0, {self.cfg.vocab_size})")
        outs = []
        for s in range(0, toks.size, self.max_batch):
            chunk = toks[s: s + self.max_batch]
            rc = self.lib.spx_forward(self._state, _ptr(chunk), chunk.size, _ptr(self._logits), int(all_logits))
            if rc:
                raise SpectraError(f"native forward failed (code {rc})")
            if all_logits:
                outs.append(self._logits[: chunk.size].copy())
        return np.concatenate(outs) if all_logits else self._logits[0].copy()

    def close(self) -> None:
        if getattr(self, "_state", None):
            self.lib.spx_state_free(self._state)
            self._state = None

    def __del__(self):
        self.close()

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
    import torch

    from spectra.checkpoint import load_state
    from spectra.model import Transformer, rope_tables

    with torch.device("meta"):
        model = Transformer(pm.cfg)
    model = model.to_empty(device="cpu")
    model.rope_cos, model.rope_sin = rope_tables(pm.cfg.head_dim, pm.cfg.max_seq_len, pm.cfg.rope_theta)
    load_state(model, pm.state_dict(), str(pm.path))
    return model.eval()


def load_engine(path: str | Path, backend: str = "auto", *, max_len: int | None = None,
                n_threads: int | None = None, kernel: str | None = None, max_batch: int = 128, verify: bool = True,
                act: str = "int8x2"):
    """An engine for a packed directory (native, or its torch reference) or any checkpoint (torch)."""
    from spectra.infer.kernels.build import KernelUnavailable

    if backend not in ("auto", "native", "torch"):
        raise SpectraError(f"unknown backend '{backend}'; allowed: auto, native, torch")
    if is_packed_dir(path):
        pm = PackedModel.load(path, verify=verify)
        if backend in ("auto", "native"):
            try:
                return NativeEngine(pm, max_len=max_len, n_threads=n_threads, kernel=kernel, max_batch=max_batch, act=act)
            except KernelUnavailable as e:
                if backend == "native":
                    raise
                warnings.warn(f"native kernel unavailable ({e}); using the PyTorch reference path", stacklevel=2)
        return TorchEngine(reference_model(pm), max_len=max_len, n_threads=n_threads)
    if backend == "native":
        raise SpectraError(f"'{path}' is not a packed model; the native backend needs 'spectra pack' output (or use --backend torch)")
    from spectra.checkpoint import load_model

    model, _ = load_model(path)
    return TorchEngine(model, max_len=max_len, n_threads=n_threads)


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
    from spectra.infer.kernels.build import kernel_id, load_library, resolve_kernel

    lib = load_library()
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty((x.shape[0], m.rows), dtype=np.float32)
    keep: list = []
    st = _mat_struct(m, keep)
    rc = lib.spx_matmul(ctypes.byref(st), _ptr(x), x.shape[0], _ptr(out), n_threads or default_threads(),
                        kernel_id(resolve_kernel(kernel)), levels)
    if rc:
        raise SpectraError(f"native matmul failed (code {rc})")
    return out


def matrix_from_ternary(q: np.ndarray, gamma: np.ndarray, split: str, fmt: str, name: str = "m") -> PackedMatrix:
    """A PackedMatrix built in memory (tests, benchmarks)."""
    mp = int(np.asarray(gamma).size)
    trits = packing.pack_ternary(np.asarray(q, dtype=np.int8), mp, split, fmt)
    return PackedMatrix(name, trits, np.asarray(gamma, dtype=np.float32).reshape(mp), q.shape[0], q.shape[1], mp, split, fmt)


__all__ = ["NativeEngine", "TorchEngine", "reference_model", "load_engine", "quantize_activations",
           "reference_matmul", "activation_error_bound", "native_matmul", "matrix_from_ternary", "linear_names"]
