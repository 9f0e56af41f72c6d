"""Optimisers built by the training loop cope with experts that receive their first images late."""
import pytest
import torch
from omegaconf import OmegaConf

import moecnn
from moecnn.train.config import OptimConfig
from moecnn.train.loop import build_optimizer


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_expert_first_routed_after_step_one(name):
    torch.manual_seed(0)
    experts = [torch.nn.Conv2d(3, 4, 1) for _ in range(2)]
    layer = moecnn.MoE(experts, k=1, noisy=False)
    cfg = OmegaConf.structured(OptimConfig(name=name, lr=0.1, momentum=0.9, nesterov=True))
    # the CUDA branch picks the fused/foreach variants; they also run on CPU tensors
    opt = build_optimizer(layer, cfg, torch.device("cuda"))
    x = torch.randn(4, 3, 5, 5)
    # step 1: only expert 0 has gradients; step 2: both (expert 1 has no optimiser state yet)
    for controls in (dict(force=0), dict(dense=True)):
        with moecnn.routing_override(layer, **controls):
            layer(x).square().mean().backward()
        before = experts[1].weight.detach().clone()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert not torch.equal(before, experts[1].weight)
