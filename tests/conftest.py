from pathlib import Path

import pytest
import torch

# One intra-op thread per test process: the suite runs with `-n 2` on 2-core machines, and the tests' small
# tensors are faster single-threaded than fighting over a shared thread pool.
torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not present at {SHARED_DATA} (only on the project's dev machines)")
    return SHARED_DATA
