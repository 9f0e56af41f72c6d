"""MoE building blocks: the layer, gates, balancing, controls and moeify."""
from .balance import HardConstraint, RoutingStats
from .control import (
    RoutingControls,
    aux_loss,
    disable_experts,
    force_expert,
    moe_layers,
    reset_routing,
    routing,
    routing_override,
    set_dense,
    set_k,
    set_routing,
)
from .gates import build_gate
from .moe import MoE, RoutingRecord
from .moeify import moeify
from .stacked import StackedExperts

__all__ = [
    "MoE", "RoutingRecord", "RoutingStats", "HardConstraint", "build_gate", "moeify", "moe_layers",
    "routing", "aux_loss", "set_routing", "set_k", "force_expert", "set_dense", "disable_experts",
    "reset_routing", "routing_override", "StackedExperts", "RoutingControls",
]
