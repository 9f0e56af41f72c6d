"""Structured (OmegaConf-compatible) configuration for the classification data pipeline."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class AugmentConfig:
    """Training-time augmentation, applied batch-wise on the device (or per sample on the DataLoader path)."""

    crop_padding: int = 4  # random crop of the original size from a zero-padded image (0 = off)
    flip: bool = True  # random horizontal flip with p = 0.5
    color_jitter: float = 0.0  # like torchvision ColorJitter(s, s, s) (paper: 0.3); 0 = off
    cutout: int = 0  # side of one square set to 0 after normalisation (the mean colour), centre uniform over the
    # image, clipped at the border (DeVries & Taylor 2017, arXiv 1708.04552; they use 8 on CIFAR-100); 0 = off


@dataclass
class DataConfig:
    """Which dataset to load, where from, how to split it and how to feed it.

    ``root=None`` resolves to ``$MOECNN_DATA_DIR/<name>`` when that variable is set, else
    ``~/.cache/moecnn/<name>`` (fashion_mnist: ``/usr/share/datasets/fashion-mnist`` when it exists).
    """

    name: str = "synthetic"  # synthetic | cifar100 | cifar10 | fashion_mnist | image_folder | digits
    root: Optional[str] = None
    download: bool = False  # fetch the official archive (cifar*, fashion_mnist) when it is missing
    val_size: int = 5000  # images held out from train (stratified, seeded); 0 = no validation split
    train_subset: Optional[int] = None  # keep only the first n training images (after the val split)
    test_subset: Optional[int] = None  # keep only the first n test images
    superclass_map: Optional[str] = None  # image_folder: JSON file {class_name: superclass_name}
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    gpu_resident: bool = True  # whole uint8 dataset on the device, augmentation on the device
    num_workers: int = 2  # DataLoader path only
    seed: int = 0  # split seed
    image_size: Optional[int] = None  # digits: 16 or 32 (default 32); image_folder: resize to this square size
    synthetic_train_size: int = 10000  # synthetic: generated training images (before the val split)
    synthetic_test_size: int = 2000  # synthetic: generated test images


@dataclass
class ShapesDataConfig:
    """The generated shapes detection set (``moecnn.data.shapes``)."""

    out: Optional[str] = None  # folder for the generated set; None → <run_dir>/data/shapes
    num_train: int = 400
    num_val: int = 100
    image_size: int = 160
    seed: int = 0
    size_mix: List[float] = field(default_factory=lambda: [1 / 3, 1 / 3, 1 / 3])
    max_objects: int = 4


@dataclass
class DetectionDataConfig:
    """COCO-format detection data (annotation JSON + image folder per split), or the generated shapes set."""

    source: str = "coco"  # coco (json + image folders below) | shapes (generated)
    train_json: str = "${oc.env:COCO_ROOT,data/coco}/annotations/instances_train2017.json"
    train_images: str = "${oc.env:COCO_ROOT,data/coco}/train2017"
    val_json: str = "${oc.env:COCO_ROOT,data/coco}/annotations/instances_val2017.json"
    val_images: str = "${oc.env:COCO_ROOT,data/coco}/val2017"
    shapes: ShapesDataConfig = field(default_factory=ShapesDataConfig)
    label_map: str = "contiguous"  # contiguous (1..K) | coco_id (torchvision COCO models: 91 classes)
    hflip: float = 0.5
    aspect_ratio_grouping: bool = True
    num_workers: int = 2
    max_train_images: Optional[int] = None
    max_val_images: Optional[int] = None
