import torch

# One intra-op thread per test process: the suite runs with `-n 2` on 2-core machines, and the tests' small
# tensors are faster single-threaded than fighting over a shared thread pool.
torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_each_test():
    """Every test starts from the same global RNG state, whatever ran before it in this worker
    (pytest-xdist spreads tests differently as the suite grows)."""
    torch.manual_seed(0)
