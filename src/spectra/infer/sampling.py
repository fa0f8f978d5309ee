"""Next-token sampling: greedy, temperature, top-k, top-p (nucleus), seeded."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spectra.errors import SpectraError


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 = greedy (argmax)
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 1.0  # 1 = no nucleus cut
    seed: int | None = None

    def validate(self) -> "SamplingConfig":
        if not self.temperature >= 0:
            raise SpectraError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise SpectraError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise SpectraError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2**63:  # numpy's generator takes no negative seed
            raise SpectraError(f"seed must be in [0, 2^63), got {self.seed}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    def __init__(self, cfg: SamplingConfig = SamplingConfig()):
        self.cfg = cfg.validate()
        self.rng = np.random.default_rng(cfg.seed)

    def probs(self, logits: np.ndarray) -> np.ndarray:
        """The distribution sampled from (after temperature, top-k, top-p), fp64 [vocab]."""
        c = self.cfg
        z = np.asarray(logits, dtype=np.float64).reshape(-1)
        if c.greedy:
            p = np.zeros_like(z)
            p[int(np.argmax(z))] = 1.0
            return p
        z = z / c.temperature
        if 0 < c.top_k < z.size:
            kth = np.partition(z, -c.top_k)[-c.top_k]
            z = np.where(z >= kth, z, -np.inf)
        p = np.exp(z - z.max())
        p /= p.sum()
        if c.top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            cum = np.cumsum(p[order])
            keep = int(np.searchsorted(cum, c.top_p) + 1)  # smallest prefix with mass >= top_p
            mask = np.zeros_like(p, dtype=bool)
            mask[order[:keep]] = True
            p = np.where(mask, p, 0.0)
            p /= p.sum()
        return p

    def __call__(self, logits: np.ndarray) -> int:
        if self.cfg.greedy:
            return int(np.argmax(logits))
        p = self.probs(logits)
        return int(self.rng.choice(p.size, p=p))
