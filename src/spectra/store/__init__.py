"""The on-disk world, owned once: what kind a path is, loading it, run-directory layout,
output names, dtype names, tokenizer lookup and the Hugging Face Hub.

=====================  =====================================================================
module                 owns
=====================  =====================================================================
``store.kinds``        :class:`Kind`, :func:`kind_of` / :func:`detect`, :func:`resolve` (path or Hub id)
``store.loader``       :func:`load` (``as_`` = config / meta / model / tokenizer / packed / engine)
``store.hfconfig``     config.json: :func:`hf_config`, :func:`read_config`, :func:`read_model_config`
``store.modeldir``     model directories: :func:`save_model`, :func:`load_model`, :func:`build_model`
``store.tokenizer``    :func:`find_tokenizer`, :func:`load_tokenizer`
``store.dtypes``       :data:`DTYPE_NAMES`, :func:`torch_dtype`
``store.runs``         training run directories (final model, checkpoints, metrics), the suite index
``store.names``        output names (QuantLMs), built and parsed
``store.hub``          Hub ids -> local snapshot directories
=====================  =====================================================================

Names are imported lazily from their modules, so ``from spectra.store import kind_of``
does not import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "kinds": ("Kind", "detect", "kind_of", "resolve"),
    "loader": ("load", "usable_kind", "load_dense"),
    "hfconfig": ("FAMILIES", "hf_config", "read_config", "model_config_from_hf", "read_model_config", "family_of"),
    "modeldir": ("save_model", "load_model", "build_model", "load_state", "read_weights", "copy_tokenizer",
                 "to_hf_names", "from_hf_names"),
    "tokenizer": ("TOKENIZER_FILE", "find_tokenizer", "load_tokenizer"),
    "dtypes": ("DTYPE_NAMES", "torch_dtype", "dtype_name"),
    "runs": ("final_model", "checkpoints", "read_metrics", "is_run_dir", "is_suite_dir", "read_suite_index",
             "write_suite_index"),
    "names": ("QuantName", "quantlm_name", "parse_quantlm_name"),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'spectra.store' has no attribute '{name}'")
    return getattr(importlib.import_module(f"spectra.store.{mod}"), name)
