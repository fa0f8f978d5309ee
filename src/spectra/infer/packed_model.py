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
import os
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
def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


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


def _f16(name: str, t) -> np.ndarray:
    h = t.float().numpy().astype(np.float16)
    if not np.all(np.isfinite(h)):
        raise SpectraError(f"tensor '{name}' has values outside the float16 range; cannot store it in 16 bits")
    return h


def _read_checkpoint(ckpt: Path, head: str):
    """(shape, config dict, spectra-named state dict) of a TriLM checkpoint, checked before any packing."""
    from spectra.store import from_hf_names, read_model_config, read_weights
    from spectra.validate import check_config_shapes

    cfg, d = read_model_config(ckpt)
    sd = from_hf_names(read_weights(ckpt))
    check_config_shapes(cfg, {k: tuple(v.shape) for k, v in sd.items()}, str(ckpt))
    missing = [n for n in linear_names(cfg) + ["embed_tokens", "lm_head", "norm"] if f"{n}.weight" not in sd]
    if missing:
        raise SpectraError(f"{ckpt}: missing tensor '{missing[0]}.weight'")
    if head == "q8" and cfg.dim % 32:
        raise SpectraError(f"--head q8 needs dim divisible by 32 (got {cfg.dim}); use --head f16")
    return cfg, d, sd


def _pack_tensors(cfg: ModelConfig, sd: dict, fmt: str, head: str, progress: bool):
    """(tensors to store, packed.json's ``linear`` table, bits per linear weight)."""
    import torch
    from tqdm import tqdm

    from spectra.ternary import dequantize, split_of

    tensors: dict[str, np.ndarray] = {"embed_tokens.weight": _f16("embed_tokens.weight", sd["embed_tokens.weight"]),
                                      "norm.weight": sd["norm.weight"].float().numpy()}
    for i in range(cfg.n_layers):
        for nn_ in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"layers.{i}.{nn_}.weight"] = sd[f"layers.{i}.{nn_}.weight"].float().numpy()
    meta_t: dict[str, dict] = {}
    linear_bits = 0
    linear_params = 0
    for name in tqdm(linear_names(cfg), desc=f"pack {fmt}", disable=not progress, unit="mat"):
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
        tensors["lm_head.weight"] = _f16("lm_head.weight", hw)
    else:
        tensors["lm_head.q8"], tensors["lm_head.scale"] = packing.quantize_head_q8(hw.numpy())
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    return tensors, meta_t, linear_bits / max(1, linear_params)


def write_packed(ckpt: str | Path, out: str | Path, fmt: str = "t2", head: str = "f16",
                 progress: bool = True) -> dict:
    """Pack a TriLM checkpoint directory into ``out`` atomically. Returns the metadata dict."""
    from safetensors.numpy import save_file

    from spectra.fsutil import atomic_dir, atomic_write_json
    from spectra.store import family_of, find_tokenizer
    from spectra.store.tokenizer import TOKENIZER_CONFIG, TOKENIZER_FILE

    packing.check_format(fmt)
    if head not in packing.HEADS:
        raise SpectraError(f"unknown head format '{head}'; allowed: {', '.join(packing.HEADS)}")
    ckpt = Path(ckpt)
    cfg, d, sd = _read_checkpoint(ckpt, head)
    src_dtype = str(sd["embed_tokens.weight"].dtype).removeprefix("torch.")
    tensors, meta_t, bits_per_weight = _pack_tensors(cfg, sd, fmt, head, progress)
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
        "linear_bits_per_weight": bits_per_weight,
        "file": {"name": WEIGHTS},
        "tensors": sums,
    }
    tok = find_tokenizer(ckpt)
    with atomic_dir(Path(out)) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT_NAME, "weights": fmt})
        os.chmod(tmp / WEIGHTS, 0o666 & ~_umask())  # safetensors creates its files 0600
        meta["file"]["bytes"] = (tmp / WEIGHTS).stat().st_size
        if tok is not None:
            shutil.copyfile(tok, tmp / TOKENIZER_FILE)
        if (ckpt / TOKENIZER_CONFIG).is_file():  # the encoding settings travel with the tokenizer
            shutil.copyfile(ckpt / TOKENIZER_CONFIG, tmp / TOKENIZER_CONFIG)
        atomic_write_json(tmp / PACKED_JSON, meta)
    return meta


# ----------------------------------------------------------------------------- loading
# Every field of packed.json is checked against the tensors and the hard limits before any value
# reaches the C engine (which trusts them as array bounds): docs/security.md, "Validation of input files".
_MODEL_INT = ("dim", "n_layers", "n_heads", "ffn_dim", "vocab_size", "mp", "max_seq_len")
_MODEL_NUM = ("norm_eps", "rope_theta", "init_std")


def _model_config(meta: dict, where: str) -> ModelConfig:
    from spectra.validate import check_model_limits, json_field

    model = json_field(meta, "model", "dict", where)
    unknown = sorted(set(model) - set(_MODEL_INT) - set(_MODEL_NUM))
    if unknown:
        raise SpectraError(f"{where}: unknown model field '{unknown[0]}'")
    for k in _MODEL_INT:
        json_field(model, k, "int", f"{where}: model")
    for k in _MODEL_NUM:
        if k in model:
            json_field(model, k, "num", f"{where}: model", lo=0)
    check_model_limits(model, where)
    try:
        return ModelConfig(**model).validate(require_padded_vocab=False)
    except SpectraError as e:
        raise SpectraError(f"{where}: {e}") from None


def expected_tensors(cfg: ModelConfig, fmt: str, head: str) -> dict[str, tuple[str, list[int]]]:
    """Every tensor a packed model of this shape holds: name -> (safetensors dtype, shape)."""
    out = {"embed_tokens.weight": ("F16", [cfg.vocab_size, cfg.dim]), "norm.weight": ("F32", [cfg.dim])}
    for i in range(cfg.n_layers):
        for nn_ in ("input_layernorm", "post_attention_layernorm"):
            out[f"layers.{i}.{nn_}.weight"] = ("F32", [cfg.dim])
    for name, (rows, k, split) in expected_linear(cfg).items():
        out[f"{name}.trits"] = ("U8", [rows, packing.row_bytes(k, cfg.mp, split, fmt)])
        out[f"{name}.gamma"] = ("F32", [cfg.mp])
    if head == "f16":
        out["lm_head.weight"] = ("F16", [cfg.vocab_size, cfg.dim])
    else:
        out["lm_head.q8"] = ("I8", [cfg.vocab_size, cfg.dim])
        out["lm_head.scale"] = ("F32", [cfg.vocab_size])
    return out


def expected_linear(cfg: ModelConfig) -> dict[str, tuple[int, int, str]]:
    """Block linears -> (rows, k, split) implied by the model shape."""
    from spectra.config import split_of

    shape = {"gate_proj": (cfg.ffn_dim, cfg.dim), "up_proj": (cfg.ffn_dim, cfg.dim), "down_proj": (cfg.dim, cfg.ffn_dim)}
    return {n: (*shape.get(n.rsplit(".", 1)[-1], (cfg.dim, cfg.dim)), split_of(n)) for n in linear_names(cfg)}


def _check_linear(meta: dict, cfg: ModelConfig, fmt: str, where: str) -> None:
    from spectra.validate import json_field

    lin = json_field(meta, "linear", "dict", where)
    want = expected_linear(cfg)
    extra = sorted(set(lin) - set(want))
    if extra:
        raise SpectraError(f"{where}: 'linear' names '{extra[0]}', which a {cfg.n_layers}-layer model does not have")
    for name, (rows, k, split) in want.items():
        w = f"{where}: linear '{name}'"
        if name not in lin:
            raise SpectraError(f"{w} is missing")
        m = lin[name]
        expect = {"rows": rows, "k": k, "mp": cfg.mp, "split": split, "kp": packing.padded_k(k, cfg.mp, split),
                  "fmt": fmt, "row_bytes": packing.row_bytes(k, cfg.mp, split, fmt)}
        if not isinstance(m, dict):
            raise SpectraError(f"{w} must be an object")
        for key, v in expect.items():
            if key not in m and key in ("fmt", "row_bytes"):
                continue  # optional (derived) fields
            if key not in m or type(m[key]) is not type(v) or m[key] != v:
                raise SpectraError(f"{w}: '{key}' is {str(m.get(key))[:40]!r}, the model shape implies {v!r} "
                                   f"(edited or corrupted {PACKED_JSON})")


def read_packed_meta(path: str | Path) -> tuple[dict, ModelConfig]:
    """packed.json of a packed directory, every field checked against the limits and the model shape.

    Does not open the weights (see :meth:`PackedModel.load` for the tensor checks)."""
    from spectra.validate import json_field, read_json_object

    path = Path(path)
    mf = path / PACKED_JSON
    if not mf.is_file():
        raise SpectraError(f"'{path}' is not a packed model directory (no {PACKED_JSON}); create one with 'spectra pack'")
    where = str(mf)
    meta = read_json_object(mf, PACKED_JSON, required=("format", "version"))
    if meta["format"] != FORMAT_NAME:
        raise SpectraError(f"{mf}: 'format' is {str(meta['format'])[:40]!r}, expected {FORMAT_NAME!r}")
    if meta["version"] != VERSION:
        raise SpectraError(f"{mf}: version {str(meta['version'])[:20]} is not supported (this spectra reads version {VERSION}); re-pack the checkpoint")
    fmt = json_field(meta, "weights", "str", where)
    if fmt not in packing.FORMATS:
        raise SpectraError(f"{mf}: 'weights' is {fmt[:20]!r}; allowed: {', '.join(packing.FORMATS)}")
    head = json_field(meta, "head", "str", where)
    if head not in packing.HEADS:
        raise SpectraError(f"{mf}: 'head' is {head[:20]!r}; allowed: {', '.join(packing.HEADS)}")
    file = json_field(meta, "file", "dict", where)
    if json_field(file, "name", "str", f"{where}: file") != WEIGHTS:
        raise SpectraError(f"{mf}: 'file.name' must be {WEIGHTS!r} (a packed model keeps its tensors beside {PACKED_JSON})")
    json_field(file, "bytes", "int", f"{where}: file", lo=8, hi=1 << 50)
    cfg = _model_config(meta, where)
    if head == "q8" and cfg.dim % 32:
        raise SpectraError(f"{mf}: head 'q8' needs model.dim divisible by 32, got {cfg.dim}")
    for key in ("eos_token_id", "bos_token_id"):
        if meta.get(key) is not None:
            json_field(meta, key, "int", where, lo=0, hi=cfg.vocab_size - 1)
    _check_linear(meta, cfg, fmt, where)
    tensors = json_field(meta, "tensors", "dict", where)
    want = expected_tensors(cfg, fmt, head)
    for name in sorted(set(tensors) | set(want)):
        if name not in want:
            raise SpectraError(f"{mf}: unexpected tensor '{name}' for this model shape")
        t, (dt, shape) = tensors.get(name), want[name]
        if not isinstance(t, dict) or t.get("dtype") != dt or t.get("shape") != shape:
            raise SpectraError(f"{mf}: tensor '{name}' is listed as {str(t)[:80]}, the model shape implies {dt}{shape}")
        sha = t.get("sha256")
        if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
            raise SpectraError(f"{mf}: tensor '{name}' has no valid 'sha256' (64 hex digits)")
    return meta, cfg


class PackedModel:
    """A packed model mapped read-only into memory. Use :meth:`load`."""

    def __init__(self, path: Path, meta: dict, arrays: dict[str, np.ndarray], mm: mmap.mmap | None,
                 cfg: ModelConfig):
        self.path, self.meta, self.arrays, self._mm, self.cfg = path, meta, arrays, mm, cfg
        self.fmt: str = meta["weights"]
        self.head: str = meta["head"]

    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> "PackedModel":
        """Map ``path``/model.safetensors after checking packed.json (:func:`read_packed_meta`), the file
        size, every tensor's dtype/shape/offsets against the model shape, and, when ``verify``, every sha256."""
        from spectra.validate import safetensors_header

        path = Path(path)
        meta, cfg = read_packed_meta(path)
        wf = path / WEIGHTS
        if not wf.is_file():
            raise SpectraError(f"{wf}: missing (the packed directory is incomplete)")
        size = wf.stat().st_size
        if size != meta["file"]["bytes"]:
            raise SpectraError(f"{wf}: size {size} bytes does not match {meta['file']['bytes']} recorded in {PACKED_JSON} (truncated or corrupted file); re-pack it")
        header, data0 = safetensors_header(wf)
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
            b, e = h["data_offsets"]  # inside the file: checked by safetensors_header
            dt = np.dtype(_ST_DTYPES[h["dtype"]])
            if (data0 + b) % dt.itemsize:  # the C engine reads these as typed arrays
                raise SpectraError(f"{wf}: tensor '{name}' is not aligned to {dt.itemsize} bytes (corrupted file)")
            a = buf[data0 + b: data0 + e].view(dt).reshape(h["shape"])
            if verify and hashlib.sha256(a).hexdigest() != info["sha256"]:
                raise SpectraError(f"{wf}: checksum mismatch in tensor '{name}' (corrupted file); re-pack the checkpoint")
            arrays[name] = a
        return cls(path, meta, arrays, mm, cfg)

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
