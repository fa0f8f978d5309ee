"""Multi-process training on CPU through torchrun (gloo): DDP and FSDP2 match one process,
and a DCP checkpoint written by 2 ranks resumes on 1 rank."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from spectra.train import TrainConfig, list_checkpoints, read_metrics, train

from tests.test_train_run import TINY, cfg_for, data_dir, losses  # noqa: F401  (fixture re-export)

REPO = Path(__file__).resolve().parents[1]
STEPS = 6
# TriLM with MP=2: the per-shard scales must keep their meaning under FSDP sharding.
COMMON = {**TINY, "model.family": "trilm", "model.mp": 2, "schedule.steps": STEPS, "batch.micro_batch": 4,
          "checkpoint.ephemeral_every": 3, "eval.at_end": False, "schedule.warmup": 2}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(cfg: TrainConfig, nproc: int = 2):
    args = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            f"--master-port={_free_port()}", "--master-addr=127.0.0.1", "-m", "spectra", "train"]
    args += [f"{k}={v}" for k, v in cfg.to_flat().items()]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):  # noqa: F811
    return losses(train(cfg_for(data_dir, tmp_path_factory.mktemp("ref") / "run", **COMMON)))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "fsdp+ac"])
def test_two_ranks_match_one_process(data_dir, reference, tmp_path, strategy):  # noqa: F811
    run = tmp_path / strategy
    extra = {"train.activation_checkpoint": 1} if strategy.endswith("+ac") else {}  # FSDP2 + recompute
    torchrun(cfg_for(data_dir, run, **{**COMMON, "train.parallel": strategy.split("+")[0], **extra}))
    got = losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in range(1, STEPS + 1):
        assert abs(got[s] - reference[s]) <= 1e-5, (strategy, s, got[s], reference[s])
    assert [s for s, _ in list_checkpoints(run)] == [3, 6]
    if strategy == "fsdp":
        # DCP checkpoint from 2 ranks -> resume on 1 rank: same next losses.
        st = list_checkpoints(run)[0][1]
        one = train(cfg_for(data_dir, tmp_path / "one", **{**COMMON, "resume": str(st)}))
        resumed = losses(one)
        assert sorted(resumed) == [4, 5, 6]
        for s in (4, 5, 6):
            assert abs(resumed[s] - got[s]) <= 1e-5, (s, resumed[s], got[s])
        # The gathered model directory of the sharded run equals the 1-rank one at the end.
        from spectra.checkpoint import read_weights

        a, b = read_weights(run / "final"), read_weights(one / "final")
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
