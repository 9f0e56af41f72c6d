"""torch.compile (CPU, inductor): the capacity dispatch is static-shaped and sync-free, so it compiles as one graph
(fullgraph=True), masked BatchNorm statistics included; the default bucketed dispatch compiles with graph breaks
at its one host sync. Both equal exact eager dispatch in training (outputs, gradients, running statistics)."""
import copy
import shutil

import pytest
import torch
from torch import nn

import moecnn

from _moe_equiv import EXACT

needs_cc = pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None,
                              reason="torch.compile on CPU needs a C compiler")


def _experts():
    torch.manual_seed(0)
    return [nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()) for _ in range(3)]


def _check(compiled, layer, ref, x):
    y = compiled(x)
    yr = ref(x)
    torch.testing.assert_close(y, yr, atol=1e-5, rtol=1e-5)
    (y.square().mean() + moecnn.aux_loss(layer)[0]).backward()
    (yr.square().mean() + moecnn.aux_loss(ref)[0]).backward()
    for (name, p), q in zip(layer.named_parameters(), ref.parameters()):
        gp = p.grad if p.grad is not None else torch.zeros_like(p)
        gq = q.grad if q.grad is not None else torch.zeros_like(q)
        torch.testing.assert_close(gp, gq, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    for (name, b), c in zip(layer.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, c, atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@needs_cc
@pytest.mark.parametrize("stacked,channels_last", [(False, False), (True, False), (True, True)])
def test_capacity_dispatch_compiles_fullgraph_and_matches_exact(stacked, channels_last):
    """Training-mode capacity dispatch (nothing dropped) as one graph, list or stacked experts, BatchNorm
    statistics masked to the routed slots; an idle expert's statistics do not move."""
    experts = _experts()
    layer = moecnn.MoE(copy.deepcopy(experts), k=2, balance="kl", capacity_factor=4.0, noisy=False,
                       stacked=stacked).train()
    ref = moecnn.MoE(copy.deepcopy(experts), k=2, balance="kl", noisy=False, **EXACT).train()
    with torch.no_grad():
        for m in (layer, ref):
            m.gate.load_state_dict(layer.gate.state_dict())
            m.gate.fc.bias[2] -= 100.0  # expert 2 idle
    x = torch.randn(8, 4, 5, 5)
    if channels_last:  # the layout of the compiled recipe (masked statistics: two per-channel reductions)
        x = x.contiguous(memory_format=torch.channels_last)
    layer(x)  # the one-off checks run eagerly; then reset the statistics to the reference's
    layer.load_state_dict(ref.state_dict())
    compiled = torch.compile(layer, fullgraph=True)  # raises on any graph break or data-dependent shape
    _check(compiled, layer, ref, x)
    assert int(layer.record.counts[2]) == 0 and int(layer.experts[2][1].num_batches_tracked) == 0


@needs_cc
def test_default_bucketed_dispatch_compiles_and_matches_exact():
    experts = _experts()
    layer = moecnn.MoE(copy.deepcopy(experts), k=2, noisy=False).train()
    ref = moecnn.MoE(copy.deepcopy(experts), k=2, noisy=False, **EXACT).train()
    ref.gate.load_state_dict(layer.gate.state_dict())
    x = torch.randn(9, 4, 5, 5)
    _check(torch.compile(layer), layer, ref, x)
