"""Typed model configuration (OmegaConf structured configs).

:class:`MoEConfig` holds every option of an MoE layer once; the task model sections extend it
(:class:`ModelConfig` for classification, :class:`DetectorConfig` for detection), and :func:`moe_kwargs` turns it
into the keyword arguments of :class:`moecnn.MoE` — the one place where config keys meet the layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

INITS = ("reinit", "copy", "copy_noise")


@dataclass
class MoEConfig:
    """Options of every MoE layer a model gets (placements and ``targets`` alike)."""

    num_experts: int = 4
    k: int = 2  # experts per image (per unit for spatial gates)
    gate: Optional[str] = None  # registered gate; None = the model's default (gap_fc; detection heads: relu_gap_fc / spatial)
    balance: str = "kl"  # "none", a loss/constraint name, or "name:weight,name:weight"
    balance_weight: float = 0.5  # w_aux for losses named without a weight
    threshold: Optional[float] = None  # hard constraint τ (None: 0.5 relative, 0.3 mean)
    decay: Optional[float] = None  # hard-constraint state decay (None = reference, never decays)
    noisy: Optional[bool] = None  # noisy top-k (None: on for soft, off for hard constraints)
    capacity_factor: Optional[float] = None  # None = exact execution; float = static-capacity training (drops overflow)
    stacked: Optional[bool] = None  # None = the layer's default execution; true/false force grouped/per-expert experts
    targets: List[str] = field(default_factory=list)  # module paths or glob patterns that become MoEs of copies
    init: str = "reinit"  # experts made from a target: reinit | copy | copy_noise
    init_noise: float = 0.01  # copy_noise: Gaussian noise of this × each tensor's std


@dataclass
class ModelConfig(MoEConfig):
    """Classification model: a source, a name, optional MoE placement and ``targets``, optional warm start."""

    source: str = "moecnn"  # moecnn (CIFAR ResNets of the paper) | torchvision | timm
    name: str = "resnet18"  # model name within the source
    width: Optional[int] = None  # moecnn: base width (stage 1); None = the model's default
    moe: str = "none"  # moecnn: registered placement (none | resblock | block | conv), or none
    position: int = 4  # moecnn: stage 1..4 that the placement turns into an MoE
    expert_width: Optional[int] = None  # resblock placement: expert width P (None = the paper's 25/50/90/180)
    pretrained: bool = False  # torchvision/timm: the library's published weights (downloads them)
    small_input: bool = False  # torchvision/timm: stride-1 stem for small images (e.g. 32×32), see models/builder.py
    init_from: Optional[str] = None  # dense weights before the MoE is made: a run dir, a checkpoint, a state dict
    init_from_ignore: List[str] = field(default_factory=list)  # glob patterns of keys init_from leaves alone (e.g. fc.*)
    label_smoothing: float = 0.0  # cross-entropy label smoothing


@dataclass
class DetectorConfig(MoEConfig):
    """RetinaNet with MoE heads (``moecnn.DETECTORS``)."""

    name: str = "retinanet_resnet18_fpn_moe"
    num_classes: Optional[int] = None  # None → from the data (incl. background)
    balance_weight: float = 0.25
    moe_heads: str = "both"  # both | cls | reg | none
    routing: str = "level"  # level (per image per FPN level) | anchor (per anchor position)
    weights: Optional[str] = None  # local weights file, or "torchvision" (downloads)
    weights_backbone: Optional[str] = None
    freeze_backbone: bool = False
    trainable_backbone_layers: Optional[int] = None
    min_size: int = 608
    max_size: int = 1024
    anchor_sizes: Optional[List[int]] = None
    head_norm: str = "none"
    fpn_channels: int = 256
    head_convs: int = 4
    packed: Optional[bool] = None  # None: each expert runs once on all FPN levels packed into one map when the
    # towers have no normalisation (head_norm=none) and stacked/capacity_factor are unset, else once per level
    score_thresh: float = 0.05
    detections_per_img: int = 100


def parse_balance(spec: Any, default_weight: float) -> Optional[Dict[str, float]]:
    """``"kl"`` → {kl: w}; ``"kl:0.5,z_loss:0.001"`` → both; ``"none"``/"" → None."""
    if isinstance(spec, dict):
        return {str(k): float(v) for k, v in spec.items()}
    spec = (spec or "").strip()
    if spec in ("", "none"):
        return None
    out: Dict[str, float] = {}
    for part in spec.split(","):
        name, _, weight = part.strip().partition(":")
        try:
            out[name.strip()] = float(weight) if weight else default_weight
        except ValueError:
            raise ValueError(f"bad balance weight in '{part}': expected name:number, e.g. kl:0.5") from None
    return out


def moe_kwargs(m: Any) -> Dict[str, Any]:
    """:class:`moecnn.MoE` keyword arguments of an :class:`MoEConfig` (``k`` and the experts are the caller's)."""
    kw: Dict[str, Any] = dict(balance=parse_balance(m.balance, m.balance_weight), balance_weight=m.balance_weight,
                              threshold=m.threshold, decay=m.decay, noisy=m.noisy, capacity_factor=m.capacity_factor)
    if m.gate is not None:
        kw["gate"] = m.gate
    if m.stacked is not None:
        kw["stacked"] = bool(m.stacked)
    return kw


def check_moe(m: Any, where: str = "model") -> None:
    """One-line errors for MoE options (shared by the task validators)."""
    if m.num_experts < 1:
        raise ValueError(f"{where}.num_experts must be >= 1, got {m.num_experts}")
    if not 1 <= m.k <= m.num_experts:
        raise ValueError(f"{where}.k={m.k} must be between 1 and {where}.num_experts={m.num_experts}")
    if m.init not in INITS:
        raise ValueError(f"{where}.init must be one of {', '.join(INITS)}, got '{m.init}'")
    if m.capacity_factor is not None and m.capacity_factor <= 0:
        raise ValueError(f"{where}.capacity_factor must be > 0 or null, got {m.capacity_factor}")
    parse_balance(m.balance, m.balance_weight)
