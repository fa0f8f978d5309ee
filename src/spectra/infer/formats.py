"""Packed ternary formats as a table (in the spirit of gguf-py's ``GGML_QUANT_SIZES`` + ``quants.py``).

Every format stores a matrix W_hat [rows, k] in {-1, 0, 1} row by row, in blocks of
:data:`BLOCK` weights along k, as *codes* c = W_hat + 1 in {0, 1, 2}; the per-shard
scale gamma is stored beside it in fp32 (docs/packed-format.md has the byte layouts).
An entry gives the name used in files and on the CLI, the id the C engine switches on
(``spx_matrix.fmt``), the bytes per block, and the block codec:

* ``t2`` (id 2), 64 bytes per block (2.0 bits per weight): two 32-byte chunks of 128
  weights; byte j of chunk h holds weights h*128 + i*32 + j in bits 2i..2i+1 (i = 0..3),
  so a SIMD kernel gets 32 consecutive codes from one AND and one shift.
* ``t1`` (id 1), 52 bytes per block (1.625 bits per weight): 32 bytes holding 5 trits
  each (weight k*32 + j is digit k of byte j), 16 bytes holding 5 trits each (weight
  160 + k*16 + j) and 4 bytes holding 4 trits each (weight 240 + k*4 + j). A byte
  holding the base-3 number v with n digits (most significant first) stores
  ceil(v * 256 / 3^n); digit k is recovered as ((byte * 3^k) mod 256) * 3 >> 8 (the
  llama.cpp TQ1_0 trick: no division, SIMD-friendly).

Adding a format = one :data:`FORMATS` entry (its codec below) + its kernel in C under
the same id (docs/architecture.md lists the steps; tests/test_formats.py checks the
ids and block sizes against the C sources). numpy is imported inside the codecs so the
CLI can read this table at start-up for free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from spectra.errors import SpectraError

BLOCK = 256  # weights per block along k (every format)


@dataclass(frozen=True)
class PackedFormat:
    name: str
    c_id: int  # spx_matrix.fmt in the C engine
    block_bytes: int  # bytes per BLOCK weights
    help: str
    pack_blocks: Callable  # codes uint8 [rows, nb, BLOCK] -> uint8 [rows, nb, block_bytes]
    unpack_blocks: Callable  # uint8 [rows, nb, block_bytes] -> codes uint8 [rows, nb, BLOCK]

    @property
    def bits_per_weight(self) -> float:
        return self.block_bytes * 8 / BLOCK


@dataclass(frozen=True)
class HeadFormat:
    name: str
    c_id: int  # spx_model.head_fmt in the C engine
    help: str


# ----------------------------------------------------------------------------- t2: 2 bits per trit
def _t2_pack(c):
    rows, nb, _ = c.shape
    c = c.reshape(rows, nb, 2, 4, 32)
    b = c[:, :, :, 0] | (c[:, :, :, 1] << 2) | (c[:, :, :, 2] << 4) | (c[:, :, :, 3] << 6)
    return b.reshape(rows, nb, 64)


def _t2_unpack(p):
    import numpy as np

    rows, nb, _ = p.shape
    p = p.reshape(rows, nb, 2, 1, 32)
    c = np.concatenate([(p >> (2 * i)) & 3 for i in range(4)], axis=3)  # [rows, nb, 2, 4, 32]
    return c.reshape(rows, nb, BLOCK).astype(np.uint8)


# ----------------------------------------------------------------------------- t1: base 3, 5 trits per byte
def _encode_base3(c, n: int):
    """c [..., n, m] digits (most significant first) -> bytes [..., m] = ceil(v*256/3^n)."""
    import numpy as np

    pw = 3 ** np.arange(n - 1, -1, -1, dtype=np.int32)
    v = np.einsum("...nm,n->...m", c.astype(np.int32), pw)
    n3 = 3**n
    return ((v * 256 + n3 - 1) // n3).astype(np.uint8)


def _decode_base3(b, n: int):
    """bytes [..., m] -> digits [..., n, m]."""
    import numpy as np

    b = b.astype(np.uint16)
    return np.stack([(((b * (3**k)) & 255) * 3 >> 8) for k in range(n)], axis=-2).astype(np.uint8)


def _t1_pack(c):
    import numpy as np

    rows, nb, _ = c.shape
    a = _encode_base3(c[:, :, :160].reshape(rows, nb, 5, 32), 5)
    m = _encode_base3(c[:, :, 160:240].reshape(rows, nb, 5, 16), 5)
    t = _encode_base3(c[:, :, 240:].reshape(rows, nb, 4, 4), 4)
    return np.concatenate([a, m, t], axis=-1)


def _t1_unpack(p):
    import numpy as np

    rows, nb, _ = p.shape
    a = _decode_base3(p[:, :, :32], 5).reshape(rows, nb, 160)
    m = _decode_base3(p[:, :, 32:48], 5).reshape(rows, nb, 80)
    t = _decode_base3(p[:, :, 48:52], 4).reshape(rows, nb, 16)
    return np.concatenate([a, m, t], axis=-1)


FORMATS: dict[str, PackedFormat] = {
    f.name: f for f in (
        PackedFormat("t2", 2, 64, "2 bits/weight (fastest)", _t2_pack, _t2_unpack),
        PackedFormat("t1", 1, 52, "5 trits/byte, 1.625 bits/weight (smallest)", _t1_pack, _t1_unpack),
    )
}
HEAD_FORMATS: dict[str, HeadFormat] = {
    h.name: h for h in (
        HeadFormat("f16", 0, "16-bit floats"),
        HeadFormat("q8", 1, "int8 rows with an fp32 scale per row"),
    )
}


def get_format(name: str) -> PackedFormat:
    f = FORMATS.get(name)
    if f is None:
        from spectra.errors import closest

        allowed = ", ".join(f"{x.name} ({x.bits_per_weight:g} bits/weight)" for x in FORMATS.values())
        raise SpectraError(f"unknown packed format '{name}'{closest(str(name), FORMATS)}; allowed: {allowed}")
    return f


def get_head(name: str) -> HeadFormat:
    h = HEAD_FORMATS.get(name)
    if h is None:
        raise SpectraError(f"unknown head format '{name}'; allowed: {', '.join(HEAD_FORMATS)}")
    return h
