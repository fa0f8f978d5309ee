"""GGUF export for llama.cpp, written with the ``gguf`` Python package.

Layout (llama.cpp's ``llama`` architecture, as its ``convert_hf_to_gguf.py`` writes it):

* keys: ``general.architecture = llama``, ``llama.{context_length, embedding_length,
  block_count, feed_forward_length, attention.head_count, attention.head_count_kv,
  attention.layer_norm_rms_epsilon, rope.dimension_count, rope.freq_base, vocab_size}``,
  ``general.file_type``, ``general.quantization_version``, the tokenizer, plus
  ``spectra.family`` / ``spectra.pretraining_model_parallel``.
* tensors: ``token_embd``, ``blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output,
  ffn_norm, ffn_gate, ffn_up, ffn_down}``, ``output_norm``, ``output``. Norms are F32.
* Q and K rows are permuted per head from HF's rotate-half RoPE layout to the
  interleaved-pair layout llama.cpp's ``rope`` (mode 0) expects.

Ternary types (TQ2_0: 2 bits/trit, TQ1_0: 5 trits/byte; both 256-weight blocks with one
fp16 scale): each TriLM matrix is first decomposed into (W_hat, per-shard gamma) by
:func:`spectra.ternary.recover_ternary`; the values written are ``fp16(gamma_s) * W_hat``,
so every block's absmax (its scale) is exactly its shard's gamma rounded to fp16 and the
trits are exact. The only change is gamma's rounding to fp16 (the format stores fp16
scales; a checkpoint exported from the fp16 release loses nothing). Every TQ tensor is
dequantized again and compared; a block that would straddle two shards (row-parallel
shards whose width is not a multiple of 256) cannot be exact, so such a matrix is
written as F16 instead (also exact) and listed in the summary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from spectra.errors import SpectraError

QTYPES = ("tq2_0", "tq1_0", "q8_0", "f16", "f32")
HEAD_TYPES = ("f32", "f16", "q8_0")


def _gg(name: str):
    import gguf

    return {"tq2_0": gguf.GGMLQuantizationType.TQ2_0, "tq1_0": gguf.GGMLQuantizationType.TQ1_0,
            "q8_0": gguf.GGMLQuantizationType.Q8_0, "f16": gguf.GGMLQuantizationType.F16,
            "f32": gguf.GGMLQuantizationType.F32}[name]


def _file_type(name: str):
    import gguf

    F = gguf.LlamaFileType
    return {"tq2_0": F.MOSTLY_TQ2_0, "tq1_0": F.MOSTLY_TQ1_0, "q8_0": F.MOSTLY_Q8_0,
            "f16": F.MOSTLY_F16, "f32": F.ALL_F32}[name]


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate-half rows -> llama.cpp interleaved rows, per head: [h, 2, d/2, in] -> [h, d/2, 2, in]."""
    out, inp = w.shape
    return w.reshape(n_heads, 2, out // n_heads // 2, inp).transpose(1, 2).reshape(out, inp)


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    out, inp = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, inp).transpose(1, 2).reshape(out, inp)


GGUF_NAMES = {
    "embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight", "lm_head.weight": "output.weight",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(name: str) -> str:
    """spectra/HF parameter name -> llama.cpp tensor name."""
    if name in GGUF_NAMES:
        return GGUF_NAMES[name]
    parts = name.split(".")  # layers.N.<module path>.weight
    if parts[0] != "layers" or parts[-1] != "weight":
        raise SpectraError(f"no GGUF name for tensor '{name}'")
    mod = ".".join(parts[2:-1])
    if mod not in GGUF_NAMES:
        raise SpectraError(f"no GGUF name for tensor '{name}'")
    return f"blk.{parts[1]}.{GGUF_NAMES[mod]}.weight"


@dataclass
class GGUFResult:
    path: Path
    qtype: str
    family: str
    types: dict[str, str] = field(default_factory=dict)  # gguf tensor name -> type
    fallbacks: dict[str, str] = field(default_factory=dict)  # tensor -> reason it was written as F16
    gamma_max_rel_rounding: float = 0.0  # max |fp16(gamma) - gamma| / gamma over all shards
    nbytes: int = 0

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for t in self.types.values():
            counts[t] = counts.get(t, 0) + 1
        s = (f"wrote {self.path} ({self.nbytes / 1e6:.2f} MB): llama architecture, {self.family}, "
             f"file type {self.qtype}; tensors: " + ", ".join(f"{n} {t}" for t, n in sorted(counts.items())))
        if self.qtype in ("tq2_0", "tq1_0"):
            s += f"\nternary matrices exact; gamma rounded to fp16 (max relative change {self.gamma_max_rel_rounding:.2e})"
        for k, why in self.fallbacks.items():
            s += f"\n  {k}: written as F16 ({why})"
        return s


def _quantize(arr: np.ndarray, qt: str):
    import gguf

    return gguf.quants.quantize(arr, _gg(qt))


def _ternary_tensor(w_fp16_vals: np.ndarray, qt: str) -> np.ndarray | None:
    """TQ-quantize values that are fp16(gamma)*W_hat; None if the round trip is not exact."""
    import gguf

    try:
        data = _quantize(w_fp16_vals, qt)
    except gguf.QuantError:
        return None
    back = gguf.quants.dequantize(data, _gg(qt)).reshape(w_fp16_vals.shape)
    return data if np.array_equal(back, w_fp16_vals) else None


def export_gguf(ckpt: str | Path, out: str | Path, *, qtype: str | None = None, head_type: str = "auto",
                embed_type: str = "auto", tokenizer: str | Path | None = None, name: str | None = None) -> GGUFResult:
    """Write ``out`` (a .gguf file, atomically) from a spectra or HF model directory."""
    import gguf

    from spectra.fsutil import atomic_path
    from spectra.interop.gguf_tokenizer import add_vocab, load_vocab
    from spectra.interop.hf import convert
    from spectra.ternary import dequantize, recover_ternary, split_of
    from spectra.store.tokenizer import TOKENIZER_FILE, find_tokenizer

    ckpt, out = Path(ckpt), Path(out)
    conv = convert(ckpt)
    cfg, fam = conv.cfg, conv.family
    qtype = qtype or ("tq2_0" if fam == "trilm" else "f16")
    if qtype not in QTYPES:
        raise SpectraError(f"unknown GGUF type '{qtype}'; allowed: {', '.join(QTYPES)}")
    if qtype.startswith("tq") and fam != "trilm":
        raise SpectraError(f"{ckpt}: --type {qtype} stores ternary weights, but this checkpoint is a {fam}; "
                           "use --type f16 or q8_0 (or export a TriLM)")
    auto = {"q8_0": "q8_0", "f32": "f32"}.get(qtype, "f16")
    head_type = auto if head_type == "auto" else head_type
    embed_type = auto if embed_type == "auto" else embed_type
    for flag, v in (("--head-type", head_type), ("--embed-type", embed_type)):
        if v not in HEAD_TYPES:
            raise SpectraError(f"unknown {flag} '{v}'; allowed: auto, {', '.join(HEAD_TYPES)}")
    tok_path = find_tokenizer(tokenizer or ckpt)
    if tok_path is None:
        raise SpectraError(f"no tokenizer: '{Path(tokenizer) if tokenizer else ckpt / TOKENIZER_FILE}' does not exist; "
                           "pass --tokenizer PATH/tokenizer.json (llama.cpp needs the vocabulary inside the GGUF file)")
    vocab = load_vocab(tok_path, cfg.vocab_size)
    if out.suffix != ".gguf":
        raise SpectraError(f"GGUF output '{out}' should end in .gguf")

    res = GGUFResult(out, qtype, fam)
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        w.add_name(name or ckpt.resolve().name)
        w.add_context_length(cfg.max_seq_len)
        w.add_embedding_length(cfg.dim)
        w.add_block_count(cfg.n_layers)
        w.add_feed_forward_length(cfg.ffn_dim)
        w.add_head_count(cfg.n_heads)
        w.add_head_count_kv(cfg.n_heads)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_vocab_size(cfg.vocab_size)
        w.add_file_type(_file_type(qtype))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_string("spectra.family", fam)
        if fam == "trilm":
            w.add_uint32("spectra.pretraining_model_parallel", cfg.mp)
        add_vocab(w, vocab, int(conv.config.get("bos_token_id", 0) or 0), int(conv.config.get("eos_token_id", 0) or 0))

        for key, t in conv.state.items():
            gname = gguf_name(key)
            t = t.detach().float()
            leaf = key.split(".")[-2] if "." in key else key
            if t.ndim == 1:
                data, qt = t.numpy().astype(np.float32), "f32"
            elif key == "lm_head.weight" or key == "embed_tokens.weight":
                qt = head_type if key == "lm_head.weight" else embed_type
                data = _quantize(t.numpy(), qt)
            else:
                qt = qtype
                if fam == "trilm" and qt in ("tq2_0", "tq1_0"):
                    q, g = recover_ternary(t, cfg.mp, split_of(key))
                    g16 = g.half().float()
                    nz = g > 0
                    if bool(nz.any()):
                        rel = ((g16 - g).abs()[nz] / g[nz]).max().item()
                        res.gamma_max_rel_rounding = max(res.gamma_max_rel_rounding, rel)
                    t = dequantize(q, g16, split_of(key))  # fp16(gamma) * W_hat, exact in fp32
                if leaf in ("q_proj", "k_proj"):
                    t = permute_qk(t, cfg.n_heads)  # rows stay within their head, hence their shard
                arr = t.contiguous().numpy()
                if qt in ("tq2_0", "tq1_0"):
                    data = _ternary_tensor(arr, qt)
                    if data is None:
                        res.fallbacks[gname] = (
                            f"row length {arr.shape[1]} is not a multiple of 256" if arr.shape[1] % 256 else
                            f"256-weight {qt.upper()} blocks would straddle shards with different gammas "
                            f"(mp={cfg.mp}, {split_of(key)} split)") + "; F16 keeps it exact"
                        qt, data = "f16", _quantize(arr, "f16")
                else:
                    data = _quantize(arr, qt)
            w.add_tensor(gname, data, raw_dtype=_gg(qt))
            res.types[gname] = qt.upper()
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=False)
        w.close()
    res.nbytes = out.stat().st_size
    return res
