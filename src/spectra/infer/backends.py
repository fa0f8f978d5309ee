"""Engine backends as a table: the CLI choices, the loaders and the fallback order come from here.

Each :class:`Backend` opens a single-sequence engine (``forward`` / ``reset`` / ``pos``:
generation, evaluation) and a multi-sequence batch engine
(:class:`~spectra.infer.batch.BatchEngine`: serving) for a path whose kind
:mod:`spectra.store` has decided. ``auto`` tries the backends that accept the path in
table order and falls back, with one warning, when one is unavailable on this machine
(no C compiler, no GPU).

To add a backend: write its engine classes (the interface of
:class:`~spectra.infer.engine.TorchEngine` and of :class:`~spectra.infer.batch.BatchEngine`),
then add one entry to :data:`BACKENDS` before ``torch`` (the universal fallback).
Nothing here imports torch or numpy at import time (the CLI reads the choices at start-up).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from spectra.errors import SpectraError


class BackendUnavailable(SpectraError):
    """The backend cannot run on this machine (missing compiler, device, library)."""


@dataclass(frozen=True)
class Backend:
    name: str
    help: str
    packed_only: bool  # True: reads only 'spectra pack' output
    open: Callable  # (packed model or path, kind, **options) -> single-sequence engine
    open_batch: Callable  # (path, **options) -> BatchEngine


def _native(src, kind, *, max_len=None, n_threads=None, kernel=None, max_batch=128, act="int8x2", **_):
    from spectra.infer.engine import NativeEngine
    from spectra.infer.kernels.build import KernelUnavailable

    try:
        return NativeEngine(src, max_len=max_len, n_threads=n_threads, kernel=kernel, max_batch=max_batch, act=act)
    except KernelUnavailable as e:
        raise BackendUnavailable(str(e)) from None


def _native_batch(path, **kw):
    from spectra.infer.engine import NativeBatchEngine
    from spectra.infer.kernels.build import KernelUnavailable

    try:
        return NativeBatchEngine.from_dir(path, **kw)
    except KernelUnavailable as e:
        raise BackendUnavailable(str(e)) from None


def _torch(src, kind, *, max_len=None, n_threads=None, dtype=None, **_):
    from spectra.infer.engine import TorchEngine, reference_model
    from spectra.store.kinds import Kind

    if kind is Kind.PACKED_TRILM:  # the packed file's exact PyTorch reference
        model = reference_model(src)
    else:
        from spectra.store.loader import load_dense

        model = load_dense(Path(src), kind, dtype=dtype)
    return TorchEngine(model, max_len=max_len, n_threads=n_threads)


def _torch_batch(path, *, max_seqs=16, max_len=None, n_threads=None, max_step_tokens=512, **_):
    from spectra.infer.torch_batch import TorchBatchEngine

    return TorchBatchEngine.from_path(path, max_seqs=max_seqs, max_len=max_len, n_threads=n_threads,
                                      max_step_tokens=max_step_tokens)


BACKENDS: dict[str, Backend] = {
    b.name: b for b in (
        Backend("native", "the C engine for packed ternary models (cpuid dispatch, threads in C)", True,
                _native, _native_batch),
        Backend("torch", "PyTorch, any model kind (a packed model runs as its exact reference)", False,
                _torch, _torch_batch),
    )
}
CHOICES = ("auto", *BACKENDS)


def check_backend(name: str) -> str:
    if name not in CHOICES:
        raise SpectraError(f"unknown backend '{name}'; allowed: {', '.join(CHOICES)}")
    return name


def _candidates(backend: str, packed: bool, path) -> list[Backend]:
    check_backend(backend)
    if backend == "auto":
        return [b for b in BACKENDS.values() if packed or not b.packed_only]
    b = BACKENDS[backend]
    if b.packed_only and not packed:
        raise SpectraError(f"'{path}' is not a packed model; the {b.name} backend needs 'spectra pack' output "
                           f"(or use --backend torch)")
    return [b]


def _first_available(cands: list[Backend], backend: str, opener: Callable):
    for i, b in enumerate(cands):
        try:
            return opener(b)
        except BackendUnavailable as e:
            if backend != "auto" or i == len(cands) - 1:
                raise
            warnings.warn(f"{b.name} backend unavailable ({e}); using {cands[i + 1].name}", stacklevel=3)
    raise AssertionError("no candidate backend")  # _candidates never returns an empty list


def open_engine(path, backend: str = "auto", *, verify: bool = True, **options):
    """A single-sequence engine for any loadable path (see :func:`spectra.store.load`)."""
    from spectra.store.kinds import Kind
    from spectra.store.loader import usable_kind

    path = Path(path)
    kind = usable_kind(path)
    packed = kind is Kind.PACKED_TRILM
    cands = _candidates(backend, packed, path)
    src = path
    if packed:  # mapped and checked once, whichever backend ends up reading it
        from spectra.infer.packed_model import PackedModel

        src = PackedModel.load(path, verify=verify)
    return _first_available(cands, backend, lambda b: b.open(src, kind, **options))


def open_batch_engine(path, backend: str = "auto", **options):
    """A multi-sequence :class:`~spectra.infer.batch.BatchEngine` for any loadable path."""
    from spectra.store.kinds import Kind
    from spectra.store.loader import usable_kind

    path = Path(path)
    cands = _candidates(backend, usable_kind(path) is Kind.PACKED_TRILM, path)
    return _first_available(cands, backend, lambda b: b.open_batch(path, **options))
