"""Hugging Face Hub ids as model paths: ``SpectraSuite/TriLM_99M_Unpacked`` -> a local directory.

Every command that takes a model path goes through the store's path resolver, which
calls :func:`resolve_model` when the argument is not an existing local path but looks
like ``owner/name``. Downloads go through ``huggingface_hub.snapshot_download`` into
its own cache (``HF_HUB_CACHE`` / ``HF_HOME``), so a model fetched once is reused by
every tool of the ecosystem; ``HF_HUB_OFFLINE=1`` is honoured (cache only).

Pickle-based weight files (``pytorch_model.bin``, ``*.pt``...) are never downloaded:
spectra never unpickles user files, so they would be dead weight.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from spectra.errors import SpectraError

# owner/name as the Hub spells them (letters, digits, '-', '_', '.'; no leading '.'/'-')
_HUB_ID = re.compile(r"^(?:hf://)?([A-Za-z0-9][A-Za-z0-9_.-]{0,95})/([A-Za-z0-9][A-Za-z0-9_.-]{0,95})$")
IGNORE = ["*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle", "pytorch_model*.bin", "training_args.bin",
          "optimizer*.bin", "*.msgpack", "*.h5", "*.ot", "*.onnx", "*.onnx_data"]


def hub_id(s: str) -> str | None:
    """``owner/name`` if ``s`` is shaped like a Hub model id (``hf://`` prefix allowed), else None."""
    m = _HUB_ID.match(str(s).strip())
    if not m or ".." in s:
        return None
    return f"{m.group(1)}/{m.group(2)}"


def offline() -> bool:
    """HF_HUB_OFFLINE read now (huggingface_hub reads it once at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_cache_dir() -> str | None:
    """The huggingface_hub cache to use now (None: its default)."""
    # Read at call time for the same reason as offline(): tests and long-lived processes set it late.
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def resolve_model(path_or_id: str, revision: str | None = None) -> Path:
    """A local model directory for ``path_or_id``: an existing path as is, or a Hub id downloaded
    (or found in the cache) at ``revision`` (branch, tag or commit; default ``main``)."""
    p = Path(path_or_id).expanduser()
    if p.exists():
        if revision:
            raise SpectraError(f"--revision {revision} applies to Hub ids, but '{path_or_id}' is a local path; "
                               "drop --revision or name the model as OWNER/NAME")
        return p
    rid = hub_id(str(path_or_id))
    if rid is None:
        raise SpectraError(f"'{path_or_id}' is neither an existing path nor a Hugging Face Hub id (OWNER/NAME); "
                           "check the path")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                            RepositoryNotFoundError, RevisionNotFoundError)
    except ImportError:
        raise SpectraError(f"'{path_or_id}' is not a local path; loading Hub ids needs huggingface_hub: "
                           "pip install 'spectra-lm[hub]'") from None
    rev = f"@{revision}" if revision else ""
    try:
        local = snapshot_download(rid, revision=revision, cache_dir=hub_cache_dir(), local_files_only=offline(),
                                  ignore_patterns=IGNORE)
    except LocalEntryNotFoundError:
        if offline():
            raise SpectraError(f"'{rid}{rev}' is not in the Hugging Face cache ({hub_cache_dir() or 'default'}) and "
                               "HF_HUB_OFFLINE=1; download it once online (unset HF_HUB_OFFLINE) or pass a local "
                               "directory") from None
        raise SpectraError(f"'{rid}{rev}' could not be downloaded (no network?) and is not cached; "
                           "retry online or pass a local directory") from None
    except RevisionNotFoundError:
        raise SpectraError(f"'{rid}' has no revision '{revision}'; give a branch, tag or commit that exists") from None
    except RepositoryNotFoundError:
        raise SpectraError(f"Hub repository '{rid}' not found (or private: log in with `hf auth login`); "
                           "check the id") from None
    except (EntryNotFoundError, HfHubHTTPError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SpectraError(f"'{rid}{rev}': Hub download failed: {first}") from None
    except OSError as e:  # network errors, disk full
        raise SpectraError(f"'{rid}{rev}': Hub download failed: {e}") from None
    local = Path(local)
    if not (local / "config.json").is_file() and not (local / "packed.json").is_file():
        raise SpectraError(f"Hub repository '{rid}{rev}' holds no config.json or packed.json at its root; "
                           "it is not a model repository spectra can load")
    return local
