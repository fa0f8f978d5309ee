"""Native kernel: C source compiled on first use (see build.py) and loaded with ctypes."""

from spectra.infer.kernels.build import (  # noqa: F401
    KERNELS, KernelUnavailable, available_kernels, best_kernel, kernel_id, load_library, resolve_kernel,
)
