"""Findings 3 and 5 of issue 15: `--out` never destroys, and every swap is atomic.

The policy (spectra.fsutil.check_output, docs/security.md): refuse an existing file, a
directory holding the input or inside it, and (without --force) a non-empty directory
the same command did not write. The swap is renameat2(RENAME_EXCHANGE); a kill injected
before every rename of pack, data build, import and export (the SPECTRA_TEST_KILL_AT_RENAME
hook) must leave the complete old output or the complete new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from spectra.cli import main
from spectra.config import ModelConfig
from spectra.errors import SpectraError
from spectra.fsutil import MARKER, atomic_dir, check_output, exchange, recover, swap_dir

from helpers.release_dirs import write_release_dir

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _cfg() -> ModelConfig:
    return ModelConfig(dim=128, n_layers=1, n_heads=2, ffn_dim=256, vocab_size=256, mp=1, max_seq_len=32).validate()


def _tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "alpha": 1, "beta": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    """A small HF TriLM directory with a tokenizer (input of pack, import and export)."""
    d = write_release_dir(tmp_path_factory.mktemp("rel") / "hf", _cfg(), seed=3)
    _tokenizer(d / "tokenizer.json")
    return d


def _tree(p: Path) -> dict[str, str] | None:
    """Every file under ``p`` (relative path -> sha256), None when ``p`` is missing."""
    if not p.is_dir():
        return None
    return {str(f.relative_to(p)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(p.rglob("*")) if f.is_file()}


def _corpus(path: Path, n: int = 80) -> Path:
    rng = random.Random(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    words = ["alpha", "beta", "gamma", "delta", "ternary", "weights", "pack", "shard"]
    path.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(40)) for _ in range(n)))
    return path


# -- the policy ------------------------------------------------------------------------

def test_pack_into_the_run_holding_the_checkpoint_is_refused(release, tmp_path, capsys):
    run = tmp_path / "run"
    ck = run / "checkpoints" / "step-0000020"
    shutil.copytree(release, ck)
    (run / "metrics.jsonl").write_text("{}\n")
    before = _tree(run)
    assert main(["pack", str(ck), "--out", str(run)]) == 2
    assert "contains the input" in capsys.readouterr().err
    assert main(["pack", str(ck), "--out", str(run), "--force"]) == 2  # --force never for the input's home
    assert main(["pack", str(ck), "--out", str(ck)]) == 2
    assert main(["pack", str(ck), "--out", str(ck / "packed")]) == 2  # inside the input
    assert "inside the input directory" in capsys.readouterr().err
    assert _tree(run) == before


def test_foreign_directory_needs_force_and_file_is_never_replaced(release, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    assert main(["pack", str(release), "--out", str(other)]) == 2
    assert "refusing to replace it (choose another --out, or pass --force)" in capsys.readouterr().err
    assert (other / "precious.txt").read_text() == "keep me"
    f = tmp_path / "afile"
    f.write_text("a file")
    for argv in (["pack", str(release)], ["import", str(release)], ["export", str(release), "--to", "hf"]):
        assert main(argv + ["--out", str(f), "--force"]) == 2
        err = capsys.readouterr().err
        assert "is an existing file" in err or "is not a directory" in err, err  # (pack checks writability first)
    assert f.read_text() == "a file" and not (tmp_path / ".afile.old").exists()
    assert main(["pack", str(release), "--out", str(other), "--force"]) == 0
    assert not (other / "precious.txt").exists() and (other / "packed.json").is_file()
    assert json.loads((other / MARKER).read_text()) == {"command": "pack"}


def test_own_output_and_empty_directory_are_replaced(release, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["pack", str(release), "--out", str(empty), "--format", "t1"]) == 0
    assert main(["pack", str(release), "--out", str(empty), "--format", "t2"]) == 0  # its own: no --force
    assert "format t2" in capsys.readouterr().out
    # another command's output is not "the same kind"
    assert main(["import", str(release), "--out", str(empty)]) == 2


def test_import_into_its_source_keeps_the_tokenizer(release, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(release, src)
    before = _tree(src)
    assert main(["import", str(src), "--out", str(src), "--force"]) == 2
    assert "is the input" in capsys.readouterr().err
    assert _tree(src) == before
    assert main(["import", str(src), "--out", str(tmp_path / "ck")]) == 0
    assert (tmp_path / "ck" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert (tmp_path / "ck" / "ternary_layout.json").is_file()


def test_data_build_policy(tmp_path, capsys):
    corpus = _corpus(tmp_path / "corpus" / "c.txt")
    base = ["data", "build", "--source", str(corpus), "--vocab-size", "300", "--no-progress"]
    assert main(base + ["--out", str(tmp_path / "corpus"), "--force"]) == 2  # holds the corpus
    assert "contains the input" in capsys.readouterr().err
    assert corpus.is_file()
    f = tmp_path / "f"
    f.write_text("x")
    assert main(base + ["--out", str(f), "--force"]) == 2 and f.read_text() == "x"


def test_check_output_unit(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "w").write_text("w")
    with pytest.raises(SpectraError, match="is the input"):
        check_output(inp, "pack", inputs=[inp], force=True)
    with pytest.raises(SpectraError, match="contains the input"):
        check_output(tmp_path, "pack", inputs=[inp], force=True)
    with pytest.raises(SpectraError, match="inside the input directory"):
        check_output(inp / "x", "pack", inputs=[inp], force=True)
    check_output(inp / "x", "report", inputs=[inp], inside_input_ok=True)
    link = tmp_path / "link"
    link.symlink_to(inp)
    with pytest.raises(SpectraError, match="symbolic link"):
        check_output(link, "pack", force=True)
    # file outputs: a directory is refused, a foreign file needs force, an owned one is replaced
    with pytest.raises(SpectraError, match="is a directory"):
        check_output(inp, "export", file=True, force=True)
    g = tmp_path / "m.gguf"
    g.write_bytes(b"NOPE")
    with pytest.raises(SpectraError, match="existing file that spectra export did not write"):
        check_output(g, "export", file=True, owned=lambda p: p.read_bytes()[:4] == b"GGUF")
    g.write_bytes(b"GGUF....")
    check_output(g, "export", file=True, owned=lambda p: p.read_bytes()[:4] == b"GGUF")
    with pytest.raises(SpectraError, match=r"refusing to replace it \(choose another --out\)$"):
        check_output(inp, "train", can_force=False)


# -- atomic swap -----------------------------------------------------------------------

def test_exchange_swaps_and_fallback_recovers(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "A").write_text("a")
    (b / "B").write_text("b")
    if not exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) unsupported here")
    assert (a / "B").exists() and (b / "A").exists()
    # a swap into place: the old tree is gone only after the new one is in
    out = tmp_path / "out"
    with atomic_dir(out) as t:
        (t / "v").write_text("1")
    with atomic_dir(out) as t:
        (t / "v").write_text("2")
    assert (out / "v").read_text() == "2" and [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    # fallback: interrupted between its two renames -> recover() restores the old tree
    monkeypatch.setenv("SPECTRA_NO_RENAME_EXCHANGE", "1")
    new = tmp_path / "new"
    new.mkdir()
    (new / "v").write_text("3")
    os.replace(out, tmp_path / ".out.old")  # the state a kill after the first rename leaves
    recover(out)
    assert (out / "v").read_text() == "2" and not (tmp_path / ".out.old").exists()
    swap_dir(new, out)
    assert (out / "v").read_text() == "3" and not (tmp_path / ".out.old").exists()


def test_atomic_dir_never_replaces_a_file_or_link(tmp_path):
    f = tmp_path / "f"
    f.write_text("keep")
    (tmp_path / "d").mkdir()
    (tmp_path / "l").symlink_to(tmp_path / "d")
    for p in (f, tmp_path / "l"):
        with pytest.raises(SpectraError, match="not a directory"):
            with atomic_dir(p) as t:
                (t / "x").write_text("new")
    assert f.read_text() == "keep" and (tmp_path / "l").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f", "l"]


def test_failed_build_never_deletes_the_previous_result(tmp_path):
    out = tmp_path / "o"
    with atomic_dir(out) as t:
        (t / "v").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as t:
            (t / "v").write_text("half")
            raise RuntimeError("boom")
    assert (out / "v").read_text() == "old"
    assert [p for p in tmp_path.iterdir() if p.name != "o"] == []


_HARNESS = r"""
import hashlib, json, os, shutil, sys
from pathlib import Path
import torch  # imported once here; each forked child runs one command (no import cost)
torch.set_num_threads(1)
import spectra.fsutil as fs
from spectra.cli import main
# warm the lazy imports (model construction pulls in torch submodules) so children start fast
import spectra.data.build, spectra.infer.packed_model, spectra.interop.hf
from spectra.config import ModelConfig
from spectra.model import build_meta
build_meta(ModelConfig(dim=64, n_layers=1, n_heads=2, ffn_dim=128, vocab_size=128, mp=1, max_seq_len=16).validate())

spec = json.loads(sys.argv[1])
out, snap = Path(spec["out"]), Path(spec["snapshot"])

def tree(p):
    if not p.is_dir():
        return None
    return hashlib.sha256(json.dumps({str(f.relative_to(p)): hashlib.sha256(f.read_bytes()).hexdigest()
                          for f in sorted(p.rglob("*")) if f.is_file()}).encode()).hexdigest()

res = []
for n in range(1, spec["max"]):
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(snap, out)
    pid = os.fork()
    if pid == 0:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, 1); os.dup2(fd, 2)
        os.environ[fs.KILL_ENV] = str(n)
        fs._renames = 0
        try:
            rc = main(spec["args"])
        except BaseException:
            rc = 99
        os._exit(rc or 0)
    rc = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if spec.get("recover"):
        fs.recover(out)  # what the next write of this output does first
    res.append([n, rc, tree(out)])
    if rc != 137:
        break
print(json.dumps({"old": tree(snap), "runs": res}))
"""


def _sweep(args: list[str], out: Path, snapshot: Path, fallback: bool = False) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO / "tests")])}
    if fallback:
        env["SPECTRA_NO_RENAME_EXCHANGE"] = "1"
    spec = {"args": args, "out": str(out), "snapshot": str(snapshot), "max": 200, "recover": fallback}
    r = subprocess.run([sys.executable, "-c", _HARNESS, json.dumps(spec)], env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    runs = rep["runs"]
    n_last, rc_last, new = runs[-1]
    assert rc_last == 0, f"the command failed after {n_last - 1} injected kills (rc {rc_last})"
    assert new is not None and new != rep["old"]
    kills = [x for x in runs if x[1] == 137]
    assert len(kills) >= 2, runs  # the hook fired at several renames
    for n, _, state in kills:
        assert state in (rep["old"], new), f"kill before rename {n} left neither the old nor the new output"


def _prepare(tmp_path: Path, argv_old: list[str], out: Path) -> Path:
    assert main(argv_old + ["--out", str(out)]) == 0
    snap = tmp_path / "snapshot"
    shutil.copytree(out, snap)
    return snap


def test_kill_at_every_rename_pack(release, tmp_path):
    out = tmp_path / "packed"
    snap = _prepare(tmp_path, ["pack", str(release), "--format", "t1", "--no-verify"], out)
    _sweep(["pack", str(release), "--format", "t2", "--no-verify", "--out", str(out)], out, snap)


def test_kill_at_every_rename_pack_fallback_swap(release, tmp_path):
    out = tmp_path / "packed"
    snap = _prepare(tmp_path, ["pack", str(release), "--format", "t1", "--no-verify"], out)
    _sweep(["pack", str(release), "--format", "t2", "--no-verify", "--out", str(out)], out, snap, fallback=True)


def test_kill_at_every_rename_import(release, tmp_path):
    out = tmp_path / "ck"
    snap = _prepare(tmp_path, ["import", str(release), "--dtype", "float32"], out)
    _sweep(["import", str(release), "--out", str(out)], out, snap)


def test_kill_at_every_rename_export(release, tmp_path):
    out = tmp_path / "hf"
    snap = _prepare(tmp_path, ["export", str(release), "--to", "hf", "--dtype", "float32"], out)
    _sweep(["export", str(release), "--to", "hf", "--out", str(out)], out, snap)


def test_kill_at_every_rename_data_build(tmp_path):
    corpus = _corpus(tmp_path / "c.txt")
    out = tmp_path / "data"
    base = ["data", "build", "--source", str(corpus), "--vocab-size", "300", "--no-progress", "--workers", "1"]
    snap = _prepare(tmp_path, base + ["--seed", "1"], out)
    _sweep(base + ["--seed", "2", "--out", str(out)], out, snap)
