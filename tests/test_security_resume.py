"""Finding 1 of issue 15: a training state handed to --resume must never run code.

torch's DCP unpickles ``.metadata`` and reads non-tensor values with
``torch.load(weights_only=False)``; spectra loads both through allow-lists
(spectra.train.safe_dcp). Each crafted state below would run ``os.system`` on the
old code (the marker file would appear); now it is refused with one line, exit 2.
"""

import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spectra.errors import SpectraError
from spectra.train import TrainConfig, list_checkpoints, train

REPO = Path(__file__).resolve().parents[1]
TINY = {"model.dim": 32, "model.n_layers": 1, "model.n_heads": 2, "model.ffn_dim": 64}


def cfg_for(words_data, out, **kw) -> TrainConfig:
    base = {"out": str(out), "data.dir": str(words_data), "data.seq_len": 32, "batch.global_tokens": 4 * 32,
            "batch.micro_batch": 4, "log.progress": False, "log.tensorboard": False, "train.threads": 1,
            "checkpoint.log_spaced": False, "checkpoint.every": 0, "eval.at_end": False, **TINY}
    base.update(kw)
    return TrainConfig().override(base)


@pytest.fixture(scope="module")
def trained(words_data, tmp_path_factory):
    """A finished 2-step run (checkpoint at step 2), copied per test."""
    run = tmp_path_factory.mktemp("secrun") / "run"
    train(cfg_for(words_data, run, **{"schedule.steps": 2}))
    return run


def _copy_run(trained, tmp_path) -> Path:
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(trained, dst)
    return dst


class _Evil:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _fix_sizes(ckpt: Path) -> None:
    """Make state.json list the tampered files' sizes, so only the content decides."""
    st_file = ckpt / "train_state" / "state.json"
    st = json.loads(st_file.read_text())
    st["files"] = {rel: (ckpt / rel).stat().st_size for rel in st["files"]}
    st_file.write_text(json.dumps(st))


def _resume_cli(words_data, run) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "spectra", "train"] + [
        f"{k}={v}" for k, v in cfg_for(words_data, run, **{"schedule.steps": 3, "resume": "auto"}).to_flat().items()]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)


def _assert_one_line_refusal(out: subprocess.CompletedProcess, marker: Path, what: str) -> None:
    assert not marker.exists(), "the crafted training state ran code"
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [x for x in out.stderr.splitlines() if x.strip() and not x.startswith("note:")]  # bf16 hint on some CPUs
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert what in lines[0], lines[0]


def test_crafted_metadata_is_refused_and_runs_nothing(words_data, trained, tmp_path):
    run = _copy_run(trained, tmp_path)
    ckpt = list_checkpoints(run)[-1][1]
    marker = tmp_path / "pwned"
    (ckpt / "train_state" / "dcp" / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    _fix_sizes(ckpt)
    out = _resume_cli(words_data, run)
    _assert_one_line_refusal(out, marker, "posix.system")
    # --resume DIR takes the same path (in-process here)
    with pytest.raises(SpectraError, match=r"refers to 'posix.system'.*refusing it"):
        train(cfg_for(words_data, run, **{"schedule.steps": 3, "resume": str(ckpt)}))
    assert not marker.exists()


def _tamper_bytes_entry(ckpt: Path, payload: bytes) -> None:
    """Replace one non-tensor value (an optimizer hyper-parameter) in the .distcp file with ``payload``."""
    from spectra.train.safe_dcp import read_metadata

    dcp_dir = ckpt / "train_state" / "dcp"
    md = read_metadata(dcp_dir)
    key = next(k for k in md.storage_data if k.fqn.endswith("param_groups.0.lr"))
    info = md.storage_data[key]
    f = dcp_dir / info.relative_path
    data = f.read_bytes()
    new = data[: info.offset] + payload + data[info.offset + info.length:]
    delta = len(payload) - info.length
    for s in md.storage_data.values():
        if s.relative_path == info.relative_path and s.offset > info.offset:
            s.offset += delta
    info.length = len(payload)
    f.write_bytes(new)
    (dcp_dir / ".metadata").write_bytes(pickle.dumps(md))  # the genuine classes: the index itself is fine
    _fix_sizes(ckpt)


def test_crafted_optimizer_value_is_refused_and_runs_nothing(words_data, trained, tmp_path):
    run = _copy_run(trained, tmp_path)
    ckpt = list_checkpoints(run)[-1][1]
    marker = tmp_path / "pwned2"
    buf = io.BytesIO()
    torch.save(_Evil(marker), buf)  # what DCP's default planner would torch.load(weights_only=False)
    _tamper_bytes_entry(ckpt, buf.getvalue())
    out = _resume_cli(words_data, run)
    _assert_one_line_refusal(out, marker, "loading training state")


def test_index_pointing_outside_the_checkpoint_is_refused(words_data, trained, tmp_path):
    from spectra.train.safe_dcp import read_metadata

    run = _copy_run(trained, tmp_path)
    ckpt = list_checkpoints(run)[-1][1]
    dcp_dir = ckpt / "train_state" / "dcp"
    md = read_metadata(dcp_dir)
    next(iter(md.storage_data.values())).relative_path = "../../../../etc/passwd"
    (dcp_dir / ".metadata").write_bytes(pickle.dumps(md))
    _fix_sizes(ckpt)
    with pytest.raises(SpectraError, match=r"is not a plain file name inside the checkpoint"):
        read_metadata(dcp_dir)


@pytest.mark.parametrize("blob", [b"", b"\x80\x04K", b"not a pickle at all", pickle.dumps({"a": 1}),
                                  pickle.dumps([torch.Size([2])])])
def test_garbage_metadata_gives_one_line_error(tmp_path, blob):
    from spectra.train.safe_dcp import read_metadata

    (tmp_path / ".metadata").write_bytes(blob)
    with pytest.raises(SpectraError, match=r"not a checkpoint spectra can load safely") as e:
        read_metadata(tmp_path)
    assert "\n" not in str(e.value)


def test_genuine_state_still_resumes(words_data, trained, tmp_path):
    run = _copy_run(trained, tmp_path)
    train(cfg_for(words_data, run, **{"schedule.steps": 3, "resume": "auto"}))
    assert [s for s, _ in list_checkpoints(run)][-1] == 3


@pytest.mark.parametrize("state", ["[]", "{}", '{"files": {"../../etc/passwd": 1}}', "\xff not json",
                                   '{"files": {"model.safetensors": "big"}}'])
def test_garbage_state_json_is_an_incomplete_checkpoint(words_data, trained, tmp_path, state):
    run = _copy_run(trained, tmp_path)
    ckpt = list_checkpoints(run)[-1][1]
    (ckpt / "train_state" / "state.json").write_text(state, encoding="utf-8", errors="surrogateescape")
    assert list_checkpoints(run) == []  # ignored by discovery, no traceback
    with pytest.raises(SpectraError, match="is incomplete"):
        train(cfg_for(words_data, run, **{"schedule.steps": 3, "resume": str(ckpt)}))


def test_state_json_without_loader_is_refused(words_data, trained, tmp_path):
    run = _copy_run(trained, tmp_path)
    ckpt = list_checkpoints(run)[-1][1]
    st_file = ckpt / "train_state" / "state.json"
    st = json.loads(st_file.read_text())
    del st["loader"]
    st_file.write_text(json.dumps(st))
    with pytest.raises(SpectraError, match="lacks a valid step/loader/scaler"):
        train(cfg_for(words_data, run, **{"schedule.steps": 3, "resume": "auto"}))
