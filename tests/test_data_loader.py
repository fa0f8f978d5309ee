"""TokenDataset reads and DataLoader order, resume, ranks, epochs, fingerprints."""

import json

import numpy as np
import pytest
import torch

from spectra.data import DataLoader, TokenDataset, build_dataset, epoch_permutation
from spectra.errors import SpectraError


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loader")
    rng = np.random.default_rng(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    with open(tmp / "c.jsonl", "w") as f:
        for i in range(600):
            f.write(json.dumps({"text": f"{i} " + " ".join(rng.choice(words, rng.integers(3, 60)))}) + "\n")
    # small shards so that samples straddle shard boundaries
    return build_dataset(tmp / "c.jsonl", tmp / "d", vocab_size=300, val_fraction=0.1, shard_tokens=1000,
                         progress=False)


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_dataset_reads_across_shards(data):
    ds = TokenDataset(data)
    assert len(ds._files) > 3
    full = np.concatenate([np.fromfile(f, dtype=ds.dtype) for f in ds._files])
    assert full.size == ds.num_tokens
    for start, n in ((0, 10), (995, 20), (999, 1), (1000, 5), (ds.num_tokens - 7, 7), (123, 2500)):
        assert np.array_equal(ds.read(start, n), full[start:start + n])
    with pytest.raises(SpectraError, match="outside"):
        ds.read(ds.num_tokens - 2, 5)
    w1, w2 = ds.random_windows(8, 64, seed=3), ds.random_windows(8, 64, seed=3)
    assert w1.dtype == torch.long and w1.shape == (8, 64) and torch.equal(w1, w2)
    assert not torch.equal(w1, ds.random_windows(8, 64, seed=4))
    ev = list(ds.eval_windows(100, batch_size=4))
    xs = torch.cat([x for x, _ in ev]).flatten()
    ys = torch.cat([y for _, y in ev]).flatten()
    n = ds.num_eval_windows(100)
    assert xs.numel() == n * 100 and torch.equal(xs, torch.from_numpy(full[: n * 100].astype(np.int64)))
    assert torch.equal(ys, torch.from_numpy(full[1: n * 100 + 1].astype(np.int64)))
    assert len(list(ds.eval_windows(100, max_windows=3))) == 3
    v = TokenDataset(data, "validation")
    assert 0 < v.num_tokens < ds.num_tokens and v.vocab_size == 300 and v.tokenizer_path.is_file()


def test_samples_are_exact_windows_and_x_y_shift(data):
    dl = DataLoader(data, seq_len=31, global_batch=4)
    x, y = next(iter(dl))
    assert x.shape == y.shape == (4, 31) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    ids = dl.global_batch_samples(0)
    for row, i in zip(x, ids):
        assert torch.equal(row, torch.from_numpy(dl.ds.read(int(i) * 32, 31).astype(np.int64)))


def test_every_train_token_once_per_epoch(data):
    L = 39
    ds = TokenDataset(data)
    spe = ds.num_tokens // (L + 1)
    G = [g for g in range(8, 1, -1) if spe % g == 0][0]  # no dropped batch tail: exact cover
    dl = DataLoader(data, seq_len=L, global_batch=G)
    assert dl.samples_per_epoch == spe and dl.batches_per_epoch == spe // G
    seen = [dl.global_batch_samples(b) for b in range(dl.batches_per_epoch)]
    rows = {}
    for b, (x, y) in enumerate(take(dl, dl.batches_per_epoch)):
        for i, xr, yr in zip(seen[b], x, y):
            rows[int(i)] = torch.cat([xr, yr[-1:]])
    assert sorted(rows) == list(range(spe))
    stream = torch.cat([rows[i] for i in range(spe)])
    assert torch.equal(stream, torch.from_numpy(ds.read(0, spe * (L + 1)).astype(np.int64)))
    # with a batch tail: each sample at most once, exactly batches*G of them
    dl2 = DataLoader(data, seq_len=L, global_batch=G + 1)
    ids = np.concatenate([dl2.global_batch_samples(b) for b in range(dl2.batches_per_epoch)])
    assert len(set(ids.tolist())) == len(ids) == dl2.batches_per_epoch * (G + 1)


def test_epochs_roll_over_with_a_new_shuffle(data):
    dl = DataLoader(data, seq_len=63, global_batch=8, seed=5)
    bpe = dl.batches_per_epoch
    e0 = np.concatenate([dl.global_batch_samples(b) for b in range(bpe)])
    e1 = np.concatenate([dl.global_batch_samples(b) for b in range(bpe, 2 * bpe)])
    assert len(set(e0.tolist())) == len(set(e1.tolist())) == bpe * 8 and not np.array_equal(e0, e1)
    p0, p1 = np.asarray(dl.permutation(0)), np.asarray(dl.permutation(1))
    assert sorted(p0) == sorted(p1) == list(range(dl.samples_per_epoch))
    assert np.array_equal(np.asarray(dl.permutation(1)), epoch_permutation(dl.samples_per_epoch, 5, 1))
    batches = take(dl, bpe + 2)
    assert dl.state_dict()["epoch"] == 1 and dl.state_dict()["batches"] == bpe + 2
    assert len(batches) == bpe + 2
    idx = list((data / "cache").glob("index-train-*-s5-e*.npy"))
    assert len(idx) == 2 and isinstance(dl.permutation(1), np.memmap)


@pytest.mark.parametrize("k", [0, 1, 7, 13])
def test_resume_gives_exactly_the_uninterrupted_batches(data, k):
    ref = DataLoader(data, seq_len=47, global_batch=6, seed=1)
    n = ref.batches_per_epoch + 5  # crosses an epoch boundary
    full = take(ref, n)
    a = DataLoader(data, seq_len=47, global_batch=6, seed=1)
    take(a, k)
    state = json.loads(json.dumps(a.state_dict()))  # survives JSON
    b = DataLoader(data, seq_len=47, global_batch=6, seed=999)  # the state's seed wins
    b.load_state_dict(state)
    rest = take(b, n - k)
    for (x1, y1), (x2, y2) in zip(full[k:], rest):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_one_rank_vs_two_ranks_cover_the_same_global_batches(data):
    one = take(DataLoader(data, seq_len=31, global_batch=8, seed=2), 12)
    r0 = take(DataLoader(data, seq_len=31, global_batch=8, seed=2, rank=0, world_size=2), 12)
    r1 = take(DataLoader(data, seq_len=31, global_batch=8, seed=2, rank=1, world_size=2), 12)
    for (x, y), (x0, y0), (x1, y1) in zip(one, r0, r1):
        assert x0.shape == (4, 31)
        assert torch.equal(x, torch.cat([x0, x1])) and torch.equal(y, torch.cat([y0, y1]))
    # resume a 1-rank run on 4 ranks
    a = DataLoader(data, seq_len=31, global_batch=8, seed=2)
    take(a, 5)
    parts = []
    for r in range(4):
        d = DataLoader(data, seq_len=31, global_batch=8, seed=2, rank=r, world_size=4)
        d.load_state_dict(a.state_dict())
        parts.append(take(d, 3))
    for j in range(3):
        assert torch.equal(torch.cat([parts[r][j][0] for r in range(4)]), one[5 + j][0])


def test_state_errors(data, tmp_path):
    dl = DataLoader(data, seq_len=31, global_batch=8)
    st = dl.state_dict()
    assert set(st) >= {"batches", "seed", "epoch", "fingerprint"}
    bad = {**st, "fingerprint": "0" * 32}
    with pytest.raises(SpectraError, match="changed under this run"):
        dl.load_state_dict(bad)
    dl.load_state_dict(bad, allow_fingerprint_mismatch=True)
    with pytest.raises(SpectraError, match="seq_len=31"):
        DataLoader(data, seq_len=15, global_batch=8).load_state_dict(st)
    with pytest.raises(SpectraError, match="fewer than one global batch"):
        DataLoader(data, seq_len=4000, global_batch=8)
    with pytest.raises(SpectraError, match="not divisible"):
        DataLoader(data, seq_len=31, global_batch=6, world_size=4)
    with pytest.raises(SpectraError, match="no manifest.json"):
        DataLoader(tmp_path, seq_len=31, global_batch=8)
    with pytest.raises(SpectraError, match="unknown split"):
        TokenDataset(data, "valid")


def test_torn_index_file_is_rebuilt(data):
    dl = DataLoader(data, seq_len=55, global_batch=4, seed=11)
    ref = dl.global_batch_samples(3).copy()
    p = dl._index_path(0)
    p.write_bytes(p.read_bytes()[:50])
    dl2 = DataLoader(data, seq_len=55, global_batch=4, seed=11)
    assert np.array_equal(dl2.global_batch_samples(3), ref)
