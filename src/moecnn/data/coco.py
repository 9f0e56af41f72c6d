"""COCO-format detection data: a validated dataset returning torchvision detection targets, an
aspect-ratio grouped batch sampler, a collate function and COCO box evaluation (faster-coco-eval, with a
pycocotools fallback).

Annotation problems are reported as one-line :class:`CocoFormatError` messages that say what is wrong and
where (file, image, annotation id), e.g.
``instances_val.json: annotation 17 (image 42 'a.jpg'): bbox [600, 10, 80, 40] extends outside the 640x480 image``.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

__all__ = [
    "CocoFormatError",
    "CocoDetection",
    "GroupedBatchSampler",
    "collate_detection",
    "load_coco_json",
    "validate_coco",
    "coco_evaluate",
    "detections_to_coco",
    "area_bucket",
    "AREA_BUCKETS",
    "SMALL_MAX_AREA",
    "MEDIUM_MAX_AREA",
]

SMALL_MAX_AREA = 32**2
MEDIUM_MAX_AREA = 96**2
AREA_BUCKETS = ("small", "medium", "large")
METRIC_NAMES = ("AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L")


def area_bucket(area: float) -> int:
    """COCO's size bucket of an area: 0 small (< 32²), 1 medium (< 96²), 2 large."""
    return 0 if area < SMALL_MAX_AREA else (1 if area < MEDIUM_MAX_AREA else 2)


class CocoFormatError(ValueError):
    """A COCO annotation file (or its image folder) is malformed; the message names the place."""


def load_coco_json(path: str | os.PathLike) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CocoFormatError(f"annotation file not found: {path}")
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise CocoFormatError(f"{path.name}: not valid JSON ({e})") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise CocoFormatError(f"{path.name}: missing or non-list top-level key '{key}'")
    return data


def validate_coco(
    data: Dict[str, Any],
    image_dir: str | os.PathLike | None = None,
    name: str = "annotations",
    tolerance: float = 1.0,
    check_files: bool = True,
) -> None:
    """Raise :class:`CocoFormatError` at the first problem: duplicate/missing ids, missing image files,
    unknown image or category ids, malformed boxes, boxes outside their image (beyond ``tolerance`` px)."""
    cats = {}
    for c in data["categories"]:
        if "id" not in c:
            raise CocoFormatError(f"{name}: category without 'id': {c}")
        if c["id"] in cats:
            raise CocoFormatError(f"{name}: duplicate category id {c['id']}")
        cats[c["id"]] = c
    images = {}
    for im in data["images"]:
        for key in ("id", "file_name", "width", "height"):
            if key not in im:
                raise CocoFormatError(f"{name}: image entry {im.get('id', '?')} has no '{key}'")
        if im["id"] in images:
            raise CocoFormatError(f"{name}: duplicate image id {im['id']}")
        images[im["id"]] = im
        if check_files and image_dir is not None:
            fp = Path(image_dir) / im["file_name"]
            if not fp.is_file():
                raise CocoFormatError(f"{name}: image {im['id']}: file not found: {fp}")
    seen = set()
    for a in data["annotations"]:
        aid = a.get("id", "?")
        if aid in seen:
            raise CocoFormatError(f"{name}: duplicate annotation id {aid}")
        seen.add(aid)
        if a.get("image_id") not in images:
            raise CocoFormatError(f"{name}: annotation {aid}: unknown image_id {a.get('image_id')}")
        im = images[a["image_id"]]
        where = f"{name}: annotation {aid} (image {im['id']} '{im['file_name']}')"
        if a.get("category_id") not in cats:
            raise CocoFormatError(
                f"{where}: unknown category_id {a.get('category_id')} (known: {sorted(cats)[:10]}"
                f"{', ...' if len(cats) > 10 else ''})"
            )
        box = a.get("bbox")
        if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(isinstance(v, (int, float)) for v in box):
            raise CocoFormatError(f"{where}: bbox must be 4 numbers [x, y, w, h], got {box}")
        x, y, w, h = (float(v) for v in box)
        if not all(math.isfinite(v) for v in (x, y, w, h)) or w < 0 or h < 0:
            raise CocoFormatError(f"{where}: bbox {box} has a negative or non-finite size")
        W, H = float(im["width"]), float(im["height"])
        if x < -tolerance or y < -tolerance or x + w > W + tolerance or y + h > H + tolerance:
            raise CocoFormatError(f"{where}: bbox {box} extends outside the {im['width']}x{im['height']} image")


class CocoDetection(Dataset):
    """COCO-format detection set: ``(image, target)`` with image a float C×H×W tensor in [0, 1] and target
    torchvision's detection dict: ``boxes`` (xyxy, float), ``labels`` (int64), ``image_id``, ``area``,
    ``iscrowd``. Crowd boxes and boxes under ``min_box_size`` px are left out of the targets (COCO
    evaluation still sees them through the JSON).

    Args:
        label_map: ``"contiguous"`` (labels 1..K in sorted category-id order; num_classes = K + 1) or
            ``"coco_id"`` (label = category id, as torchvision's COCO-pretrained models; num_classes =
            max id + 1).
        hflip: probability of a horizontal flip (training augmentation).
        max_images: keep only the first ``max_images`` images (sorted by id) for quick runs.
    """

    def __init__(
        self,
        ann_file: str | os.PathLike,
        image_dir: str | os.PathLike,
        label_map: str = "contiguous",
        hflip: float = 0.0,
        max_images: Optional[int] = None,
        min_box_size: float = 1.0,
        validate: bool = True,
        seed: int = 0,
    ) -> None:
        self.ann_file = str(ann_file)
        self.image_dir = str(image_dir)
        self.data = load_coco_json(ann_file)
        if validate:
            validate_coco(self.data, image_dir, name=Path(ann_file).name)
        if label_map not in ("contiguous", "coco_id"):
            raise ValueError(f"label_map must be 'contiguous' or 'coco_id', got '{label_map}'")
        self.label_map = label_map
        self.category_ids = sorted(c["id"] for c in self.data["categories"])
        self.categories = {c["id"]: c.get("name", str(c["id"])) for c in self.data["categories"]}
        if label_map == "contiguous":
            self.cat_to_label = {cid: i + 1 for i, cid in enumerate(self.category_ids)}
        else:
            self.cat_to_label = {cid: cid for cid in self.category_ids}
        self.label_to_cat = {v: k for k, v in self.cat_to_label.items()}
        self.num_classes = max(self.cat_to_label.values(), default=0) + 1
        images = sorted(self.data["images"], key=lambda im: im["id"])
        if max_images is not None:
            images = images[: int(max_images)]
        self.images = images
        self.image_ids = [im["id"] for im in images]
        self.anns = defaultdict(list)
        for a in self.data["annotations"]:
            self.anns[a["image_id"]].append(a)
        self.hflip = float(hflip)
        self.min_box_size = float(min_box_size)

    def __len__(self) -> int:
        return len(self.images)

    def aspect_ratios(self) -> List[float]:
        return [im["width"] / im["height"] for im in self.images]

    def subset_gt(self) -> Dict[str, Any]:
        """The annotation dict restricted to this dataset's images (the ground truth for evaluation)."""
        keep = set(self.image_ids)
        d = {k: v for k, v in self.data.items() if k not in ("images", "annotations")}
        d["images"] = [im for im in self.data["images"] if im["id"] in keep]
        d["annotations"] = [a for a in self.data["annotations"] if a["image_id"] in keep]
        return d

    def target(self, index: int) -> Dict[str, torch.Tensor]:
        im = self.images[index]
        boxes, labels, areas, crowd = [], [], [], []
        for a in self.anns.get(im["id"], []):
            x, y, w, h = a["bbox"]
            if a.get("iscrowd", 0) or w < self.min_box_size or h < self.min_box_size:
                continue
            x1, y1 = max(0.0, x), max(0.0, y)
            x2, y2 = min(float(im["width"]), x + w), min(float(im["height"]), y + h)
            if x2 - x1 < self.min_box_size or y2 - y1 < self.min_box_size:
                continue
            boxes.append([x1, y1, x2, y2])
            labels.append(self.cat_to_label[a["category_id"]])
            areas.append(float(a.get("area", w * h)))
            crowd.append(0)
        return {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "image_id": torch.tensor(im["id"]),
            "area": torch.tensor(areas, dtype=torch.float32),
            "iscrowd": torch.tensor(crowd, dtype=torch.int64),
        }

    def load_image(self, index: int) -> torch.Tensor:
        im = self.images[index]
        path = Path(self.image_dir) / im["file_name"]
        try:
            with Image.open(path) as pil:
                arr = np.asarray(pil.convert("RGB"), dtype=np.uint8).copy()
        except FileNotFoundError:
            raise CocoFormatError(f"{Path(self.ann_file).name}: image {im['id']}: file not found: {path}") from None
        if arr.shape[0] != im["height"] or arr.shape[1] != im["width"]:
            raise CocoFormatError(
                f"{Path(self.ann_file).name}: image {im['id']} '{im['file_name']}' is {arr.shape[1]}x{arr.shape[0]}, "
                f"the JSON says {im['width']}x{im['height']}"
            )
        return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)

    def __getitem__(self, index: int):
        img = self.load_image(index)
        t = self.target(index)
        # torch's RNG: re-seeded per worker and per epoch by the DataLoader, so flips differ across epochs
        if self.hflip > 0 and float(torch.rand(())) < self.hflip:
            img = img.flip(-1)
            w = img.shape[-1]
            b = t["boxes"].clone()
            b[:, 0], b[:, 2] = w - t["boxes"][:, 2], w - t["boxes"][:, 0]
            t["boxes"] = b
        return img, t


def collate_detection(batch):
    """List of (image, target) → (tuple of images, tuple of targets), as torchvision detectors expect."""
    return tuple(zip(*batch))


class GroupedBatchSampler(Sampler[List[int]]):
    """Batches whose images share an aspect-ratio group (landscape / portrait by default, or ``bins``),
    so padded batches waste little. Shuffled per epoch (``set_epoch``) from ``seed``; leftovers of each
    group are emitted as smaller batches unless ``drop_last``."""

    def __init__(
        self,
        aspect_ratios: Sequence[float],
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        bins: Sequence[float] = (1.0,),
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.groups = np.digitize(np.asarray(aspect_ratios, dtype=float), np.asarray(sorted(bins)))
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> List[List[int]]:
        order = np.arange(len(self.groups))
        if self.shuffle:
            order = np.random.default_rng(self.seed + self.epoch).permutation(order)
        buffers: Dict[int, List[int]] = defaultdict(list)
        out = []
        for i in order:
            g = int(self.groups[i])
            buffers[g].append(int(i))
            if len(buffers[g]) == self.batch_size:
                out.append(buffers.pop(g))
        if not self.drop_last:
            out.extend(b for b in buffers.values() if b)
        return out

    def __iter__(self) -> Iterator[List[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())


# ---------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------


def _coco_api(backend: str):
    if backend == "faster":
        import faster_coco_eval

        return faster_coco_eval.COCO, faster_coco_eval.COCOeval_faster
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval
    raise ValueError(f"backend must be 'faster', 'pycocotools' or 'auto', got '{backend}'")


def coco_evaluate(
    gt: Dict[str, Any] | str | os.PathLike,
    detections: List[Dict[str, Any]],
    backend: str = "auto",
    verbose: bool = False,
) -> Dict[str, float]:
    """COCO box AP of ``detections`` (COCO results: image_id, category_id, bbox xywh, score) against
    ``gt`` (annotation dict or JSON path). Returns AP, AP50, AP75, AP_S, AP_M, AP_L in [0, 1]
    (−1 where a bucket has no ground truth) and ``backend``. ``backend="auto"``: faster-coco-eval, else
    pycocotools."""
    if backend == "auto":
        try:
            import faster_coco_eval  # noqa: F401

            backend = "faster"
        except ImportError:
            backend = "pycocotools"
    COCO, COCOeval = _coco_api(backend)
    gt_dict = load_coco_json(gt) if not isinstance(gt, dict) else gt
    gt_dict = dict(gt_dict)
    gt_dict.setdefault("info", {})
    gt_dict.setdefault("licenses", [])
    if not detections:
        return {**{m: 0.0 for m in METRIC_NAMES}, "backend": backend, "num_detections": 0}
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink) if not verbose else contextlib.nullcontext():
        coco_gt = COCO()
        coco_gt.dataset = json.loads(json.dumps(gt_dict))
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes([dict(d) for d in detections])
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.params.imgIds = sorted(im["id"] for im in gt_dict["images"])
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = [float(v) for v in ev.stats[:6]]
    return {**dict(zip(METRIC_NAMES, stats)), "backend": backend, "num_detections": len(detections)}


def detections_to_coco(
    outputs: Sequence[Dict[str, torch.Tensor]], image_ids: Sequence[int], label_to_cat: Dict[int, int]
) -> List[Dict[str, Any]]:
    """torchvision detections (xyxy boxes, labels, scores) → COCO result dicts (xywh, category ids)."""
    res = []
    for out, iid in zip(outputs, image_ids):
        boxes = out["boxes"].detach().float().cpu()
        if boxes.numel() == 0:
            continue
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        for b, s, l in zip(xywh, out["scores"].detach().float().cpu().tolist(), out["labels"].cpu().tolist()):
            cat = label_to_cat.get(int(l))
            if cat is None:
                continue
            res.append({"image_id": int(iid), "category_id": int(cat), "bbox": [round(v, 2) for v in b], "score": float(s)})
    return res
