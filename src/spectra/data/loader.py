"""Deterministic, resumable, rank-independent batches (OLMo-core style).

The train split is cut into ``samples_per_epoch = num_tokens // (seq_len + 1)``
non-overlapping samples of ``seq_len + 1`` tokens (sample i = tokens
``[i*(L+1), (i+1)*(L+1))``, the tail is dropped), so each token is seen once per
epoch. Epoch ``e`` visits them in the order of a permutation drawn from
``(seed, e)`` and stored as a memmap in ``<data>/cache/``. Global batch ``b`` of the
run is samples ``perm_e[k*G : (k+1)*G]`` with ``e, k = divmod(b, batches_per_epoch)``;
rank r of W takes rows ``[r*G/W, (r+1)*G/W)`` of it. The incomplete last global batch
of an epoch is dropped. So the state is just ``{batches, seed, epoch, fingerprint}``
and resuming -- with any number of ranks -- continues the same global sequence.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from spectra.errors import SpectraError
from spectra.fsutil import atomic_path
from spectra.data.dataset import TokenDataset
from spectra.data.manifest import CACHE_DIR


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled sample order of one epoch (numpy PCG64 seeded by (seed, epoch))."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(epoch)])))
    return rng.permutation(n).astype(np.uint32 if n <= 1 << 32 else np.uint64)


class DataLoader:
    """Iterate ``(x, y)`` LongTensors of shape ``[global_batch // world_size, seq_len]`` forever
    (epochs roll over). ``state_dict()`` after receiving a batch counts it as consumed."""

    def __init__(self, data_dir, seq_len: int, global_batch: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, split: str = "train", verify: str = "auto"):
        if seq_len <= 0 or global_batch <= 0:
            raise SpectraError(f"seq_len and global_batch must be positive, got {seq_len}, {global_batch}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise SpectraError(f"rank {rank} is not in [0, world_size={world_size})")
        if global_batch % world_size:
            raise SpectraError(f"global_batch {global_batch} is not divisible by world_size {world_size}")
        self.ds = TokenDataset(data_dir, split, verify=verify)
        self.dir = Path(data_dir)
        self.seq_len, self.global_batch = int(seq_len), int(global_batch)
        self.rank, self.world_size, self.seed, self.split = int(rank), int(world_size), int(seed), split
        self.local_batch = self.global_batch // self.world_size
        self.samples_per_epoch = self.ds.num_tokens // (self.seq_len + 1)
        self.batches_per_epoch = self.samples_per_epoch // self.global_batch
        if self.batches_per_epoch == 0:
            raise SpectraError(
                f"the {split} split of {self.dir} has {self.ds.num_tokens} tokens = {self.samples_per_epoch} samples of "
                f"{self.seq_len}+1 tokens, fewer than one global batch of {self.global_batch}; use more data, a "
                f"shorter seq_len or a smaller batch")
        self.batches = 0  # global batches consumed
        self._perm: np.ndarray | None = None
        self._perm_epoch = -1

    # -- state ---------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        return self.ds.fingerprint

    @property
    def epoch(self) -> int:
        return self.batches // self.batches_per_epoch

    @property
    def tokens_per_batch(self) -> int:
        """Input tokens per global batch (global_batch x seq_len)."""
        return self.global_batch * self.seq_len

    @property
    def tokens_consumed(self) -> int:
        return self.batches * self.tokens_per_batch

    def state_dict(self) -> dict:
        return {"batches": self.batches, "seed": self.seed, "epoch": self.epoch, "fingerprint": self.fingerprint,
                "seq_len": self.seq_len, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict, allow_fingerprint_mismatch: bool = False) -> None:
        """Continue after ``state["batches"]`` global batches. The order is defined by (seed,
        sequence of global batches), not by ranks, so any world_size may resume it."""
        for k in ("batches", "seed", "fingerprint"):
            if k not in state:
                raise SpectraError(f"data loader state lacks {k!r} (got keys {sorted(state)})")
        if state["fingerprint"] != self.fingerprint and not allow_fingerprint_mismatch:
            raise SpectraError(
                f"data in {self.dir} changed under this run: loader state fingerprint {state['fingerprint']} != "
                f"dataset fingerprint {self.fingerprint}; use the original data or explicitly allow the mismatch "
                f"(allow_fingerprint_mismatch=True / --allow-data-change)")
        for k, mine in (("seq_len", self.seq_len), ("global_batch", self.global_batch)):
            if k in state and int(state[k]) != mine:
                raise SpectraError(f"data loader state was saved with {k}={state[k]}, this loader has {k}={mine}; "
                                   f"resuming would not continue the same sample sequence")
        batches = int(state["batches"])
        if batches < 0:
            raise SpectraError(f"data loader state 'batches' must be >= 0, got {batches}")
        self.seed, self.batches = int(state["seed"]), batches
        if "epoch" in state and int(state["epoch"]) != self.epoch and state["fingerprint"] == self.fingerprint:
            raise SpectraError(f"data loader state is inconsistent: batches={batches} is epoch {self.epoch} for "
                               f"{self.batches_per_epoch} batches per epoch, but the state says epoch {state['epoch']}")
        self._perm_epoch = -1  # seed may have changed

    # -- index ---------------------------------------------------------------
    def _index_path(self, epoch: int) -> Path:
        return (self.dir / CACHE_DIR / f"index-{self.split}-{self.fingerprint[:16]}-L{self.seq_len}"
                f"-n{self.samples_per_epoch}-s{self.seed}-e{epoch}.npy")

    def permutation(self, epoch: int) -> np.ndarray:
        """The epoch's sample order as a read-only memmap, built atomically on first use."""
        if epoch == self._perm_epoch and self._perm is not None:
            return self._perm
        p = self._index_path(epoch)
        perm = None
        if p.is_file():
            try:
                perm = np.load(p, mmap_mode="r", allow_pickle=False)
                if perm.shape != (self.samples_per_epoch,):
                    perm = None
            except (ValueError, OSError):
                perm = None  # torn / foreign file: rebuild below
        if perm is None:
            arr = epoch_permutation(self.samples_per_epoch, self.seed, epoch)
            try:
                with atomic_path(p) as tmp:
                    with open(tmp, "wb") as f:
                        np.save(f, arr, allow_pickle=False)
                perm = np.load(p, mmap_mode="r", allow_pickle=False)
            except OSError:  # read-only data dir: keep it in memory
                perm = arr
        self._perm, self._perm_epoch = perm, epoch
        return perm

    # -- batches -------------------------------------------------------------
    def sample(self, i: int) -> np.ndarray:
        n = self.seq_len + 1
        return self.ds.read(int(i) * n, n)

    def global_batch_samples(self, b: int) -> np.ndarray:
        """Sample ids of global batch ``b`` (all ranks)."""
        epoch, k = divmod(int(b), self.batches_per_epoch)
        return np.asarray(self.permutation(epoch)[k * self.global_batch:(k + 1) * self.global_batch])

    def batch(self, b: int):
        """This rank's (x, y) of global batch ``b`` (does not change the state)."""
        import torch

        ids = self.global_batch_samples(b)[self.rank * self.local_batch:(self.rank + 1) * self.local_batch]
        arr = np.empty((len(ids), self.seq_len + 1), dtype=self.ds.dtype)
        for j, i in enumerate(ids):
            arr[j] = self.sample(i)
        t = torch.from_numpy(arr.astype(np.int64))
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def __iter__(self) -> Iterator[tuple]:
        while True:
            x, y = self.batch(self.batches)
            self.batches += 1
            yield x, y
