"""Floating-point dtype names as they appear on disk (``config.json``'s ``torch_dtype``) and on the CLI.

The one map from a name to a torch dtype. torch is imported only when a name is
resolved, so commands can list the names without paying for torch at start-up.
"""

from __future__ import annotations

from spectra.errors import SpectraError

DTYPE_NAMES = ("float32", "float16", "bfloat16")


def torch_dtype(name, *, what: str = "dtype", default=None):
    """``'float16'`` -> ``torch.float16``; a torch dtype passes through; ``None``/``'auto'`` -> ``default``
    (fp32 when not given: the CPU default, deterministic everywhere)."""
    import torch

    if name is None or name == "auto":
        return default if default is not None else torch.float32
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPE_NAMES:
        raise SpectraError(f"{what} '{name}' is not supported; allowed: {', '.join(DTYPE_NAMES)}")
    return getattr(torch, name)


def dtype_name(dtype) -> str:
    """``torch.float16`` -> ``'float16'`` (the spelling config.json uses)."""
    return str(dtype).removeprefix("torch.")
