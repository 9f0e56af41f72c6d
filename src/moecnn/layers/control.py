"""Reading routing and auxiliary losses from any model, and inference controls on a model or one layer.

Everything works on the MoE layers found with ``model.modules()``: no global state, no hooks.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Dict, Iterator, Optional, Sequence, Tuple

import torch
from torch import nn

from .moe import MoE, RoutingRecord


def moe_layers(model: nn.Module) -> Dict[str, MoE]:
    """All MoE layers of ``model`` by qualified name (``""`` when ``model`` is itself an MoE)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoE)}


def routing(model: nn.Module | Dict[str, MoE]) -> Dict[str, RoutingRecord]:
    """The routing record of every MoE layer's last forward (``model`` may also be the dict that
    :func:`moe_layers` returned, which saves walking the module tree in a training loop)."""
    layers = model if isinstance(model, dict) else moe_layers(model)
    return {name: m.record for name, m in layers.items() if m.record is not None}


def aux_loss(model: nn.Module | Dict[str, MoE]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Total weighted auxiliary loss of the last forward and each term, keyed ``"<layer>/<loss>"``
    (``model`` may also be a :func:`moe_layers` dict)."""
    terms: Dict[str, torch.Tensor] = {}
    for name, rec in routing(model).items():
        for loss_name, val in rec.aux_losses.items():
            terms[f"{name or 'moe'}/{loss_name}"] = val
    if not terms:
        mods = list(model.values()) if isinstance(model, dict) else [model]
        p = next((q for m in mods for q in m.parameters()), None)
        return torch.zeros((), device=p.device if p is not None else None), terms
    return torch.stack(list(terms.values())).sum(), terms


def _layers(model: nn.Module, layer: Optional[str]) -> Dict[str, MoE]:
    layers = moe_layers(model)
    if layer is not None:
        if layer not in layers:
            raise ValueError(f"no MoE layer named '{layer}'; layers: {', '.join(layers) or '(none)'}")
        layers = {layer: layers[layer]}
    if not layers:
        raise ValueError("the model has no MoE layers")
    return layers


def set_routing(
    model: nn.Module,
    k: int | None = None,
    force: int | None = None,
    dense: bool = False,
    disabled: Sequence[int] = (),
    layer: str | None = None,
) -> None:
    """Set inference controls on every MoE layer (or the one named ``layer``)."""
    for m in _layers(model, layer).values():
        m.set_controls(k=k, force=force, dense=dense, disabled=disabled)


def set_k(model: nn.Module, k: int, layer: str | None = None) -> None:
    set_routing(model, k=k, layer=layer)


def force_expert(model: nn.Module, expert: int, layer: str | None = None) -> None:
    set_routing(model, force=expert, layer=layer)


def set_dense(model: nn.Module, dense: bool = True, layer: str | None = None) -> None:
    set_routing(model, dense=dense, layer=layer)


def disable_experts(model: nn.Module, experts: Sequence[int], layer: str | None = None) -> None:
    set_routing(model, disabled=experts, layer=layer)


def reset_routing(model: nn.Module) -> None:
    for m in moe_layers(model).values():
        m.reset_controls()


@contextlib.contextmanager
def routing_override(model: nn.Module, **controls) -> Iterator[nn.Module]:
    """``with routing_override(model, k=1): ...`` — controls apply inside the block, then are restored."""
    layers = moe_layers(model)
    saved = {n: (m.k_override, m.forced_expert, m.dense, m.disabled) for n, m in layers.items()}
    try:
        set_routing(model, **controls)
        yield model
    finally:
        for n, m in layers.items():
            k, f, d, dis = saved[n]
            m.set_controls(k=k, force=f, dense=d, disabled=dis)


@dataclasses.dataclass(frozen=True)
class RoutingControls:
    """One inference setting of the MoE layers, from the command line down to the layer: test-time ``k``, one
    ``force``d expert, ``dense`` equal weights, ``disabled`` experts, on every layer or the one named ``layer``."""

    k: Optional[int] = None
    force: Optional[int] = None
    dense: bool = False
    disabled: Tuple[int, ...] = ()
    layer: Optional[str] = None

    @property
    def active(self) -> bool:
        return self.k is not None or self.force is not None or self.dense or bool(self.disabled)

    def kwargs(self) -> Dict[str, object]:
        return {"k": self.k, "force": self.force, "dense": self.dense, "disabled": list(self.disabled),
                "layer": self.layer}

    def tag(self) -> str:
        """File-name tag: ``k1``, ``force3``, ``disable0-2``, ``dense`` joined by ``_`` (plus ``@layer``)."""
        parts = ([f"k{self.k}"] if self.k is not None else []) + ([f"force{self.force}"] if self.force is not None else [])
        parts += ([f"disable{'-'.join(map(str, self.disabled))}"] if self.disabled else []) + (["dense"] if self.dense else [])
        return "_".join(parts) + (f"@{self.layer}" if self.layer else "")

    def apply(self, model: nn.Module):
        """``with controls.apply(model): ...`` (no change when nothing is set)."""
        return routing_override(model, **self.kwargs()) if self.active else contextlib.nullcontext(model)
