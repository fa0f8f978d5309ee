import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# The test data pack: $SPECTRA_TEST_DATA (set by .ci/run), else ../shared/data next to the repo.
SHARED_DATA = Path(os.environ.get("SPECTRA_TEST_DATA") or REPO / ".." / "shared" / "data").resolve()

torch.set_num_threads(min(2, os.cpu_count() or 1))


def shared_data(*parts: str) -> Path:
    """Path inside ../shared/data, skipping the test cleanly when the data pack is absent."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared data not available: {p}")
    return p


@pytest.fixture
def shared():
    return shared_data


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of small-op tests: as fast alone, and far faster when the
    2-core machine is shared (thread hand-offs under load dominate otherwise).
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# Briefly trained models shared by the test files that need one (each trained at most once per
# session, on first use). Data: tinyshakespeare with its own BPE. The recipes are the ones the
# tests were written against (the llama.cpp greedy agreement is checked on exactly this micro run).
SHAKES = {1024: {"vocab_size": 1024, "val_fraction": 0.1}, 2048: {"vocab_size": 2048}}
RECIPES = {
    # preset: (SHAKES key, overrides)
    "nano": (1024, {"data.seq_len": 128, "batch.global_tokens": 8 * 128, "batch.micro_batch": 8,
                    "schedule.steps": 200, "optim.lr": 3e-3, "train.threads": 1}),
    "micro": (2048, {"data.seq_len": 128, "batch.global_tokens": 2048, "batch.micro_batch": 16,
                     "schedule.steps": 40, "train.threads": 2}),
}


@pytest.fixture(scope="session")
def words_data(tmp_path_factory) -> Path:
    """A tiny training dataset from a random-word corpus (no shared data needed; read-only: share it)."""
    import random

    from spectra.data import build_dataset

    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "ternary", "weights", "train", "model", "token", "shard"]
    root = tmp_path_factory.mktemp("words")
    (root / "c.txt").write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(60)) for _ in range(120)))
    return build_dataset(str(root / "c.txt"), root / "d", vocab_size=300, val_fraction=0.1, progress=False)


@pytest.fixture(scope="session")
def shakes_data(tmp_path_factory):
    """vocab (a SHAKES key) -> data directory built from tinyshakespeare (built once per session)."""
    cache: dict = {}

    def get(vocab: int) -> Path:
        if vocab not in cache:
            from spectra.data import build_dataset

            text = shared_data("text", "tinyshakespeare.txt")
            out = tmp_path_factory.mktemp(f"shakes{vocab}") / "shakes"
            cache[vocab] = build_dataset(str(text), out, progress=False, **SHAKES[vocab])
        return cache[vocab]

    return get


@pytest.fixture(scope="session")
def trained_ckpt(tmp_path_factory, shakes_data):
    """(preset, family) -> final checkpoint of that preset trained by its RECIPES entry (read-only: share it)."""
    cache: dict = {}

    def get(preset: str, family: str) -> Path:
        if (preset, family) not in cache:
            from spectra.train import TrainConfig, final_checkpoint, train

            vocab, over = RECIPES[preset]
            run = tmp_path_factory.mktemp(f"trained-{preset}-{family}") / "run"
            cfg = TrainConfig().override({
                "out": str(run), "model.preset": preset, "model.family": family,
                "data.dir": str(shakes_data(vocab)), "checkpoint.log_spaced": False, "checkpoint.every": 0,
                "eval.at_end": False, "log.progress": False, "log.tensorboard": False, **over})
            cache[(preset, family)] = final_checkpoint(train(cfg))
        return cache[(preset, family)]

    return get


class Req:
    """The one attribute of lm_eval's ``Instance`` that the LM methods read."""

    def __init__(self, *args):
        self.args = args
