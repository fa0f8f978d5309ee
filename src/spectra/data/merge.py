"""Data builds split across machines: partitions of a many-file source, and ``spectra data merge``.

A partition is a contiguous run of the source's files (sorted, as a single build reads
them), cut so that every partition holds about the same number of bytes. Each
partition is an ordinary data directory whose manifest also records its index, the
partition count and the build key the whole build would have. Documents go to train
or validation by a hash of their text, never by position, so concatenating the
partitions' token streams in index order gives exactly the single-machine stream;
:func:`merge_partitions` re-cuts that stream into shards of the same size, so shard
files, digests, manifest and fingerprint equal those of a single build of the source.

A trained BPE would differ per partition: a partitioned build needs a tokenizer file.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from spectra.data import manifest as mf
from spectra.errors import SpectraError


def partition_bounds(sizes: list[int], k: int) -> list[int]:
    """``k + 1`` file indices: partition ``i`` holds files ``[b[i], b[i+1])``, each non-empty, byte totals
    as equal as contiguous runs allow (cut where the running total crosses ``i/k`` of the bytes)."""
    n = len(sizes)
    cum = np.cumsum([0] + [max(1, int(s)) for s in sizes])
    bounds = [0]
    for i in range(1, k):
        j = int(np.searchsorted(cum, cum[-1] * i / k, side="left"))
        bounds.append(min(max(j, bounds[-1] + 1), n - (k - i)))  # keep every partition non-empty
    return bounds + [n]


def partition_source(src, num_partitions: int, partition: int, *, trains_bpe: bool, max_docs, max_tokens) -> dict:
    """Restrict a file source to its slice ``partition`` of ``num_partitions`` (in place); returns the
    manifest's partition record."""
    from spectra.data.sources import FileSource

    k, i = num_partitions, partition
    if k < 1 or not 0 <= i < k:
        raise SpectraError(f"--partition must be in [0, {k - 1}] for --num-partitions {k}, got {i}")
    if not isinstance(src, FileSource):
        raise SpectraError("--num-partitions needs a local file source (a directory of corpus files); download a "
                           "Hub dataset first (`hf download NAME --repo-type dataset --local-dir DIR`, docs/data.md)")
    if trains_bpe:
        raise SpectraError("--num-partitions needs --tokenizer FILE: a BPE trained per partition would differ; "
                           "train it once (spectra data build on a sample) and pass its tokenizer.json")
    if max_docs is not None or max_tokens is not None:
        raise SpectraError("--max-docs / --max-tokens cut the whole stream and cannot be applied per partition; "
                           "drop them with --num-partitions")
    if len(src.files) < k:
        raise SpectraError(f"{src.root} has {len(src.files)} corpus file(s), fewer than --num-partitions {k}; "
                           "split the corpus into more files or use fewer partitions")
    full = src.describe()
    b = partition_bounds([p.stat().st_size for p in src.files], k)
    src.files = src.files[b[i]:b[i + 1]]
    return {"index": i, "count": k, "files": [b[i], b[i + 1]], "full_source": full}


def _check_parts(parts: list[Path]) -> list[dict]:
    ms = []
    for d in parts:
        m = mf.read_manifest(d)
        if "partition" not in m:
            raise SpectraError(f"{d}: not a partition (its manifest has no 'partition' record); build slices with "
                               "`spectra data build --num-partitions K --partition I`")
        ms.append(m)
    k = ms[0]["partition"]["count"]
    idx = sorted(m["partition"]["index"] for m in ms)
    if idx != list(range(k)) or any(m["partition"]["count"] != k for m in ms):
        missing = sorted(set(range(k)) - set(idx))
        raise SpectraError(f"need each of the {k} partitions exactly once; got indices {idx}"
                           + (f" (missing {missing})" if missing else ""))
    key = ms[0]["partition"]["full_build_key"]
    for d, m in zip(parts, ms):
        if m["partition"]["full_build_key"] != key:
            raise SpectraError(f"{d}: built from different inputs or options than {parts[0]} (source, tokenizer, "
                               "seed, val fraction, shard size or dtype differ); rebuild it with the same command")
    return ms


def merge_partitions(parts: list, out_dir, *, force: bool = False, progress: bool = True,
                     log: Callable[[str], None] | None = None) -> Path:
    """Join partition directories (any order) into ``out_dir``, identical to a single build of the source."""
    from spectra.data.build import ShardWriter, is_data_dir
    from spectra.fsutil import atomic_dir, atomic_write_json, claim_output

    log = log or (lambda m: print(m, file=sys.stderr) if progress else None)
    parts = [Path(p) for p in parts]
    if not parts:
        raise SpectraError("no partition directories given")
    ms = _check_parts(parts)
    order = sorted(range(len(parts)), key=lambda j: ms[j]["partition"]["index"])
    parts, ms = [parts[j] for j in order], [ms[j] for j in order]
    for d, m in zip(parts, ms):
        for split in mf.SPLITS:
            mf.verify_split(d, m, split, "full")  # nothing unverified goes into the merged stream
    m0 = ms[0]
    t0 = time.perf_counter()
    with claim_output(Path(out_dir), "data merge", inputs=parts, force=force, owned=is_data_dir):
        with atomic_dir(Path(out_dir)) as tmp:
            shutil.copyfile(parts[0] / m0["tokenizer"]["file"], tmp / m0["tokenizer"]["file"])
            splits = {}
            for split in mf.SPLITS:
                w = ShardWriter(tmp, split, m0["dtype"], m0["shard_tokens"])
                for d, m in zip(parts, ms):
                    for s in m["splits"][split]["shards"]:
                        w.write(np.fromfile(d / s["file"], dtype=m0["dtype"]))
                splits[split] = {"documents": sum(m["splits"][split]["documents"] for m in ms),
                                 "tokens": w.tokens, "bytes": sum(m["splits"][split]["bytes"] for m in ms),
                                 "shards": w.close()}
            man = _merged_manifest(ms, splits)
            atomic_write_json(tmp / mf.MANIFEST, man)
            mf.write_stamps(tmp, {s["file"]: s["blake2b"] for sp in mf.SPLITS for s in man["splits"][sp]["shards"]})
    tr, va = man["splits"]["train"], man["splits"]["validation"]
    log(f"{out_dir}: merged {len(parts)} partitions: train {tr['tokens']:,} tokens, validation {va['tokens']:,} "
        f"tokens, in {time.perf_counter() - t0:.1f}s; fingerprint {man['fingerprint']}")
    return Path(out_dir)


def _merged_manifest(ms: list[dict], splits: dict) -> dict:
    """The manifest a single build of the whole source writes (same fields, same order)."""
    m0 = ms[0]
    reads = [m.get("read", {}) for m in ms]
    offenders = [o for r in reads for o in r.get("offenders", [])]
    read = {"documents": sum(r.get("documents", 0) for r in reads),
            "empty_documents": sum(r.get("empty_documents", 0) for r in reads),
            "bad_records": sum(r.get("bad_records", 0) for r in reads),
            "replaced_chars": sum(r.get("replaced_chars", 0) for r in reads),
            "files": sum(r.get("files", 0) for r in reads),
            "skipped_files": reads[0].get("skipped_files", []),  # each partition lists the whole root's
            "offenders": offenders[:10]}
    man = {k: v for k, v in m0.items() if k not in ("partition", "fingerprint", "build_key")}
    man.update(source=m0["partition"]["full_source"], read=read, splits=splits,
               limits={**m0.get("limits", {}), "truncated": False})
    man["fingerprint"] = mf.content_fingerprint(man)
    man["build_key"] = m0["partition"]["full_build_key"]
    return json.loads(json.dumps(man))
