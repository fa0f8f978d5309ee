"""Native thread pool: results independent of thread count and rows per call, thread caps, thread-creation
failures reported, and a pool that still finishes next to a busy process (it sleeps instead of spinning)."""

import ctypes
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from spectra.errors import SpectraError

from spectra.infer import kernels  # noqa: E402  (our own module: an import error must fail)
try:
    AVAILABLE = kernels.available_kernels()
except kernels.KernelUnavailable as e:
    pytest.skip(f"native kernel unavailable: {e}", allow_module_level=True)

from spectra.infer.engine import load_engine, matrix_from_ternary, native_matmul  # noqa: E402
from spectra.infer.kernels.build import check_threads, load_library, pool_error, usable_cpus  # noqa: E402

PROMPT = [int(t) for t in np.random.default_rng(1).integers(1, 4096, 19)]


@pytest.fixture(scope="module")
def nano(tmp_path_factory):
    """A random nano TriLM packed t2/f16 (f16 head: vocab 4096 rows split between threads) and t1/q8."""
    from spectra.checkpoint import save_model
    from spectra.config import get_preset
    from spectra.infer.packed_model import write_packed
    from spectra.model import Transformer
    from spectra.ternary import to_ternary

    d = tmp_path_factory.mktemp("pool")
    ck = save_model(to_ternary(Transformer(get_preset("nano").model).init_weights(5), 1), d / "ck", "trilm")
    write_packed(ck, d / "t2", "t2", "f16", progress=False)
    write_packed(ck, d / "t1", "t1", "q8", progress=False)
    return d


def _run(path, n_threads, kernel, decode=4):
    """Prefill logits of every prompt token, then greedy decode logits: one array."""
    eng = load_engine(path, "native", max_len=64, n_threads=n_threads, kernel=kernel)
    out = [eng.forward(PROMPT, all_logits=True)]
    for _ in range(decode):
        out.append(eng.forward([int(out[-1].reshape(-1, out[-1].shape[-1])[-1].argmax())])[None])
    eng.close()
    return np.concatenate(out)


@pytest.mark.parametrize("fmt", ["t2", "t1"])
def test_threads_1_to_4_give_identical_logits(nano, fmt):
    for kern in AVAILABLE:
        ref = _run(nano / fmt, 1, kern)
        for n in (2, 3, 4):
            assert np.array_equal(_run(nano / fmt, n, kern), ref), (kern, n)


@pytest.mark.parametrize("fmt", ["t2", "t1"])
def test_chunk_size_and_threads_never_change_logits(nano, fmt, monkeypatch):
    """Rows are handed out in chunks from a shared counter (whichever thread is free takes the next):
    chunk sizes (SPECTRA_CHUNK_ROWS, read when a pool starts) and thread counts give the same bits."""
    lib = load_library()
    for kern in AVAILABLE:
        monkeypatch.delenv("SPECTRA_CHUNK_ROWS", raising=False)
        ref = _run(nano / fmt, 1, kern, decode=2)
        for chunk, n in (("8", 2), ("8", 3), ("24", 2), ("4096", 2)):
            monkeypatch.setenv("SPECTRA_CHUNK_ROWS", chunk)
            assert lib.spx_chunk_rows() == int(chunk)
            assert np.array_equal(_run(nano / fmt, n, kern, decode=2), ref), (kern, chunk, n)
    for bad in ("12", "0", "x", "-8", "131072"):  # not a multiple of 8 in [8, 65536]: the default
        monkeypatch.setenv("SPECTRA_CHUNK_ROWS", bad)
        assert lib.spx_chunk_rows() == 64, bad


def test_matmul_chunks_of_8_rows(monkeypatch):
    """Many small chunks over 1-4 threads: the scalar single-thread bits on every path."""
    rng = np.random.default_rng(3)
    m = _random_matrix(133, 700, 2, "col", "t2", rng)
    x = rng.normal(size=(9, 700)).astype(np.float32)
    ref = native_matmul(x, m, kernel="scalar", n_threads=1, levels=2)
    monkeypatch.setenv("SPECTRA_CHUNK_ROWS", "8")
    for kern in AVAILABLE:
        for n in (1, 2, 4):
            assert np.array_equal(native_matmul(x, m, kernel=kern, n_threads=n, levels=2), ref), (kern, n)


def _random_matrix(rows, k, mp, split, fmt, rng):
    q = rng.choice(np.array([-1, 0, 1], dtype=np.int8), size=(rows, k), p=[0.3, 0.4, 0.3])
    return matrix_from_ternary(q, rng.uniform(0.005, 0.05, mp).astype(np.float32), split, fmt)


@pytest.mark.parametrize("fmt", ["t2", "t1"])
def test_matmul_rows_independent_of_path_threads_and_batch(fmt):
    """Batch invariance at the matmul: a row computed alone (T=1) or inside T=37, on any path and any
    thread count, has the same bits (integer dots, one fp32 reduction order everywhere)."""
    rng = np.random.default_rng(7)
    for rows, k, mp, split in [(96, 512, 1, "col"), (37, 1536, 6, "row"), (41, 300, 2, "col")]:
        m = _random_matrix(rows, k, mp, split, fmt, rng)
        x = (rng.normal(size=(37, k)) * rng.uniform(0.1, 4.0, k)).astype(np.float32)
        for levels in (1, 2):
            ref = native_matmul(x, m, kernel="scalar", n_threads=1, levels=levels)
            for kern in AVAILABLE:
                for n in (1, 2, 3, 4):
                    y = native_matmul(x, m, kernel=kern, n_threads=n, levels=levels)
                    assert np.array_equal(y, ref), (kern, n, levels, rows, k)
                for i in (0, 17, 36):
                    y1 = native_matmul(x[i:i + 1], m, kernel=kern, n_threads=2, levels=levels)
                    assert np.array_equal(y1[0], ref[i]), (kern, i, levels, rows, k)


def test_thread_count_limits():
    cpus = usable_cpus()
    assert check_threads(1) == 1 and check_threads(4 * cpus) == 4 * cpus  # oversubscription when asked: allowed
    assert check_threads(np.int64(2)) == 2 and type(check_threads(np.int64(2))) is int
    for bad in (0, -2, 4 * cpus + 1, 100_000, 2.0, True, "2"):
        with pytest.raises(SpectraError, match="threads"):
            check_threads(bad)
    lib = load_library()
    assert lib.spx_cpu_count() == cpus and lib.spx_max_threads() == 4 * cpus


def test_huge_thread_count_refused_before_any_thread_starts(nano):
    m = _random_matrix(8, 256, 1, "col", "t2", np.random.default_rng(0))
    x = np.ones((1, 256), np.float32)
    with pytest.raises(SpectraError, match="refused"):
        native_matmul(x, m, n_threads=10**6)
    with pytest.raises(SpectraError, match="refused"):
        load_engine(nano / "t2", "native", max_len=16, n_threads=10**6)
    # the C side checks too (defence in depth): nothing is created, the error says why
    lib = load_library()
    from spectra.infer.engine import _mat_struct

    st = _mat_struct(m, [])
    out = np.empty((1, 8), np.float32)
    assert lib.spx_matmul(ctypes.byref(st), x.ctypes.data, 1, out.ctypes.data, 10**6, 1, 1) == -10
    assert "limit" in pool_error(lib)
    assert lib.spx_read_sum(x.ctypes.data, x.nbytes, 10**6, 1) == 0


SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
static int left = -1;  /* pthread_create calls still allowed; -1: all */
void shim_allow(int n) { left = n; }
int pthread_create(pthread_t *t, const pthread_attr_t *a, void *(*f)(void *), void *arg) {
    static int (*real)(pthread_t *, const pthread_attr_t *, void *(*)(void *), void *);
    if (!real) real = dlsym(RTLD_NEXT, "pthread_create");
    if (left == 0) return EAGAIN;
    if (left > 0) left--;
    return real(t, a, f, arg);
}
"""


def test_pthread_create_failure_is_reported_not_fatal(tmp_path):
    """The third thread cannot be created: the pool joins the two it started and the caller gets
    a SpectraError naming the cause; the process stays usable (a 1-thread matmul still works)."""
    cc = os.environ.get("CC") or "cc"
    (tmp_path / "shim.c").write_text(SHIM)
    r = subprocess.run([cc, "-shared", "-fPIC", "-o", str(tmp_path / "shim.so"), str(tmp_path / "shim.c"), "-ldl"],
                       capture_output=True, text=True, timeout=120)
    if r.returncode:
        pytest.skip(f"cannot build the pthread_create shim: {r.stderr[-300:]}")
    code = textwrap.dedent(f"""
        import ctypes, numpy as np
        from spectra.errors import SpectraError
        from spectra.infer.engine import matrix_from_ternary, native_matmul
        m = matrix_from_ternary(np.ones((8, 256), np.int8), np.ones(1, np.float32), "col", "t2")
        x = np.ones((1, 256), np.float32)
        ref = native_matmul(x, m, n_threads=1)
        ctypes.CDLL({str(tmp_path / 'shim.so')!r}).shim_allow(2)
        try:
            native_matmul(x, m, n_threads=4)
            print("NO ERROR")
        except SpectraError as e:
            print("ERR", e)
        print("SAME", bool(np.array_equal(native_matmul(x, m, n_threads=1), ref)))
        """)
    env = dict(os.environ, LD_PRELOAD=str(tmp_path / "shim.so"), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("ERR native matmul failed (code -11") and "pthread_create" in lines[0], lines
    assert lines[-1] == "SAME True"


ALLOC_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>
static int left = -1;  /* aligned_alloc calls that still succeed before one fails; -1: all */
void shim_fail_after(int n) { left = n; }
void *aligned_alloc(size_t align, size_t n) {
    static void *(*real)(size_t, size_t);
    if (!real) real = dlsym(RTLD_NEXT, "aligned_alloc");
    if (left == 0) { left = -1; return NULL; }
    if (left > 0) left--;
    return real(align, n);
}
"""


def test_failed_allocations_are_errors_not_crashes(nano, tmp_path):
    """Each big buffer of a matmul and of an engine state (activations, per-thread scratch) failing in
    turn: a SpectraError naming the cause, never a crash; afterwards everything works with the same bits."""
    cc = os.environ.get("CC") or "cc"
    (tmp_path / "shim.c").write_text(ALLOC_SHIM)
    r = subprocess.run([cc, "-shared", "-fPIC", "-o", str(tmp_path / "shim.so"), str(tmp_path / "shim.c"), "-ldl"],
                       capture_output=True, text=True, timeout=120)
    if r.returncode:
        pytest.skip(f"cannot build the aligned_alloc shim: {r.stderr[-300:]}")
    code = textwrap.dedent(f"""
        import ctypes, numpy as np
        from spectra.errors import SpectraError
        from spectra.infer.engine import load_engine, matrix_from_ternary, native_matmul
        shim = ctypes.CDLL({str(tmp_path / 'shim.so')!r})
        rng = np.random.default_rng(0)
        m = matrix_from_ternary(rng.integers(-1, 2, (40, 600)).astype(np.int8), np.ones(2, np.float32), "row", "t2")
        x = rng.normal(size=(5, 600)).astype(np.float32)
        ref = native_matmul(x, m, n_threads=2, levels=2)
        eng = load_engine({str(nano / 't2')!r}, "native", max_len=16, n_threads=2)
        lref = eng.forward([1, 2, 3], all_logits=True)
        eng.close()
        for n in range(10):
            for what in ("matmul", "engine"):
                shim.shim_fail_after(n)
                try:
                    if what == "matmul":
                        ok = np.array_equal(native_matmul(x, m, n_threads=2, levels=2), ref)
                    else:
                        eng = load_engine({str(nano / 't2')!r}, "native", max_len=16, n_threads=2)
                        ok = np.array_equal(eng.forward([1, 2, 3], all_logits=True), lref)
                        eng.close()
                    print(what, n, "OK" if ok else "DIFFERENT")
                except SpectraError as e:
                    print(what, n, "ERR", e)
                shim.shim_fail_after(-1)
        print("SAME", bool(np.array_equal(native_matmul(x, m, n_threads=2, levels=2), ref)))
        """)
    env = dict(os.environ, LD_PRELOAD=str(tmp_path / "shim.so"), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == "SAME True", lines
    errs = {w: [ln for ln in lines if ln.startswith(w) and " ERR " in ln] for w in ("matmul", "engine")}
    assert errs["matmul"] and all("out of memory" in ln for ln in errs["matmul"]), lines
    assert errs["engine"] and all("cannot allocate the state" in ln for ln in errs["engine"]), lines
    assert not [ln for ln in lines if "DIFFERENT" in ln], lines
    assert any(ln.startswith("matmul 9 OK") for ln in lines) and any(ln.startswith("engine 9 OK") for ln in lines), lines


def test_pool_finishes_next_to_a_busy_process(nano):
    """One process spinning on a core: a 2-thread engine (whose waits sleep after a short spin) still
    completes - bounded by a generous timeout, no timing assertion - with unchanged logits."""
    quiet = _run(nano / "t2", 2, None, decode=8)
    # the burner stops by itself if this process dies (never a CPU burner left behind)
    busy = subprocess.Popen([sys.executable, "-c", f"import os\nwhile os.getppid() == {os.getpid()}:\n    sum(range(100000))\n"])
    try:
        code = textwrap.dedent(f"""
            import sys, numpy as np
            sys.path.insert(0, {os.path.dirname(__file__)!r})
            from test_kernel_pool import _run
            np.save({str(nano / 'busy.npy')!r}, _run({str(nano / 't2')!r}, 2, None, decode=8))
            """)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
        assert out.returncode == 0, out.stderr[-2000:]
    finally:
        busy.kill()
        busy.wait()
    assert np.array_equal(np.load(nano / "busy.npy"), quiet)
