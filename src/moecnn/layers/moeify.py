"""Turn any named submodule of any model (torchvision, timm, your own) into an MoE of copies of itself."""
from __future__ import annotations

import copy
from typing import Callable, List, Sequence, Union

import torch
from torch import nn

from .moe import MoE

Target = Union[str, Sequence[str], Callable[[str, nn.Module], bool]]


def _reinit(module: nn.Module) -> None:
    for m in module.modules():
        if hasattr(m, "reset_parameters") and callable(m.reset_parameters):
            m.reset_parameters()


@torch.no_grad()
def _add_noise(module: nn.Module, scale: float, generator: torch.Generator | None) -> None:
    for p in module.parameters():
        if p.numel() > 1 and p.is_floating_point():
            std = p.float().std().item() or 1.0
            p.add_(torch.randn(p.shape, generator=generator).to(p) * std * scale)


def _resolve(model: nn.Module, target: Target) -> List[str]:
    names = dict(model.named_modules())
    if callable(target):
        found = [n for n, m in names.items() if n and target(n, m)]
        # keep outermost matches only (a matched module's children are inside its experts)
        found = [n for n in found if not any(n.startswith(o + ".") for o in found if o != n)]
    else:
        found = [target] if isinstance(target, str) else list(target)
        for n in found:
            if n not in names or not n:
                sample = ", ".join(list(n for n in names if n)[:12])
                raise ValueError(f"model has no submodule '{n}'; submodules include: {sample}, ...")
    if not found:
        raise ValueError("moeify target matched no submodule")
    return found


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def moeify(
    model: nn.Module,
    target: Target,
    num_experts: int,
    k: int = 2,
    init: str = "reinit",
    noise: float = 0.01,
    seed: int | None = None,
    **moe_kwargs,
) -> nn.Module:
    """Replace each target submodule by ``MoE([copy_1 .. copy_N])`` in place and return the model.

    Args:
        target: dotted module name (``"layer4.1"``), a list of names, or a predicate ``f(name, module)``
            (e.g. every Conv2d of a stage for ConvMoE).
        init: ``"reinit"`` (each copy re-initialised with ``reset_parameters``), ``"copy"`` (exact copies:
            for pretrained weights, experts diverge through routing), or ``"copy_noise"`` (copies plus
            Gaussian noise of ``noise`` × each tensor's std).
        moe_kwargs: passed to :class:`MoE` (gate, balance, balance_weight, threshold, noisy, ...).
    """
    if init not in ("reinit", "copy", "copy_noise"):
        raise ValueError(f"init must be 'reinit', 'copy' or 'copy_noise', got '{init}'")
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive integer, got {num_experts}")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    for name in _resolve(model, target):
        original = model.get_submodule(name)
        if isinstance(original, MoE):
            raise ValueError(f"'{name}' is already an MoE layer")
        experts = []
        for _ in range(num_experts):
            e = copy.deepcopy(original)
            if init == "reinit":
                _reinit(e)
            elif init == "copy_noise":
                _add_noise(e, noise, gen)
            experts.append(e)
        layer = MoE(experts, k=k, **moe_kwargs)
        p = next(original.parameters(), None)
        if p is not None:
            layer.to(device=p.device)
        _set_submodule(model, name, layer)
    return model
