import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()

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
