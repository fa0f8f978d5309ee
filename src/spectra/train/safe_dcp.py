"""Loading a torch.distributed.checkpoint (DCP) directory without running code from it.

torch 2.13's DCP reads ``.metadata`` with ``pickle.load`` and its default planner reads
non-tensor values with ``torch.load(weights_only=False)``: a crafted training state
would run arbitrary code on ``spectra train --resume``. Here:

* ``.metadata`` is unpickled by :class:`_MetadataUnpickler`, whose ``find_class`` admits
  only the DCP metadata dataclasses, ``torch.Size``, dtypes/layouts and ``pathlib``
  paths (the "restricting globals" recipe of the pickle docs; the same idea as torch's
  own ``weights_only`` unpickler). Anything else is refused before it is called.
* The result is checked for shape (types of every entry, file names without a
  directory part, no storage transforms) before DCP sees it.
* :class:`SafeLoadPlanner` reads the non-tensor values with ``weights_only=True``.

Tensors themselves are read by DCP's ``FileSystemReader`` with ``weights_only=True``.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as md
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo

from spectra.errors import SpectraError

METADATA_FILE = ".metadata"
MAX_METADATA_BYTES = 256 << 20  # far above any real index (a 3.9B model's is a few MB)

_DCP_MD = "torch.distributed.checkpoint.metadata"
_ALLOWED: dict[tuple[str, str], object] = {
    (_DCP_MD, "Metadata"): md.Metadata,
    (_DCP_MD, "MetadataIndex"): md.MetadataIndex,
    (_DCP_MD, "StorageMeta"): md.StorageMeta,
    (_DCP_MD, "TensorStorageMetadata"): md.TensorStorageMetadata,
    (_DCP_MD, "BytesStorageMetadata"): md.BytesStorageMetadata,
    (_DCP_MD, "ChunkStorageMetadata"): md.ChunkStorageMetadata,
    (_DCP_MD, "TensorProperties"): md.TensorProperties,
    (_DCP_MD, "_MEM_FORMAT_ENCODING"): md._MEM_FORMAT_ENCODING,
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
    ("torch", "Size"): torch.Size,
    # torch.layout pickles as _get_layout("torch.strided"): a lookup in a table of layouts
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    ("pathlib", "PosixPath"): Path,  # StorageMeta.checkpoint_id: a path, never opened
    ("pathlib", "PurePosixPath"): Path,
    ("collections", "OrderedDict"): dict,
}
_ALLOWED.update({("torch", str(t).removeprefix("torch.")): t for t in vars(torch).values() if isinstance(t, torch.dtype)})


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it refers to '{module}.{name}', which a DCP index never holds") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("it uses persistent ids, which a DCP index never holds")


def _bad(path: Path, why: str) -> SpectraError:
    return SpectraError(f"training state '{path}' is not a checkpoint spectra can load safely: {why}; "
                        "refusing it (nothing from it was run); resume from a checkpoint you trust")


def _check_chunks(path: Path, fqn: str, v) -> None:
    if not (isinstance(v.properties, md.TensorProperties) and isinstance(v.size, torch.Size)
            and isinstance(v.chunks, list)):
        raise _bad(path, f"entry '{fqn}' has malformed tensor metadata")
    for c in v.chunks:
        if not (isinstance(c, md.ChunkStorageMetadata) and isinstance(c.offsets, torch.Size)
                and isinstance(c.sizes, torch.Size) and len(c.offsets) == len(c.sizes) == len(v.size)):
            raise _bad(path, f"entry '{fqn}' has a malformed chunk")


def check_metadata(path: Path, m) -> md.Metadata:
    """Types and values of an unpickled index: only what DCP writes, files inside ``path``."""
    if not isinstance(m, md.Metadata) or not isinstance(m.state_dict_metadata, dict):
        raise _bad(path, f"{METADATA_FILE} holds a {type(m).__name__}, not a DCP index")
    for fqn, v in m.state_dict_metadata.items():
        if not isinstance(fqn, str):
            raise _bad(path, "an entry name is not a string")
        if isinstance(v, md.TensorStorageMetadata):
            _check_chunks(path, fqn, v)
        elif not isinstance(v, md.BytesStorageMetadata):
            raise _bad(path, f"entry '{fqn}' has metadata of type {type(v).__name__}")
    if not isinstance(m.storage_data, dict):
        raise _bad(path, "storage_data is not a mapping")
    for k, s in m.storage_data.items():
        if not isinstance(k, md.MetadataIndex) or not isinstance(s, _StorageInfo):
            raise _bad(path, "storage_data holds an entry of an unexpected type")
        rel = s.relative_path
        if not isinstance(rel, str) or not rel or "/" in rel or "\\" in rel or rel in (".", "..") or "\0" in rel:
            raise _bad(path, f"storage file name {rel!r} is not a plain file name inside the checkpoint")
        if not (isinstance(s.offset, int) and isinstance(s.length, int) and s.offset >= 0 and s.length >= 0):
            raise _bad(path, f"storage entry of '{k.fqn}' has a negative or non-integer offset/length")
        if getattr(s, "transform_descriptors", None):
            raise _bad(path, f"storage entry of '{k.fqn}' asks for transforms {s.transform_descriptors!r}")
    pd = m.planner_data
    if pd is not None and not (isinstance(pd, dict) and all(
            isinstance(k, str) and isinstance(v, tuple) and all(isinstance(x, (str, int)) for x in v)
            for k, v in pd.items())):
        raise _bad(path, "planner_data is not a mapping of names to key paths")
    return m


def read_metadata(path: str | Path) -> md.Metadata:
    """Unpickle and check ``path/.metadata`` with the allow-list (raises SpectraError)."""
    path = Path(path)
    f = path / METADATA_FILE
    try:
        size = f.stat().st_size
        if size > MAX_METADATA_BYTES:
            raise _bad(path, f"{METADATA_FILE} is {size} bytes (limit {MAX_METADATA_BYTES})")
        data = f.read_bytes()
    except OSError as e:
        raise SpectraError(f"cannot read '{f}': {e.strerror or e}; pick another checkpoint") from None
    try:
        m = _MetadataUnpickler(io.BytesIO(data)).load()
    except SpectraError:
        raise
    except Exception as e:  # UnpicklingError, EOFError, TypeError from a constructor, KeyError, ...
        raise _bad(path, f"{METADATA_FILE}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return check_metadata(path, m)


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with the metadata read above (once, checked) instead of ``pickle.load``."""

    def __init__(self, path: str | Path):
        super().__init__(str(path))
        self._metadata = read_metadata(path)

    def read_metadata(self, *args, **kwargs) -> md.Metadata:
        m = self._metadata
        if getattr(m, "storage_meta", None) is None:
            m.storage_meta = md.StorageMeta()
        m.storage_meta.load_id = self.load_id
        return m


class SafeLoadPlanner(DefaultLoadPlanner):
    """Non-tensor values (optimizer hyper-parameters, ...) with ``torch.load(weights_only=True)``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def load(state: dict, path: str | Path) -> None:
    """``dcp.load(state, checkpoint_id=path)`` without code execution; errors are SpectraErrors."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    reader = SafeFileSystemReader(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner())
    except CheckpointException as e:
        exc = next((pair[0] for pair in e.failures.values()), e)
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        raise SpectraError(f"loading training state '{path}' failed ({why}); pick another checkpoint") from None
