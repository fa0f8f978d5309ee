"""Crash-safe file and directory writes, the ``--out`` policy and output locks.

A failed or interrupted write must leave the previous file intact: everything is
written to a temporary sibling, fsynced, then renamed over the target (atomic on
POSIX). Directories are assembled under a temporary name and swapped into place with
``renameat2(RENAME_EXCHANGE)`` (one atomic step; the old tree is deleted last). Every
rename goes through :func:`_rename` / :func:`exchange`, where a test hook can kill the
process. The policy for what ``--out`` may replace (:func:`check_output`) and the lock an
output is written under (:func:`output_lock`, both via :func:`claim_output`) are here too.
docs/security.md explains all of it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

# Test hook: SPECTRA_TEST_KILL_AT_RENAME=N makes the process os._exit(137) right before its
# Nth rename/exchange, like a SIGKILL there (tests/test_security_files.py sweeps N).
KILL_ENV = "SPECTRA_TEST_KILL_AT_RENAME"
# SPECTRA_NO_RENAME_EXCHANGE=1 forces the two-rename fallback (to test it on Linux).
NO_EXCHANGE_ENV = "SPECTRA_NO_RENAME_EXCHANGE"
_renames = 0


def _before_rename() -> None:
    global _renames
    n = os.environ.get(KILL_ENV)
    if n:
        _renames += 1
        if _renames == int(n):
            os._exit(137)


def _rename(src, dst) -> None:
    _before_rename()
    os.replace(src, dst)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_renameat2 = None


def _libc_renameat2():
    global _renameat2
    if _renameat2 is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _renameat2 = fn
        except (AttributeError, OSError):  # musl, macOS, old glibc
            _renameat2 = False
    return _renameat2


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two existing paths atomically (Linux renameat2 RENAME_EXCHANGE).

    False when this system or file system cannot (then nothing was changed); other
    failures raise OSError.
    """
    fn = _libc_renameat2()
    if not fn or os.environ.get(NO_EXCHANGE_ENV):
        return False
    _before_rename()
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    e = ctypes.get_errno()
    if e in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(e, f"renameat2(RENAME_EXCHANGE) {a} <-> {b}: {os.strerror(e)}")


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def fsync_dir(path: str | os.PathLike) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _rename(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj, indent: int = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(dirpath)


def old_name(path: Path) -> Path:
    """Where the two-rename fallback parks the previous tree during a swap."""
    return path.parent / f".{path.name}.old"


def recover(path: str | os.PathLike) -> None:
    """Undo a swap interrupted in the fallback's window: previous tree parked, new one not in.

    Restores ``.NAME.old`` to ``NAME`` when ``NAME`` is missing; removes it when ``NAME``
    is there (the swap finished). Never deletes the only copy of a result.
    """
    path = Path(path)
    old = old_name(path)
    if not old.is_dir():
        return
    if os.path.lexists(path):
        shutil.rmtree(old, ignore_errors=True)
    else:
        _rename(old, path)
        fsync_dir(path.parent)


def swap_dir(new: Path, path: Path) -> None:
    """Put the complete directory ``new`` at ``path``, replacing what is there in one atomic step.

    With RENAME_EXCHANGE the old tree ends up at ``new``'s name and is deleted last. Without
    it (non-Linux or a file system that cannot), the fallback is two renames: old ->
    ``.NAME.old``, new -> NAME; a kill between them leaves the old tree complete at
    ``.NAME.old``, which :func:`recover` (called by the next write of that output) restores.
    """
    path, new = Path(path), Path(new)
    if os.path.lexists(path) and (path.is_symlink() or not path.is_dir()):
        from spectra.errors import SpectraError

        raise SpectraError(f"'{path}' exists and is not a directory; refusing to replace it with one")
    if not os.path.lexists(path):
        _rename(new, path)
    elif exchange(new, path):
        fsync_dir(path.parent)
        shutil.rmtree(new, ignore_errors=True)  # the previous result, now under the temporary name
    else:
        old = old_name(path)
        if old.exists():
            shutil.rmtree(old)
        _rename(path, old)
        _rename(new, path)
        fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a temporary name; on success fsync it and swap it into place.

    The swap is :func:`swap_dir` (atomic exchange), so a crash at any point leaves either
    the old or the new directory complete. When ``path`` was claimed with
    ``claim_output`` in this process, the output marker goes in before the swap.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        yield tmp
        marker_for(path, tmp)
        fsync_tree(tmp)
        swap_dir(tmp, path)
    finally:
        if tmp.exists():  # a failed build, or the previous result after an exchange
            shutil.rmtree(tmp, ignore_errors=True)


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """safetensors.torch.save_file, atomically (contiguous CPU copies)."""
    from safetensors.torch import save_file

    t = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(t, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors (re)creates the file 0600


# -- the --out policy and output locks ----------------------------------------------------

MARKER = ".spectra-output.json"  # {"command": ...}: which spectra command wrote this directory
_claimed: dict[str, str] = {}  # realpath -> command, for outputs claimed in this process


def _real(p) -> Path:
    return Path(os.path.realpath(os.fspath(p)))


def _inside(a: Path, b: Path) -> bool:
    """a is b or below it (both resolved)."""
    return a == b or b in a.parents


def read_marker(path: str | os.PathLike) -> str | None:
    """The command recorded in ``path/.spectra-output.json`` (None when absent or unreadable)."""
    try:
        d = json.loads((Path(path) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return d.get("command") if isinstance(d, dict) and isinstance(d.get("command"), str) else None


def write_marker(directory: str | os.PathLike, command: str) -> None:
    atomic_write_json(Path(directory) / MARKER, {"command": command})


def marker_for(path: Path, directory: Path) -> None:
    """Write the marker into ``directory`` (about to become ``path``) when ``path`` was claimed."""
    cmd = _claimed.get(str(_real(path)))
    if cmd is not None:
        write_marker(directory, cmd)


def _owned(owned, out: Path) -> bool:
    try:
        return bool(owned and owned(out))
    except OSError:  # unreadable: not known to be ours
        return False


def check_output(out, command: str, *, inputs=(), force: bool = False, file: bool = False,
                 owned=None, inside_input_ok: bool = False, can_force: bool = True) -> Path:
    """The ``--out`` policy, one place for every command (docs/security.md).

    Refuses: ``out`` that is or contains an input, or lies inside an input directory (even
    with ``force``; ``inside_input_ok`` relaxes only the last, for reports written next to
    their runs); an existing file where a directory is written, or a directory where a file
    is; a symbolic link; a non-empty directory (or existing file) that this ``command`` did
    not write, unless ``force``. "Wrote" means the marker says so, or ``owned(path)`` (the
    command's own check, for outputs written before markers existed) is true.
    Returns ``out`` as a Path; raises SpectraError naming the path and the fix (``can_force``:
    the command has a --force flag to offer).
    """
    from spectra.errors import SpectraError

    out = Path(out)
    flag = f"spectra {command}"
    fix = "choose another --out, or pass --force" if can_force else "choose another --out"
    real = _real(out)
    for i in inputs:
        if i is None:
            continue
        ri = _real(i)
        if real == ri:
            raise SpectraError(f"--out '{out}' is the input '{i}' itself; choose another --out")
        if not file and _inside(ri, real):
            raise SpectraError(f"--out '{out}' contains the input '{i}'; writing it would replace the input; "
                               "choose another --out")
        if not inside_input_ok and Path(ri).is_dir() and _inside(real, ri):
            raise SpectraError(f"--out '{out}' is inside the input directory '{i}'; choose a path outside it")
    if out.is_symlink():
        raise SpectraError(f"--out '{out}' is a symbolic link; give the real path (a swap would replace the link)")
    if file:
        if out.is_dir():
            raise SpectraError(f"--out '{out}' is a directory; {flag} writes a file: give a file path")
        if out.exists() and not force and not _owned(owned, out):
            raise SpectraError(f"--out '{out}' is an existing file that {flag} did not write; "
                               f"refusing to replace it ({fix})")
    elif out.exists():
        if not out.is_dir():
            raise SpectraError(f"--out '{out}' is an existing file; {flag} writes a directory: "
                               "choose another --out (a file is never replaced by a directory)")
        ours = read_marker(out) == command or _owned(owned, out)
        if not ours and not force and any(p.name != MARKER for p in out.iterdir()):
            raise SpectraError(f"--out '{out}' is a non-empty directory that {flag} did not write; "
                               f"refusing to replace it ({fix})")
    anc = real.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not os.access(anc, os.W_OK | os.X_OK):
        raise SpectraError(f"--out '{out}': cannot write in '{anc}' (permission denied); choose a writable place")
    return out


def _holder(lock: Path) -> str:
    try:
        h = json.loads(lock.read_text(encoding="utf-8"))
        return f"pid {h.get('pid')}, `{h.get('command')}`, started {h.get('started')}"
    except (OSError, ValueError, AttributeError):
        return "holder unknown"


@contextlib.contextmanager
def output_lock(path: str | os.PathLike, command: str, wait: bool = False) -> Iterator[Path]:
    """Exclusive flock on ``.NAME.lock`` next to ``path`` while a command writes ``path``.

    A second process gets a SpectraError naming the holder (pid, command, start time),
    or waits with ``wait=True``. The lock file records the holder and is removed on release.
    """
    import fcntl
    import time

    from spectra.errors import SpectraError

    path = Path(path)
    lock = path.parent / f".{path.name}.lock"
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise SpectraError(f"--out '{path}': cannot create '{lock}' ({e.strerror or e}); "
                               "choose a writable place") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            raise SpectraError(f"'{path}' is being written by another process ({_holder(lock)}); "
                               "wait for it to finish or choose another --out") from None
        try:  # the previous holder may have removed the file between our open and flock: retry
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        info = {"pid": os.getpid(), "command": command,
                "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        yield lock
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)  # while still holding it, so no one can lock the old inode after us
        os.close(fd)


@contextlib.contextmanager
def claim_output(out, command: str, *, inputs=(), force: bool = False, file: bool = False, owned=None,
                 inside_input_ok: bool = False, mark: bool = True, wait: bool = False) -> Iterator[Path]:
    """Lock ``out``, apply :func:`check_output`, and mark what this command writes there.

    With ``mark`` a directory output gets the marker: inside the new tree before the swap
    when written with :func:`atomic_dir`. Commands that write into a directory in place
    (quantize, report) call :func:`write_marker` themselves once it exists.
    """
    out = Path(out)
    with output_lock(out, f"spectra {command}", wait=wait):
        check_output(out, command, inputs=inputs, force=force, file=file, owned=owned,
                     inside_input_ok=inside_input_ok)
        key = str(_real(out))
        if mark and not file:
            _claimed[key] = command
        try:
            yield out
        finally:
            _claimed.pop(key, None)
