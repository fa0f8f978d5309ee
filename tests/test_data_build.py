"""spectra.data.build_dataset: sources, tokenizer, shards, manifest, determinism, bad input."""

import gzip
import json
import os
import random

import numpy as np
import pytest

from spectra.data import TokenDataset, build_dataset, is_validation, load_tokenizer, open_source, read_manifest
from spectra.errors import SpectraError

WORDS = ("the cat sat on a mat while dogs ran over green hills and rivers flowed to distant seas under a bright "
         "sky full of birds singing songs of old times ternary weights quantize every layer").split()


def make_docs(n=300, seed=0):
    rng = random.Random(seed)
    return [f"doc {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 80))) for i in range(n)]


def write_jsonl(path, docs, field="text"):
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({field: d, "meta": 1}) + "\n")


def shard_bytes(d):
    m = read_manifest(d)
    return {s["file"]: (d / s["file"]).read_bytes() for sp in m["splits"].values() for s in sp["shards"]}


def decode_split(d, split):
    """Documents of a split, decoded back from the shards (EOS-separated)."""
    ds = TokenDataset(d, split)
    tok = load_tokenizer(d)
    ids = ds.read(0, ds.num_tokens).astype(np.int64)
    cuts = np.flatnonzero(ids == ds.eos_id)
    out, s = [], 0
    for c in cuts:
        out.append(tok.decode(ids[s:c].tolist(), skip_special_tokens=False))
        s = c + 1
    assert s == len(ids), "every document ends with EOS"
    return out


def test_neox_round_trip_real_text(shared):
    tok = load_tokenizer(shared("tokenizer", "gpt-neox-20b.json"))
    assert tok.encode("Hello world, this is a test.").ids == [12092, 1533, 13, 436, 310, 247, 1071, 15]
    for name in ("tinyshakespeare.txt", "wikitext2-valid.txt", "ptb-valid.txt"):
        text = shared("text", name).read_text(encoding="utf-8")[:200_000]
        assert tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text, name


def test_neox_build_decodes_back_to_the_documents(shared, tmp_path):
    src = shared("text", "tinyshakespeare.txt")
    out = build_dataset(src, tmp_path / "d", tokenizer=shared("tokenizer", "gpt-neox-20b.json"), val_fraction=0.05, progress=False)
    m = read_manifest(out)
    assert m["dtype"] == "uint16" and m["tokenizer"]["eos_id"] == 0
    assert m["tokenizer"]["vocab_size"] == 50281 and m["tokenizer"]["padded_vocab"] == 50304
    docs = list(open_source(src))
    train = [d for d in docs if not is_validation(d.encode(), 0, 0.05)]
    val = [d for d in docs if is_validation(d.encode(), 0, 0.05)]
    assert decode_split(out, "train") == train
    assert decode_split(out, "validation") == val
    assert m["splits"]["train"]["documents"] == len(train) and len(val) > 0
    # the tokenizer travels with the shards
    assert (out / "tokenizer.json").read_bytes() == shared("tokenizer", "gpt-neox-20b.json").read_bytes()
    # 32-bit: same ids, wider dtype
    out32 = build_dataset(src, tmp_path / "d32", tokenizer=shared("tokenizer", "gpt-neox-20b.json"), val_fraction=0.05, dtype="uint32",
                          progress=False)
    a, b = TokenDataset(out, "train"), TokenDataset(out32, "train")
    assert b.dtype == np.uint32 and np.array_equal(a.read(0, a.num_tokens), b.read(0, b.num_tokens))


def test_two_builds_identical_and_rerun_is_noop(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", make_docs(400))
    kw = dict(vocab_size=400, val_fraction=0.1, shard_tokens=3000, progress=False)
    a = build_dataset(tmp_path / "c.jsonl", tmp_path / "a", **kw)
    b = build_dataset(tmp_path / "c.jsonl", tmp_path / "b", num_workers=1, **kw)  # 1 vs 2 tokenizer threads
    sa, sb = shard_bytes(a), shard_bytes(b)
    assert len(sa) > 2 and sa == sb  # several bounded shards, byte-identical
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    assert (a / "manifest.json").read_bytes() == (b / "manifest.json").read_bytes()
    assert all(s["tokens"] <= 3000 for sp in read_manifest(a)["splits"].values() for s in sp["shards"])
    mt = {f: os.stat(a / f).st_mtime_ns for f in sa}
    logs = []
    build_dataset(tmp_path / "c.jsonl", tmp_path / "a", log=logs.append, **kw)
    assert "up to date" in logs[-1] and mt == {f: os.stat(a / f).st_mtime_ns for f in sa}
    # a changed input rebuilds
    write_jsonl(tmp_path / "c.jsonl", make_docs(401))
    build_dataset(tmp_path / "c.jsonl", tmp_path / "a", log=logs.append, **kw)
    assert read_manifest(a)["fingerprint"] != read_manifest(b)["fingerprint"]


def test_validation_documents_never_in_train(tmp_path):
    docs = make_docs(500, seed=1)
    docs += docs[:100]  # duplicates must land on the same side
    write_jsonl(tmp_path / "c.jsonl", docs)
    out = build_dataset(tmp_path / "c.jsonl", tmp_path / "d", vocab_size=350, val_fraction=0.2, progress=False)
    train, val = decode_split(out, "train"), decode_split(out, "validation")
    assert 60 < len(val) < 180 and len(train) + len(val) == len(docs)
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(docs)


def test_sources_formats_agree(tmp_path):
    pytest.importorskip("zstandard", reason="zstandard not installed (.zst sources; the dev extra installs it)")
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow not installed (parquet sources; the dev extra installs it)")
    import pyarrow as pa
    import zstandard

    docs = make_docs(120, seed=2)
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    write_jsonl(d / "a.jsonl", docs[:30])
    with gzip.open(d / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": x}) + "\n" for x in docs[30:60])
    (d / "sub" / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps({"text": x}) + "\n" for x in docs[60:90]).encode()))
    pq.write_table(pa.table({"text": docs[90:110]}), d / "sub" / "d.parquet")
    (d / "sub" / "e.txt").write_text("\n\n".join(docs[110:]) + "\n", encoding="utf-8")
    (d / "notes.csv").write_text("ignored")
    src = open_source(d)
    assert list(src) == docs
    assert src.stats.skipped_files == ["notes.csv"] and src.stats.files == 5
    # txt units
    (tmp_path / "t.txt").write_text("a b\nc\n\n\nd e\n", encoding="utf-8")
    assert list(open_source(tmp_path / "t.txt")) == ["a b\nc", "d e"]
    assert list(open_source(tmp_path / "t.txt", txt_unit="line")) == ["a b", "c", "d e"]
    assert list(open_source(tmp_path / "t.txt", txt_unit="file")) == ["a b\nc\n\n\nd e\n"]
    # custom text field
    write_jsonl(tmp_path / "f.jsonl", docs[:5], field="content")
    assert list(open_source(tmp_path / "f.jsonl", text_field="content")) == docs[:5]


def test_hf_datasets_source_offline(tmp_path, monkeypatch):
    pytest.importorskip("datasets", reason="datasets not installed (the data extra: pip install -e '.[data]')")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    docs = make_docs(80, seed=3)
    write_jsonl(tmp_path / "c.jsonl", docs)
    src = open_source("hf:json", hf_data_files=[str(tmp_path / "c.jsonl")], max_docs=50)
    assert list(src) == docs[:50]
    out = build_dataset("hf:json", tmp_path / "d", hf_data_files=[str(tmp_path / "c.jsonl")], vocab_size=300,
                        val_fraction=0.0, progress=False)
    assert decode_split(out, "train") == docs
    assert read_manifest(out)["source"]["kind"] == "hf"


def test_max_tokens_stops_at_a_document_end(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", make_docs(300))
    out = build_dataset(tmp_path / "c.jsonl", tmp_path / "d", vocab_size=300, val_fraction=0.0, max_tokens=2000,
                        progress=False)
    m = read_manifest(out)
    n = m["splits"]["train"]["tokens"]
    assert m["limits"]["truncated"] and 2000 <= n < 2000 + 200
    ds = TokenDataset(out)
    assert ds.read(n - 1, 1)[0] == ds.eos_id


def test_default_corpus_build(tmp_path):
    out = build_dataset("default", tmp_path / "d", vocab_size=1024, max_docs=120, progress=False)
    m = read_manifest(out)
    assert m["source"]["kind"] == "default" and m["source"]["python"]
    assert m["tokenizer"]["vocab_size"] == 1024 and m["splits"]["train"]["tokens"] > 20_000
    assert m["splits"]["validation"]["tokens"] > 0
    tok = load_tokenizer(out)
    text = "Return the absolute value of the argument. Ünïcödé ✓"
    assert tok.decode(tok.encode(text).ids) == text  # byte-level: anything round-trips


# ---- bad input ----------------------------------------------------------------------------------

def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(SpectraError, match="does not exist"):
        build_dataset(tmp_path / "nope.jsonl", tmp_path / "d", progress=False)
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(SpectraError, match="empty corpus"):
        build_dataset(tmp_path / "e.jsonl", tmp_path / "d", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpectraError, match="no corpus files"):
        build_dataset(tmp_path / "empty", tmp_path / "d", progress=False)
    (tmp_path / "x.bin").write_bytes(b"abc")
    with pytest.raises(SpectraError, match="unknown corpus file type"):
        build_dataset(tmp_path / "x.bin", tmp_path / "d", progress=False)
    assert not (tmp_path / "d").exists()


def test_bad_jsonl_records_fail_or_skip(tmp_path):
    docs = make_docs(50)
    lines = [json.dumps({"text": d}) for d in docs]
    lines[3] = "{not json"
    lines[7] = json.dumps({"body": "x"})
    lines[9] = json.dumps([1, 2])
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(SpectraError, match=r"c\.jsonl:4: not valid JSON"):
        build_dataset(tmp_path / "c.jsonl", tmp_path / "d", vocab_size=300, progress=False)
    assert not (tmp_path / "d").exists()
    out = build_dataset(tmp_path / "c.jsonl", tmp_path / "d", vocab_size=300, on_bad="skip", val_fraction=0.0,
                        progress=False)
    rd = read_manifest(out)["read"]
    assert rd["bad_records"] == 3 and len(rd["offenders"]) == 3
    assert "c.jsonl:8" in rd["offenders"][1] and "'text'" in rd["offenders"][1]
    assert decode_split(out, "train") == [d for i, d in enumerate(docs) if i not in (3, 7, 9)]


def test_undecodable_bytes_are_replaced_and_counted(tmp_path):
    (tmp_path / "c.txt").write_bytes(b"good text here\n\nbad \xff\xfe bytes\n\nmore text\n")
    out = build_dataset(tmp_path / "c.txt", tmp_path / "d", vocab_size=300, val_fraction=0.0, progress=False)
    assert read_manifest(out)["read"]["replaced_chars"] == 2
    assert decode_split(out, "train")[1] == "bad \ufffd\ufffd bytes"
    (tmp_path / "s.jsonl").write_text(json.dumps({"text": "lone \ud800 surrogate"}) + "\n")
    out = build_dataset(tmp_path / "s.jsonl", tmp_path / "s", vocab_size=300, val_fraction=0.0, progress=False)
    assert read_manifest(out)["read"]["replaced_chars"] == 1


def test_token_ids_too_large_for_dtype(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(70_000)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "big.json"))
    (tmp_path / "c.txt").write_text("w1 w69999 w5\n")
    with pytest.raises(SpectraError, match="do not fit uint16"):
        build_dataset(tmp_path / "c.txt", tmp_path / "d", tokenizer=tmp_path / "big.json", dtype="uint16",
                      val_fraction=0.0, progress=False)
    out = build_dataset(tmp_path / "c.txt", tmp_path / "d", tokenizer=tmp_path / "big.json", val_fraction=0.0,
                        progress=False)
    ds = TokenDataset(out)
    assert ds.dtype == np.uint32 and ds.read(0, 4).tolist() == [3, 70001, 7, 0]


def test_truncated_or_modified_shard_is_named(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", make_docs(100))
    out = build_dataset(tmp_path / "c.jsonl", tmp_path / "d", vocab_size=300, progress=False)
    shard = out / "train-00000.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[:-2])
    with pytest.raises(SpectraError, match="train-00000.bin has .* bytes, the manifest expects"):
        TokenDataset(out)
    shard.write_bytes(data[:10] + bytes([data[10] ^ 1]) + data[11:])
    with pytest.raises(SpectraError, match="train-00000.bin content does not match"):
        TokenDataset(out)
    shard.write_bytes(data)
    TokenDataset(out, verify="full")
    # a broken build is rebuilt by the next run with the same inputs
    shard.write_bytes(data[:-2])
    build_dataset(tmp_path / "c.jsonl", tmp_path / "d", vocab_size=300, progress=False)
    assert shard.read_bytes() == data


def test_failed_or_interrupted_build_leaves_previous_build_intact(tmp_path, monkeypatch):
    from spectra.data import build as build_mod

    write_jsonl(tmp_path / "c.jsonl", make_docs(200))
    out = build_dataset(tmp_path / "c.jsonl", tmp_path / "d", vocab_size=300, progress=False)
    before = shard_bytes(out)
    fp = read_manifest(out)["fingerprint"]
    # new input with a bad record: the rebuild fails, the old build stays
    with open(tmp_path / "c.jsonl", "a") as f:
        f.write("oops\n")
    with pytest.raises(SpectraError):
        build_dataset(tmp_path / "c.jsonl", tmp_path / "d", vocab_size=300, progress=False)
    assert shard_bytes(out) == before and TokenDataset(out).fingerprint == fp
    # an interruption in the middle of writing shards
    write_jsonl(tmp_path / "c.jsonl", make_docs(300))
    calls = []

    def boom(self, ids):
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(build_mod.ShardWriter, "write", boom)
    with pytest.raises(KeyboardInterrupt):
        build_dataset(tmp_path / "c.jsonl", tmp_path / "d", vocab_size=300, progress=False)
    assert calls and shard_bytes(out) == before and TokenDataset(out, verify="full").fingerprint == fp
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_refuses_to_replace_a_foreign_directory(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", make_docs(20))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep me")
    with pytest.raises(SpectraError, match="refusing to replace"):
        build_dataset(tmp_path / "c.jsonl", tmp_path / "mine", vocab_size=300, progress=False)
    assert (tmp_path / "mine" / "precious.txt").read_text() == "keep me"


def test_hard_killed_build_is_never_trusted(tmp_path):
    """SIGKILL in the middle of writing shards: the old build stays valid; the next run cleans up."""
    import signal
    import subprocess
    import sys

    write_jsonl(tmp_path / "c.jsonl", make_docs(200))
    out = build_dataset(tmp_path / "c.jsonl", tmp_path / "d", vocab_size=300, progress=False)
    before, fp = shard_bytes(out), read_manifest(out)["fingerprint"]
    write_jsonl(tmp_path / "c.jsonl", make_docs(300))
    code = (
        "import os, signal, sys\n"
        "from spectra.data import build as b\n"
        "orig = b.ShardWriter.write\n"
        "def write(self, ids):\n"
        "    orig(self, ids); self.f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
        "b.ShardWriter.write = write\n"
        "b.build_dataset(sys.argv[1], sys.argv[2], vocab_size=300, shard_tokens=500, progress=False)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "c.jsonl"), str(out)], capture_output=True)
    assert r.returncode == -signal.SIGKILL
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".d.") and p.name.endswith(".tmp")]
    assert leftovers and any(leftovers[0].glob("train-*.bin"))  # a half-written build exists ...
    assert shard_bytes(out) == before and TokenDataset(out, verify="full").fingerprint == fp  # ... and is ignored
    build_dataset(tmp_path / "c.jsonl", out, vocab_size=300, shard_tokens=500, progress=False)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert TokenDataset(out).fingerprint != fp
