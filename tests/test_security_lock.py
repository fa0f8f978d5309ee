"""Finding 6 of issue 15: one writer per output. Two `spectra train --out R` (or two
`--resume auto`) at once: the second exits 2 naming the holder (pid, command, start time);
the lock is an flock on '.R.lock' next to R (spectra.fsutil.output_lock). Also: a start
that fails leaves no train_config.json behind, so a plain rerun is not refused."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spectra.errors import SpectraError
from spectra.fsutil import output_lock
from spectra.train import TrainConfig, list_checkpoints, train

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src")}
TINY = {"model.dim": 32, "model.n_layers": 1, "model.n_heads": 2, "model.ffn_dim": 64}

_HOLD = r"""
import sys, time
from spectra.fsutil import output_lock
with output_lock(sys.argv[1], "spectra pack"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(SpectraError, match=rf"being written by another process \(pid {p.pid}, `spectra pack`, "
                                               r"started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC\)"):
            with output_lock(out, "spectra pack"):
                pass
    finally:
        p.kill()
        p.wait()
    with output_lock(out, "spectra pack") as lock:  # a killed holder's lock is free again
        assert lock.exists()
    assert not lock.exists()  # removed on release


def _cfg(words_data, run, **kw) -> TrainConfig:
    return TrainConfig().override({
        "out": str(run), "data.dir": str(words_data), "data.seq_len": 32, "batch.global_tokens": 4 * 32,
        "batch.micro_batch": 4, "log.progress": False, "log.tensorboard": False, "train.threads": 1,
        "checkpoint.log_spaced": False, "checkpoint.every": 0, "eval.at_end": False, "train.precision": "fp32",
        **TINY, **kw})


def _flat(words_data, run, **kw) -> list[str]:
    return [f"{k}={v}" for k, v in _cfg(words_data, run, **kw).to_flat().items()]


def _cli(args) -> list[str]:
    return [sys.executable, "-m", "spectra", "train"] + args


def _wait_for_lock(run: Path, p: subprocess.Popen) -> None:
    lock = run.parent / f".{run.name}.lock"
    deadline = time.time() + 120
    while time.time() < deadline:
        if lock.exists() and lock.stat().st_size > 0 and (run / "metrics.jsonl").exists():
            return
        if p.poll() is not None:
            pytest.fail(f"first training exited early: {p.stderr.read()[-2000:]}")
        time.sleep(0.05)
    pytest.fail("first training never took the lock")


@pytest.mark.parametrize("resume", [False, True])
def test_two_trainings_of_one_run(words_data, tmp_path, resume):
    run = tmp_path / "run"
    if resume:  # a finished short run, then two `--resume auto` to a longer schedule at once
        train(_cfg(words_data, run, **{"schedule.steps": 2}))
    extra = {"schedule.steps": 100000, "log.every": 1}
    if resume:
        extra["resume"] = "auto"
    first = subprocess.Popen(_cli(_flat(words_data, run, **extra)), env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_lock(run, first)
        second = subprocess.run(_cli(_flat(words_data, run, **extra)), env=ENV, capture_output=True, text=True,
                                timeout=300)
        assert first.poll() is None  # the holder is undisturbed
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 2, second.stderr[-2000:]
    err = [x for x in second.stderr.splitlines() if x.strip() and not x.startswith("note:")]
    assert len(err) == 1 and "Traceback" not in second.stderr, second.stderr[-2000:]
    assert f"pid {first.pid}, `spectra train`, started " in err[0], err[0]


def test_failed_start_leaves_no_config_behind(words_data, tmp_path, monkeypatch):
    import spectra.train.trainer as tr

    run = tmp_path / "run"
    cfg = _cfg(words_data, run, **{"schedule.steps": 2})

    def broken(plan, cfg):
        raise SpectraError("model.init_from 'x' is broken")

    monkeypatch.setattr(tr, "init_model", broken)
    with pytest.raises(SpectraError, match="is broken"):
        train(cfg)
    assert not (run / tr.RUN_CONFIG).exists()
    assert not (run.parent / f".{run.name}.lock").exists()
    monkeypatch.undo()
    train(cfg)  # a plain rerun: not "already holds a run"
    assert [s for s, _ in list_checkpoints(run)] == [2]


def test_train_out_policy(words_data, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(SpectraError, match="non-empty directory that spectra train did not write"):
        train(_cfg(words_data, foreign, **{"schedule.steps": 1}))
    with pytest.raises(SpectraError, match="inside the input directory"):
        train(_cfg(words_data, Path(words_data) / "run", **{"schedule.steps": 1}))
    assert (foreign / "notes.txt").read_text() == "mine" and not (Path(words_data) / "run").exists()


def test_unusable_place_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")  # a parent that is a file: fails for root too
    with pytest.raises(SpectraError, match="choose a writable place"):
        with output_lock(tmp_path / "afile" / "out", "spectra pack"):
            pass
