"""The embedded demo corpus: English prose that every CPython installation ships.

Documents, in this fixed order:

1. every ``pydoc_data.topics`` entry (the language reference sections that
   ``help('if')`` shows), sorted by topic name;
2. one document per standard-library module (``.py`` files under the stdlib
   directory, sorted by relative path, skipping ``test``/``tests``/``idle_test``
   and ``site-packages``): its module, class and function docstrings in source
   order, each of at least 40 characters, separated by blank lines.

Sources are parsed with :mod:`ast` (never imported), so building is side-effect free.
The result is about 2 MB / 0.5M GPT-NeoX tokens on Python 3.11 -- a demo corpus for
the tiny presets, not a pretraining corpus. It is deterministic for a given CPython
build: the same version from the same distribution yields identical documents; the
manifest records the version and a hash of the file listing so a difference shows.
"""

from __future__ import annotations

import ast
import hashlib
import os
import platform
import sysconfig
from pathlib import Path
from typing import Iterator

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
MIN_DOCSTRING = 40


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _module_files() -> list[Path]:
    root = _stdlib_root()
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in _SKIP_DIRS and not x.startswith("."))
        out += [Path(d) / f for f in sorted(files) if f.endswith(".py")]
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def _docstrings(src: bytes) -> list[str]:
    try:
        tree = ast.parse(src)
    except (SyntaxError, ValueError):  # a few stdlib files are templates / other grammars
        return []
    nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    nodes.sort(key=lambda n: getattr(n, "lineno", 0))  # source order (ast.walk is breadth-first)
    out = []
    for n in nodes:
        ds = ast.get_docstring(n)
        if ds and len(ds) >= MIN_DOCSTRING:
            out.append(ds.strip())
    return out


def default_corpus() -> Iterator[str]:
    """Yield the demo corpus documents (str), deterministically."""
    from pydoc_data import topics

    for name in sorted(topics.topics):
        text = topics.topics[name].strip()
        if text:
            yield text
    root = _stdlib_root()
    for path in _module_files():
        docs = _docstrings(path.read_bytes())
        if docs:
            mod = path.relative_to(root).with_suffix("").as_posix().replace("/", ".")
            yield f"Module {mod}\n\n" + "\n\n".join(docs)


def default_corpus_identity() -> dict:
    """What the corpus depends on: Python version and a hash of the stdlib file listing (cheap)."""
    root = _stdlib_root()
    h = hashlib.blake2b(digest_size=16)
    files = _module_files()
    for p in files:
        h.update(f"{p.relative_to(root).as_posix()}\0{p.stat().st_size}\n".encode())
    return {
        "kind": "default",
        "description": f"embedded demo corpus: pydoc_data topics + stdlib docstrings of "
                       f"{platform.python_implementation()} {platform.python_version()}",
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "stdlib_files": len(files),
        "stdlib_listing_hash": h.hexdigest(),
    }
