"""Model sizes from a config alone: parameter counts and size in bits per family (the paper's x-axis).

Pure arithmetic on :class:`~spectra.config.ModelConfig` (no torch), so ``spectra info``
starts fast. Embedding, output head and norms are counted at 16 bits in every family; only the
linear weights inside the transformer blocks change precision:

* FloatLM: 16 bits per weight (fp16 / bf16);
* QuantLM: 8 / 6 / 4.25 / 3.25 effective bits per weight, the paper's figures for
  GPTQ with group size 128 (the group scales are folded into the 0.25);
* TriLM: log2(3) bits per weight plus one 16-bit scale per model-parallel shard of
  each matrix (negligible).
"""

from __future__ import annotations

import math

from spectra.config import ModelConfig

LOG2_3 = math.log2(3)
QUANT_BITS = {8: 8.0, 6: 6.0, 4: 4.25, 3: 3.25}
FAMILIES = ("floatlm", "q8", "q6", "q4", "q3", "trilm")


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """:func:`spectra.model.param_counts` of the model a config builds, from its shapes alone.

    Keys: embedding, head, linear (inside blocks), norm, total, non_embedding and paper (the
    paper's count: linear + embedding + head, no norms). Equal to counting a meta-device
    build (tested for every preset).
    """
    d, f, v, n = cfg.dim, cfg.ffn_dim, cfg.vocab_size, cfg.n_layers
    c = {"embedding": v * d, "head": v * d, "linear": n * (4 * d * d + 3 * d * f), "norm": n * 2 * d + d}
    c["total"] = sum(c.values())
    c["non_embedding"] = c["total"] - c["embedding"]
    c["paper"] = c["linear"] + c["embedding"] + c["head"]
    return c


def size_bits(counts: dict[str, int], family: str, cfg: ModelConfig | None = None) -> float:
    """Size in bits from :func:`count_params` (or :func:`spectra.model.param_counts`) output."""
    other = counts["embedding"] + counts["head"] + counts["norm"]
    lin = counts["linear"]
    family = family.lower()
    if family in ("floatlm", "float", "fp16"):
        per = 16.0
        extra = 0.0
    elif family in ("trilm", "ternary"):
        per = LOG2_3
        n_mats = 7 * (cfg.n_layers if cfg else 0)
        extra = 16.0 * n_mats * (cfg.mp if cfg else 1)
    elif family in ("bilm", "binary"):
        per = 1.0
        extra = 16.0 * 7 * (cfg.n_layers if cfg else 0) * (cfg.mp if cfg else 1)
    elif family.startswith("q") and family[1:].isdigit() and int(family[1:]) in QUANT_BITS:
        per = QUANT_BITS[int(family[1:])]
        extra = 0.0
    else:
        raise ValueError(f"unknown family {family!r}; allowed: {', '.join(FAMILIES)}, bilm")
    return 16.0 * other + per * lin + extra
