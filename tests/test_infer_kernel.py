"""Native kernel: matmul vs the PyTorch reference (stated error bound), paths agree, forced scalar runs."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from spectra.errors import SpectraError

from spectra.infer import kernels  # noqa: E402  (our own module: an import error must fail)
try:
    AVAILABLE = kernels.available_kernels()
except kernels.KernelUnavailable as e:  # no C compiler here: the reference path is tested elsewhere
    pytest.skip(f"native kernel unavailable: {e}", allow_module_level=True)

from spectra.infer.engine import (  # noqa: E402
    activation_error_bound, matrix_from_ternary, native_matmul, quantize_activations, reference_matmul,
)
from spectra.infer.packing import padded_k  # noqa: E402

LAYOUTS = [(96, 512, 1, "col"), (48, 768, 3, "row"), (36, 1536, 6, "row"), (40, 300, 2, "col"), (30, 384, 3, "row")]


def _matrix(rows, k, mp, split, fmt, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.choice(np.array([-1, 0, 1], dtype=np.int8), size=(rows, k), p=[0.3, 0.4, 0.3])
    return matrix_from_ternary(q, rng.uniform(0.005, 0.05, mp).astype(np.float32), split, fmt)


@pytest.mark.parametrize("kernel", AVAILABLE)
@pytest.mark.parametrize("fmt", ["t2", "t1"])
@pytest.mark.parametrize("levels", [1, 2])
def test_matmul_within_int8_bound(kernel, fmt, levels):
    """|kernel - x W^T| <= sum_k |W_rk| d_b(k)/2 (+ fp32 accumulation), and == the int8 reference to ~1e-6."""
    for i, (rows, k, mp, split) in enumerate(LAYOUTS):
        m = _matrix(rows, k, mp, split, fmt, seed=i)
        x = torch.randn(7, k) * torch.linspace(0.1, 3.0, k)  # uneven magnitudes: blocks get different scales
        x[0, 3] = 40.0  # an outlier
        y = native_matmul(x.numpy(), m, kernel=kernel, n_threads=2, levels=levels).astype(np.float64)
        for t in (1, 2):  # decode-sized calls take the in-register t2 path: same numbers as prefill's
            y1 = native_matmul(x[:t].numpy(), m, kernel=kernel, n_threads=2, levels=levels).astype(np.float64)
            np.testing.assert_allclose(y1, y[:t], rtol=1e-5, atol=1e-6 * np.abs(y).max())
        exact = (x.double() @ m.dequantize().double().T).numpy()
        emul = reference_matmul(x, m, levels).numpy()
        bound = activation_error_bound(x, m, levels).numpy()
        scale = np.abs(exact).max()
        assert np.abs(y - emul).max() <= 2e-6 * scale + 1e-7, (k, mp, split)
        assert np.all(np.abs(y - exact) <= bound + 2e-6 * scale + 1e-7), (k, mp, split)
        if levels == 1:  # the bound is not vacuous: int8 error is visible, int8x2 shrinks it > 100x
            assert np.abs(y - exact).max() > 1e-3 * np.abs(exact).mean()
        else:
            b1 = activation_error_bound(x, m, 1).numpy()
            assert bound.max() < b1.max() / 100


@pytest.mark.skipif("avx2" not in AVAILABLE, reason="CPU without AVX2")
@pytest.mark.parametrize("fmt", ["t2", "t1"])
def test_scalar_and_simd_paths_agree(fmt):
    m = _matrix(64, 1280, 2, "row", fmt, seed=3)
    x = np.random.default_rng(0).normal(size=(9, 1280)).astype(np.float32)
    ys = {k: native_matmul(x, m, kernel=k, levels=2) for k in AVAILABLE}
    for k, y in ys.items():
        np.testing.assert_allclose(y, ys["scalar"], rtol=1e-5, atol=1e-6 * np.abs(ys["scalar"]).max(), err_msg=k)


def test_quantizer_is_bit_identical_to_reference():
    import ctypes

    from spectra.infer.kernels.build import load_library

    lib = load_library()
    k, nseg = 900, 3
    kp = padded_k(k, nseg, "row")
    x = (np.random.default_rng(0).normal(size=(3, k)) * 5).astype(np.float32)
    x[1, :300] = 0.0  # an all-zero segment: scale 0
    ref = quantize_activations(torch.from_numpy(x), k, nseg, kp, levels=2)
    for kern in AVAILABLE:
        nb = kp // 256
        q = np.zeros((3, 2, kp), np.int8)
        d = np.zeros((3, 2, nb), np.float32)
        s = np.zeros((3, 2, nb), np.int32)
        assert lib.spx_quantize(x.ctypes.data, 3, k, nseg, kp, 2, q.ctypes.data, d.ctypes.data, s.ctypes.data,
                                kernels.kernel_id(kern)) == 0
        for lvl in range(2):
            rq, rd, rs = ref[lvl]
            assert np.array_equal(q[:, lvl], rq.numpy()), kern
            assert np.array_equal(d[:, lvl], rd.numpy()), kern
            assert np.array_equal(s[:, lvl], rs.numpy()), kern
    del ctypes


def test_forced_scalar_path_in_a_process_without_simd(tmp_path):
    """SPECTRA_KERNEL=scalar: what a CPU without AVX2 runs; the engine works and says so."""
    from spectra.checkpoint import save_model
    from spectra.config import get_preset
    from spectra.infer.packed_model import write_packed
    from spectra.model import Transformer
    from spectra.ternary import to_ternary

    ck = save_model(to_ternary(Transformer(get_preset("nano").model).init_weights(0), 1), tmp_path / "ck", "trilm")
    write_packed(ck, tmp_path / "p", "t2", progress=False)
    code = ("from spectra.infer.engine import load_engine\n"
            f"e = load_engine({str(tmp_path / 'p')!r}, 'native', max_len=32)\n"
            "l = e.forward([1, 2, 3]); print(e.kernel, l.shape, bool((l == l).all()))\n")
    env = dict(os.environ, SPECTRA_KERNEL="scalar")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["scalar", "(4096,)", "True"]


def test_unknown_kernel_name():
    with pytest.raises(SpectraError, match="unknown kernel"):
        kernels.resolve_kernel("avx3")


def test_read_bandwidth_probe_reads_every_word():
    # The probe's checksum (so the compiler cannot drop the reads): over whole 4 KiB chunks, the
    # sum mod 2^64 of w[i] ^ w[i+4] for each group of 8 words, once per repetition. Addition mod
    # 2^64 is order-free, so it must not depend on the thread split; a partial last chunk is skipped.
    from spectra.infer.kernels.build import load_library

    buf = np.random.default_rng(0).integers(0, 256, (1 << 20) + 1000, dtype=np.uint8)
    w = buf[: (buf.nbytes // 4096) * 4096].view(np.uint64).reshape(-1, 8)
    once = int(np.sum(w[:, :4] ^ w[:, 4:], dtype=np.uint64))
    assert once != 0
    lib = load_library()
    for threads, reps in ((1, 1), (2, 1), (3, 2)):
        got = lib.spx_read_sum(buf.ctypes.data, buf.nbytes, threads, reps)
        assert got == (once * reps) % (1 << 64), (threads, reps)
