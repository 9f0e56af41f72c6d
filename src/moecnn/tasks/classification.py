"""Image classification: any classifier (moecnn CIFAR ResNets, torchvision, timm) on any registered dataset."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..data.config import DataConfig
from ..layers import aux_loss, moe_layers, routing
from ..models.builder import EXTRAS
from ..models.config import ModelConfig, check_moe
from ..registry import PLACEMENTS, SOURCES, TASKS
from .base import Task, autocast

TTA_MODES = ("none", "flip")


def check_tta(tta: str) -> None:
    if tta not in TTA_MODES:
        raise ValueError(f"tta must be one of {', '.join(TTA_MODES)}, got '{tta}'")


def _pct(num: torch.Tensor, den: torch.Tensor) -> list:
    acc = (100.0 * num / den.clamp_min(1)).tolist()
    return [a if d > 0 else None for a, d in zip(acc, den.tolist())]


@torch.no_grad()
def evaluate(model: nn.Module, loader, num_classes: int, device: torch.device, precision: str = "fp32",
             class_to_super: Optional[Sequence[int]] = None, details: bool = False, tta: str = "none") -> Dict:
    """Top-1/top-5 in percent and mean loss; with ``details`` also per-class / per-superclass top-1.

    ``tta="flip"``: the logits are the mean of the model's logits for each image and its horizontal mirror."""
    check_tta(tta)
    was = model.training
    model.eval()
    tot = torch.zeros(num_classes, device=device)
    c1 = torch.zeros(num_classes, device=device)
    c5 = torch.zeros(num_classes, device=device)
    loss = torch.zeros((), device=device)
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, precision):
            out = model(x).float()
            if tta == "flip":
                out = 0.5 * (out + model(x.flip(-1)).float())
        loss += F.cross_entropy(out, y, reduction="sum")
        top = out.topk(min(5, out.shape[1]), dim=1).indices
        ones = torch.ones_like(y, dtype=torch.float)
        tot.index_add_(0, y, ones)
        c1.index_add_(0, y, (top[:, 0] == y).float())
        c5.index_add_(0, y, (top == y[:, None]).any(1).float())
    model.train(was)
    n = tot.sum().clamp_min(1)
    res = {"top1": (100 * c1.sum() / n).item(), "top5": (100 * c5.sum() / n).item(),
           "loss": (loss / n).item(), "images": int(tot.sum().item())}
    if details:
        res["per_class"] = _pct(c1, tot)
        if class_to_super is not None and len(class_to_super) == num_classes:
            sup = torch.as_tensor(list(class_to_super), device=device, dtype=torch.long)
            ns = int(sup.max().item()) + 1
            res["per_superclass"] = _pct(torch.zeros(ns, device=device).index_add_(0, sup, c1),
                                         torch.zeros(ns, device=device).index_add_(0, sup, tot))
    return res


@torch.no_grad()
def collect_routing(model: nn.Module, loader, device: Optional[torch.device] = None,
                    precision: str = "fp32") -> Dict[str, np.ndarray]:
    """Per-image routing over a whole loader (model in eval mode, current routing controls).

    Returns numpy arrays: ``labels`` (B,) int64, ``preds`` (B,) int64, ``layers`` (L,) str, and per MoE
    layer name L: ``L/logits`` B×N float32 raw gate logits (before noise/top-k), ``L/weights`` B×N float32
    sparse gate weights (rows sum to 1), ``L/top1`` (B,) int64 expert with the largest weight.
    Spatial gates give B×N×H×W / B×H×W instead.
    """
    device = device or next(model.parameters()).device
    was = model.training
    model.eval()
    names = list(moe_layers(model))
    acc: Dict[str, list] = {"labels": [], "preds": []}
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        with autocast(device, precision):
            out = model(x)
        acc["labels"].append(y.cpu())
        acc["preds"].append(out.argmax(1).cpu())
        recs = routing(model)
        for name in names:
            rec = recs[name]
            acc.setdefault(f"{name}/logits", []).append(rec.logits.float().cpu())
            acc.setdefault(f"{name}/weights", []).append(rec.weights.float().cpu())
            acc.setdefault(f"{name}/top1", []).append(rec.weights.argmax(1).cpu())
    model.train(was)
    res = {k: torch.cat(v).numpy() for k, v in acc.items()}
    res["labels"] = res["labels"].astype(np.int64)
    res["layers"] = np.array(names, dtype=str)
    return res


@TASKS.register("classification")
class Classification(Task):
    name = "classification"
    data_schema = DataConfig
    model_schema = ModelConfig
    metric = "top1"
    splits = ("val", "test")

    @classmethod
    def validate(cls, cfg: DictConfig) -> None:
        m, d = cfg.model, cfg.data
        if m.source not in SOURCES:
            raise ValueError(f"model.source must be one of {', '.join(SOURCES.names())}, got '{m.source}'")
        if m.moe != "none" and m.moe not in PLACEMENTS:
            raise ValueError(f"model.moe must be none or one of {', '.join(PLACEMENTS.names())}, got '{m.moe}'")
        if m.moe != "none" and m.source != "moecnn":
            raise ValueError(f"model.moe={m.moe} is a placement in the moecnn CIFAR ResNets; for "
                             f"model.source={m.source} name the MoE blocks with model.targets=[...] (and model.moe=none)")
        if m.moe != "none" or m.targets:
            check_moe(m)
        if not 1 <= m.position <= 4:
            raise ValueError(f"model.position must be a stage number 1..4, got {m.position}")
        if not 0 <= m.label_smoothing < 1:
            raise ValueError(f"model.label_smoothing must be in [0, 1), got {m.label_smoothing}")
        if d.val_size < 0:
            raise ValueError(f"data.val_size must be >= 0 (0 = no validation split), got {d.val_size}")
        for name in ("crop_padding", "cutout"):
            if d.augment[name] < 0:
                raise ValueError(f"data.augment.{name} must be >= 0 (0 = off), got {d.augment[name]}")

    @classmethod
    def requirements(cls, cfg: DictConfig) -> List[Tuple[str, str]]:
        src = cfg.model.source
        return [(src, EXTRAS[src])] if src in EXTRAS else []

    # ------------------------------------------------------------------ data and model
    def setup(self, train: bool = True) -> None:
        from ..data import build_data

        self.data_cfg = OmegaConf.to_object(self.cfg.data)
        b = self.bundle = build_data(self.data_cfg)
        self.info = {"num_classes": b.num_classes, "in_channels": b.in_channels, "dataset": b.name,
                     "class_names": list(b.class_names), "superclass_names": list(b.superclass_names or []),
                     "class_to_super": list(b.class_to_super or []), "mean": list(b.mean), "std": list(b.std),
                     "image_size": b.image_size}

    def _loader(self, ds, batch_size: int, train: bool, seed: int = 0, rank: int = 0, world_size: int = 1):
        from ..data import make_loader

        b, d = self.bundle, self.data_cfg
        return make_loader(ds, batch_size, train=train, device=self.device, mean=b.mean, std=b.std,
                           augment=d.augment if train else None, channels_last=self.channels_last, seed=seed,
                           rank=rank, world_size=world_size, num_workers=d.num_workers, gpu_resident=d.gpu_resident)

    def train_loader(self, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        loader = self._loader(self.bundle.train, batch_size, True, seed, rank, world_size)
        if len(loader) == 0:
            raise ValueError(f"the training set ({len(self.bundle.train)} images) is smaller than one batch "
                             f"({batch_size}); lower optim.batch_size")
        return loader

    def build_model(self, for_loading: bool = False) -> nn.Module:
        from ..models.builder import build_classifier

        m = self.cfg.model
        if for_loading:  # the checkpoint supplies every tensor: no warm start, no download
            m = OmegaConf.merge(m, {"init_from": None, "pretrained": False})
        return build_classifier(m, self.info["num_classes"], self.info["in_channels"])

    # ------------------------------------------------------------------ training step
    def losses(self, model, batch):
        x, y = batch
        out = model(x)
        terms = {"task": F.cross_entropy(out.float(), y, label_smoothing=float(self.cfg.model.label_smoothing))}
        terms.update(aux_loss(self.layers)[1] if self.layers else {})
        return terms, {"correct": (out.argmax(1) == y).sum(), "seen": torch.full((), y.shape[0], device=y.device)}

    def batch_size(self, batch) -> int:
        return int(batch[1].shape[0])

    def reference_loss(self) -> float:
        """Cross-entropy of a uniform guess, ln(classes)."""
        return float(np.log(max(self.info["num_classes"], 2)))

    def train_summary(self, counts: Dict[str, float]) -> Dict[str, float]:
        return {"top1": 100 * counts["correct"] / max(counts["seen"], 1)}

    # ------------------------------------------------------------------ evaluation
    def has_split(self, split: str) -> bool:
        ds = getattr(self.bundle, split, None)
        return ds is not None and len(ds) > 0

    def eval_loader(self, split: str, batch_size: int):
        if not self.has_split(split):
            other = "test" if split == "val" else "val"
            raise ValueError(f"the run's data has no '{split}' split (empty or data.val_size=0); use --split {other}")
        return self._loader(getattr(self.bundle, split), batch_size, False)

    def eval_batch_size(self, train_batch: Optional[int] = None) -> int:
        return max(train_batch or 0, 256) if train_batch else 512

    def evaluate(self, model, split: str, batch_size: int, details: bool = False, tta: str = "none") -> Dict[str, Any]:
        c2s = self.bundle.class_to_super
        return evaluate(model, self.eval_loader(split, batch_size), self.bundle.num_classes, self.device,
                        self.cfg.train.precision, c2s, details=details, tta=tta)

    def routing_dump(self, model, split: str, batch_size: int) -> Dict[str, np.ndarray]:
        b = self.bundle
        rt = collect_routing(model, self.eval_loader(split, batch_size), self.device, self.cfg.train.precision)
        if b.class_to_super is not None:
            rt["superlabels"] = np.asarray(b.class_to_super, dtype=np.int64)[rt["labels"]]
        rt["class_names"] = np.array(list(b.class_names), dtype=str)
        if b.superclass_names:
            rt["superclass_names"] = np.array(list(b.superclass_names), dtype=str)
        return rt

    def probe(self, model, size: int) -> Optional[Dict[str, np.ndarray]]:
        """The first ``size`` images of the validation split (else the test split), routed as evaluated."""
        split = "val" if self.has_split("val") else "test"
        ds = getattr(self.bundle, split)
        n = min(size, len(ds))
        if n == 0 or not self.layers:
            return None
        from ..data.datasets import _take

        sub = _take(ds, torch.arange(n))
        rt = collect_routing(model, self._loader(sub, 256, False), self.device, self.cfg.train.precision)
        out = {"labels": rt["labels"], "layers": rt["layers"], "split": np.array(split)}
        if self.bundle.class_to_super is not None:
            out["superlabels"] = np.asarray(self.bundle.class_to_super, dtype=np.int64)[rt["labels"]]
        for name in rt["layers"]:
            w = rt[f"{name}/weights"]
            w = w.mean((2, 3)) if w.ndim == 4 else w
            out[f"{name}/weights"] = w
        return out
