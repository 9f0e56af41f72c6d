"""The :class:`Task` interface: what one kind of problem supplies to the one training loop and evaluation entry.

A task owns its config sections (``data_schema``, ``model_schema``), builds its data and model, computes its
losses as a dict (heads own their losses, the MoE auxiliary loss included) and evaluates. Everything else —
devices, DDP, precision, ``torch.compile``, optimiser, schedule, checkpoints, resume, logging — is the loop's
(:mod:`moecnn.train.loop`) and the same for every task. Tasks are registered in :data:`moecnn.registry.TASKS`.
"""
from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional, Tuple

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from ..layers import RoutingRecord, moe_layers, routing


def autocast(device: torch.device, precision: str = "fp32"):
    """bf16/fp16 autocast on CUDA (``train.precision``); the CPU always runs fp32. The one autocast of the
    training loop and of every task's evaluation."""
    if torch.device(device).type == "cuda" and precision in ("bf16", "fp16"):
        return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()


class Task:
    name: ClassVar[str]
    data_schema: ClassVar[type]
    model_schema: ClassVar[type]
    metric: ClassVar[str]  # the headline metric of evaluate() (selects best.pt; shown in progress lines)
    splits: ClassVar[Tuple[str, ...]]  # evaluation splits, the one reported last (final.json, moecnn eval) last

    def __init__(self, cfg: DictConfig, run_dir: Optional[Path] = None, device: torch.device = torch.device("cpu"),
                 channels_last: bool = False) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.info: Dict[str, Any] = {}  # what rebuilding the model needs without the data (stored in checkpoints)
        self.layers: Dict[str, nn.Module] = {}

    # ------------------------------------------------------------------ config
    @classmethod
    def validate(cls, cfg: DictConfig) -> None:
        """One-line ``ValueError`` for bad task-specific settings (the shared sections are checked elsewhere)."""

    @classmethod
    def requirements(cls, cfg: DictConfig) -> List[Tuple[str, str]]:
        """(importable module, the moecnn extra that installs it) pairs this config needs."""
        return []

    @classmethod
    def check_requirements(cls, cfg: DictConfig) -> None:
        for module, extra in cls.requirements(cfg):
            if importlib.util.find_spec(module) is None:
                raise ValueError(f"this config needs the '{module}' package: pip install \"moecnn[{extra}]\"")

    # ------------------------------------------------------------------ data and model
    def setup(self, train: bool = True) -> None:
        """Build the datasets (training split only when ``train``) and fill :attr:`info`."""
        raise NotImplementedError

    def train_loader(self, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        """This rank's training batches: an iterable with ``len()`` and ``set_epoch(epoch)``."""
        raise NotImplementedError

    def build_model(self, for_loading: bool = False) -> nn.Module:
        """The model (``for_loading``: only the architecture; a checkpoint supplies every tensor)."""
        raise NotImplementedError

    def bind(self, model: nn.Module) -> nn.Module:
        """Remember the (unwrapped) model's MoE layers for :meth:`losses` and :meth:`records`."""
        self.layers = moe_layers(model)
        return model

    # ------------------------------------------------------------------ training step
    def losses(self, model: nn.Module, batch) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """(loss terms — the loss is their sum, each logged as ``loss/<name>`` —, counts summed over the epoch)."""
        raise NotImplementedError

    def batch_size(self, batch) -> int:
        raise NotImplementedError

    def train_summary(self, counts: Dict[str, float]) -> Dict[str, float]:
        """Epoch metrics from the summed counts (e.g. top-1 from correct / seen)."""
        return {}

    def reference_loss(self) -> Optional[float]:
        """A loss no sensible training exceeds by far (divergence warnings); None = the first epoch's loss."""
        return None

    def records(self) -> Dict[str, RoutingRecord]:
        """Routing of the last forward by unit name (one MoE layer, or one layer at one FPN level)."""
        return routing(self.layers)

    # ------------------------------------------------------------------ evaluation
    def eval_batch_size(self, train_batch: Optional[int] = None) -> int:
        """Evaluation batch when ``train.eval_batch_size`` is unset (``train_batch``: the per-rank training batch)."""
        return train_batch or 8

    def evaluate(self, model: nn.Module, split: str, batch_size: int, details: bool = False,
                 tta: str = "none") -> Dict[str, Any]:
        """Metrics of ``model`` (eval mode, its current routing controls) on ``split``."""
        raise NotImplementedError

    def has_split(self, split: str) -> bool:
        raise NotImplementedError

    def routing_dump(self, model: nn.Module, split: str, batch_size: int) -> Optional[Dict[str, np.ndarray]]:
        """Per-image routing arrays of ``split`` for ``moecnn analyze`` (None: the task has its own analysis)."""
        return None

    def probe(self, model: nn.Module, size: int) -> Optional[Dict[str, np.ndarray]]:
        """Routing of a fixed set of ``size`` evaluation images (the same images at every call)."""
        return None
