"""The capacity dispatch is static-shaped and sync-free: it compiles as one graph (fullgraph=True)."""
import shutil

import pytest
import torch
from torch import nn

import moecnn


@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None, reason="torch.compile on CPU needs a C compiler")
@pytest.mark.parametrize("stacked", [False, True])
def test_capacity_dispatch_compiles_fullgraph_and_matches_eager(stacked):
    """Training-mode capacity dispatch (where the capacity applies) as one graph, list or stacked experts."""
    torch.manual_seed(0)
    experts = [nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()) for _ in range(3)]
    layer = moecnn.MoE(experts, k=2, balance="kl", capacity_factor=1.5, noisy=False, stacked=stacked).train()
    x = torch.randn(8, 4, 5, 5)
    eager = layer(x)  # also runs the one-off expert shape check outside the compiled graph
    compiled = torch.compile(layer, fullgraph=True)  # raises on any graph break or data-dependent shape
    y = compiled(x)
    torch.testing.assert_close(y, eager, atol=1e-5, rtol=1e-5)
    (y.mean() + moecnn.aux_loss(layer)[0]).backward()
    assert all(p.grad is not None for p in layer.gate.parameters())
    assert all(p.grad is not None for p in layer.experts.parameters())
