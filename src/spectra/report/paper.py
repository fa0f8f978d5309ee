"""Published Spectra numbers (SPEC.md), for `spectra report --paper`."""

from __future__ import annotations

# 6-task average by size: Float, Q8, Q6, Q4, Q3, TriLM.
SIX_TASK_AVG = {
    "99m": {"floatlm": 44.3, "q8": 44.3, "q6": 44.3, "q4": 42.6, "q3": 40.3, "trilm": 43.5},
    "390m": {"floatlm": 48.5, "q8": 48.6, "q6": 48.9, "q4": 47.7, "q3": 46.5, "trilm": 46.4},
    "1.1b": {"floatlm": 54.9, "q8": 54.8, "q6": 55.0, "q4": 54.4, "q3": 52.6, "trilm": 51.6},
    "3.9b": {"floatlm": 61.4, "q8": 61.3, "q6": 61.3, "q4": 60.7, "q3": 56.8, "trilm": 60.7},
}
# Size in bits x 1e9 as published (the rest computed from the presets by spectra.sizes).
SIZE_BITS = {
    ("trilm", "99m"): 0.90, ("trilm", "390m"): 2.11, ("trilm", "1.1b"): 4.42, ("trilm", "3.9b"): 10.76,
    ("floatlm", "99m"): 1.60, ("floatlm", "390m"): 6.28, ("floatlm", "1.1b"): 18.39, ("floatlm", "3.9b"): 63.83,
    ("q4", "99m"): 1.03, ("q4", "3.9b"): 20.59,
}
# Final validation loss law at 300B tokens: L(N) = A / N^alpha + eps.
SCALING = {"trilm": {"A": 185.0, "alpha": 0.26, "eps": 1.76}, "floatlm": {"A": 159.0, "alpha": 0.26, "eps": 1.67}}
# TriLM validation perplexity at 50B / 150B / 300B tokens.
TRILM_PPL = {"99m": {50e9: 27.11, 150e9: 26.30, 300e9: 25.70}, "560m": {50e9: 15.48, 150e9: 14.50, 300e9: 14.01}}
PAPER_PARAMS = {"99m": 99.74e6, "190m": 190.0e6, "390m": 392.4e6, "560m": 569.2e6, "830m": 834.0e6,
                "1.1b": 1.149e9, "1.5b": 1.515e9, "2.4b": 2.461e9, "3.9b": 3.989e9}


def size_bits(family: str, size: str) -> float:
    """Size in bits of a published model: the paper's figure when given, else computed from the preset."""
    if (family, size) in SIZE_BITS:
        return SIZE_BITS[(family, size)] * 1e9
    from spectra.sizes import size_bits as compute
    from spectra.config import get_preset
    from spectra.model import build_meta, param_counts

    p = get_preset(size)
    return compute(param_counts(build_meta(p.model)), family, p.model)
