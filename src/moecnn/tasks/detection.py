"""Object detection: RetinaNet with MoE heads (``moecnn.DETECTORS``) on COCO-format data or the generated shapes set.

The detector computes its own losses (torchvision's focal and box losses plus the heads' balancing loss as
``aux``); evaluation is COCO box AP on the validation split (faster-coco-eval, else pycocotools).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..data.config import DetectionDataConfig
from ..models.config import DetectorConfig, check_moe
from ..layers import aux_loss
from ..registry import DETECTORS, TASKS
from .base import Task, autocast


def _to_device(images, targets, device):
    images = [im.to(device, non_blocking=True) for im in images]
    if targets is not None:
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
    return images, targets


@torch.no_grad()
def evaluate_model(model, dataset, device: torch.device | str = "cpu", batch_size: int = 8,
                   max_images: Optional[int] = None, precision: str = "fp32", backend: str = "auto",
                   num_workers: int = 0) -> Dict[str, Any]:
    """COCO AP of ``model`` on ``dataset`` (a :class:`~moecnn.data.coco.CocoDetection`), plus how many detections
    each expert produced. Returns AP, AP50, AP75, AP_S, AP_M, AP_L, num_images, detections_per_expert."""
    from torch.utils.data import DataLoader, Subset

    from ..data.coco import coco_evaluate, collate_detection, detections_to_coco

    device = torch.device(device)
    was = model.training
    model.eval()
    n = len(dataset) if max_images is None else min(len(dataset), int(max_images))
    loader = DataLoader(Subset(dataset, range(n)), batch_size=batch_size, shuffle=False,
                        collate_fn=collate_detection, num_workers=num_workers)
    results, ids = [], []
    per_expert: Dict[int, int] = {}
    for images, targets in loader:
        images, _ = _to_device(images, None, device)
        with autocast(device, precision):
            outs = model(images)
        outs = [{k: v.float() if v.is_floating_point() else v for k, v in o.items()} for o in outs]
        img_ids = [int(t["image_id"]) for t in targets]
        results.extend(detections_to_coco(outs, img_ids, dataset.label_to_cat))
        for o in outs:
            if "experts" in o:
                for e in o["experts"].tolist():
                    per_expert[int(e)] = per_expert.get(int(e), 0) + 1
        ids.extend(img_ids)
    model.train(was)
    gt = dataset.subset_gt()
    keep = set(ids)
    gt["images"] = [im for im in gt["images"] if im["id"] in keep]
    gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] in keep]
    metrics = coco_evaluate(gt, results, backend=backend)
    metrics.update(num_images=len(ids), detections_per_expert={str(k): v for k, v in sorted(per_expert.items())})
    return metrics


class _ShardedSampler:
    """Only the batches of one rank (each rank still draws the same shuffled batch list)."""

    def __init__(self, sampler, rank: int, world: int) -> None:
        self.sampler, self.rank, self.world = sampler, rank, world

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        batches = list(self.sampler)
        n = len(batches) // self.world
        return iter(batches[self.rank: n * self.world: self.world])

    def __len__(self) -> int:
        return len(self.sampler) // self.world


class _DeviceBatches:
    def __init__(self, loader, device: torch.device) -> None:
        self.loader, self.device = loader, device

    def set_epoch(self, epoch: int) -> None:
        self.loader.batch_sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for images, targets in self.loader:
            yield _to_device(images, targets, self.device)


_DETECTOR_KEYS = ("num_experts", "k", "moe_heads", "routing", "gate", "balance", "balance_weight", "threshold",
                  "decay", "noisy", "capacity_factor", "stacked", "packed", "weights", "weights_backbone", "freeze_backbone",
                  "trainable_backbone_layers", "min_size", "max_size", "anchor_sizes", "head_norm", "fpn_channels",
                  "head_convs", "score_thresh", "detections_per_img")
_MOE_KEYS = ("num_experts", "k", "routing", "gate", "balance", "balance_weight", "threshold", "decay", "noisy",
             "capacity_factor", "stacked", "packed")


@TASKS.register("detection")
class Detection(Task):
    name = "detection"
    data_schema = DetectionDataConfig
    model_schema = DetectorConfig
    metric = "AP"
    splits = ("val",)

    @classmethod
    def validate(cls, cfg: DictConfig) -> None:
        m, d = cfg.model, cfg.data
        if m.name not in DETECTORS:
            raise ValueError(f"model.name must be a registered detector ({', '.join(DETECTORS.names())}), "
                             f"got '{m.name}'")
        if d.source not in ("coco", "shapes"):
            raise ValueError(f"data.source must be 'coco' or 'shapes', got '{d.source}'")
        if m.moe_heads not in ("both", "cls", "reg", "none"):
            raise ValueError(f"model.moe_heads must be both, cls, reg or none, got '{m.moe_heads}'")
        if m.routing not in ("level", "anchor"):
            raise ValueError(f"model.routing must be level or anchor, got '{m.routing}'")
        if (m.moe_heads != "none" and not m.name.endswith("_fpn")) or m.targets:
            check_moe(m)
        if m.moe_heads != "none" and not m.name.endswith("_fpn"):
            from ..models.retinanet import check_packed

            try:
                check_packed(m.packed, m.head_norm == "none", m.stacked is not None or m.capacity_factor is not None)
            except ValueError as e:
                raise ValueError(f"model.{e}".replace("packed=True", "packed=true")) from None
        if not 0 <= d.hflip <= 1:
            raise ValueError(f"data.hflip must be a probability in [0, 1], got {d.hflip}")

    @classmethod
    def requirements(cls, cfg: DictConfig) -> List[Tuple[str, str]]:
        import importlib.util

        if importlib.util.find_spec("faster_coco_eval") or importlib.util.find_spec("pycocotools"):
            return []
        return [("faster_coco_eval", "coco")]

    # ------------------------------------------------------------------ data and model
    def _paths(self) -> Dict[str, str]:
        d = self.cfg.data
        if d.source == "shapes":
            from ..data.shapes import generate_shapes

            s = d.shapes
            out = s.out or (str(self.run_dir / "data" / "shapes") if self.run_dir is not None else None)
            if out is None:
                raise ValueError("data.shapes.out is needed when no run directory is given")
            return generate_shapes(out, s.num_train, s.num_val, s.image_size, s.seed, list(s.size_mix), s.max_objects)
        return {"train_json": d.train_json, "train_images": d.train_images, "val_json": d.val_json,
                "val_images": d.val_images}

    def setup(self, train: bool = True) -> None:
        from ..data.coco import CocoDetection

        p, d = self._paths(), self.cfg.data
        self.train_ds = (CocoDetection(p["train_json"], p["train_images"], label_map=d.label_map, hflip=d.hflip,
                                       max_images=d.max_train_images, seed=int(self.cfg.train.seed))
                         if train else None)
        self.val_ds = CocoDetection(p["val_json"], p["val_images"], label_map=d.label_map,
                                    max_images=d.max_val_images)
        ref = self.train_ds or self.val_ds
        num_classes = self.cfg.model.num_classes or ref.num_classes
        self.info = {"num_classes": int(num_classes), "categories": {str(k): v for k, v in ref.categories.items()},
                     "dataset": d.source}

    def train_loader(self, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        from torch.utils.data import DataLoader

        from ..data.coco import GroupedBatchSampler, collate_detection

        ds, d = self.train_ds, self.cfg.data
        if d.aspect_ratio_grouping:
            sampler = GroupedBatchSampler(ds.aspect_ratios(), batch_size, shuffle=True, seed=seed)
        else:
            sampler = _Reseeded(ds, batch_size, seed)
        if world_size > 1:
            sampler = _ShardedSampler(sampler, rank, world_size)
        loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate_detection, num_workers=int(d.num_workers),
                            pin_memory=self.device.type == "cuda")
        if len(sampler) == 0:
            raise ValueError(f"the training set ({len(ds)} images) gives no batch of {batch_size} per rank; lower "
                             f"optim.batch_size")
        return _DeviceBatches(loader, self.device)

    def build_model(self, for_loading: bool = False) -> nn.Module:
        from ..layers import moeify
        from ..models.builder import resolve_targets
        from ..models.config import moe_kwargs
        from ..models.retinanet import uses_torchvision_coco_weights

        m = OmegaConf.to_container(self.cfg.model, resolve=True)
        kw = {k: m[k] for k in _DETECTOR_KEYS}
        kw["expert_noise"] = m["init_noise"]
        if kw.get("anchor_sizes") is not None:
            kw["anchor_sizes"] = tuple(kw["anchor_sizes"])
        if kw.get("balance") in (None, "none", ""):
            kw["balance"] = None
        if for_loading:  # rebuild the architecture only; the checkpoint supplies every tensor
            kw["frozen_bn"] = kw["weights"] is not None or kw["weights_backbone"] is not None or kw["freeze_backbone"]
            kw["torchvision_bn_eps"] = uses_torchvision_coco_weights(kw["weights"])
            kw["weights"] = kw["weights_backbone"] = None
        if m["name"].endswith("_fpn") or m["moe_heads"] == "none":
            kw = {k: v for k, v in kw.items() if k not in _MOE_KEYS}
            kw["moe_heads"] = "none"
        model = DETECTORS.get(m["name"])(num_classes=self.info["num_classes"], seed=int(self.cfg.train.seed), **kw)
        if m["targets"]:
            moeify(model, resolve_targets(model, m["targets"]), m["num_experts"], k=m["k"], init=m["init"],
                   noise=m["init_noise"], **moe_kwargs(self.cfg.model))
        return model

    # ------------------------------------------------------------------ training step
    def losses(self, model, batch):
        images, targets = batch
        terms = dict(model(images, targets))  # the heads' own losses, their balancing term as "aux"
        if self._other_layers:  # MoE layers from model.targets (e.g. in the backbone) add their balancing terms
            terms.update(aux_loss(self._other_layers)[1])
        return terms, {}

    def batch_size(self, batch) -> int:
        return len(batch[0])

    def records(self):
        """One unit per MoE head and FPN level (``<layer>@P3`` …); other MoE layers by name."""
        out = {}
        for name, layer in self.layers.items():
            recs = getattr(self._heads.get(name), "level_records", None)
            if recs:
                for lvl, r in enumerate(recs):
                    out[f"{name}@P{lvl + 3}"] = r
            elif layer.record is not None:
                out[name] = layer.record
        return out

    def bind(self, model: nn.Module) -> nn.Module:
        super().bind(model)
        mods = dict(model.named_modules())
        self._heads = {name: mods.get(name.rsplit(".", 1)[0] if "." in name else "") for name in self.layers}
        self._other_layers = {n: m for n, m in self.layers.items()
                              if getattr(self._heads[n], "level_records", None) is None}
        return model

    # ------------------------------------------------------------------ evaluation
    def has_split(self, split: str) -> bool:
        return split == "val"

    def evaluate(self, model, split: str, batch_size: int, details: bool = False, tta: str = "none") -> Dict[str, Any]:
        if split != "val":
            raise ValueError(f"detection runs are evaluated on their validation set only; use --split val (got '{split}')")
        if tta != "none":
            raise ValueError("--tta is for classification runs; detection has no test-time augmentation")
        return evaluate_model(model, self.val_ds, self.device, batch_size, precision=self.cfg.train.precision)


class _Reseeded:
    """Shuffled fixed-size batches (no aspect-ratio grouping), reshuffled per epoch from ``seed``."""

    def __init__(self, ds, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.seed, self.epoch = len(ds), batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        return iter([perm[i:i + self.batch_size] for i in range(0, self.n, self.batch_size)])

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)


__all__ = ["Detection", "evaluate_model"]
