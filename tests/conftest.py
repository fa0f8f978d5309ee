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


class Req:
    """The one attribute of lm_eval's ``Instance`` that the LM methods read."""

    def __init__(self, *args):
        self.args = args
