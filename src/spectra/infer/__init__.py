"""Packed ternary models and their inference engines (issue 7).

* :mod:`spectra.infer.packing`      t2 / t1 trit formats, q8 head
* :mod:`spectra.infer.packed_model` packed directories: write, mmap load, checksums
* :mod:`spectra.infer.kernels`      the native C engine (built on first use, cpuid dispatch, threads)
* :mod:`spectra.infer.engine`       NativeEngine, TorchEngine, the PyTorch reference path
* :mod:`spectra.infer.sampling`, :mod:`spectra.infer.generate`  sampling and streaming generation
"""

from spectra.infer.packed_model import PackedModel, is_packed_dir, write_packed  # noqa: F401
