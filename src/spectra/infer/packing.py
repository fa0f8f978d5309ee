"""Packed ternary matrices: padding, codes, and the block formats of :mod:`spectra.infer.formats`; the q8 head.

The formats themselves (t2, t1: block bytes, C ids, block codecs) are the table in
:mod:`spectra.infer.formats`; this module turns whole matrices into rows of blocks.

Shapes whose k (or, for a row-parallel matrix, each of its mp shard segments of k)
is not a multiple of 256 are padded *exactly*: every segment is padded with zero
weights up to a multiple of 256, and the kernel pads the activations the same way.
Padding changes the size, never the function.
"""

from __future__ import annotations

import numpy as np

from spectra.errors import SpectraError
from spectra.infer.formats import BLOCK, HEAD_FORMATS, get_format
from spectra.infer.formats import FORMATS as _TABLE

# Views of the format table for callers that want plain maps.
FORMATS = {f.name: f.block_bytes for f in _TABLE.values()}  # bytes per 256-weight block
FMT_ID = {f.name: f.c_id for f in _TABLE.values()}  # the id the C engine switches on
HEADS = tuple(HEAD_FORMATS)


def check_format(fmt: str) -> str:
    return get_format(fmt).name


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


def pack_codes(codes: np.ndarray, fmt: str) -> np.ndarray:
    """codes uint8 [rows, kp] (kp multiple of 256) -> packed uint8 [rows, kp/256 * bytes_per_block]."""
    f = get_format(fmt)
    rows, kp = codes.shape
    nb = kp // BLOCK
    return np.ascontiguousarray(f.pack_blocks(codes.reshape(rows, nb, BLOCK)).reshape(rows, nb * f.block_bytes))


def unpack_codes(packed: np.ndarray, fmt: str) -> np.ndarray:
    f = get_format(fmt)
    rows, nbytes = packed.shape
    bpb = f.block_bytes
    if nbytes % bpb:
        raise SpectraError(f"packed row of {nbytes} bytes is not a whole number of {fmt} blocks ({bpb} bytes)")
    nb = nbytes // bpb
    return f.unpack_blocks(np.asarray(packed).reshape(rows, nb, bpb)).reshape(rows, nb * BLOCK).astype(np.uint8)


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
