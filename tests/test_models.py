"""Every registered classification model × MoE placement: forward, backward, gradients, no NaN (timm style)."""
import pytest
import torch

import moecnn
from moecnn.models import ModelConfig, build_model, create_model
from moecnn.models.cifar_resnet import PAPER_EXPERT_WIDTHS

CLASSIFIERS = [n for n in moecnn.MODELS.names() if not n.startswith("retinanet")]


@pytest.mark.parametrize("name", CLASSIFIERS)
@pytest.mark.parametrize("moe", ["none", "resblock", "block", "conv"])
def test_forward_backward_every_parameter(name, moe):
    torch.manual_seed(0)
    kw = {} if moe == "none" else dict(position=4, num_experts=3, k=3, balance={"kl": 0.5})  # k=N: all experts run
    model = create_model(name, num_classes=7, in_channels=3, width=8, moe=moe, **kw).train()
    x = torch.randn(4, 3, 16, 16)
    out = model(x)
    assert out.shape == (4, 7) and torch.isfinite(out).all()
    total, terms = moecnn.aux_loss(model)
    assert (len(terms) > 0) == (moe != "none")
    (torch.nn.functional.cross_entropy(out, torch.arange(4)) + total).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing[:5]
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("position", [1, 2, 3, 4])
def test_resblock_moe_paper_widths_and_skip(position):
    model = create_model("resnet18", num_classes=100, moe="resblock", position=position, num_experts=4, k=2)
    stage = getattr(model, f"layer{position}")
    expert = stage.moe.experts[0]
    assert expert[0].conv1.out_channels == PAPER_EXPERT_WIDTHS[position - 1]  # P = 25/50/90/180
    assert isinstance(stage.skip, torch.nn.Identity) == (position == 1)
    y = model.eval()(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 100)


def test_dense_resnet18_parameter_count():
    n = sum(p.numel() for p in create_model("resnet18", num_classes=100, moe="none").parameters())
    assert 11.1e6 < n < 11.3e6  # SPEC §2: ≈ 11.2 M


def test_build_model_from_config_and_errors():
    cfg = ModelConfig(name="resnet10_tiny", moe="resblock", num_experts=4, k=2, balance="kl:0.5,z_loss:0.001")
    model = build_model(cfg, num_classes=5, in_channels=1)
    layer = moecnn.moe_layers(model)["layer4.moe"]
    assert layer.soft_losses == {"kl": 0.5, "z_loss": 0.001}
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 5)
    with pytest.raises(ValueError, match="k must be"):
        build_model(ModelConfig(name="resnet10_tiny", moe="resblock", num_experts=2, k=3), num_classes=5)
    with pytest.raises(ValueError, match="unknown MoE placement 'dense'"):
        create_model("resnet18", moe="dense")
    with pytest.raises(ValueError, match="unknown model 'resnet99'"):
        create_model("resnet99")
    with pytest.raises(ValueError, match="bad balance weight"):
        build_model(ModelConfig(name="resnet10_tiny", moe="resblock", balance="kl:lots"), num_classes=5)
