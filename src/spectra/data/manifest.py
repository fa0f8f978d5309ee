"""The data directory's manifest and shard verification.

Layout of a data directory::

    manifest.json            what was built, from what, and a content fingerprint
    tokenizer.json           the tokenizer the ids belong to (travels with checkpoints)
    train-00000.bin ...      flat little-endian uint16/uint32 token ids, EOS after each document
    validation-00000.bin ...
    cache/                   loader indices and verification stamps (safe to delete)

A shard is trusted only when it is listed in the manifest with its exact size and
blake2b digest. Hashing is skipped on later opens when a stamp in ``cache/`` shows
the file unchanged (size, mtime, inode) since it was last hashed -- git's "racy"
rule applies: a stamp taken within ``RACY_NS`` of the file's mtime is not trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

from spectra.errors import SpectraError
from spectra.fsutil import atomic_write_json

MANIFEST = "manifest.json"
FORMAT = "spectra-tokens"
VERSION = 1
CACHE_DIR = "cache"
STAMPS = "verified.json"
RACY_NS = 2_000_000_000
SPLITS = ("train", "validation")


def digest_file(path, chunk: int = 1 << 22) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(chunk), b""):
            h.update(b)
    return h.hexdigest()


def content_fingerprint(manifest: dict) -> str:
    """Digest of what a model would see: dtype, tokenizer and every shard's digest in order."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{manifest['dtype']}\0{manifest['tokenizer']['sha256']}\n".encode())
    for split in SPLITS:
        for s in manifest["splits"].get(split, {}).get("shards", []):
            h.update(f"{split}\0{s['file']}\0{s['tokens']}\0{s['blake2b']}\n".encode())
    return h.hexdigest()


def read_manifest(data_dir) -> dict:
    d = Path(data_dir)
    if not d.exists():
        raise SpectraError(f"data directory does not exist: {d} (build it with 'spectra data build')")
    p = d / MANIFEST
    if not p.is_file():
        raise SpectraError(f"{d} is not a spectra data directory: no {MANIFEST} (build it with 'spectra data build')")
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SpectraError(f"{p}: not valid JSON ({e}); rebuild with 'spectra data build --force'") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise SpectraError(f"{p}: not a {FORMAT} manifest")
    if m.get("version") != VERSION:
        raise SpectraError(f"{p}: manifest version {m.get('version')} is not supported (this spectra reads {VERSION})")
    for k in ("dtype", "tokenizer", "splits", "fingerprint"):
        if k not in m:
            raise SpectraError(f"{p}: manifest lacks field {k!r}; rebuild with 'spectra data build --force'")
    if m["dtype"] not in ("uint16", "uint32"):
        raise SpectraError(f"{p}: field 'dtype' must be uint16 or uint32, got {m['dtype']!r}")
    if content_fingerprint(m) != m["fingerprint"]:
        raise SpectraError(f"{p}: field 'fingerprint' does not match the listed shards (manifest edited?); rebuild")
    return m


def _load_stamps(d: Path) -> dict:
    try:
        return json.loads((d / CACHE_DIR / STAMPS).read_text())
    except (OSError, ValueError):
        return {}


def write_stamps(d: Path, entries: dict) -> None:
    """Record that these files (name -> blake2b) were hashed now; best effort (read-only dirs are fine)."""
    stamps = _load_stamps(d)
    now = time.time_ns()
    for name, digest in entries.items():
        st = (d / name).stat()
        stamps[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino, "blake2b": digest,
                        "stamped_ns": now}
    try:
        atomic_write_json(d / CACHE_DIR / STAMPS, stamps)
    except OSError:
        pass


def verify_split(data_dir, manifest: dict, split: str, mode: str = "auto") -> None:
    """Check every shard of ``split``: size always; digest per ``mode`` ('auto' = unless a
    trusted stamp shows the file unchanged, 'full' = always, 'size' = never)."""
    if mode not in ("auto", "full", "size"):
        raise SpectraError(f"verify must be 'auto', 'full' or 'size', got {mode!r}")
    d = Path(data_dir)
    itemsize = np.dtype(manifest["dtype"]).itemsize
    stamps = _load_stamps(d) if mode == "auto" else {}
    fresh = {}
    for s in manifest["splits"][split]["shards"]:
        p = d / s["file"]
        if not p.is_file():
            raise SpectraError(f"shard {p} is missing (listed in {d / MANIFEST}); rebuild with 'spectra data build --force'")
        st = p.stat()
        want = s["tokens"] * itemsize
        if st.st_size != want:
            raise SpectraError(f"shard {p} has {st.st_size} bytes, the manifest expects {want} "
                               f"({s['tokens']} {manifest['dtype']} tokens): truncated or replaced; rebuild with --force")
        if mode == "size":
            continue
        stamp = stamps.get(s["file"])
        if (stamp and stamp.get("blake2b") == s["blake2b"] and stamp.get("size") == st.st_size
                and stamp.get("mtime_ns") == st.st_mtime_ns and stamp.get("ino") == st.st_ino
                and stamp.get("stamped_ns", 0) - st.st_mtime_ns > RACY_NS):
            continue
        got = digest_file(p)
        if got != s["blake2b"]:
            raise SpectraError(f"shard {p} content does not match the manifest (blake2b {got} != {s['blake2b']}): "
                               f"modified after the build; rebuild with 'spectra data build --force'")
        fresh[s["file"]] = got
    if fresh:
        write_stamps(d, fresh)
