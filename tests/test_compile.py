"""The capacity dispatch is static-shaped and sync-free: it compiles as one graph (fullgraph=True)."""
import shutil

import pytest
import torch
from torch import nn

import moecnn


@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None, reason="torch.compile on CPU needs a C compiler")
def test_capacity_dispatch_compiles_fullgraph_and_matches_eager():
    torch.manual_seed(0)
    experts = [nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()) for _ in range(3)]
    layer = moecnn.MoE(experts, k=2, balance="kl", capacity_factor=1.5).eval()
    x = torch.randn(8, 4, 5, 5)
    eager = layer(x)  # also runs the one-off expert shape check outside the compiled graph
    compiled = torch.compile(layer, fullgraph=True)  # raises on any graph break or data-dependent shape
    torch.testing.assert_close(compiled(x), eager, atol=1e-5, rtol=1e-5)
    layer.train()
    y = compiled(x)
    (y.mean() + moecnn.aux_loss(layer)[0]).backward()
    assert all(p.grad is not None for p in layer.gate.parameters())
