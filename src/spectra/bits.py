"""Model size in bits for each family (the paper's x-axis).

Embedding, output head and norms are counted at 16 bits in every family; only the
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


def size_bits(counts: dict[str, int], family: str, cfg: ModelConfig | None = None) -> float:
    """Size in bits from :func:`spectra.model.param_counts` output."""
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
