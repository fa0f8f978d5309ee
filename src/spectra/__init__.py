"""spectra-lm: train, quantize, pack, evaluate and serve FloatLM / TriLM / QuantLM suites."""

__version__ = "0.1.0"

from spectra.errors import SpectraError  # noqa: E402

__all__ = ["__version__", "SpectraError"]
