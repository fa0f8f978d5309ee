"""Data builds that scale out: worker processes and partitions + merge equal a single build byte for byte."""

import json
import random

import pytest

from spectra.cli import main
from spectra.data import build as B
from spectra.data import read_manifest
from spectra.data.build import build_dataset
from spectra.data.merge import merge_partitions, partition_bounds
from spectra.data.tokenizer import train_bpe
from spectra.errors import SpectraError

WORDS = ("ternary weights pack two bits per trit while float models keep sixteen and the scaling law fits a "
         "power of parameters to validation loss across nine sizes").split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    src = d / "src"
    (src / "sub").mkdir(parents=True)
    docs = []
    for i, n in enumerate([40, 250, 15, 120, 60, 90]):  # uneven files: the byte-balanced cut is exercised
        rows = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60))) + f" #{i}.{j}" for j in range(n)]
        docs += rows
        f = src / ("sub" if i % 2 else "") / f"part-{i}.jsonl"
        f.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    (src / "notes.bin").write_text("not a corpus file")  # listed as skipped, in every partition's view
    tok = d / "tokenizer.json"
    train_bpe(docs, 400).save(str(tok))
    return src, tok


def _files(d):
    m = read_manifest(d)
    return m, {s["file"]: (d / s["file"]).read_bytes() for sp in m["splits"].values() for s in sp["shards"]}


KW = dict(val_fraction=0.1, shard_tokens=1500, progress=False)


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory):
    src, tok = corpus
    return build_dataset(src, tmp_path_factory.mktemp("single") / "d", tokenizer=tok, num_workers=1, **KW)


@pytest.mark.parametrize("k", [2, 3])
def test_partitions_merge_to_the_single_build(corpus, single, tmp_path, k):
    src, tok = corpus
    parts = [build_dataset(src, tmp_path / f"p{i}", tokenizer=tok, num_partitions=k, partition=i, num_workers=1, **KW)
             for i in range(k)]
    pm = [read_manifest(p)["partition"] for p in parts]
    assert [p["index"] for p in pm] == list(range(k)) and pm[-1]["files"][1] == 6
    merged = merge_partitions(parts[::-1], tmp_path / "merged", progress=False)  # order of arguments is free
    (m1, f1), (m2, f2) = _files(single), _files(merged)
    assert f1 == f2 and len(f1) > 2  # several shards, re-cut at the same boundaries
    assert m2 == m1  # the whole manifest: fingerprint, build key, counts, source
    assert (merged / "tokenizer.json").read_bytes() == (single / "tokenizer.json").read_bytes()
    # a later single build of the same inputs finds the merged directory up to date
    logs = []
    build_dataset(src, merged, tokenizer=tok, num_workers=1, log=logs.append, **KW)
    assert any("up to date" in x for x in logs)


def test_worker_processes_same_bytes(corpus, single, tmp_path, monkeypatch):
    monkeypatch.setattr(B, "BATCH_DOCS", 64)  # many batches, so the worker pool starts
    src, tok = corpus
    logs = []
    d = build_dataset(src, tmp_path / "w2", tokenizer=tok, num_workers=2, log=logs.append, **KW)
    assert any("2 worker processes" in x for x in logs)
    assert _files(d) == _files(single)
    # truncation at max_tokens cuts the same place with processes as in-process
    a = build_dataset(src, tmp_path / "t1", tokenizer=tok, num_workers=1, max_tokens=5000, **KW)
    b = build_dataset(src, tmp_path / "t2", tokenizer=tok, num_workers=2, max_tokens=5000, **KW)
    (ma, fa), (mb, fb) = _files(a), _files(b)
    assert fa == fb and ma["fingerprint"] == mb["fingerprint"] and ma["limits"]["truncated"]


def test_partition_bounds_balanced_and_nonempty():
    assert partition_bounds([10, 10, 10, 10], 2) == [0, 2, 4]
    assert partition_bounds([100, 1, 1, 1], 3) == [0, 1, 2, 4]
    assert partition_bounds([1, 1, 1, 100], 3) == [0, 2, 3, 4]  # the big last file alone
    for k in (1, 2, 5):
        b = partition_bounds([7, 3, 9, 1, 4], k)
        assert b[0] == 0 and b[-1] == 5 and all(x < y for x, y in zip(b, b[1:]))


def test_partition_errors(corpus, tmp_path, single):
    src, tok = corpus
    with pytest.raises(SpectraError, match="needs --tokenizer FILE"):
        build_dataset(src, tmp_path / "x", num_partitions=2, partition=0, **KW)
    with pytest.raises(SpectraError, match="fewer than --num-partitions 7"):
        build_dataset(src, tmp_path / "x", tokenizer=tok, num_partitions=7, partition=0, **KW)
    with pytest.raises(SpectraError, match=r"--partition must be in \[0, 1\]"):
        build_dataset(src, tmp_path / "x", tokenizer=tok, num_partitions=2, partition=2, **KW)
    with pytest.raises(SpectraError, match="local file source"):
        build_dataset("default", tmp_path / "x", tokenizer=tok, num_partitions=2, partition=0, **KW)
    with pytest.raises(SpectraError, match="--max-docs"):
        build_dataset(src, tmp_path / "x", tokenizer=tok, num_partitions=2, partition=0, max_docs=5, **KW)
    p0 = build_dataset(src, tmp_path / "p0", tokenizer=tok, num_partitions=2, partition=0, **KW)
    with pytest.raises(SpectraError, match=r"missing \[1\]"):
        merge_partitions([p0], tmp_path / "m", progress=False)
    other = build_dataset(src, tmp_path / "o1", tokenizer=tok, num_partitions=2, partition=1, seed=5, **KW)
    with pytest.raises(SpectraError, match="different inputs or options"):
        merge_partitions([p0, other], tmp_path / "m", progress=False)
    with pytest.raises(SpectraError, match="not a partition"):
        merge_partitions([p0, single], tmp_path / "m", progress=False)


def test_cli_build_partitions_and_merge(corpus, single, tmp_path, capsys):
    src, tok = corpus
    for i in range(2):
        assert main(["data", "build", "--source", str(src), "--out", str(tmp_path / f"p{i}"), "--tokenizer", str(tok),
                     "--val-fraction", "0.1", "--shard-tokens", "1500", "--num-partitions", "2", "--partition", str(i),
                     "--workers", "1", "--no-progress"]) == 0
    assert main(["data", "merge", str(tmp_path / "p0"), str(tmp_path / "p1"), "--out", str(tmp_path / "m")]) == 0
    assert "merged 2 partitions" in capsys.readouterr().out
    assert _files(tmp_path / "m") == _files(single)
    assert main(["data", "merge", str(tmp_path / "p0"), "--out", str(tmp_path / "m2")]) == 2
