"""QuantLM: GPTQ / RTN post-training quantization of FloatLMs (see docs/quantization.md)."""

from spectra.quant.api import (
    calibration_tokens, is_packed_gptq, load_quantized, quantize_model, read_packed_state, refuse_non_float,
    save_packed, save_quantized, spec_of,
)
from spectra.quant.gptq import Hessian, gptq_quantize, output_error
from spectra.quant.rtn import SUPPORTED_BITS, QuantResult, dequantize, rtn_quantize
from spectra.quant.sequential import QuantSpec, quantize_layers

__all__ = [
    "Hessian", "QuantResult", "QuantSpec", "SUPPORTED_BITS", "calibration_tokens", "dequantize", "gptq_quantize",
    "is_packed_gptq", "load_quantized", "output_error", "quantize_layers", "quantize_model", "read_packed_state",
    "refuse_non_float", "rtn_quantize", "save_packed", "save_quantized", "spec_of",
]
