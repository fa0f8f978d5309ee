"""Packed ternary models and their inference engines (issue 7).

* :mod:`spectra.infer.formats`      the packed-format table (t2, t1; f16 / q8 heads)
* :mod:`spectra.infer.packing`      block layouts of those formats, padding, the q8 head
* :mod:`spectra.infer.backends`     the engine-backend table (native, torch)
* :mod:`spectra.infer.packed_model` packed directories: write, mmap load, checksums
* :mod:`spectra.infer.kernels`      the native C engine (built on first use, cpuid dispatch, threads)
* :mod:`spectra.infer.engine`       NativeEngine, TorchEngine, the PyTorch reference path
* :mod:`spectra.infer.sampling`, :mod:`spectra.infer.generate`  sampling and streaming generation
"""


_LAZY = {"PackedModel", "is_packed_dir", "write_packed"}  # from packed_model; lazily, so that the CLI can
# read the format and backend tables (spectra.infer.formats / .backends) without importing numpy


def __getattr__(name: str):
    if name in _LAZY:
        from spectra.infer import packed_model

        return getattr(packed_model, name)
    raise AttributeError(f"module 'spectra.infer' has no attribute '{name}'")
