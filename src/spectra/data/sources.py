"""Corpus sources: local files / directories, Hugging Face datasets, the embedded demo corpus.

``open_source(spec, ...)`` returns a :class:`Source`: iterating it yields document
strings in a fixed order; ``.identity()`` is a cheap description of what the
documents depend on (used to make re-runs no-ops) and ``.stats`` counts what was
skipped or repaired while reading.

Local formats (compression by suffix: ``.gz``, ``.zst``/``.zstd``):
``.txt`` (documents = paragraphs separated by blank lines, whole files, or lines),
``.jsonl``/``.ndjson``/``.json`` (one JSON object per line, text in ``text_field``),
``.parquet`` (column ``text_field``). A directory is walked recursively in sorted
order; hidden files and unknown suffixes are skipped (and listed).
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from spectra.errors import SpectraError

TXT_SUFFIXES = (".txt", ".text", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet",)
COMPRESSION = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
TXT_UNITS = ("paragraph", "file", "line")
MAX_OFFENDERS = 10  # how many bad records are listed by name (all are counted)


@dataclass
class SourceStats:
    documents: int = 0
    empty_documents: int = 0  # blank text: skipped silently, counted
    bad_records: int = 0  # jsonl lines that are not JSON objects / lack the text field
    replaced_chars: int = 0  # undecodable bytes replaced by U+FFFD
    files: int = 0
    skipped_files: list = field(default_factory=list)
    offenders: list = field(default_factory=list)  # "file:line: reason" for the first bad records

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


# Undecodable bytes are replaced by U+FFFD and counted (a per-source counter, set while reading).
_replaced = [0]


def _count_replace(err: UnicodeDecodeError):
    _replaced[0] += err.end - err.start
    return "\ufffd", err.end


codecs.register_error("spectra_count_replace", _count_replace)


def _decode(b: bytes) -> str:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return b.decode("utf-8", errors="spectra_count_replace")


def _kind_of(path: Path) -> tuple[str | None, str | None]:
    """(format, compression) from the file name; format None when unknown."""
    name = path.name.lower()
    comp = None
    for suf, c in COMPRESSION.items():
        if name.endswith(suf):
            comp, name = c, name[: -len(suf)]
            break
    for kind, sufs in (("txt", TXT_SUFFIXES), ("jsonl", JSONL_SUFFIXES), ("parquet", PARQUET_SUFFIXES)):
        if name.endswith(sufs):
            if kind == "parquet" and comp:
                return None, comp  # parquet compresses internally
            return kind, comp
    return None, comp


def _open_binary(path: Path, comp: str | None):
    if comp == "gzip":
        return gzip.open(path, "rb")
    if comp == "zstd":
        try:
            import zstandard
        except ImportError:
            raise SpectraError(f"{path}: reading .zst needs the 'zstandard' package (pip install spectra-lm[data])") from None
        fh = open(path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(fh, closefd=True))
    return open(path, "rb")


class Source:
    """Base: subclasses implement ``_docs()`` and ``identity()``."""

    def __init__(self, on_bad: str = "fail", max_docs: int | None = None):
        if on_bad not in ("fail", "skip"):
            raise SpectraError(f"on_bad must be 'fail' or 'skip', got {on_bad!r}")
        self.on_bad = on_bad
        self.max_docs = max_docs
        self.stats = SourceStats()

    def identity(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def _docs(self) -> Iterator[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def bad(self, where: str, reason: str) -> None:
        self.stats.bad_records += 1
        if len(self.stats.offenders) < MAX_OFFENDERS:
            self.stats.offenders.append(f"{where}: {reason}")
        if self.on_bad == "fail":
            raise SpectraError(f"{where}: {reason} (pass --skip-bad-records / on_bad='skip' to skip and count such records)")

    def __iter__(self) -> Iterator[str]:
        self.stats = SourceStats()
        _replaced[0] = 0
        n = 0
        for doc in self._docs():
            self.stats.replaced_chars = _replaced[0]
            if not doc or doc.isspace():
                self.stats.empty_documents += 1
                continue
            if self.max_docs is not None and n >= self.max_docs:
                break
            n += 1
            self.stats.documents = n
            yield doc
        self.stats.replaced_chars = _replaced[0]


class FileSource(Source):
    def __init__(self, path, text_field="text", txt_unit="paragraph", **kw):
        super().__init__(**kw)
        self.root = Path(path)
        if not self.root.exists():
            raise SpectraError(f"source path does not exist: {self.root}")
        if txt_unit not in TXT_UNITS:
            raise SpectraError(f"txt_unit must be one of {TXT_UNITS}, got {txt_unit!r}")
        self.text_field, self.txt_unit = text_field, txt_unit
        self.files, skipped = self._list()
        self._skipped = skipped
        if not self.files:
            raise SpectraError(
                f"no corpus files under {self.root} (looked for {', '.join(TXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES)}"
                f", optionally .gz/.zst)"
            )

    def _list(self):
        if self.root.is_file():
            kind, _ = _kind_of(self.root)
            if kind is None:
                raise SpectraError(
                    f"{self.root}: unknown corpus file type; use .txt, .jsonl, .json, .ndjson (optionally .gz/.zst) or .parquet"
                )
            return [self.root], []
        files, skipped = [], []
        for d, dirs, names in os.walk(self.root):
            dirs[:] = sorted(x for x in dirs if not x.startswith("."))
            for n in sorted(names):
                p = Path(d) / n
                if n.startswith("."):
                    continue
                (files if _kind_of(p)[0] else skipped).append(p)
        key = lambda p: p.relative_to(self.root).as_posix()  # noqa: E731
        return sorted(files, key=key), sorted(key(p) for p in skipped)

    def _rel(self, p: Path) -> str:
        return p.name if self.root.is_file() else p.relative_to(self.root).as_posix()

    def identity(self) -> dict:
        files = []
        for p in self.files:
            st = p.stat()
            files.append([self._rel(p), st.st_size, st.st_mtime_ns])
        return {"kind": "files", "path": str(self.root.resolve()), "text_field": self.text_field,
                "txt_unit": self.txt_unit, "files": files}

    def describe(self) -> dict:
        return {"kind": "files", "description": f"local files: {self.root.resolve()} ({len(self.files)} files)",
                "path": str(self.root.resolve()), "files": [self._rel(p) for p in self.files],
                "text_field": self.text_field, "txt_unit": self.txt_unit}

    def _docs(self) -> Iterator[str]:
        self.stats.skipped_files = list(self._skipped)
        for p in self.files:
            self.stats.files += 1
            kind, comp = _kind_of(p)
            try:
                if kind == "txt":
                    yield from self._txt(p, comp)
                elif kind == "jsonl":
                    yield from self._jsonl(p, comp)
                else:
                    yield from self._parquet(p)
            except (OSError, EOFError) as e:  # truncated gzip, unreadable file, bad zstd frame
                raise SpectraError(f"{p}: cannot read: {e}") from None

    def _txt(self, p: Path, comp) -> Iterator[str]:
        with _open_binary(p, comp) as f:
            if self.txt_unit == "file":
                yield _decode(f.read())
                return
            para: list[str] = []
            for raw in f:
                line = _decode(raw)
                if self.txt_unit == "line":
                    yield line.rstrip("\r\n")
                elif line.strip():
                    para.append(line)
                elif para:
                    yield "".join(para).rstrip("\r\n")
                    para = []
            if para:
                yield "".join(para).rstrip("\r\n")

    def _jsonl(self, p: Path, comp) -> Iterator[str]:
        field_ = self.text_field
        with _open_binary(p, comp) as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(_decode(raw))
                except json.JSONDecodeError as e:
                    self.bad(f"{p}:{lineno}", f"not valid JSON ({e.msg} at column {e.colno})")
                    continue
                if not isinstance(obj, dict):
                    self.bad(f"{p}:{lineno}", f"expected a JSON object, got {type(obj).__name__}")
                    continue
                text = obj.get(field_)
                if not isinstance(text, str):
                    why = "has no" if field_ not in obj else f"has a non-string ({type(text).__name__})"
                    keys = ", ".join(list(obj)[:8])
                    self.bad(f"{p}:{lineno}", f"{why} text field {field_!r} (keys: {keys}; set --text-field)")
                    continue
                yield text

    def _parquet(self, p: Path) -> Iterator[str]:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise SpectraError(f"{p}: reading parquet needs 'pyarrow' (pip install spectra-lm[data])") from None
        try:
            pf = pq.ParquetFile(p)
        except Exception as e:  # pyarrow.ArrowInvalid for non-parquet bytes
            raise SpectraError(f"{p}: not a readable parquet file: {e}") from None
        names = pf.schema_arrow.names
        if self.text_field not in names:
            raise SpectraError(f"{p}: no column {self.text_field!r} (columns: {', '.join(names)}); set --text-field")
        row = 0
        for batch in pf.iter_batches(columns=[self.text_field], batch_size=4096):
            for text in batch.column(0).to_pylist():
                row += 1
                if not isinstance(text, str):
                    self.bad(f"{p}:row {row}", f"text field {self.text_field!r} is {type(text).__name__}, not a string")
                    continue
                yield text


class HFSource(Source):
    """``hf:NAME[:CONFIG]`` through ``datasets.load_dataset(..., streaming=True)``."""

    def __init__(self, name, config=None, split="train", text_field="text", data_files=None, revision=None, **kw):
        super().__init__(**kw)
        self.name, self.config, self.split, self.text_field = name, config, split, text_field
        self.data_files = [str(Path(f).resolve()) if Path(f).exists() else f for f in (
            [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files or []))]
        self.revision = revision

    def identity(self) -> dict:
        local = []
        for f in self.data_files:
            p = Path(f)
            if p.exists():
                st = p.stat()
                local.append([f, st.st_size, st.st_mtime_ns])
            else:
                local.append([f])
        return {"kind": "hf", "name": self.name, "config": self.config, "split": self.split,
                "revision": self.revision, "text_field": self.text_field, "data_files": local,
                "max_docs": self.max_docs}

    def describe(self) -> dict:
        d = f"Hugging Face dataset {self.name}" + (f" ({self.config})" if self.config else "") + f", split {self.split}, streaming"
        return {"kind": "hf", "description": d, "name": self.name, "config": self.config, "split": self.split,
                "revision": self.revision, "text_field": self.text_field, "data_files": self.data_files}

    def _docs(self) -> Iterator[str]:
        try:
            import datasets
        except ImportError:
            raise SpectraError("hf: sources need the 'datasets' package (pip install spectra-lm[data])") from None
        kw = {"streaming": True, "split": self.split}
        if self.data_files:
            kw["data_files"] = self.data_files
        if self.revision:
            kw["revision"] = self.revision
        try:
            ds = datasets.load_dataset(self.name, self.config, **kw)
        except Exception as e:  # network / not found / bad config: one line naming the dataset
            raise SpectraError(f"cannot open Hugging Face dataset {self.name!r} (config {self.config!r}, split "
                               f"{self.split!r}): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        for i, row in enumerate(ds):
            text = row.get(self.text_field) if isinstance(row, dict) else None
            if not isinstance(text, str):
                keys = ", ".join(list(row)[:8]) if isinstance(row, dict) else ""
                self.bad(f"{self.name}[{self.split}] row {i}", f"no string text field {self.text_field!r} (keys: {keys})")
                continue
            yield text


class DefaultSource(Source):
    def identity(self) -> dict:
        from spectra.data.corpus import default_corpus_identity

        return {**default_corpus_identity(), "max_docs": self.max_docs}

    def describe(self) -> dict:
        from spectra.data.corpus import default_corpus_identity

        return default_corpus_identity()

    def _docs(self) -> Iterator[str]:
        from spectra.data.corpus import default_corpus

        yield from default_corpus()


def open_source(source, text_field: str = "text", txt_unit: str = "paragraph", on_bad: str = "fail",
                max_docs: int | None = None, hf_split: str = "train", hf_data_files=None,
                hf_revision: str | None = None) -> Source:
    """Parse a source spec: a path, ``"hf:NAME[:CONFIG]"`` or ``"default"``."""
    kw = {"on_bad": on_bad, "max_docs": max_docs}
    if isinstance(source, Source):
        return source
    s = str(source)
    if s == "default":
        return DefaultSource(**kw)
    if s.startswith("hf:"):
        parts = s[3:].split(":", 1)
        if not parts[0]:
            raise SpectraError(f"bad source {s!r}: use hf:NAME or hf:NAME:CONFIG (e.g. hf:DKYoon/SlimPajama-6B)")
        return HFSource(parts[0], parts[1] if len(parts) > 1 and parts[1] else None, split=hf_split,
                        text_field=text_field, data_files=hf_data_files, revision=hf_revision, **kw)
    return FileSource(s, text_field=text_field, txt_unit=txt_unit, **kw)
