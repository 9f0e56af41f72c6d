"""Models: the paper's CIFAR ResNets and their MoE placements, any torchvision/timm classifier with MoE targets
(:func:`build_classifier`), and RetinaNet with MoE heads. Registries: ``MODELS`` (classifiers),
``DETECTORS``, ``PLACEMENTS``, ``SOURCES`` (see :mod:`moecnn.registry`)."""
from __future__ import annotations

from typing import List

from torch import nn

from ..registry import DETECTORS, MODELS
from . import cifar_resnet  # noqa: F401  (registers models and placements)
from .builder import adapt_small_input, build_classifier, load_init_weights, resolve_targets
from .cifar_resnet import BasicBlock, Bottleneck, CIFARResNet, ResBlockMoE
from .config import DetectorConfig, ModelConfig, MoEConfig, moe_kwargs, parse_balance

try:  # detection models register themselves when their module is present
    from . import retinanet  # noqa: F401
except ImportError as _err:  # pragma: no cover - only when torchvision detection is unavailable
    if "retinanet" not in str(_err):
        raise


def create_model(name: str, **kwargs) -> nn.Module:
    """A registered classifier or detector by name, e.g. ``create_model("resnet18", num_classes=100,
    moe="resblock", position=4, num_experts=4, k=2, balance="kl")``."""
    if name in DETECTORS:
        return DETECTORS.get(name)(**kwargs)
    return MODELS.get(name)(**kwargs)


def list_models() -> List[str]:
    return sorted(MODELS.names() + DETECTORS.names())


def build_model(cfg: ModelConfig, num_classes: int, in_channels: int = 3) -> nn.Module:
    """A classifier from a :class:`ModelConfig` (see :func:`build_classifier`)."""
    return build_classifier(cfg, num_classes, in_channels)


__all__ = [
    "create_model", "list_models", "build_model", "build_classifier", "adapt_small_input", "load_init_weights",
    "resolve_targets", "ModelConfig", "DetectorConfig", "MoEConfig", "moe_kwargs", "parse_balance", "CIFARResNet",
    "BasicBlock", "Bottleneck", "ResBlockMoE",
]
