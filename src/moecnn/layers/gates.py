"""Gates: map a B×C×H×W feature map to per-image expert logits (B×N), or per-pixel logits (B×N×H×W).

Registered by name in :data:`moecnn.registry.GATES`; every gate is built as ``cls(in_channels, num_experts, **kw)``.
"""
from __future__ import annotations

import torch
from torch import nn

from ..registry import GATES


def _route(x: torch.Tensor) -> torch.Tensor:
    """Routing precision: float32, or float64 when the layer runs in float64."""
    return x if x.dtype == torch.float64 else x.float()


@GATES.register("gap_fc")
class GAPFCGate(nn.Module):
    """GAP → Linear(C→N): the paper's main gate ("GAP-FC")."""

    def __init__(self, in_channels: int, num_experts: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(_route(x).mean(dim=(2, 3)))


@GATES.register("conv_gap")
class ConvGAPGate(nn.Module):
    """Conv3×3 (no padding) → GAP, optionally → Linear ("Conv-GAP").

    ``hidden=None``: Conv(C→N) → GAP. ``hidden=256``: Conv(C→256) → GAP → Linear(256→N).
    Inputs smaller than 3×3 are padded so the gate works at every stage.
    """

    def __init__(self, in_channels: int, num_experts: int, hidden: int | None = None) -> None:
        super().__init__()
        out = hidden or num_experts
        self.conv = nn.Conv2d(in_channels, out, kernel_size=3, padding=0)
        self.fc = nn.Linear(hidden, num_experts) if hidden else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] < 3 or x.shape[-2] < 3:
            x = nn.functional.pad(x, (1, 1, 1, 1))
        h = _route(self.conv(x)).mean(dim=(2, 3))
        return self.fc(h) if self.fc is not None else h


@GATES.register("gap_mlp")
class GAPMLPGate(nn.Module):
    """GAP → Linear(C→hidden) → ReLU → Linear(hidden→N): a slightly richer per-image gate."""

    def __init__(self, in_channels: int, num_experts: int, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(_route(x).mean(dim=(2, 3)))


@GATES.register("relu_gap_fc")
class ReLUGAPFCGate(GAPFCGate):
    """ReLU → GAP → Linear(C→N): the gate of the paper's RetinaNet heads."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(_route(torch.relu(x)).mean(dim=(2, 3)))


@GATES.register("spatial")
class SpatialGate(nn.Module):
    """Conv1×1(C→N) per pixel (``patch=1``) or per g×g patch: logits B×N×H×W (beyond the paper).

    With a spatial gate every pixel is routed on its own; experts then run on every image (they must keep
    the spatial size) and are mixed per pixel with sparse top-k weights.
    """

    def __init__(self, in_channels: int, num_experts: int, patch: int = 1) -> None:
        super().__init__()
        self.patch = patch
        self.conv = nn.Conv2d(in_channels, num_experts, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.patch > 1:
            h, w = x.shape[-2:]
            pooled = nn.functional.avg_pool2d(x, self.patch, ceil_mode=True)
            logits = _route(self.conv(pooled))
            return nn.functional.interpolate(logits, size=(h, w), mode="nearest")
        return _route(self.conv(x))


def build_gate(gate: str | nn.Module, in_channels: int, num_experts: int, **kwargs) -> nn.Module:
    if isinstance(gate, nn.Module):
        return gate
    return GATES.get(gate)(in_channels, num_experts, **kwargs)
