"""Build and load the native engine (spectra_infer.c) with the system C compiler.

Choice (documented in docs/packed-format.md): the shared library is compiled on
first use into a per-user cache, keyed by the hash of the C sources, the compiler's
version string and the flags, then loaded with ctypes. No torch ABI is involved, no
build step at install time is needed, and a source edit simply builds a new key.
The binary is portable across x86-64 CPUs and across aarch64 CPUs: ISA-specific code is
compiled with function-level target pragmas (x86: avx2 / avxvnni / avx512vnni; aarch64: armv8.2-a+dotprod,
armv8.6-a+i8mm) and selected at run time (cpuid; getauxval hwcaps), never at compile time
(no -march=native), so the same flags build on both architectures. When no compiler exists, the
loader raises :class:`KernelUnavailable` and callers fall back to the PyTorch
reference path.

Environment:
  SPECTRA_KERNEL=auto|scalar|avx2|avxvnni|avx512|neon|i8mm  force a code path (default auto = best the CPU has)
  SPECTRA_KERNEL_CACHE=DIR                where built libraries live (default ~/.cache/spectra/kernels)
  SPECTRA_SPIN_US=N                       how long a waiting thread spins before it sleeps (default 50)
  SPECTRA_CHUNK_ROWS=N                    output rows per chunk handed to a thread (multiple of 8, default 64)
  CC=...                                  compiler (default: cc, gcc or clang from PATH)
"""

from __future__ import annotations

import ctypes
import hashlib
import operator
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from spectra.errors import SpectraError

HERE = Path(__file__).resolve().parent
SOURCES = ("spectra_infer.c", "pool.inc", "kernels.inc", "x86.inc", "neon.inc", "forward.inc", "ops.inc")
CFLAGS = ["-O3", "-std=gnu11", "-fPIC", "-shared", "-pthread", "-ffp-contract=off", "-fno-math-errno"]
KERNELS = {"auto": 0, "scalar": 1, "avx2": 2, "avx512": 3, "neon": 4, "i8mm": 5, "avxvnni": 6}
KERNEL_NAMES = {v: k for k, v in KERNELS.items()}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None


class KernelUnavailable(SpectraError):
    """The native library cannot be built or loaded here (no compiler, unsupported platform)."""


def _compiler() -> str:
    cc = os.environ.get("CC")
    if cc:
        return cc
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return name
    raise KernelUnavailable("no C compiler found (set CC or install gcc/clang); use the PyTorch reference path (--backend torch)")


def _cache_dir() -> Path:
    d = os.environ.get("SPECTRA_KERNEL_CACHE")
    if d:
        return Path(d)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "spectra" / "kernels"


def library_path() -> tuple[Path, str, list[str]]:
    cc = _compiler()
    try:
        ver = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelUnavailable(f"C compiler '{cc}' does not run ({e})") from None
    h = hashlib.sha256()
    for name in SOURCES:
        h.update((HERE / name).read_bytes())
    h.update(ver.encode())
    h.update(" ".join(CFLAGS).encode())
    return _cache_dir() / h.hexdigest()[:16] / "libspectra_infer.so", cc, CFLAGS


def build(force: bool = False) -> Path:
    """Compile (if needed) and return the path of the shared library."""
    path, cc, flags = library_path()
    if path.exists() and not force:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".libspectra_infer.", suffix=".so", dir=path.parent)
    os.close(fd)
    cmd = [cc, *flags, "-o", tmp, str(HERE / "spectra_infer.c"), "-lm"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise KernelUnavailable(f"building the native kernel failed ({' '.join(cmd)}):\n{r.stderr.strip()[-2000:]}")
        os.replace(tmp, path)  # atomic: concurrent builders race harmlessly
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


# ----------------------------------------------------------------- ctypes mirror of the C structs
class Mat(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("gamma", ctypes.c_void_p),
                ("rows", ctypes.c_int32), ("k", ctypes.c_int32), ("kp", ctypes.c_int32),
                ("mp", ctypes.c_int32), ("split", ctypes.c_int32), ("fmt", ctypes.c_int32),
                ("row_bytes", ctypes.c_int32)]


class Layer(ctypes.Structure):
    _fields_ = [(n, Mat) for n in ("q", "k", "v", "o", "gate", "up", "down")] + [
        ("attn_norm", ctypes.c_void_p), ("ffn_norm", ctypes.c_void_p)]


class Model(ctypes.Structure):
    _fields_ = [("dim", ctypes.c_int32), ("n_layers", ctypes.c_int32), ("n_heads", ctypes.c_int32),
                ("head_dim", ctypes.c_int32), ("ffn", ctypes.c_int32), ("vocab", ctypes.c_int32),
                ("norm_eps", ctypes.c_float), ("pad0", ctypes.c_float),
                ("embed", ctypes.c_void_p), ("final_norm", ctypes.c_void_p),
                ("head_fmt", ctypes.c_int32), ("head_kp", ctypes.c_int32),
                ("head", ctypes.c_void_p), ("head_scale", ctypes.c_void_p),
                ("layers", ctypes.POINTER(Layer)),
                ("rope_cos", ctypes.c_void_p), ("rope_sin", ctypes.c_void_p),
                ("rope_len", ctypes.c_int32), ("pad1", ctypes.c_int32)]


def _declare(lib: ctypes.CDLL) -> None:
    P, I, F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float  # noqa: F841
    lib.spx_cpu_supports.argtypes, lib.spx_cpu_supports.restype = [I], I
    lib.spx_best_kernel.argtypes, lib.spx_best_kernel.restype = [], I
    lib.spx_state_new.argtypes, lib.spx_state_new.restype = [ctypes.POINTER(Model), I, I, I, I, I, I, I], P
    lib.spx_state_free.argtypes, lib.spx_state_free.restype = [P], None
    lib.spx_state_kernel.argtypes, lib.spx_state_kernel.restype = [P], I
    lib.spx_state_pos.argtypes, lib.spx_state_pos.restype = [P], I
    lib.spx_state_set_pos.argtypes, lib.spx_state_set_pos.restype = [P, I], I
    lib.spx_forward.argtypes, lib.spx_forward.restype = [P, P, I, P, I], I
    # multi-sequence engine (spectra.infer.engine.NativeBatchEngine)
    lib.spx_state_max_seqs.argtypes, lib.spx_state_max_seqs.restype = [P], I
    lib.spx_slot_len.argtypes, lib.spx_slot_len.restype = [P, I], I
    lib.spx_slot_set_len.argtypes, lib.spx_slot_set_len.restype = [P, I, I], I
    lib.spx_slot_release.argtypes, lib.spx_slot_release.restype = [P, I], I
    lib.spx_step.argtypes, lib.spx_step.restype = [P, I, P, P, P, P, I], I
    lib.spx_matmul.argtypes, lib.spx_matmul.restype = [ctypes.POINTER(Mat), P, I, P, I, I, I], I
    lib.spx_quantize.argtypes, lib.spx_quantize.restype = [P, I, I, I, I, I, P, P, P, I], I
    lib.spx_read_sum.argtypes, lib.spx_read_sum.restype = [P, ctypes.c_size_t, I, I], ctypes.c_uint64
    lib.spx_last_error.argtypes, lib.spx_last_error.restype = [], I
    lib.spx_cpu_count.argtypes, lib.spx_cpu_count.restype = [], I
    lib.spx_max_threads.argtypes, lib.spx_max_threads.restype = [], I
    lib.spx_chunk_rows.argtypes, lib.spx_chunk_rows.restype = [], I


def load_library() -> ctypes.CDLL:
    """Build on first use, load once per process. Raises KernelUnavailable."""
    global _lib
    with _lock:
        if _lib is None:
            try:
                lib = ctypes.CDLL(str(build()))
            except OSError as e:
                raise KernelUnavailable(f"cannot load the native kernel: {e}") from None
            _declare(lib)
            _lib = lib
        return _lib


# ----------------------------------------------------------------- threads
THREADS_PER_CPU = 4  # SPX_THREADS_PER_CPU in spectra_infer.c: the hard cap is this x the usable CPUs
POOL_ERRORS = {
    -10: "more threads than the limit ({limit} = 4 x the {cpus} CPUs this process may use)",
    -11: "the system refused to start a thread (pthread_create failed: process or memory limits)",
    -12: "out of memory",
}


def usable_cpus() -> int:
    """CPUs in this process's affinity mask (what taskset / a cpuset allows), the default thread count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def check_threads(n: int) -> int:
    """Validate an explicit thread count before any C call: 1 <= n <= 4 x usable CPUs.

    More threads than CPUs is allowed when asked for (it only time-slices), but far more is a
    mistake that could exhaust the process table, so it is refused before anything is created."""
    cpus = usable_cpus()
    limit = THREADS_PER_CPU * cpus
    try:
        k = operator.index(n) if not isinstance(n, bool) else None  # int, numpy integers; not 2.0 or True
    except TypeError:
        k = None
    if k is None or k < 1:
        raise SpectraError(f"threads must be a positive integer, got {n!r}")
    n = k
    if n > limit:
        raise SpectraError(f"threads={n} is refused: {POOL_ERRORS[-10].format(limit=limit, cpus=cpus)}; "
                           f"use at most {limit} (default: {cpus}, one per CPU)")
    return n


def pool_error(lib: ctypes.CDLL) -> str | None:
    """Why the last pool / state creation on this thread failed, if the thread pool was the cause."""
    code = lib.spx_last_error()
    if code in POOL_ERRORS:
        cpus = lib.spx_cpu_count()
        return POOL_ERRORS[code].format(limit=THREADS_PER_CPU * cpus, cpus=cpus)
    return None


def kernel_id(name: str) -> int:
    if name not in KERNELS:
        from spectra.errors import closest

        raise SpectraError(f"unknown kernel '{name}'{closest(name, KERNELS)}; allowed: {', '.join(KERNELS)}")
    return KERNELS[name]


def resolve_kernel(name: str | None = None) -> str:
    """Kernel path to use: explicit name, else $SPECTRA_KERNEL, else the best the CPU supports.

    A forced path the CPU lacks is an error (never a silent fallback)."""
    name = name or os.environ.get("SPECTRA_KERNEL") or "auto"
    kid = kernel_id(name)
    lib = load_library()
    if kid == 0:
        return KERNEL_NAMES[lib.spx_best_kernel()]
    if not lib.spx_cpu_supports(kid):
        raise SpectraError(f"kernel '{name}' is not supported by this CPU; available: {', '.join(available_kernels())}")
    return name


def available_kernels() -> list[str]:
    lib = load_library()
    return [n for n, i in KERNELS.items() if i and lib.spx_cpu_supports(i)]


def best_kernel() -> str:
    return KERNEL_NAMES[load_library().spx_best_kernel()]
