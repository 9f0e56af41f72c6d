"""Name -> builder registries (timm style) for gates, balancing losses, hard constraints and models.

Every variant the library ships is registered here by name, so configs and the CLI can refer to it and
tests can be parametrised over all of them. Users add their own with the ``register`` decorator.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, List, TypeVar

T = TypeVar("T")


class Registry:
    """A mapping from names to builders with clear errors for unknown names."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: Dict[str, Any] = {}

    def register(self, name: str | None = None, *, override: bool = False) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            key = name or getattr(obj, "__name__")
            if key in self._items and not override:
                raise KeyError(f"{self.kind} '{key}' is already registered; pass override=True to replace it")
            self._items[key] = obj
            return obj

        return deco

    def get(self, name: str) -> Any:
        try:
            return self._items[name]
        except KeyError:
            raise ValueError(
                f"unknown {self.kind} '{name}'; choose one of: {', '.join(sorted(self._items))}"
            ) from None

    def names(self) -> List[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind}: {', '.join(self.names())})"


# One calling convention per registry:
GATES = Registry("gate")  # builder(in_channels, num_experts, **kw) -> nn.Module returning B×N (or B×N×H×W) logits
LOSSES = Registry("balancing loss")  # fn(RoutingStats) -> scalar tensor
CONSTRAINTS = Registry("hard constraint")  # HardConstraint subclass(num_experts, threshold, decay)
MODELS = Registry("model")  # classifiers: builder(num_classes, in_channels, **kw) -> nn.Module (moecnn source)
DETECTORS = Registry("detector")  # builder(num_classes, **kw) -> detector returning a loss dict in training
PLACEMENTS = Registry("MoE placement")  # fn(model, position, num_experts, k, expert_width, **moe_kwargs), in place
SOURCES = Registry("model source")  # fn(name, num_classes, in_channels, cfg) -> dense classifier
DATASETS = Registry("dataset")  # builder(DataConfig) -> DataBundle
TASKS = Registry("task")  # Task subclass (see moecnn.tasks)
