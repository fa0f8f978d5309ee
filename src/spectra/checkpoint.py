"""Compatibility name for :mod:`spectra.store.modeldir` (model directories) and its config helpers.

New code imports from :mod:`spectra.store`; this module only re-exports.
"""

from spectra.store.hfconfig import (  # noqa: F401
    FAMILIES, family_of, hf_config, model_config_from_hf, read_config, read_model_config,
)
from spectra.store.modeldir import (  # noqa: F401
    build_model, copy_tokenizer, from_hf_names, load_model, load_state, read_weights, save_model, to_hf_names,
)
