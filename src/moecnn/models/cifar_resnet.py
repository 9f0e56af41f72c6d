"""CIFAR-style ResNets (3×3 stem, stride 1, no max-pool) and the paper's MoE placements (SPEC §2).

Placements are registered in :data:`moecnn.registry.PLACEMENTS` and turn stage ``position`` of a built dense
CIFAR ResNet into an MoE in place:

- ``resblock`` (the paper's ResBlock-MoE): stage p is replaced by N narrow experts plus a skip,
  y = Σ g_i E_i(x) + S(x); each expert is two residual blocks in→P→out (P = 25/50/90/180 for p = 1..4).
- ``block`` (BlockMoE, follow-up): every block of stage p becomes an MoE of copies of that block.
- ``conv`` (ConvMoE, follow-up): every 3×3 Conv2d of stage p becomes an MoE of conv experts.
- ``none``: the dense baseline.
Stages are named ``layer1``..``layer4`` like torchvision's, so :func:`moecnn.moeify` targets carry over.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Type

import torch
from torch import nn

from ..layers import MoE, moeify
from ..registry import MODELS, PLACEMENTS

PAPER_EXPERT_WIDTHS = (25, 50, 90, 180)  # P for stage positions 1..4 (ResNet-18, SPEC §2)


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """conv3×3-BN-ReLU-conv3×3-BN + shortcut, ReLU. ``mid`` is ignored (kept for a common signature)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, mid: Optional[int] = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1×1 (cin→mid) - 3×3 (mid, stride) - 1×1 (mid→cout) with BN, + shortcut, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1, mid: Optional[int] = None) -> None:
        super().__init__()
        mid = mid or cout // 4
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = conv3x3(mid, mid, stride)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


class ResBlockMoE(nn.Module):
    """The paper's ResBlock-MoE: y = MoE(x) + S(x) with no ReLU after the sum."""

    def __init__(self, moe: MoE, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.moe = moe
        self.skip = _shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.moe(x) + self.skip(x)


def _expert(block: Type[nn.Module], cin: int, cout: int, stride: int, width: int) -> nn.Module:
    if block is BasicBlock:
        return nn.Sequential(BasicBlock(cin, width, stride), BasicBlock(width, cout))
    return nn.Sequential(Bottleneck(cin, width * 4, stride, mid=width), Bottleneck(width * 4, cout, 1, mid=width))


class CIFARResNet(nn.Module):
    """A CIFAR ResNet; ``moe`` names a registered placement applied to stage ``position`` after construction."""

    def __init__(
        self,
        block: Type[nn.Module],
        layers: Sequence[int],
        num_classes: int = 100,
        in_channels: int = 3,
        width: int = 64,
        moe: str = "none",
        position: int = 4,
        num_experts: int = 4,
        k: int = 2,
        expert_width: Optional[int] = None,
        **moe_kwargs,
    ) -> None:
        super().__init__()
        if num_classes < 1 or in_channels < 1 or width < 1:
            raise ValueError("num_classes, in_channels and width must be positive")
        expansion = 4 if block is Bottleneck else 1
        widths = [width * 2**i for i in range(4)]
        self.block, self.width, self.depths = block, width, tuple(layers)
        self.stem = nn.Sequential(conv3x3(in_channels, width), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        cin = width
        self.stage_io: List[tuple] = []  # (in channels, out channels, stride) of each stage
        stages: List[nn.Module] = []
        for i, (w, n) in enumerate(zip(widths, layers)):
            stride = 1 if i == 0 else 2
            cout = w * expansion
            blocks = [block(cin, cout, stride, mid=w)] + [block(cout, cout, 1, mid=w) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            self.stage_io.append((cin, cout, stride))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        place(self, moe, position, num_experts=num_experts, k=k, expert_width=expert_width, **moe_kwargs)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.pool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def place(model: nn.Module, moe: str, position: int, **kw) -> nn.Module:
    """Apply the registered placement ``moe`` to stage ``position`` of a CIFAR ResNet (``none``: nothing)."""
    if moe == "none":
        return model
    if moe not in PLACEMENTS:
        raise ValueError(f"unknown MoE placement '{moe}'; choose none or one of: {', '.join(PLACEMENTS.names())}")
    if not isinstance(model, CIFARResNet):
        raise ValueError(f"placement '{moe}' needs a moecnn CIFAR ResNet (model.source=moecnn); for other models "
                         f"name the blocks with model.targets=[...]")
    if not 1 <= position <= 4:
        raise ValueError(f"position must be a stage number 1..4, got {position}")
    PLACEMENTS.get(moe)(model, position, **kw)
    return model


@PLACEMENTS.register("resblock")
def resblock_placement(model: "CIFARResNet", position: int, num_experts: int, k: int,
                       expert_width: Optional[int] = None, **moe_kwargs) -> None:
    """Stage p → ResBlockMoE: N experts of two residual blocks in→P→out, plus the skip S(x)."""
    cin, cout, stride = model.stage_io[position - 1]
    p = expert_width or max(1, round(PAPER_EXPERT_WIDTHS[position - 1] * model.width / 64))
    experts = [_expert(model.block, cin, cout, stride, p) for _ in range(num_experts)]
    for e in experts:
        for m in e.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    skip = ResBlockMoE(MoE(experts, k=k, **moe_kwargs), cin, cout, stride)
    for m in skip.skip.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    setattr(model, f"layer{position}", skip)


@PLACEMENTS.register("block")
def block_placement(model: "CIFARResNet", position: int, num_experts: int, k: int,
                    expert_width: Optional[int] = None, **moe_kwargs) -> None:
    """Every block of stage p → an MoE of re-initialised copies of that block."""
    targets = [f"layer{position}.{j}" for j in range(model.depths[position - 1])]
    moeify(model, targets, num_experts, k=k, init="reinit", **moe_kwargs)


@PLACEMENTS.register("conv")
def conv_placement(model: "CIFARResNet", position: int, num_experts: int, k: int,
                   expert_width: Optional[int] = None, **moe_kwargs) -> None:
    """Every 3×3 Conv2d of stage p → an MoE of re-initialised conv experts."""
    prefix = f"layer{position}."

    def is_conv3(name: str, m: nn.Module) -> bool:
        return name.startswith(prefix) and isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)

    moeify(model, is_conv3, num_experts, k=k, init="reinit", **moe_kwargs)


@MODELS.register("resnet18")
def resnet18(**kw) -> CIFARResNet:
    """CIFAR ResNet-18 (≈11.2 M parameters dense at 100 classes)."""
    return CIFARResNet(BasicBlock, (2, 2, 2, 2), **kw)


@MODELS.register("resnet34")
def resnet34(**kw) -> CIFARResNet:
    return CIFARResNet(BasicBlock, (3, 4, 6, 3), **kw)


@MODELS.register("resnet50")
def resnet50(**kw) -> CIFARResNet:
    return CIFARResNet(Bottleneck, (3, 4, 6, 3), **kw)


@MODELS.register("wide_resnet18_2")
def wide_resnet18_2(**kw) -> CIFARResNet:
    """ResNet-18 with every stage twice as wide (128/256/512/1024)."""
    kw.setdefault("width", 128)
    return CIFARResNet(BasicBlock, (2, 2, 2, 2), **kw)


@MODELS.register("resnet10_tiny")
def resnet10_tiny(**kw) -> CIFARResNet:
    """A small ResNet (one block per stage, width 16) for CPU demos and tests."""
    kw.setdefault("width", 16)
    return CIFARResNet(BasicBlock, (1, 1, 1, 1), **kw)
