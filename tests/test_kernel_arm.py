"""aarch64 NEON paths (dotprod SDOT, i8mm SMMLA) bit for bit against the scalar path, under qemu.

tests/native/kernel_driver.c includes the engine's C source and compares every path the CPU offers
with the scalar path (random matrices in both formats, mp splits, padding, int8/int8x2, T = 1..37,
threads; a tiny model's forward with f16 and q8 heads). It is cross-compiled statically with
Debian's gcc-aarch64-linux-gnu and run with qemu-user on CPU models with both extensions (max),
dotprod only (cortex-a76) and neither (cortex-a57: the scalar fallback), so every path runs here.
scripts/setup.sh --test installs both tools; without them these tests skip and say so."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KDIR = REPO / "src" / "spectra" / "infer" / "kernels"
DRIVER = REPO / "tests" / "native" / "kernel_driver.c"
# the library's own flags (build.py) minus the shared-object ones: the same numerics contract
FLAGS = ["-O3", "-std=gnu11", "-pthread", "-ffp-contract=off", "-fno-math-errno"]
CROSS = "aarch64-linux-gnu-gcc"


def _compile(cc: str, out: Path, extra=()) -> Path:
    cmd = [cc, *FLAGS, *extra, f"-I{KDIR}", "-o", str(out), str(DRIVER), "-lm"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def arm_driver(tmp_path_factory):
    missing = [t for t in (CROSS, "qemu-aarch64") if not shutil.which(t)]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (apt-get install gcc-aarch64-linux-gnu "
                    "libc6-dev-arm64-cross qemu-user; scripts/setup.sh --test does it)")
    return _compile(CROSS, tmp_path_factory.mktemp("arm") / "kernel_driver", ["-static"])


def _run(cmd) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "ALL OK" in r.stdout, f"{' '.join(map(str, cmd))} -> {r.returncode}\n{r.stdout[-4000:]}\n{r.stderr[-2000:]}"
    return r.stdout


@pytest.mark.parametrize("cpu, paths, best", [
    ("max", "neon i8mm", "i8mm"),          # Armv9-class: dotprod + i8mm
    ("cortex-a76", "neon", "neon"),        # dotprod, no i8mm (Graviton2 / Ampere Altra class)
    ("cortex-a57", "", "scalar"),          # neither: the portable fallback
])
def test_arm_paths_match_scalar_bit_for_bit(arm_driver, cpu, paths, best):
    out = _run(["qemu-aarch64", "-cpu", cpu, str(arm_driver)])
    first = out.splitlines()[0]
    assert first == f"paths: {paths + ' ' if paths else ''}scalar; best {best}", first
    n = len(paths.split())
    # every SIMD path ran its matmul and forward comparisons (not vacuously skipped)
    assert f"matmul: {336 * n} comparisons" in out and f"forward: {16 * n} comparisons" in out, out


def test_native_driver_on_this_cpu(tmp_path):
    """The same driver natively: x86 SIMD matmuls == scalar bit for bit (and the scalar path equals a
    float64 evaluation of the same integer dots, which validates the driver's packer)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        pytest.skip("no C compiler")
    out = _run([str(_compile(cc, tmp_path / "kernel_driver"))])
    assert out.startswith("paths: ")


def test_library_builds_for_aarch64_with_buildpy_flags(tmp_path):
    """build.py compiles the same sources with the same flags on aarch64 (target pragmas, no -march)."""
    from spectra.infer.kernels.build import CFLAGS, SOURCES

    if not shutil.which(CROSS):
        pytest.skip(f"{CROSS} not installed (apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross)")
    assert "neon.inc" in SOURCES and not any(f.startswith("-march") for f in CFLAGS)
    out = tmp_path / "libspectra_infer.so"
    r = subprocess.run([CROSS, *CFLAGS, "-o", str(out), str(KDIR / "spectra_infer.c"), "-lm"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    nm = shutil.which("aarch64-linux-gnu-nm") or shutil.which("nm")
    syms = subprocess.run([nm, "-D", str(out)], capture_output=True, text=True, timeout=60).stdout
    for sym in ("spx_state_new", "spx_step", "spx_matmul", "spx_best_kernel", "spx_max_threads"):
        assert sym in syms, sym
