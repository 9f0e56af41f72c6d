"""Model zoo: CIFAR ResNets with MoE placements (and detection models), built by name from a registry."""
from __future__ import annotations

from typing import List

from torch import nn

from ..registry import MODELS
from . import cifar_resnet  # noqa: F401  (registers models)
from .cifar_resnet import BasicBlock, Bottleneck, CIFARResNet, ResBlockMoE
from .config import ModelConfig, parse_balance

try:  # detection models register themselves when their module is present
    from . import retinanet  # noqa: F401
except ImportError as _err:  # pragma: no cover - only when torchvision detection is unavailable
    if "retinanet" not in str(_err):
        raise


def create_model(name: str, **kwargs) -> nn.Module:
    """``create_model("resnet18", num_classes=100, moe="resblock", position=4, num_experts=4, k=2, balance="kl")``."""
    return MODELS.get(name)(**kwargs)


def list_models() -> List[str]:
    return MODELS.names()


def build_model(cfg: ModelConfig, num_classes: int, in_channels: int = 3) -> nn.Module:
    """Build a classification model from a :class:`ModelConfig`."""
    kw = dict(num_classes=num_classes, in_channels=in_channels, moe=cfg.moe)
    if cfg.width is not None:
        kw["width"] = cfg.width
    if cfg.moe != "none":
        kw.update(
            position=cfg.position,
            num_experts=cfg.num_experts,
            k=cfg.k,
            gate=cfg.gate,
            balance=parse_balance(cfg.balance, cfg.balance_weight),
            threshold=cfg.threshold,
            decay=cfg.decay,
            noisy=cfg.noisy,
            capacity_factor=cfg.capacity_factor,
        )
        if cfg.stacked:
            kw["stacked"] = True
        if cfg.moe == "resblock":
            kw["expert_width"] = cfg.expert_width
    return create_model(cfg.name, **kw)


__all__ = [
    "create_model", "list_models", "build_model", "ModelConfig", "parse_balance", "CIFARResNet",
    "BasicBlock", "Bottleneck", "ResBlockMoE",
]
