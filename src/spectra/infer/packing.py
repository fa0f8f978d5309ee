"""Packed ternary formats t2 (2 bits per trit) and t1 (base 3, 5 trits per byte), and the q8 head.

Both formats store a matrix W_hat [rows, k] in {-1, 0, 1} row by row, in blocks of
256 weights along k, as *codes* c = W_hat + 1 in {0, 1, 2}. The per-shard scale
gamma is stored beside it in fp32 (see docs/packed-format.md for the byte layout):

* t2, 64 bytes per block (2.0 bits per weight): two 32-byte chunks of 128 weights;
  byte j of chunk h holds weights h*128 + i*32 + j in bits 2i..2i+1 (i = 0..3), so a
  SIMD kernel gets 32 consecutive codes from one AND and one shift.
* t1, 52 bytes per block (1.625 bits per weight): 32 bytes holding 5 trits each
  (weight k*32 + j is digit k of byte j), 16 bytes holding 5 trits each (weight
  160 + k*16 + j) and 4 bytes holding 4 trits each (weight 240 + k*4 + j). A byte
  holding the base-3 number v with n digits (most significant first) stores
  ceil(v * 256 / 3^n); digit k is recovered as ((byte * 3^k) mod 256) * 3 >> 8 (the
  llama.cpp TQ1_0 trick: no division, SIMD-friendly).

Shapes whose k (or, for a row-parallel matrix, each of its mp shard segments of k)
is not a multiple of 256 are padded *exactly*: every segment is padded with zero
weights up to a multiple of 256, and the kernel pads the activations the same way.
Padding changes the size, never the function.
"""

from __future__ import annotations

import numpy as np

from spectra.errors import SpectraError

BLOCK = 256
FORMATS = {"t2": 64, "t1": 52}  # bytes per 256-weight block
FMT_ID = {"t2": 2, "t1": 1}
HEADS = ("f16", "q8")
_P5 = np.array([81, 27, 9, 3, 1], dtype=np.int32)
_P4 = np.array([27, 9, 3, 1], dtype=np.int32)


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        from spectra.errors import closest

        raise SpectraError(f"unknown packed format '{fmt}'{closest(fmt, FORMATS)}; allowed: t2 (2 bits/weight), t1 (1.625 bits/weight)")
    return fmt


def segments(k: int, mp: int, split: str) -> int:
    """Number of k-segments padded separately: a row-parallel matrix's mp shards, else 1."""
    return mp if split == "row" else 1


def padded_k(k: int, mp: int = 1, split: str = "col") -> int:
    nseg = segments(k, mp, split)
    if k % nseg:
        raise SpectraError(f"mp={mp} does not divide k={k} of a row-parallel matrix")
    seg = k // nseg
    return nseg * (-(-seg // BLOCK) * BLOCK)


def row_bytes(k: int, mp: int, split: str, fmt: str) -> int:
    return padded_k(k, mp, split) // BLOCK * FORMATS[check_format(fmt)]


def to_codes(q: np.ndarray, mp: int = 1, split: str = "col") -> np.ndarray:
    """W_hat int8 [rows, k] -> codes uint8 [rows, kp] (q + 1; padding = code 1 = weight 0)."""
    rows, k = q.shape
    kp = padded_k(k, mp, split)
    nseg = segments(k, mp, split)
    seg, segp = k // nseg, kp // nseg
    codes = np.ones((rows, nseg, segp), dtype=np.uint8)
    codes[:, :, :seg] = (q.reshape(rows, nseg, seg).astype(np.int16) + 1).astype(np.uint8)
    return codes.reshape(rows, kp)


def from_codes(codes: np.ndarray, k: int, mp: int = 1, split: str = "col") -> np.ndarray:
    rows, kp = codes.shape
    nseg = segments(k, mp, split)
    seg, segp = k // nseg, kp // nseg
    c = codes.reshape(rows, nseg, segp)
    pad = c[:, :, seg:]
    if pad.size and not np.all(pad == 1):
        raise SpectraError("packed matrix has non-zero weights in its padding (corrupted file)")
    if np.any(c[:, :, :seg] > 2):
        raise SpectraError("packed matrix holds an invalid trit code (corrupted file)")
    return (c[:, :, :seg].astype(np.int16) - 1).astype(np.int8).reshape(rows, k)


def _encode_base3(c: np.ndarray, pw: np.ndarray) -> np.ndarray:
    """c [..., n, m] digits (n = most significant first) -> bytes [..., m] = ceil(v*256/3^n)."""
    v = np.einsum("...nm,n->...m", c.astype(np.int32), pw)
    n3 = int(pw[0]) * 3
    return ((v * 256 + n3 - 1) // n3).astype(np.uint8)


def _decode_base3(b: np.ndarray, n: int) -> np.ndarray:
    """bytes [..., m] -> digits [..., n, m]."""
    b = b.astype(np.uint16)
    out = [(((b * (3**k)) & 255) * 3 >> 8) for k in range(n)]
    return np.stack(out, axis=-2).astype(np.uint8)


def pack_codes(codes: np.ndarray, fmt: str) -> np.ndarray:
    """codes uint8 [rows, kp] (kp multiple of 256) -> packed uint8 [rows, kp/256 * bytes_per_block]."""
    check_format(fmt)
    rows, kp = codes.shape
    nb = kp // BLOCK
    c = codes.reshape(rows, nb, BLOCK)
    if fmt == "t2":
        c = c.reshape(rows, nb, 2, 4, 32)
        b = c[:, :, :, 0] | (c[:, :, :, 1] << 2) | (c[:, :, :, 2] << 4) | (c[:, :, :, 3] << 6)
        return np.ascontiguousarray(b.reshape(rows, nb * 64))
    a = _encode_base3(c[:, :, :160].reshape(rows, nb, 5, 32), _P5)
    m = _encode_base3(c[:, :, 160:240].reshape(rows, nb, 5, 16), _P5)
    t = _encode_base3(c[:, :, 240:].reshape(rows, nb, 4, 4), _P4)
    return np.ascontiguousarray(np.concatenate([a, m, t], axis=-1).reshape(rows, nb * 52))


def unpack_codes(packed: np.ndarray, fmt: str) -> np.ndarray:
    check_format(fmt)
    rows, nbytes = packed.shape
    bpb = FORMATS[fmt]
    if nbytes % bpb:
        raise SpectraError(f"packed row of {nbytes} bytes is not a whole number of {fmt} blocks ({bpb} bytes)")
    nb = nbytes // bpb
    p = np.asarray(packed).reshape(rows, nb, bpb)
    if fmt == "t2":
        p = p.reshape(rows, nb, 2, 1, 32)
        c = np.concatenate([(p >> (2 * i)) & 3 for i in range(4)], axis=3)  # [rows, nb, 2, 4, 32]
        return c.reshape(rows, nb * BLOCK).astype(np.uint8)
    a = _decode_base3(p[:, :, :32], 5).reshape(rows, nb, 160)
    m = _decode_base3(p[:, :, 32:48], 5).reshape(rows, nb, 80)
    t = _decode_base3(p[:, :, 48:52], 4).reshape(rows, nb, 16)
    return np.concatenate([a, m, t], axis=-1).reshape(rows, nb * BLOCK)


def pack_ternary(q: np.ndarray, mp: int, split: str, fmt: str) -> np.ndarray:
    """W_hat int8 [rows, k] in {-1,0,1} -> packed rows (uint8)."""
    q = np.asarray(q)
    if q.dtype != np.int8 or q.ndim != 2:
        raise SpectraError(f"pack_ternary needs a 2-D int8 matrix, got {q.dtype} {q.shape}")
    if q.size and (q.min() < -1 or q.max() > 1):
        raise SpectraError("pack_ternary: values outside {-1, 0, 1}")
    return pack_codes(to_codes(q, mp, split), fmt)


def unpack_ternary(packed: np.ndarray, k: int, mp: int, split: str, fmt: str) -> np.ndarray:
    """Packed rows -> W_hat int8 [rows, k]."""
    return from_codes(unpack_codes(packed, fmt), k, mp, split)


def quantize_head_q8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output row: scale = absmax/127 (fp32), q = round(w/scale) in [-127, 127]."""
    w = np.asarray(w, dtype=np.float32)
    amax = np.abs(w).max(axis=1)
    scale = (amax / np.float32(127)).astype(np.float32)
    inv = np.where(scale > 0, np.float32(1) / np.where(scale > 0, scale, 1), 0).astype(np.float32)
    q = np.clip(np.rint(w * inv[:, None]), -127, 127).astype(np.int8)
    return q, scale


def dequantize_head_q8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return np.asarray(q, dtype=np.float32) * np.asarray(scale, dtype=np.float32)[:, None]


def bits_per_weight(k: int, rows: int, mp: int, split: str, fmt: str) -> float:
    """Stored bits per real weight of one matrix, including its fp32 per-shard scales."""
    return (rows * row_bytes(k, mp, split, fmt) + 4 * mp) * 8 / (rows * k)
