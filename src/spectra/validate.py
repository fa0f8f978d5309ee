"""One validation step between an input file and anything that allocates memory or calls C.

Every file spectra reads may be hostile (docs/security.md). The functions here turn
what such a file can do wrong into a one-line :class:`SpectraError` *before* the
bytes reach torch, safetensors' Rust code or the native engine:

* :func:`read_json_object` - config.json / packed.json / task files: UTF-8, JSON, an object, required keys.
* :func:`safetensors_header` / :func:`load_safetensors` - a safetensors file checked field by field
  (header length, dtypes, shapes, offsets inside the file) before it is opened.
* :data:`LIMITS` / :func:`check_model_limits` - model sizes far above any real model and far below
  what would overflow the C engine's index arithmetic.
* :func:`check_config_shapes` - a Llama config.json against the tensor shapes of its weights.
* :func:`check_token_ids`, :func:`check_threads`, :func:`check_max_len`, :func:`check_memory` - runtime
  arguments at every entry point.

This module imports only the standard library (and numpy/torch lazily), so any layer may call it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from spectra.errors import SpectraError

# Hard limits on model shapes (docs/security.md, "Limits"). Llama-3.1-405B has dim 16384,
# ffn 53248, 126 layers, 128 heads, vocab 128256, context 131072: these are 4-30x above that,
# and every product the engine forms (vocab*dim, rows*row_bytes, max_len*dim) stays < 2^63.
LIMITS = {
    "dim": 1 << 16,
    "ffn_dim": 1 << 18,
    "n_layers": 1 << 10,
    "n_heads": 1 << 10,
    "vocab_size": 1 << 22,
    "max_seq_len": 1 << 20,
    "mp": 1 << 6,
}
MAX_HEADER_BYTES = 100 << 20  # safetensors' own reader refuses headers over 100 MB
MAX_JSON_BYTES = 64 << 20  # config/packed/tokenizer metadata; real ones are < 20 MB

# safetensors dtype name -> bytes per element (the subset any spectra file can hold, plus the common others)
ST_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                  "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ----------------------------------------------------------------------------- JSON files
def read_json_object(path: str | Path, what: str = "file", required: tuple[str, ...] = ()) -> dict:
    """A JSON object from ``path`` or a SpectraError saying what is wrong (missing, size, UTF-8, JSON, keys)."""
    p = Path(path)
    if not p.is_file():
        raise SpectraError(f"{p}: {what} not found")
    size = p.stat().st_size
    if size > MAX_JSON_BYTES:
        raise SpectraError(f"{p}: {what} is {size} bytes (limit {MAX_JSON_BYTES}); not a spectra {what}")
    try:
        d = json.loads(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise SpectraError(f"{p}: {what} is not UTF-8 text (byte {e.start}); expected JSON") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise SpectraError(f"{p}: {what} is not valid JSON ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(d, dict):
        raise SpectraError(f"{p}: {what} must be a JSON object, got a JSON {type(d).__name__}")
    missing = [k for k in required if k not in d]
    if missing:
        raise SpectraError(f"{p}: {what} lacks the key '{missing[0]}'")
    return d


def json_field(d: dict, key: str, kind, where: str, *, lo=None, hi=None):
    """``d[key]`` checked to be of ``kind`` ('int', 'num', 'str', 'dict', 'list') and within [lo, hi]."""
    if not isinstance(d, dict) or key not in d:
        raise SpectraError(f"{where}: missing key '{key}'")
    v = d[key]
    ok = {"int": _is_int(v), "num": (_is_int(v) or isinstance(v, float)) and math.isfinite(v),
          "str": isinstance(v, str), "dict": isinstance(v, dict), "list": isinstance(v, list)}[kind]
    if not ok:
        names = {"int": "an integer", "num": "a finite number", "str": "a string", "dict": "an object", "list": "a list"}
        raise SpectraError(f"{where}: '{key}' must be {names[kind]}, got {str(v)[:60]!r}")
    if lo is not None and v < lo or hi is not None and v > hi:
        raise SpectraError(f"{where}: '{key}'={v} is outside [{lo}, {hi}]")
    return v


# ----------------------------------------------------------------------------- safetensors
def safetensors_header(path: str | Path) -> tuple[dict, int]:
    """(header without '__metadata__', offset of the data) of a safetensors file, every entry checked.

    Refuses: a file shorter than 8 bytes, a header length past the end (e.g. 2^64-1), a header that is
    not a UTF-8 JSON object, unknown dtypes, shapes that are not lists of non-negative integers,
    offsets that are not [begin, end] inside the data, and a byte count that does not match the shape.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise SpectraError(f"{p}: truncated ({size} bytes); not a safetensors file")
            n = int.from_bytes(raw, "little")
            if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
                raise SpectraError(f"{p}: corrupted safetensors header (header length {n} for a {size}-byte file)")
            text = f.read(n)
    except OSError as e:
        raise SpectraError(f"{p}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise SpectraError(f"{p}: corrupted safetensors header (not UTF-8 JSON)") from None
    if not isinstance(header, dict):
        raise SpectraError(f"{p}: corrupted safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise SpectraError(f"{p}: corrupted safetensors header ('__metadata__' must map strings to strings)")
    data0, data_len = 8 + n, size - 8 - n
    for name, h in header.items():
        where = f"{p}: tensor '{name}'"
        if not isinstance(h, dict):
            raise SpectraError(f"{where}: header entry is not an object (corrupted file)")
        dt = h.get("dtype")
        if not isinstance(dt, str) or dt not in ST_DTYPE_BYTES:
            raise SpectraError(f"{where}: unknown dtype {str(dt)[:20]!r} (corrupted file)")
        shape = h.get("shape")
        if not isinstance(shape, list) or len(shape) > 8 or not all(_is_int(s) and 0 <= s < 1 << 40 for s in shape):
            raise SpectraError(f"{where}: invalid shape {str(shape)[:60]} (corrupted file)")
        off = h.get("data_offsets")
        if not (isinstance(off, list) and len(off) == 2 and all(_is_int(o) for o in off)
                and 0 <= off[0] <= off[1] <= data_len):
            raise SpectraError(f"{where}: data offsets {str(off)[:60]} lie outside the {data_len} data bytes "
                               "(truncated or corrupted file)")
        if off[1] - off[0] != math.prod(shape) * ST_DTYPE_BYTES[dt]:
            raise SpectraError(f"{where}: {off[1] - off[0]} bytes do not hold a {dt}{shape} tensor (corrupted file)")
    return header, data0


def load_safetensors(path: str | Path, framework: str = "pt") -> dict:
    """safetensors ``load_file`` after :func:`safetensors_header` (torch tensors; ``framework='np'``: numpy)."""
    safetensors_header(path)
    try:
        if framework == "np":
            from safetensors.numpy import load_file
        else:
            from safetensors.torch import load_file
        return load_file(str(path))
    except MemoryError:
        raise SpectraError(f"{path}: not enough memory to load the tensors") from None
    except Exception as e:  # noqa: BLE001 - anything safetensors still refuses: one line naming the file
        raise SpectraError(f"{path}: cannot be read as safetensors ({str(e).splitlines()[0][:160]})") from None


# ----------------------------------------------------------------------------- model shapes
def check_model_limits(fields: dict, source: str) -> None:
    """Shape fields (ModelConfig names) are positive integers within :data:`LIMITS`."""
    for name, hi in LIMITS.items():
        if name not in fields:
            continue
        v = fields[name]
        if not _is_int(v) or v <= 0:
            raise SpectraError(f"{source}: model field '{name}' must be a positive integer, got {str(v)[:40]!r}")
        if v > hi:
            raise SpectraError(f"{source}: model field '{name}'={v} exceeds the limit {hi} (docs/security.md, Limits)")


# Hugging Face config.json keys -> ModelConfig field (for the limits) or None
_HF_INT = {"hidden_size": "dim", "intermediate_size": "ffn_dim", "num_attention_heads": "n_heads",
           "num_hidden_layers": "n_layers", "vocab_size": "vocab_size", "num_key_value_heads": "n_heads",
           "max_position_embeddings": "max_seq_len", "pretraining_model_parallel": "mp"}
_HF_NUM = ("rms_norm_eps", "rope_theta", "initializer_range")
_HF_OBJ = ("rope_scaling", "rope_parameters", "spectra", "quantization_config")


def check_hf_config(d: dict, source: str) -> None:
    """Types and limits of the config.json keys spectra reads (each may be absent; null only where HF allows)."""
    if not isinstance(d, dict):
        raise SpectraError(f"{source}: must be a JSON object, got a JSON {type(d).__name__}")
    for key, fld in _HF_INT.items():
        if key in d:
            v = d[key]
            if not _is_int(v) or v <= 0:
                raise SpectraError(f"{source}: '{key}' must be a positive integer, got {str(v)[:40]!r}")
            if v > LIMITS[fld]:
                raise SpectraError(f"{source}: '{key}'={v} exceeds the limit {LIMITS[fld]} (docs/security.md, Limits)")
    for key in _HF_NUM:
        if d.get(key) is not None:
            json_field(d, key, "num", source)
    for key in _HF_OBJ:
        if d.get(key) is not None and not isinstance(d[key], dict):
            raise SpectraError(f"{source}: '{key}' must be an object, got {str(d[key])[:40]!r}")
    for key in ("model_type", "hidden_act", "torch_dtype"):
        if d.get(key) is not None and not isinstance(d[key], str):
            raise SpectraError(f"{source}: '{key}' must be a string, got {str(d[key])[:40]!r}")
    arch = d.get("architectures")
    if arch is not None and not (isinstance(arch, list) and all(isinstance(a, str) for a in arch)):
        raise SpectraError(f"{source}: 'architectures' must be a list of names, got {str(arch)[:60]!r}")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = d.get(key)
        ids = v if isinstance(v, list) else [v]
        if v is not None and not all(_is_int(t) and 0 <= t < LIMITS["vocab_size"] for t in ids):
            raise SpectraError(f"{source}: '{key}' must be a token id (or a list of them), got {str(v)[:40]!r}")
    sp = d.get("spectra") or {}
    if "mp" in sp and not (_is_int(sp["mp"]) and 1 <= sp["mp"] <= LIMITS["mp"]):
        raise SpectraError(f"{source}: 'spectra.mp' must be an integer in [1, {LIMITS['mp']}], got {str(sp['mp'])[:20]!r}")
    for key in ("rope_scaling", "rope_parameters"):
        sub = d.get(key) or {}
        for k in ("rope_type", "type"):
            if sub.get(k) is not None and not isinstance(sub[k], str):
                raise SpectraError(f"{source}: '{key}.{k}' must be a string")
        if sub.get("rope_theta") is not None:
            json_field(sub, "rope_theta", "num", f"{source}: {key}")


def expected_shapes(dim: int, ffn: int, n_layers: int, vocab: int) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor names of a Llama checkpoint -> their shapes."""
    out = {"model.embed_tokens.weight": (vocab, dim), "lm_head.weight": (vocab, dim), "model.norm.weight": (dim,)}
    for i in range(n_layers):
        b = f"model.layers.{i}."
        for leaf in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[f"{b}self_attn.{leaf}.weight"] = (dim, dim)
        out[f"{b}mlp.gate_proj.weight"] = (ffn, dim)
        out[f"{b}mlp.up_proj.weight"] = (ffn, dim)
        out[f"{b}mlp.down_proj.weight"] = (dim, ffn)
        out[f"{b}input_layernorm.weight"] = (dim,)
        out[f"{b}post_attention_layernorm.weight"] = (dim,)
    return out


def check_config_shapes(cfg, shapes: dict[str, tuple], source: str) -> None:
    """config.json's sizes (a ModelConfig) against the tensors' shapes ({HF or spectra name: shape}).

    Catches a vocab_size larger than the embedding, a wrong hidden size, a transposed down_proj.
    Extra tensors (rotary caches some exporters write) are ignored; missing ones are refused.
    """
    got = {(k if k.startswith(("model.", "lm_head")) else f"model.{k}"): tuple(v) for k, v in shapes.items()}
    for name, want in expected_shapes(cfg.dim, cfg.ffn_dim, cfg.n_layers, cfg.vocab_size).items():
        if name not in got:
            raise SpectraError(f"{source}: tensor '{name}' is missing (config.json: {cfg.n_layers} layers)")
        if got[name] != want:
            raise SpectraError(f"{source}: tensor '{name}' has shape {list(got[name])}, config.json implies "
                               f"{list(want)} (hidden_size={cfg.dim}, intermediate_size={cfg.ffn_dim}, "
                               f"vocab_size={cfg.vocab_size}); the config does not match the weights")


# ----------------------------------------------------------------------------- runtime arguments
def check_token_ids(ids, vocab: int, what: str = "token id") -> list[int]:
    """``ids`` as a list of ints, each in [0, vocab), else a one-line error naming the first bad one."""
    out = []
    for t in ids:
        if isinstance(t, bool) or not hasattr(t, "__index__"):
            raise SpectraError(f"{what} {t!r} is not an integer")
        t = int(t)
        if not 0 <= t < vocab:
            raise SpectraError(f"{what} {t} is outside the model's vocabulary [0, {vocab})")
        out.append(t)
    return out


def check_threads(n: int | None, flag: str = "--threads") -> int | None:
    """None (the default) or an integer in [1, 4 x usable CPUs]: the native engine's own cap
    (:func:`spectra.infer.kernels.build.check_threads`, which mirrors the C limit), for every command."""
    if n is None:
        return None
    from spectra.infer.kernels.build import check_threads as engine_check

    try:
        return engine_check(n)
    except SpectraError as e:
        raise SpectraError(f"{flag}: {e}") from None


def check_max_len(max_len: int | None, model_max: int, flag: str = "--max-len") -> None:
    if max_len is None:
        return
    if not _is_int(max_len) or not 1 <= max_len <= model_max:
        raise SpectraError(f"{flag} must be in [1, {model_max}] (the model's context length), got {max_len}")


def available_memory() -> int:
    """Bytes this process may still allocate: MemAvailable, capped by RLIMIT_AS / RLIMIT_DATA."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    try:
        import resource

        for lim in (resource.RLIMIT_AS, resource.RLIMIT_DATA):
            soft = resource.getrlimit(lim)[0]
            if soft != resource.RLIM_INFINITY:
                avail = soft if avail is None else min(avail, soft)
    except (ImportError, ValueError, OSError):  # pragma: no cover - non-Unix
        pass
    return avail if avail is not None else 1 << 62


def check_memory(nbytes: int, what: str, hint: str = "") -> None:
    """Refuse an allocation of ``nbytes`` that cannot fit (instead of the OOM killer taking the machine)."""
    avail = available_memory()
    if nbytes > avail:
        raise SpectraError(f"{what} needs {nbytes / 2**30:.1f} GiB but only {avail / 2**30:.1f} GiB are available"
                           + (f"; {hint}" if hint else ""))


def runtime_bytes(dim: int, n_layers: int, n_heads: int, vocab: int, max_len: int, rows: int = 1,
                  dtype_bytes: int = 4) -> int:
    """What a generation engine allocates beyond the weights: KV cache, RoPE tables, logits of ``rows``."""
    kv = 2 * n_layers * max_len * dim * dtype_bytes
    rope = 2 * max_len * (dim // max(1, n_heads)) * 4
    return kv + rope + rows * vocab * 4


# ----------------------------------------------------------------------------- outputs
def check_out_writable(out: str | Path, flag: str = "--out", kind: str = "file") -> Path:
    """Fail before the work, not after it: ``out`` (a ``kind`` 'file' or 'dir' to be written) must be creatable.

    A file target may not be an existing directory (and a dir target not an existing file); the
    nearest existing ancestor must be a directory where a file can actually be created (probed, so
    read-only file systems and permissions are caught as the writing process sees them)."""
    import tempfile

    p = Path(out)
    if kind == "file" and p.is_dir():
        raise SpectraError(f"{flag} '{p}' is a directory; give a file path (e.g. {p / 'results.json'})")
    if kind == "dir" and p.exists() and not p.is_dir():
        raise SpectraError(f"{flag} '{p}' exists and is not a directory")
    anc = p.absolute().parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise SpectraError(f"{flag} '{p}': '{anc}' is not a directory")
    try:
        fd, probe = tempfile.mkstemp(dir=anc, prefix=".spectra-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise SpectraError(f"{flag} '{p}' is not writable ({e.strerror} in '{anc}')") from None
    return p


def check_positive(value, flag: str, *, zero_ok: bool = False):
    """None (= the default) or an integer >= 1 (>= 0 with ``zero_ok``); 0 never silently means 'default'."""
    if value is None:
        return None
    lo = 0 if zero_ok else 1
    if not _is_int(value) or value < lo:
        raise SpectraError(f"{flag} must be an integer >= {lo}, got {value!r}")
    return value


def check_finite_weights(tensors: dict, source: str, what: str = "quantized") -> None:
    """Every floating tensor finite: NaN/Inf weights would silently give a NaN model (``what``: the operation)."""
    import torch

    for name, t in tensors.items():
        if t.is_floating_point():
            bad = ~torch.isfinite(t)
            if bool(bad.any()):
                raise SpectraError(f"{source}: tensor '{name}' holds {int(bad.sum())} NaN/Inf values; it cannot be "
                                   f"{what} (re-export or fix the checkpoint)")


def check_training_memory(cfg, what: str = "training") -> None:
    """Refuse a model whose fp32 weights + gradients + AdamW moments (16 bytes/parameter, a lower bound:
    activations come on top) cannot fit in this process's memory, before anything is allocated."""
    from spectra.sizes import count_params

    n = count_params(cfg)["total"]
    check_memory(16 * n, f"{what} a {n / 1e6:,.0f}M-parameter model (fp32 weights, gradients, AdamW state)",
                 "choose a smaller preset or smaller model.* sizes")
