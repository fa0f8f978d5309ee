"""Data pipeline: corpus sources, tokenizer, token shards, dataset and resumable loader.

    from spectra.data import build_dataset, TokenDataset, DataLoader
    d = build_dataset("default", "runs/data")                  # demo corpus + trained BPE
    for x, y in DataLoader(d, seq_len=256, global_batch=16):   # LongTensors [16, 256]
        ...

See docs/data.md for sources, the manifest, shard layout and loader semantics.
"""

from spectra.data.build import build_dataset, is_validation
from spectra.data.corpus import default_corpus
from spectra.data.dataset import TokenDataset
from spectra.data.loader import DataLoader, epoch_permutation
from spectra.data.manifest import read_manifest
from spectra.data.sources import open_source
from spectra.data.tokenizer import find_eos, load_tokenizer, train_bpe

__all__ = [
    "build_dataset", "TokenDataset", "DataLoader", "load_tokenizer", "default_corpus", "train_bpe",
    "find_eos", "open_source", "read_manifest", "epoch_permutation", "is_validation",
]
