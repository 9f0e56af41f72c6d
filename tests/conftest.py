import torch

# One intra-op thread per test process: the suite runs with `-n 2` on 2-core machines, and the tests' small
# tensors are faster single-threaded than fighting over a shared thread pool.
torch.set_num_threads(1)
