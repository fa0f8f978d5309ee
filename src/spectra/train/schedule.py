"""Learning-rate and weight-decay schedules (SPEC.md, "Training recipe").

Steps are counted 1..T (``s`` = the s-th optimizer update). With warmup W, peak
``P(s)`` and the end-of-decay ratio ``r``:

* warmup (s <= W):            lr = P(s) * s / W
* progress p = (s - W) / (T - W)
* cosine (FloatLM):           lr = P(s) * (r + (1 - r) * (1 + cos(pi p)) / 2)
* linear (TriLM):             lr = P(s) * (1 - (1 - r) p)
* TriLM LR drop at fraction a:  P(s) = lr_before for s <= a T, lr_after after; the
  line continues from the same progress p, only rescaled (the paper's "drop of the
  peak LR at half of training").
* TriLM weight-decay removal at fraction b: wd(s) = wd for s <= b T, 0 after.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    total_steps: int
    warmup_steps: int
    peak_lr: float
    decay: str = "cosine"  # cosine | linear | constant
    min_lr_ratio: float = 0.1
    peak_lr_after: float | None = None  # set with drop_after_step for the TriLM LR drop
    drop_after_step: int | None = None
    weight_decay: float = 0.1
    wd_off_after_step: int | None = None

    def peak(self, step: int) -> float:
        if self.drop_after_step is not None and self.peak_lr_after is not None and step > self.drop_after_step:
            return self.peak_lr_after
        return self.peak_lr

    def lr(self, step: int) -> float:
        peak = self.peak(step)
        if self.warmup_steps > 0 and step <= self.warmup_steps:
            return peak * step / self.warmup_steps
        if self.decay == "constant" or self.total_steps <= self.warmup_steps:
            return peak
        p = min(1.0, max(0.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)))
        r = self.min_lr_ratio
        if self.decay == "cosine":
            return peak * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * p)))
        if self.decay == "linear":
            return peak * (1 - (1 - r) * p)
        raise ValueError(f"unknown decay {self.decay!r}")

    def wd(self, step: int) -> float:
        if self.wd_off_after_step is not None and step > self.wd_off_after_step:
            return 0.0
        return self.weight_decay


def build_schedule(cfg, family: str, total_steps: int, peak_lr: float, peak_lr_after: float | None) -> Schedule:
    """From a resolved TrainConfig (schedule + optim sections)."""
    s, o = cfg.schedule, cfg.optim
    ternary = family in ("trilm", "bilm")
    decay = s.decay if s.decay != "auto" else ("linear" if ternary else "cosine")
    warm = int(round(s.warmup * total_steps)) if s.warmup < 1 else int(s.warmup)
    warm = min(warm, total_steps)
    lr_drop = ternary if s.lr_drop is None else s.lr_drop
    wd_off = ternary if s.wd_off is None else s.wd_off
    return Schedule(
        total_steps=total_steps,
        warmup_steps=warm,
        peak_lr=peak_lr,
        decay=decay,
        min_lr_ratio=o.min_lr_ratio,
        peak_lr_after=peak_lr_after if lr_drop else None,
        drop_after_step=int(math.floor(s.lr_drop_at * total_steps)) if lr_drop else None,
        weight_decay=o.weight_decay,
        wd_off_after_step=int(math.floor(s.wd_off_at * total_steps)) if wd_off else None,
    )
