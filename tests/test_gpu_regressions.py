"""Regressions first seen on the GPU runs: sparse expert gradients with fused optimisers, CLI override order."""
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


def test_cli_overrides_may_follow_options(tmp_path):
    """`moecnn train --out D a=1 --config X b=2`: both overrides reach the config (seen failing on the GPU)."""
    from moecnn import cli

    argv = ["train", "--out", str(tmp_path / "r"), "train.epochs=1", "--config", "tiny", "model.balance=relative"]
    parser = cli.build_parser()
    args, extra = parser.parse_known_args(argv)
    assert extra == ["model.balance=relative"]
    rc = cli.main(argv + ["train.stop_after_epochs=0", "data.synthetic_train_size=300", "data.synthetic_test_size=100",
                          "data.val_size=50"])
    cfg = (tmp_path / "r" / "config.yaml").read_text()
    assert "balance: relative" in cfg and "epochs: 1" in cfg, (rc, cfg)
