"""``build_dataset``: corpus -> tokenizer + flat token shards + manifest (``spectra data build``).

Pipeline: a reader thread parses documents (files / HF streaming / demo corpus),
assigns each to train or validation by a keyed hash of its text, and hands batches to
the main thread. Batches are tokenized (``Tokenizer.encode_batch_fast``, EOS after
every document, split into train/validation ids) by ``num_workers`` worker processes
(started at the second batch, so a small corpus never pays for them; one worker = an
encoder thread in this process), and the main thread writes the results in source order
into bounded shards while hashing them. ``num_partitions``/``partition`` build one slice
of a many-file source for a job array; :mod:`spectra.data.merge` joins the slices. Everything is written into a temporary sibling directory that replaces
``out_dir`` only when complete, under a lock, so an interrupted build leaves the
previous build intact and no half-written shard is ever listed in a manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import queue
import shutil
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from spectra.errors import SpectraError
from spectra.fsutil import atomic_dir, atomic_write_json, claim_output, recover
from spectra.data import manifest as mf
from spectra.data.sources import Source, open_source
from spectra.data.tokenizer import (TOKENIZER_FILE, file_hash, find_eos, load_tokenizer, resolve_tokenizer_file, train_bpe,
                                    vocab_size_of, word_like_special_tokens)

DEFAULT_SHARD_TOKENS = 1 << 27  # 128M tokens = 256 MiB of uint16 per shard
DEFAULT_VAL_FRACTION = 0.01
DEFAULT_VAL_FRACTION_DEMO = 0.05
DEFAULT_BPE_VOCAB = 8192
DEFAULT_BPE_MAX_BYTES = 256 << 20  # BPE statistics from the first 256 MiB of training text
BATCH_DOCS = 2048
BATCH_BYTES = 4 << 20


def is_validation(text_bytes: bytes, seed: int, val_fraction: float) -> bool:
    """Split by document content: a keyed hash, so the split is fixed by (seed, text),
    needs no document count, and duplicates of a validation document are never in train."""
    if val_fraction <= 0:
        return False
    h = hashlib.blake2b(text_bytes, digest_size=8, key=int(seed).to_bytes(8, "little", signed=True))
    return int.from_bytes(h.digest(), "little") < val_fraction * 2.0**64


def _utf8(doc: str, counter: list) -> tuple[str, bytes]:
    try:
        return doc, doc.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from JSON "\ud800": replace and count
        b = doc.encode("utf-8", errors="replace")
        counter[0] += sum(1 for c in doc if "\ud800" <= c <= "\udfff")
        return b.decode("utf-8"), b


class ShardWriter:
    """Append ids to ``{split}-NNNNN.bin`` files of at most ``shard_tokens`` tokens, hashing as it goes."""

    def __init__(self, directory: Path, split: str, dtype, shard_tokens: int):
        self.dir, self.split, self.dtype, self.shard_tokens = directory, split, np.dtype(dtype), shard_tokens
        self.shards: list[dict] = []
        self.f = None
        self.n = 0
        self.h = None
        self.tokens = 0

    def write(self, ids: np.ndarray) -> None:
        while ids.size:
            if self.f is None:
                name = f"{self.split}-{len(self.shards):05d}.bin"
                self.f = open(self.dir / name, "wb")
                self.h, self.n = hashlib.blake2b(digest_size=16), 0
                self.shards.append({"file": name})
            part = ids[: self.shard_tokens - self.n]
            b = part.tobytes()
            self.f.write(b)
            self.h.update(b)
            self.n += part.size
            self.tokens += part.size
            ids = ids[part.size:]
            if self.n == self.shard_tokens:
                self._finish()

    def _finish(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        self.shards[-1].update(tokens=self.n, blake2b=self.h.hexdigest())
        self.f = None

    def close(self) -> list[dict]:
        if self.f is not None:
            self._finish()
        return self.shards


def is_data_dir(p: Path) -> bool:
    """A directory an older `spectra data build` wrote (before output markers): it has a manifest."""
    return (p / mf.MANIFEST).is_file()


@contextlib.contextmanager
def _parallelism(num_workers: int):
    """encode_batch parallelism: rayon threads (sized once per process by RAYON_NUM_THREADS)."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if num_workers > 1 else "false"
    if num_workers > 1:
        os.environ.setdefault("RAYON_NUM_THREADS", str(num_workers))
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def _encode_batch(tok, docs: list[str], flags: list[bool], eos_id: int, dtype: str) -> tuple:
    """(per-document lengths incl. EOS, train ids, validation ids, max id) of one batch, ids in ``dtype``."""
    seqs = [e.ids for e in tok.encode_batch_fast(docs, add_special_tokens=False)]
    lens = np.fromiter((len(x) + 1 for x in seqs), np.int64, len(seqs))
    out, top = [], -1
    for want in (False, True):
        sel = [x for x, f in zip(seqs, flags) if f == want]
        ids = np.fromiter(itertools.chain.from_iterable(x + [eos_id] for x in sel), np.int64,
                          int(sum(len(x) + 1 for x in sel)))
        if ids.size:
            top = max(top, int(ids.max()))
        out.append(ids.astype(dtype) if ids.size and int(ids.max()) <= np.iinfo(dtype).max else ids)
    return lens, out[0], out[1], top


_WORKER: dict = {}


def _worker_init(tok_file: str, eos_id: int, dtype: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    _WORKER.update(tok=load_tokenizer(tok_file), eos_id=eos_id, dtype=dtype)


def _worker_encode(docs: list[str], flags: list[bool]) -> tuple:
    return _encode_batch(_WORKER["tok"], docs, flags, _WORKER["eos_id"], _WORKER["dtype"])


class _Encoders:
    """Encodes batches in order: an encoder thread for the first batch, then ``n`` worker processes
    (spawned, so the reader thread and rayon's threads are never forked)."""

    def __init__(self, n: int, tok, tok_file: Path, eos_id: int, dtype: str, log=None):
        self.n, self.tok, self.tok_file, self.eos_id, self.dtype = n, tok, tok_file, eos_id, dtype
        self.log = log or (lambda m: None)
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="spectra-encode")
        self.pool = None
        self.submitted = 0

    def submit(self, docs, flags):
        self.submitted += 1
        if self.n > 1 and self.submitted > 1 and self.pool is None:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(self.n, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                            initargs=(str(self.tok_file), self.eos_id, self.dtype))
            self.log(f"  tokenizing with {self.n} worker processes")
        if self.pool is not None:
            return self.pool.submit(_worker_encode, docs, flags)
        return self.thread.submit(_encode_batch, self.tok, docs, flags, self.eos_id, self.dtype)

    @property
    def depth(self) -> int:  # batches in flight: enough to keep every worker busy while one is written
        return 2 * self.n if self.pool is not None else 1

    def close(self) -> None:
        self.thread.shutdown(wait=True, cancel_futures=True)
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _reader(src, seed: int, val_fraction: float, q: queue.Queue, stop: threading.Event, surrogates: list):
    """Producer thread: batches of (docs, is_val flags, utf-8 sizes)."""

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        docs, flags, sizes, nbytes = [], [], [], 0
        for doc in src:
            doc, b = _utf8(doc, surrogates)
            docs.append(doc)
            flags.append(is_validation(b, seed, val_fraction))
            sizes.append(len(b))
            nbytes += len(b)
            if len(docs) >= BATCH_DOCS or nbytes >= BATCH_BYTES:
                if not put((docs, flags, sizes)):
                    return
                docs, flags, sizes, nbytes = [], [], [], 0
        if docs:
            put((docs, flags, sizes))
        put(None)
    except BaseException as e:  # re-raised in the main thread
        put(e)


class _TrainDocs:
    """Train-split documents for BPE training (up to ``max_bytes``). Small corpora are kept in
    memory on the way (all documents, in order, up to ``CACHE_BYTES``) so the encoding pass
    does not read -- or parse, or stream from the Hub -- the source a second time."""

    CACHE_BYTES = 256 << 20

    def __init__(self, src: Source, seed: int, val_fraction: float, max_bytes: int, surrogates: list):
        self.src, self.seed, self.val_fraction, self.max_bytes = src, seed, val_fraction, max_bytes
        self.surrogates = surrogates
        self.cache: list[str] | None = []
        self.complete = False

    def __iter__(self):
        n = cached = 0
        self.surrogates[0] = 0
        for doc in self.src:
            doc, b = _utf8(doc, self.surrogates)
            if self.cache is not None:
                self.cache.append(doc)
                cached += len(b)
                if cached > self.CACHE_BYTES:
                    self.cache = None
            if is_validation(b, self.seed, self.val_fraction):
                continue
            yield doc
            n += len(b)
            if n >= self.max_bytes:
                return
        self.complete = True

    def documents(self):
        """The cached documents if the whole source was read and fit, else None."""
        return self.cache if self.complete and self.cache is not None else None


def build_dataset(
    source,
    out_dir,
    tokenizer=None,
    vocab_size: int = DEFAULT_BPE_VOCAB,
    text_field: str = "text",
    val_fraction: float | None = None,
    seed: int = 0,
    num_workers: int = 2,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    txt_unit: str = "paragraph",
    on_bad: str = "fail",
    max_docs: int | None = None,
    max_tokens: int | None = None,
    hf_split: str = "train",
    hf_data_files=None,
    hf_revision: str | None = None,
    dtype: str = "auto",
    mp: int = 1,
    eos_token: str | None = None,
    bpe_max_bytes: int = DEFAULT_BPE_MAX_BYTES,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    wait_lock: bool = True,
    num_partitions: int = 1,
    partition: int = 0,
) -> Path:
    """Tokenize ``source`` into ``out_dir`` (see module doc and docs/data.md); returns ``out_dir``.

    ``source``: a file or directory path, ``"hf:NAME[:CONFIG]"`` or ``"default"``.
    ``tokenizer``: a tokenizer.json (or a directory holding one); ``None`` or
    ``"train-bpe"`` trains a byte-level BPE of ``vocab_size`` on the train split.
    ``num_workers``: tokenizer processes. ``num_partitions`` > 1: build only slice ``partition``
    of a many-file source (``spectra data merge`` joins the slices; docs/data.md).
    A re-run with identical inputs returns at once (``force=True`` rebuilds, and may replace
    a directory `spectra data build` did not write). ``wait_lock``: wait for another build of
    ``out_dir`` to finish (False: raise a SpectraError naming it, as the CLI does).
    """
    log = log or (lambda m: print(m, file=sys.stderr) if progress else None)
    out_dir = Path(out_dir)
    if val_fraction is None:  # the demo corpus is small: hold out more of it for a usable validation loss
        val_fraction = DEFAULT_VAL_FRACTION_DEMO if str(source) == "default" else DEFAULT_VAL_FRACTION
    if not 0 <= val_fraction < 1:
        raise SpectraError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens <= 0:
        raise SpectraError(f"shard_tokens must be positive, got {shard_tokens}")
    if dtype not in ("auto", "uint16", "uint32"):
        raise SpectraError(f"dtype must be auto, uint16 or uint32, got {dtype!r}")
    if num_workers < 1:
        raise SpectraError(f"num_workers must be >= 1, got {num_workers}")
    src = open_source(source, text_field=text_field, txt_unit=txt_unit, on_bad=on_bad, max_docs=max_docs,
                      hf_split=hf_split, hf_data_files=hf_data_files, hf_revision=hf_revision)
    train_bpe_mode = tokenizer is None or str(tokenizer) == "train-bpe"
    tok_file = None if train_bpe_mode else resolve_tokenizer_file(tokenizer)
    full_identity = src.identity()  # before slicing: the key a single-machine build of the whole source has
    part = None
    if num_partitions != 1 or partition != 0:
        from spectra.data.merge import partition_source

        part = partition_source(src, num_partitions, partition, trains_bpe=train_bpe_mode, max_docs=max_docs,
                                max_tokens=max_tokens)
    key_obj = {
        "format": [mf.FORMAT, mf.VERSION], "source": full_identity,
        "tokenizer": {"train_bpe": vocab_size, "bpe_max_bytes": bpe_max_bytes} if train_bpe_mode else file_hash(tok_file),
        "val_fraction": val_fraction, "seed": seed, "shard_tokens": shard_tokens, "dtype": dtype, "mp": mp,
        "eos_token": eos_token, "max_docs": max_docs, "max_tokens": max_tokens, "on_bad": on_bad,
    }
    build_key = full_key = hashlib.sha256(json.dumps(key_obj, sort_keys=True).encode()).hexdigest()
    if part is not None:
        build_key = hashlib.sha256(json.dumps({**key_obj, "partition": [partition, num_partitions]},
                                              sort_keys=True).encode()).hexdigest()

    inputs = [p for p in (source, tok_file) if p is not None and Path(str(p)).exists()]
    # --out policy (docs/security.md): replace only a data directory, an empty one, or with force;
    # never one holding the corpus or tokenizer. The lock makes concurrent builds of it wait or fail.
    with claim_output(out_dir, "data build", inputs=inputs, force=force, owned=is_data_dir, wait=wait_lock):
        _remove_stale_temps(out_dir)
        if out_dir.exists() and not force:
            if (out_dir / mf.MANIFEST).is_file():
                try:
                    m = mf.read_manifest(out_dir)
                    if m.get("build_key") == build_key:
                        for split in mf.SPLITS:
                            mf.verify_split(out_dir, m, split)
                        log(f"{out_dir}: up to date (same inputs, shards verified); nothing to do")
                        return out_dir
                    log(f"{out_dir}: inputs changed; rebuilding")
                except SpectraError as e:
                    log(f"{out_dir}: existing build is not valid ({e}); rebuilding")
        t0 = time.perf_counter()
        with atomic_dir(out_dir) as tmp, _parallelism(num_workers):
            m = _build_into(tmp, src, tok_file, vocab_size, val_fraction, seed, shard_tokens, dtype, mp, eos_token,
                            max_tokens, bpe_max_bytes, progress, log, num_workers)
            if part is not None:
                m["partition"] = {**part, "full_build_key": full_key}
            m["build_key"] = build_key
            atomic_write_json(tmp / mf.MANIFEST, m)
            # the content hashes were just computed: stamp them (before the swap; a rename keeps
            # inode and mtime) so the next open can skip re-hashing
            mf.write_stamps(tmp, {s["file"]: s["blake2b"] for sp in mf.SPLITS for s in m["splits"][sp]["shards"]})
    tr, va = m["splits"]["train"], m["splits"]["validation"]
    log(f"{out_dir}: {tr['documents'] + va['documents']} documents, train {tr['tokens']:,} tokens, "
        f"validation {va['tokens']:,} tokens, {m['dtype']}, in {time.perf_counter() - t0:.1f}s")
    return out_dir


def _build_into(tmp: Path, src: Source, tok_file, vocab_size, val_fraction, seed, shard_tokens, dtype, mp,
                eos_token, max_tokens, bpe_max_bytes, progress, log, num_workers: int = 1) -> dict:
    from spectra.config import padded_vocab

    surrogates = [0]  # lone surrogates replaced (counted once, by whichever pass reads the source last)
    if tok_file is None:
        log(f"training a byte-level BPE tokenizer (vocab {vocab_size}) on the train split")
        t = time.perf_counter()
        train_docs = _TrainDocs(src, seed, val_fraction, bpe_max_bytes, surrogates)
        tok = train_bpe(train_docs, vocab_size)
        cached = train_docs.documents()
        if src.stats.documents == 0:
            raise SpectraError(_empty_msg(src))
        (tmp / TOKENIZER_FILE).write_text(tok.to_str(), encoding="utf-8")
        log(f"  BPE trained in {time.perf_counter() - t:.1f}s: {tok.get_vocab_size()} entries")
        origin = {"trained": True, "kind": "byte-level BPE", "requested_vocab": vocab_size,
                  "trained_on": "train split", "max_bytes": bpe_max_bytes}
    else:
        shutil.copyfile(tok_file, tmp / TOKENIZER_FILE)
        tok = load_tokenizer(tmp / TOKENIZER_FILE)
        origin = {"trained": False, "path": str(Path(tok_file).resolve())}
        cached = None
    eos_id, eos_name = find_eos(tok, eos_token)
    hijack = word_like_special_tokens(tok)
    if hijack:
        log(f"  warning: special tokens {hijack} look like ordinary words and will be matched inside text "
            f"(e.g. 'assistants' -> 'assistant' + 's'); decode with skip_special_tokens=False")
    vocab = vocab_size_of(tok)
    if dtype == "auto":
        dtype = "uint16" if vocab <= 1 << 16 else "uint32"
    limit = np.iinfo(dtype).max
    if vocab - 1 > limit:
        raise SpectraError(f"tokenizer {tok_file or 'trained BPE'} has ids up to {vocab - 1}, which do not fit "
                           f"{dtype} (max {limit}); use dtype uint32 / --dtype auto")

    writers = {s: ShardWriter(tmp, s, dtype, shard_tokens) for s in mf.SPLITS}
    docs_n = {s: 0 for s in mf.SPLITS}
    bytes_n = {s: 0 for s in mf.SPLITS}
    q: queue.Queue = queue.Queue(maxsize=4)
    stop = threading.Event()
    if cached is None:
        surrogates[0] = 0
    # the reader thread iterates the source (or the documents the BPE pass kept; src.stats then
    # already hold the counts of that complete pass)
    th = threading.Thread(target=_reader, args=(src if cached is None else cached, seed, val_fraction, q, stop, surrogates), daemon=True)
    from tqdm import tqdm

    bar = tqdm(desc="tokenize", unit="doc", disable=not progress, mininterval=0.5, dynamic_ncols=True)
    totals = {"tokens": 0, "bytes": 0}
    t0 = time.perf_counter()

    def consume(fut, flags, sizes) -> bool:
        """Write one encoded batch; True when max_tokens is reached."""
        lens, train_ids, val_ids, top = fut.result()
        if top > limit:
            raise SpectraError(f"token id {top} does not fit {dtype} (max {limit}); "
                               f"tokenizer {tok_file or 'trained BPE'} needs --dtype uint32")
        done = False
        if max_tokens is not None and totals["tokens"] + int(lens.sum()) >= max_tokens:
            keep = int(np.searchsorted(np.cumsum(lens), max_tokens - totals["tokens"], side="left")) + 1
            fl = np.asarray(flags[:keep], bool)
            train_ids, val_ids = train_ids[:int(lens[:keep][~fl].sum())], val_ids[:int(lens[:keep][fl].sum())]
            flags, lens, sizes, done = flags[:keep], lens[:keep], sizes[:keep], True
        for split, want, ids in (("train", False, train_ids), ("validation", True, val_ids)):
            n = sum(1 for f in flags if f == want)
            if not n:
                continue
            writers[split].write(ids)
            docs_n[split] += n
            bytes_n[split] += sum(b for b, f in zip(sizes, flags) if f == want)
        totals["tokens"] += int(lens.sum())
        totals["bytes"] += sum(sizes)
        bar.update(len(lens))
        dt = max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix_str(f"{totals['bytes'] / dt / 1e6:.1f} MB/s, {totals['tokens'] / 1e6:.2f}M tokens",
                            refresh=False)
        return done

    # Three stages overlap: reader thread -> encoders (the next batches) -> this thread writes in order.
    truncated = False
    enc = _Encoders(num_workers, tok, tmp / TOKENIZER_FILE, eos_id, dtype, log)
    th.start()
    try:
        pending: deque = deque()
        while not truncated:
            item = q.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            docs, flags, sizes = item
            pending.append((enc.submit(docs, flags), flags, sizes))
            while len(pending) > enc.depth:
                if consume(*pending.popleft()):
                    truncated = True
                    break
        while pending and not truncated:
            truncated = consume(*pending.popleft())
    finally:
        stop.set()
        enc.close()
        bar.close()
        th.join(timeout=5)
    if docs_n["train"] + docs_n["validation"] == 0:
        raise SpectraError(_empty_msg(src))
    if docs_n["train"] == 0:
        raise SpectraError(f"all {docs_n['validation']} documents landed in the validation split "
                           f"(val_fraction={val_fraction}); lower val_fraction or add documents")
    stats = src.stats.to_dict()
    stats["replaced_chars"] += surrogates[0]
    if stats["bad_records"]:
        log(f"  skipped {stats['bad_records']} bad records; first: {stats['offenders'][:3]}")
    if stats["replaced_chars"]:
        log(f"  replaced {stats['replaced_chars']} undecodable bytes/characters with U+FFFD")
    if val_fraction > 0 and docs_n["validation"] == 0:
        log(f"  warning: no document landed in the validation split (val_fraction={val_fraction}, "
            f"{docs_n['train']} documents)")
    man = {
        "format": mf.FORMAT,
        "version": mf.VERSION,
        "source": src.describe(),
        "read": stats,
        "tokenizer": {"file": TOKENIZER_FILE, "sha256": file_hash(tmp / TOKENIZER_FILE), "vocab_size": vocab,
                      "word_like_special_tokens": hijack,
                      "padded_vocab": padded_vocab(vocab, mp), "mp": mp, "eos_id": eos_id, "eos_token": eos_name,
                      **origin},
        "dtype": dtype,
        "document_separator": "eos after every document",
        "split": {"method": "blake2b(document utf-8, key=seed) / 2^64 < val_fraction", "seed": seed,
                  "val_fraction": val_fraction},
        "limits": {"max_docs": src.max_docs, "max_tokens": max_tokens, "truncated": truncated},
        "shard_tokens": shard_tokens,
        "splits": {s: {"documents": docs_n[s], "tokens": writers[s].tokens, "bytes": bytes_n[s],
                       "shards": writers[s].close()} for s in mf.SPLITS},
    }
    man["fingerprint"] = mf.content_fingerprint(man)
    return man


def _remove_stale_temps(out_dir: Path) -> None:
    """Leftovers of a killed build (atomic_dir's '.NAME.*.tmp'); safe under the lock, and never
    trusted anyway: only a complete directory with a manifest is ever read. A previous build
    parked as '.NAME.old' by an interrupted fallback swap is restored first, never deleted."""
    recover(out_dir)
    for p in out_dir.parent.glob(f".{out_dir.name}.*"):
        if p.is_dir() and p.name.endswith(".tmp"):
            shutil.rmtree(p, ignore_errors=True)


def _empty_msg(src: Source) -> str:
    st = src.stats
    desc = src.describe()["description"]
    return (f"empty corpus: {desc} yielded no documents ({st.empty_documents} blank, {st.bad_records} bad records"
            + (f", {len(st.skipped_files)} files of unknown type skipped" if st.skipped_files else "") + ")")
