"""Interoperability: Hugging Face import/export, ternary verification, GGUF export.

- :mod:`spectra.interop.hf`: ``import_hf``, ``export_hf``, ``convert`` (any Llama HF dir,
  TriLM decomposition into W_hat and per-shard gamma).
- :mod:`spectra.interop.layout`: shard-layout inference (search over mp; math in spectra.ternary).
- :mod:`spectra.interop.verify`: ``verify_dir`` / ``format_table`` (the "<= 1 + MP" check).
- :mod:`spectra.interop.gguf_export`: ``export_gguf`` (llama arch, TQ2_0/TQ1_0/Q8_0/F16).
- :mod:`spectra.interop.ggml_ref`: a torch reference of llama.cpp's quantized matmul numerics.

Submodules import torch; import them directly (this package stays light).
"""
