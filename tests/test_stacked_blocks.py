"""Channel-stacked execution of modern CNN blocks equals exact dispatch, in training and evaluation: timm's
BatchNormAct2d, ConvNeXt blocks (NHWC LayerNorm + Linear, LayerNorm2d, layer scale, depthwise conv),
squeeze-excitation (timm, torchvision), MobileNet/EfficientNet blocks; stochastic depth draws per image *and*
expert; what still mixes channels is refused with one line. Then ``moeify`` on real torchvision/timm models."""
import copy

import pytest
import torch
import torchvision
from torch import nn

import moecnn
from moecnn.layers import StackedExperts
from moecnn.layers.grouped import GroupedDropPath

from _moe_equiv import assert_same_step, twins

timm = pytest.importorskip("timm", reason="timm is an optional extra")
from timm.layers import BatchNormAct2d, LayerNorm2d  # noqa: E402
from timm.models._efficientnet_blocks import SqueezeExcite  # noqa: E402
from timm.models.convnext import ConvNeXtBlock  # noqa: E402

C = 8


@torch.no_grad()
def _diversify(experts):
    """Experts that differ in every tensor (weights, layer scales, running statistics)."""
    g = torch.Generator().manual_seed(1)
    for e in experts:
        for name, t in list(e.named_parameters()) + list(e.named_buffers()):
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.uniform_(0.5, 1.5, generator=g)
            else:
                t.add_(torch.randn(t.shape, generator=g) * (0.1 + 0.1 * t.std().nan_to_num()))
    return experts


def _no_drop_path(module):
    for m in module.modules():
        if type(m).__name__ == "StochasticDepth":
            m.p = 0.0
        if type(m).__name__ == "DropPath":
            m.drop_prob = 0.0
    return module


def check_family(make, c_in=C, hw=6, n=3, k=2, batch=7):
    torch.manual_seed(0)
    experts = _diversify([make() for _ in range(n)])
    a, b = twins(experts, k=k, noisy=False, stacked=True, in_channels=c_in)
    assert isinstance(b.experts, StackedExperts)
    with torch.no_grad():  # expert n-1 idle in training
        for layer in (a, b):
            layer.gate.fc.bias[n - 1] -= 100.0
    x = torch.randn(batch, c_in, hw, hw)
    for step in range(2):
        assert_same_step(a.train(), b.train(), x + 0.5 * step)
    assert_same_step(a.eval(), b.eval(), x, grad=False)


class SEBlock(nn.Module):
    """Conv-BN-act, squeeze-excitation, projection: the MobileNetV3/EfficientNet pattern."""

    def __init__(self, se):
        super().__init__()
        self.conv = nn.Conv2d(C, 16, 1)
        self.bn = BatchNormAct2d(16, act_layer=nn.SiLU)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.se = se
        self.proj = nn.Conv2d(16, C, 1)

    def forward(self, x):
        return x + self.proj(self.se(self.dw(self.bn(self.conv(x)))))


FAMILIES = {
    "timm-BatchNormAct2d": lambda: nn.Sequential(nn.Conv2d(C, 8, 3, padding=1), BatchNormAct2d(8, act_layer=nn.ReLU),
                                                 nn.Conv2d(8, C, 1), BatchNormAct2d(C, apply_act=False)),
    "timm-ConvNeXtBlock-nhwc": lambda: ConvNeXtBlock(C, ls_init_value=0.5),
    "timm-ConvNeXtBlock-conv-mlp": lambda: ConvNeXtBlock(C, conv_mlp=True, ls_init_value=0.5),
    "tv-CNBlock": lambda: torchvision.models.convnext.CNBlock(C, layer_scale=0.5, stochastic_depth_prob=0.0),
    "LayerNorm2d": lambda: nn.Sequential(torchvision.models.convnext.LayerNorm2d(C), nn.Conv2d(C, C, 2, 2),
                                         LayerNorm2d(C), nn.GELU()),
    "timm-SE": lambda: SEBlock(SqueezeExcite(16, rd_ratio=0.25)),
    "tv-SE": lambda: SEBlock(torchvision.ops.SqueezeExcitation(16, 4)),
    "depthwise-GroupNorm": lambda: nn.Sequential(nn.Conv2d(C, C, 3, padding=1, groups=C), nn.GroupNorm(4, C),
                                                 nn.Hardswish(), nn.Conv2d(C, 2 * C, 1), nn.Dropout(0.0)),
    "BatchNorm-no-running-stats": lambda: nn.Sequential(nn.Conv2d(C, C, 3, padding=1, padding_mode="reflect"),
                                                        nn.BatchNorm2d(C, track_running_stats=False), nn.ReLU6()),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_block_family_stacks_exactly(family):
    check_family(FAMILIES[family])


def test_mixing_blocks_are_refused_and_run_per_expert():
    """ConvNeXt-V2's global response normalisation divides by a mean over channels: it does not stack."""
    make = lambda: ConvNeXtBlock(C, use_grn=True)  # noqa: E731
    with pytest.raises(ValueError, match="mixes channels"):
        moecnn.MoE([make() for _ in range(2)], k=1, stacked=True)
    auto = moecnn.MoE([make() for _ in range(2)], k=1)
    assert not auto.can_stack
    assert auto.train()(torch.randn(3, C, 4, 4)).shape == (3, C, 4, 4)


@pytest.mark.parametrize("kind", ["torchvision", "timm"])
def test_stochastic_depth_draws_per_image_and_expert(kind):
    """In the stacked layout a row holds N experts' images: each (image, expert) slot gets its own draw, with
    the probability and scaling of exact dispatch."""
    drop = (torchvision.ops.StochasticDepth(0.3, "row") if kind == "torchvision"
            else timm.layers.DropPath(0.3))
    n = 4
    experts = [nn.Sequential(nn.Conv2d(C, C, 1), copy.deepcopy(drop)) for _ in range(n)]
    layer = moecnn.MoE(experts, k=n, noisy=False, stacked=True)
    template = layer.experts._template[0]
    assert isinstance(template[1], GroupedDropPath) and template[1].p == pytest.approx(0.3)
    gdp = GroupedDropPath(0.3, "row", True, groups=n).train()
    torch.manual_seed(0)
    y = gdp(torch.ones(4000, n * 3, 1, 1)).view(4000, n, 3)
    assert (y == y[:, :, :1]).all()  # one draw per (image, expert) block
    kept = y[:, :, 0] > 0
    assert all(v == 0.0 or v == pytest.approx(1 / 0.7) for v in y.unique().tolist())
    assert kept.float().mean().item() == pytest.approx(0.7, abs=0.03)
    corr = torch.corrcoef(kept.float().T)
    assert (corr - torch.eye(n)).abs().max() < 0.08  # independent across experts
    torch.manual_seed(0)
    out = layer.train()(torch.randn(64, C, 3, 3))
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------ real models

MODELS = [  # (library, model, moeified block)
    ("torchvision", "resnet50", "layer3.1"),
    ("torchvision", "mobilenet_v2", "features.5"),
    ("torchvision", "efficientnet_b0", "features.4.1"),
    ("torchvision", "convnext_tiny", "features.5.1"),
    ("torchvision", "regnet_y_400mf", "trunk_output.block3.block3-1"),
    ("timm", "efficientnet_b0", "blocks.3.1"),
    ("timm", "convnext_atto", "stages.2.blocks.1"),
    ("timm", "regnety_002", "s3.b2"),
    ("timm", "mobilenetv3_small_100", "blocks.3.1"),
]


def _model(lib, name):
    torch.manual_seed(0)  # random init, never pretrained weights
    if lib == "timm":
        return timm.create_model(name, pretrained=False, num_classes=10)
    return getattr(torchvision.models, name)(num_classes=10)


@pytest.mark.parametrize("lib,name,path", MODELS, ids=[f"{m[0]}-{m[1]}" for m in MODELS])
def test_moeify_real_model_stacked(lib, name, path):
    """``moeify(model, block, num_experts=4, k=2, init="copy", stacked=True)`` reproduces the dense model; then
    the block's experts (made different) train stacked exactly like exact dispatch."""
    model = _model(lib, name).eval()
    x = torch.randn(2, 3, 64, 64)
    seen = {}
    hook = model.get_submodule(path).register_forward_pre_hook(lambda m, a: seen.update(shape=a[0].shape))
    with torch.no_grad():
        ref = model(x)
    hook.remove()
    block = copy.deepcopy(model.get_submodule(path))
    moecnn.moeify(model, path, num_experts=4, k=2, init="copy", stacked=True)
    layer = model.get_submodule(path)
    assert isinstance(layer.experts, StackedExperts)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref, atol=1e-4, rtol=1e-4)
    experts = _diversify([_no_drop_path(copy.deepcopy(block)) for _ in range(4)])
    a, b = twins(experts, k=2, noisy=False, stacked=True)
    xb = torch.randn(5, *seen["shape"][1:])
    assert_same_step(a.train(), b.train(), xb, atol=1e-4)
    assert_same_step(a.eval(), b.eval(), xb, grad=False, atol=1e-4)
