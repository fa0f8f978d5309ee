"""Packed model directories: write from a TriLM checkpoint, load memory-mapped with checksums.

A packed directory holds

* ``packed.json``       metadata: format, model shape, per-tensor dtype/shape/sha256, file size
* ``model.safetensors`` the tensors (standard safetensors; mapped read-only, never copied)
* ``tokenizer.json``    copied from the checkpoint when present

Tensors: ``embed_tokens.weight`` f16, norms f32, per block linear ``<name>.trits``
(uint8 packed rows) and ``<name>.gamma`` (fp32 per shard), and the head either
``lm_head.weight`` f16 or ``lm_head.q8`` int8 + ``lm_head.scale`` fp32 per row.
The layout is documented byte by byte in docs/packed-format.md.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spectra.config import LINEAR_NAMES, ModelConfig
from spectra.errors import SpectraError
from spectra.infer import packing

from spectra.store.kinds import PACKED_JSON  # noqa: E402  (store decides what a path is)
WEIGHTS = "model.safetensors"
FORMAT_NAME = "spectra-packed-ternary"
VERSION = 1
_ST_DTYPES = {"U8": np.uint8, "I8": np.int8, "F16": np.float16, "F32": np.float32, "I32": np.int32}
_NP_TO_ST = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


def linear_names(cfg: ModelConfig) -> list[str]:
    out = []
    for i in range(cfg.n_layers):
        for leaf in LINEAR_NAMES:
            part = "self_attn" if leaf in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            out.append(f"layers.{i}.{part}.{leaf}")
    return out


def is_packed_dir(path: str | Path) -> bool:
    from spectra.store.kinds import Kind, detect

    return detect(path) is Kind.PACKED_TRILM


@dataclass
class PackedMatrix:
    """One packed ternary matrix (views into the mapped file)."""

    name: str
    trits: np.ndarray  # uint8 [rows, row_bytes]
    gamma: np.ndarray  # fp32 [mp]
    rows: int
    k: int
    mp: int
    split: str
    fmt: str

    @property
    def kp(self) -> int:
        return packing.padded_k(self.k, self.mp, self.split)

    def ternary(self) -> np.ndarray:
        """W_hat int8 [rows, k]."""
        return packing.unpack_ternary(self.trits, self.k, self.mp, self.split, self.fmt)

    def dequantize(self):
        """gamma * W_hat as fp32 torch tensor, through spectra.ternary (the single source of the math)."""
        import torch

        from spectra.ternary import dequantize

        return dequantize(torch.from_numpy(self.ternary()), torch.from_numpy(np.array(self.gamma)), self.split)


# ----------------------------------------------------------------------------- writing
def _ternary_of(name: str, w, mp: int, split: str):
    """(W_hat, gamma) of an unpacked checkpoint weight, or a SpectraError naming the matrix."""
    import torch

    from spectra.ternary import recover_ternary

    try:
        return recover_ternary(w, mp, split)
    except SpectraError:
        distinct = int(torch.unique(w.float()).numel())
        raise SpectraError(
            f"matrix '{name}' is not ternary: it holds {distinct} distinct values (a TriLM matrix with "
            f"mp={mp} has at most {1 + 2 * mp}: 0 and +-gamma per shard); pack needs a TriLM checkpoint "
            f"(check 'pretraining_model_parallel' in config.json if this is one)") from None


def write_packed(ckpt: str | Path, out: str | Path, fmt: str = "t2", head: str = "f16",
                 progress: bool = True) -> dict:
    """Pack a TriLM checkpoint directory into ``out`` atomically. Returns the metadata dict."""
    import torch
    from safetensors.numpy import save_file
    from tqdm import tqdm

    from spectra.checkpoint import family_of, from_hf_names, model_config_from_hf, read_config, read_weights
    from spectra.fsutil import atomic_dir, atomic_write_json
    from spectra.ternary import dequantize, split_of

    packing.check_format(fmt)
    if head not in packing.HEADS:
        raise SpectraError(f"unknown head format '{head}'; allowed: {', '.join(packing.HEADS)}")
    ckpt = Path(ckpt)
    d = read_config(ckpt)
    cfg = model_config_from_hf(d, str(ckpt / "config.json"))
    sd = from_hf_names(read_weights(ckpt))
    names = linear_names(cfg)
    missing = [n for n in names + ["embed_tokens", "lm_head", "norm"] if f"{n}.weight" not in sd]
    if missing:
        raise SpectraError(f"{ckpt}: missing tensor '{missing[0]}.weight'")
    if head == "q8" and cfg.dim % 32:
        raise SpectraError(f"--head q8 needs dim divisible by 32 (got {cfg.dim}); use --head f16")
    tensors: dict[str, np.ndarray] = {}
    meta_t: dict[str, dict] = {}
    src_dtype = str(sd["embed_tokens.weight"].dtype).removeprefix("torch.")

    def f16(name, t):
        a = t.float().numpy()
        h = a.astype(np.float16)
        if not np.all(np.isfinite(h)):
            raise SpectraError(f"tensor '{name}' has values outside the float16 range; cannot store it in 16 bits")
        return h

    tensors["embed_tokens.weight"] = f16("embed_tokens.weight", sd["embed_tokens.weight"])
    tensors["norm.weight"] = sd["norm.weight"].float().numpy()
    for i in range(cfg.n_layers):
        for nn_ in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"layers.{i}.{nn_}.weight"] = sd[f"layers.{i}.{nn_}.weight"].float().numpy()
    linear_bits = 0
    linear_params = 0
    for name in tqdm(names, desc=f"pack {fmt}", disable=not progress, unit="mat"):
        w = sd[f"{name}.weight"].float()
        split = split_of(name)
        q, gamma = _ternary_of(name, w, cfg.mp, split)
        # exactness: the stored (W_hat, gamma) reproduce the checkpoint's gamma*W_hat bit for bit
        if not torch.equal(dequantize(q, gamma, split), w):
            raise SpectraError(f"matrix '{name}': recovered gamma*W_hat differs from the checkpoint (internal error)")
        trits = packing.pack_ternary(q.numpy(), cfg.mp, split, fmt)
        tensors[f"{name}.trits"] = trits
        tensors[f"{name}.gamma"] = gamma.float().numpy().astype(np.float32)
        meta_t[name] = {"rows": int(w.shape[0]), "k": int(w.shape[1]), "mp": cfg.mp, "split": split,
                        "kp": packing.padded_k(int(w.shape[1]), cfg.mp, split)}
        linear_bits += trits.nbytes * 8 + 32 * cfg.mp
        linear_params += w.numel()
    hw = sd["lm_head.weight"].float()
    if head == "f16":
        tensors["lm_head.weight"] = f16("lm_head.weight", hw)
    else:
        q8, sc = packing.quantize_head_q8(hw.numpy())
        tensors["lm_head.q8"], tensors["lm_head.scale"] = q8, sc
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    sums = {k: {"dtype": _NP_TO_ST[v.dtype], "shape": list(v.shape), "sha256": hashlib.sha256(v.tobytes()).hexdigest()}
            for k, v in tensors.items()}
    spectra_meta = d.get("spectra") or {}
    meta = {
        "format": FORMAT_NAME,
        "version": VERSION,
        "weights": fmt,
        "block": packing.BLOCK,
        "head": head,
        "embedding": "f16",
        "activations": "int8 per 256-block (absmax/127, round half even) in the native kernel",
        "model": cfg.to_dict(),
        "family": family_of(d),
        "eos_token_id": d.get("eos_token_id", 0),
        "bos_token_id": d.get("bos_token_id", 0),
        "source": {"checkpoint": str(ckpt.resolve()), "dtype": src_dtype,
                   **{k: spectra_meta[k] for k in ("step", "tokens") if k in spectra_meta}},
        "linear": meta_t,
        "linear_bits_per_weight": linear_bits / max(1, linear_params),
        "file": {"name": WEIGHTS},
        "tensors": sums,
    }
    out = Path(out)
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT_NAME, "weights": fmt})
        meta["file"]["bytes"] = (tmp / WEIGHTS).stat().st_size
        for tok in ("tokenizer.json", "tokenizer_config.json"):
            if (ckpt / tok).exists():
                shutil.copyfile(ckpt / tok, tmp / tok)
        atomic_write_json(tmp / PACKED_JSON, meta)
    return meta


# ----------------------------------------------------------------------------- loading
def _read_header(path: Path, size: int) -> tuple[dict, int]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise SpectraError(f"{path}: truncated ({size} bytes); not a safetensors file")
        n = int.from_bytes(raw, "little")
        if n <= 0 or 8 + n > size:
            raise SpectraError(f"{path}: corrupted safetensors header (length {n} for a {size}-byte file)")
        try:
            return json.loads(f.read(n)), 8 + n
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise SpectraError(f"{path}: corrupted safetensors header (not JSON)") from None


class PackedModel:
    """A packed model mapped read-only into memory. Use :meth:`load`."""

    def __init__(self, path: Path, meta: dict, arrays: dict[str, np.ndarray], mm: mmap.mmap | None):
        self.path, self.meta, self.arrays, self._mm = path, meta, arrays, mm
        self.cfg = ModelConfig(**meta["model"]).validate(require_padded_vocab=False)
        self.fmt: str = meta["weights"]
        self.head: str = meta["head"]

    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> "PackedModel":
        """Map ``path``/model.safetensors; check its size always and every tensor's sha256 when ``verify``."""
        path = Path(path)
        mf = path / PACKED_JSON
        if not mf.is_file():
            raise SpectraError(f"'{path}' is not a packed model directory (no {PACKED_JSON}); create one with 'spectra pack'")
        try:
            meta = json.loads(mf.read_text())
        except json.JSONDecodeError as e:
            raise SpectraError(f"{mf}: not valid JSON ({e})") from None
        if meta.get("format") != FORMAT_NAME:
            raise SpectraError(f"{mf}: 'format' is {meta.get('format')!r}, expected {FORMAT_NAME!r}")
        if meta.get("version") != VERSION:
            raise SpectraError(f"{mf}: version {meta.get('version')} is not supported (this spectra reads version {VERSION}); re-pack the checkpoint")
        packing.check_format(meta.get("weights", "?"))
        wf = path / meta["file"]["name"]
        if not wf.is_file():
            raise SpectraError(f"{wf}: missing (the packed directory is incomplete)")
        size = wf.stat().st_size
        if size != meta["file"]["bytes"]:
            raise SpectraError(f"{wf}: size {size} bytes does not match {meta['file']['bytes']} recorded in {PACKED_JSON} (truncated or corrupted file); re-pack it")
        header, data0 = _read_header(wf, size)
        with open(wf, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        buf = np.frombuffer(mm, dtype=np.uint8)
        arrays: dict[str, np.ndarray] = {}
        for name, info in meta["tensors"].items():
            h = header.get(name)
            if h is None:
                raise SpectraError(f"{wf}: tensor '{name}' listed in {PACKED_JSON} is missing from the file")
            if h["dtype"] != info["dtype"] or list(h["shape"]) != list(info["shape"]):
                raise SpectraError(f"{wf}: tensor '{name}' is {h['dtype']}{h['shape']}, {PACKED_JSON} says {info['dtype']}{info['shape']}")
            b, e = h["data_offsets"]
            dt = np.dtype(_ST_DTYPES[h["dtype"]])
            n = int(np.prod(h["shape"])) if h["shape"] else 1
            if e - b != n * dt.itemsize or data0 + e > size:
                raise SpectraError(f"{wf}: tensor '{name}' has inconsistent offsets (corrupted file)")
            a = buf[data0 + b: data0 + e].view(dt).reshape(h["shape"])
            if verify and hashlib.sha256(a).hexdigest() != info["sha256"]:
                raise SpectraError(f"{wf}: checksum mismatch in tensor '{name}' (corrupted file); re-pack the checkpoint")
            arrays[name] = a
        return cls(path, meta, arrays, mm)

    # -- accessors
    def matrix(self, name: str) -> PackedMatrix:
        m = self.meta["linear"][name]
        return PackedMatrix(name, self.arrays[f"{name}.trits"], self.arrays[f"{name}.gamma"], m["rows"], m["k"],
                            m["mp"], m["split"], self.fmt)

    def matrices(self) -> list[PackedMatrix]:
        return [self.matrix(n) for n in linear_names(self.cfg)]

    def head_weight(self) -> np.ndarray:
        """The head as fp32 [vocab, dim] (what the stored head computes)."""
        if self.head == "f16":
            return self.arrays["lm_head.weight"].astype(np.float32)
        return packing.dequantize_head_q8(self.arrays["lm_head.q8"], self.arrays["lm_head.scale"])

    @property
    def file_bytes(self) -> int:
        return int(self.meta["file"]["bytes"])

    def state_dict(self) -> dict:
        """Unpacked fp32 torch state dict (spectra names): gamma*W_hat exactly, embedding/head as stored."""
        import torch

        sd = {"embed_tokens.weight": torch.from_numpy(self.arrays["embed_tokens.weight"].astype(np.float32)),
              "norm.weight": torch.from_numpy(np.array(self.arrays["norm.weight"])),
              "lm_head.weight": torch.from_numpy(self.head_weight())}
        for i in range(self.cfg.n_layers):
            for nn_ in ("input_layernorm", "post_attention_layernorm"):
                sd[f"layers.{i}.{nn_}.weight"] = torch.from_numpy(np.array(self.arrays[f"layers.{i}.{nn_}.weight"]))
        for m in self.matrices():
            sd[f"{m.name}.weight"] = m.dequantize()
        return sd

    def tokenizer_path(self) -> Path | None:
        p = self.path / "tokenizer.json"
        return p if p.exists() else None
