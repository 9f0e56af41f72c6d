"""moecnn: sparsely-gated mixture-of-experts layers for interpretable CNNs.

Reproduces and extends Pavlitska, Hubschneider, Struppek, Zöllner, "Sparsely-gated Mixture-of-Expert
Layers for CNN Interpretability", IJCNN 2023 (arXiv 2204.10598).
"""
from .layers import (
    MoE,
    RoutingRecord,
    aux_loss,
    disable_experts,
    force_expert,
    moe_layers,
    moeify,
    reset_routing,
    routing,
    routing_override,
    set_dense,
    set_k,
    set_routing,
)
from .registry import CONSTRAINTS, DATASETS, DETECTORS, GATES, LOSSES, MODELS, PLACEMENTS, SOURCES, TASKS

__version__ = "0.1.0"

__all__ = [
    "MoE", "RoutingRecord", "moeify", "moe_layers", "routing", "aux_loss", "set_routing", "set_k",
    "force_expert", "set_dense", "disable_experts", "reset_routing", "routing_override",
    "GATES", "LOSSES", "CONSTRAINTS", "MODELS", "DETECTORS", "PLACEMENTS", "SOURCES", "TASKS", "DATASETS",
    "create_model", "list_models", "from_pretrained",
]


def create_model(name: str, **kwargs):
    """Build a registered model by name (see :func:`moecnn.models.create_model`)."""
    from .models import create_model as _create

    return _create(name, **kwargs)


def from_pretrained(source, device: str = "cpu"):
    """A model exported with ``moecnn export`` (a folder) or pushed to the Hugging Face Hub (a repo id)."""
    from .export import from_pretrained as _load

    return _load(source, device)


def list_models():
    from .models import list_models as _list

    return _list()
