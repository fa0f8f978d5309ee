"""Mixed precision: autocast contexts and the fp16 dynamic loss scaler.

Master weights and optimizer state stay fp32 in every mode; only the forward
matmuls run in bf16/fp16 under autocast. fp16 multiplies the loss by a scale
before backward; a step whose gradients overflow is skipped, the scale halves,
and the skip is counted (the paper reports a few hundred such batches per run).
After ``window`` clean steps the scale doubles.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from spectra.errors import SpectraError

_COMPUTE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device_type: str) -> str:
    if precision == "auto":
        return "bf16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return precision


def amp_dtype(precision: str) -> torch.dtype:
    """The dtype the matmuls compute in under a resolved ``precision`` (fp32 | bf16 | fp16)."""
    try:
        return _COMPUTE[precision]
    except KeyError:
        raise SpectraError(f"precision '{precision}' is unknown; allowed: {', '.join(_COMPUTE)}") from None


def autocast(precision: str, device_type: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=amp_dtype(precision))


@dataclass
class LossScaler:
    """Dynamic loss scaling (Megatron/apex semantics). Disabled = scale 1, never skips."""

    enabled: bool = False
    scale: float = 2.0**16
    window: int = 1000
    min_scale: float = 1.0
    factor: float = 2.0
    good_steps: int = 0
    overflows: int = 0  # steps skipped because of overflow, over the whole run

    def loss_multiplier(self) -> float:
        return self.scale if self.enabled else 1.0

    def update(self, finite: bool) -> bool:
        """Record one step's outcome; returns True when the step should be applied."""
        if not self.enabled:
            return finite
        if not finite:
            self.overflows += 1
            self.good_steps = 0
            self.scale = max(self.min_scale, self.scale / self.factor)
            return False
        self.good_steps += 1
        if self.good_steps % self.window == 0:
            self.scale *= self.factor
        return True

    def state_dict(self) -> dict:
        return {"enabled": self.enabled, "scale": self.scale, "good_steps": self.good_steps,
                "overflows": self.overflows}

    def load_state_dict(self, d: dict) -> None:
        self.scale = float(d["scale"])
        self.good_steps = int(d["good_steps"])
        self.overflows = int(d["overflows"])
