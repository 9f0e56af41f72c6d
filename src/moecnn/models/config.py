"""Typed model configuration (an OmegaConf structured config)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional


@dataclass
class ModelConfig:
    name: str = "resnet18"  # registered model: resnet18 | resnet34 | resnet50 | wide_resnet18_2 | resnet10_tiny
    width: Optional[int] = None  # base width (stage 1); None = the model's default
    moe: str = "resblock"  # none | resblock | block | conv
    position: int = 4  # stage 1..4 that becomes the MoE
    num_experts: int = 4
    k: int = 2
    gate: str = "gap_fc"  # registered gate
    balance: str = "kl"  # "none", a loss/constraint name, or "name:weight,name:weight"
    balance_weight: float = 0.5  # w_aux for losses named without a weight
    threshold: Optional[float] = None  # hard constraint τ (None: 0.5 relative, 0.3 mean)
    decay: Optional[float] = None  # hard-constraint state decay (None = reference, never decays)
    noisy: Optional[bool] = None  # noisy top-k (None: on for soft, off for hard constraints)
    expert_width: Optional[int] = None  # ResBlock-MoE expert width P (None = the paper's 25/50/90/180)
    capacity_factor: Optional[float] = None  # None = exact dispatch; float = static-capacity dispatch (training)
    stacked: bool = False  # run the experts as one channel-stacked grouped network (fewer, larger kernels)


def parse_balance(spec: str, default_weight: float) -> Optional[Dict[str, float]]:
    """``"kl"`` → {kl: w}; ``"kl:0.5,z_loss:0.001"`` → both; ``"none"``/"" → None."""
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
