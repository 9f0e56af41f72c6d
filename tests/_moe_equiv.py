"""Shared check: an MoE execution computes what exact dispatch computes (outputs, gradients, buffers)."""
from __future__ import annotations

import copy

import torch

import moecnn

EXACT = dict(stacked=False, bucketed=False, capacity_factor=None)  # each expert on exactly its own sub-batch


def twins(experts, k=2, ref=EXACT, **kw):
    """(exact reference layer, layer under test) with the same experts, gate and noise weights."""
    a = moecnn.MoE(copy.deepcopy(list(experts)), k=k, **{**kw, **ref})
    b = moecnn.MoE(copy.deepcopy(list(experts)), k=k, **kw)
    b.gate.load_state_dict(a.gate.state_dict())
    if a.noise is not None:
        b.noise.load_state_dict(a.noise.state_dict())
    return a, b


def _grad(p):
    # an expert that exact dispatch never ran has no gradient there: compare as zero
    return p.grad if p.grad is not None else torch.zeros_like(p)


def assert_same_step(a, b, x, atol=1e-5, rtol=1e-4, seed=0, grad=True):
    """One forward (+ backward) of both layers on the same input: outputs, input and parameter gradients,
    and every buffer of the state dict (running statistics, num_batches_tracked, constraint state)."""
    xa = x.clone().requires_grad_(grad)
    xb = x.clone().requires_grad_(grad)
    torch.manual_seed(seed)
    ya = a(xa)
    torch.manual_seed(seed)
    yb = b(xb)
    torch.testing.assert_close(yb, ya, atol=atol, rtol=rtol)
    if grad:
        g = torch.randn_like(ya)
        for p in list(a.parameters()) + list(b.parameters()):
            p.grad = None
        (ya * g).sum().backward()
        (yb * g).sum().backward()
        torch.testing.assert_close(xb.grad, xa.grad, atol=atol, rtol=rtol)
        pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
        assert pa.keys() == pb.keys()
        for name in pa:
            torch.testing.assert_close(_grad(pb[name]), _grad(pa[name]), atol=atol * 10, rtol=rtol * 10,
                                       msg=lambda m, n=name: f"grad {n}: {m}")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        if sa[name].is_floating_point():
            torch.testing.assert_close(sb[name], sa[name], atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")
        else:
            assert torch.equal(sb[name], sa[name]), name
    return ya, yb
