"""``TokenDataset``: one split of a data directory as a flat, random-access token array."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from spectra.errors import SpectraError
from spectra.data import manifest as mf
from spectra.data.tokenizer import TOKENIZER_FILE


class TokenDataset:
    """The concatenated shards of ``split`` ("train" or "validation") as memmaps.

    Opening validates the manifest and every shard's size, and its blake2b digest
    (``verify="auto"`` skips the hash for files a trusted stamp shows unchanged;
    ``"full"`` always hashes; ``"size"`` never does). Errors name the file.
    """

    def __init__(self, data_dir, split: str = "train", verify: str = "auto"):
        self.dir = Path(data_dir)
        if split not in mf.SPLITS:
            from spectra.errors import closest

            raise SpectraError(f"unknown split {split!r}{closest(split, mf.SPLITS)}; choose one of {mf.SPLITS}")
        self.split = split
        self.manifest = mf.read_manifest(self.dir)
        mf.verify_split(self.dir, self.manifest, split, verify)
        tok = self.manifest["tokenizer"]
        self.tokenizer_path = self.dir / tok.get("file", TOKENIZER_FILE)
        if not self.tokenizer_path.is_file():
            raise SpectraError(f"{self.tokenizer_path} is missing (the ids in {self.dir} need it); rebuild the data")
        self.fingerprint: str = self.manifest["fingerprint"]
        self.vocab_size: int = int(tok["vocab_size"])
        self.padded_vocab_size: int = int(tok["padded_vocab"])
        self.eos_id: int = int(tok["eos_id"])
        self.dtype = np.dtype(self.manifest["dtype"])
        shards = self.manifest["splits"][split]["shards"]
        self._files = [self.dir / s["file"] for s in shards]
        sizes = np.array([s["tokens"] for s in shards], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.num_tokens: int = int(self._starts[-1])
        self.num_documents: int = int(self.manifest["splits"][split]["documents"])
        self._maps: list[np.memmap | None] = [None] * len(self._files)

    def __len__(self) -> int:
        return self.num_tokens

    def __repr__(self) -> str:
        return f"TokenDataset({str(self.dir)!r}, split={self.split!r}, tokens={self.num_tokens}, vocab={self.vocab_size})"

    def padded_vocab(self, mp: int = 1) -> int:
        from spectra.config import padded_vocab

        return padded_vocab(self.vocab_size, mp)

    def _map(self, i: int) -> np.memmap:
        m = self._maps[i]
        if m is None:
            m = self._maps[i] = np.memmap(self._files[i], dtype=self.dtype, mode="r")
        return m

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) as a numpy array of the on-disk dtype (across shard boundaries)."""
        start, length = int(start), int(length)
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise SpectraError(f"read({start}, {length}) is outside the {self.split} split of {self.dir} "
                               f"({self.num_tokens} tokens)")
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        off = start - int(self._starts[i]) if length else 0
        if length == 0:
            return np.empty(0, self.dtype)
        m = self._map(i)
        if off + length <= m.shape[0]:
            return np.array(m[off:off + length])
        parts, need = [], length
        while need:
            m = self._map(i)
            take = min(need, m.shape[0] - off)
            parts.append(m[off:off + take])
            need -= take
            i, off = i + 1, 0
        return np.concatenate(parts)

    def random_windows(self, n: int, length: int, seed: int = 0):
        """``n`` windows of ``length`` tokens at uniform random offsets (GPTQ calibration style),
        as a LongTensor [n, length]; deterministic in ``seed``."""
        import torch

        if length > self.num_tokens:
            raise SpectraError(f"window length {length} exceeds the {self.num_tokens} tokens of the {self.split} "
                               f"split of {self.dir}")
        rng = np.random.default_rng(seed)
        starts = rng.integers(0, self.num_tokens - length + 1, size=n)
        out = np.stack([self.read(s, length) for s in starts]) if n else np.empty((0, length), self.dtype)
        return torch.from_numpy(out.astype(np.int64))

    def num_eval_windows(self, seq_len: int) -> int:
        return max(0, (self.num_tokens - 1) // seq_len)

    def eval_windows(self, seq_len: int, max_windows: int | None = None, batch_size: int = 1) -> Iterator[tuple]:
        """Non-overlapping windows in order: window i is x = tokens[i*L : (i+1)*L], y = x shifted by
        one, so every token after the first is predicted exactly once. Yields LongTensors
        (x, y) of shape [b, seq_len] with b = batch_size (the last batch may be smaller)."""
        import torch

        if seq_len <= 0:
            raise SpectraError(f"seq_len must be positive, got {seq_len}")
        n = self.num_eval_windows(seq_len)
        if max_windows is not None:
            n = min(n, int(max_windows))
        if n == 0:
            raise SpectraError(f"the {self.split} split of {self.dir} has {self.num_tokens} tokens: too few for one "
                               f"window of {seq_len}+1 tokens")
        for b0 in range(0, n, batch_size):
            rows = [self.read(i * seq_len, seq_len + 1) for i in range(b0, min(n, b0 + batch_size))]
            arr = torch.from_numpy(np.stack(rows).astype(np.int64))
            yield arr[:, :-1], arr[:, 1:]
