"""Output names the tools give to what they write, built and parsed in one place.

QuantLM directories (``spectra quantize``, the suite): ``q{bits}-g{group}-s{seed}``
for GPTQ with calibration seed ``seed``, ``q{bits}-g{group}-rtn`` for round-to-nearest,
``grow`` instead of ``g{group}`` for one scale per row (group size -1); the packed
GPTQ twin of ``NAME`` is ``NAME-packed``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from spectra.errors import SpectraError

PACKED_SUFFIX = "-packed"
_QUANT_NAME = re.compile(r"^q(?P<bits>\d+)-(?:g(?P<group>\d+)|(?P<row>grow))-(?:s(?P<seed>\d+)|(?P<rtn>rtn))"
                         r"(?P<packed>-packed)?$")


@dataclass(frozen=True)
class QuantName:
    bits: int
    group_size: int  # -1: one scale per row
    method: str  # gptq | rtn
    seed: int | None  # calibration seed (GPTQ); None for RTN
    packed: bool = False

    def __str__(self) -> str:
        return quantlm_name(self.bits, self.group_size, self.method, self.seed, packed=self.packed)

    @property
    def family(self) -> str:
        """The report's family label: q8, q6, q4, q3, ..."""
        return f"q{self.bits}"

    @property
    def variant(self) -> str:
        """What tells QuantLMs of one bit width apart: ``s<seed>`` (GPTQ) or ``rtn``."""
        return "rtn" if self.method == "rtn" else f"s{self.seed}"


def quantlm_name(bits: int, group_size: int, method: str, seed: int | None, *, packed: bool = False) -> str:
    if method not in ("gptq", "rtn"):
        raise SpectraError(f"unknown quantization method '{method}'; allowed: gptq, rtn")
    if method == "gptq" and seed is None:
        raise SpectraError("a GPTQ QuantLM name needs its calibration seed")
    g = f"g{group_size}" if group_size > 0 else "grow"
    name = f"q{bits}-{g}-" + ("rtn" if method == "rtn" else f"s{seed}")
    return name + (PACKED_SUFFIX if packed else "")


def parse_quantlm_name(name: str) -> QuantName:
    """Inverse of :func:`quantlm_name`; a name it did not build is a :class:`SpectraError`."""
    m = _QUANT_NAME.match(name)
    if m is None:
        raise SpectraError(f"'{name}' is not a QuantLM output name (expected q<bits>-g<group>-s<seed> or "
                           f"q<bits>-g<group>-rtn, optionally with '{PACKED_SUFFIX}')")
    rtn = m["rtn"] is not None
    return QuantName(bits=int(m["bits"]), group_size=-1 if m["row"] else int(m["group"]),
                     method="rtn" if rtn else "gptq", seed=None if rtn else int(m["seed"]),
                     packed=m["packed"] is not None)
