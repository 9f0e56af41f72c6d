"""A synthetic COCO-format detection set with objects of controlled sizes ("shapes").

``generate_shapes(out_dir, ...)`` writes::

    out_dir/annotations/instances_train.json, instances_val.json
    out_dir/images/train/*.png, images/val/*.png
    out_dir/shapes.json  (the generation parameters)

Objects are filled circles, squares and triangles (categories 1, 2, 3) in random colours (colour does not
give the class away) on textured backgrounds (noise, gradients, stripes, checkerboards). Each object's size
is drawn so that its box area falls clearly inside one COCO area bucket — small (< 32²), medium (< 96²) or
large — with the mix given by ``size_mix``. Everything is deterministic from ``seed``. The annotation
``area`` is the box area, so COCO's size buckets follow the boxes exactly.

From the command line: ``moecnn data shapes --out DIR [--num-train N --num-val N --image-size S --seed S]``.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["generate_shapes", "add_shapes_cli", "SHAPE_CLASSES", "size_ranges"]

SHAPE_CLASSES = ("circle", "square", "triangle")
_PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (250, 250, 250), (20, 20, 20),
]


def size_ranges(image_size: int) -> Dict[str, Tuple[int, int]]:
    """Side-length ranges (px) per bucket, chosen so the box area lies well inside the COCO bucket."""
    return {
        "small": (10, 26),  # area 100 .. 676  (< 1024)
        "medium": (38, min(86, image_size - 4)),  # area 1444 .. 7396 (< 9216)
        "large": (104, max(104, min(int(image_size * 0.9), 200))),  # area ≥ 10816
    }


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    kind = rng.integers(0, 4)
    base = rng.integers(40, 216, size=3).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == 0:  # coloured noise
        img = base + rng.normal(0, 25, size=(h, w, 3))
    elif kind == 1:  # linear gradient
        other = rng.integers(40, 216, size=3).astype(np.float32)
        t = (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1))
        t = (t - t.min()) / (np.ptp(t) + 1e-6)
        img = base * (1 - t[..., None]) + other * t[..., None]
    elif kind == 2:  # stripes
        period = rng.uniform(6, 20)
        ang = rng.uniform(0, math.pi)
        s = np.sin((xx * math.cos(ang) + yy * math.sin(ang)) * 2 * math.pi / period)
        img = base + 30 * s[..., None]
    else:  # checkerboard
        cell = int(rng.integers(6, 18))
        c = ((xx // cell + yy // cell) % 2)[..., None]
        img = base + (c * 2 - 1) * 25
    img = img + rng.normal(0, 6, size=(h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _overlap(a: Sequence[float], b: Sequence[float]) -> float:
    ax2, ay2, bx2, by2 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    iw = max(0.0, min(ax2, bx2) - max(a[0], b[0]))
    ih = max(0.0, min(ay2, by2) - max(a[1], b[1]))
    return iw * ih / (min(a[2] * a[3], b[2] * b[3]) + 1e-9)  # overlap relative to the smaller box


def _draw(draw: ImageDraw.ImageDraw, cls: int, x: int, y: int, s: int, colour) -> List[float]:
    """Draw shape ``cls`` in the s×s box at (x, y); return its tight box [x, y, w, h]."""
    if cls == 0:
        draw.ellipse([x, y, x + s - 1, y + s - 1], fill=colour)
    elif cls == 1:
        draw.rectangle([x, y, x + s - 1, y + s - 1], fill=colour)
    else:
        draw.polygon([(x + (s - 1) / 2, y), (x, y + s - 1), (x + s - 1, y + s - 1)], fill=colour)
    return [float(x), float(y), float(s), float(s)]


def _make_split(
    out: Path, split: str, num_images: int, image_size: int, rng: np.random.Generator, size_mix: Sequence[float],
    max_objects: int, id_offset: int,
) -> Dict:
    img_dir = out / "images" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    ranges = size_ranges(image_size)
    buckets = ["small", "medium", "large"]
    mix = np.asarray(size_mix, dtype=float)
    if image_size < ranges["large"][0] + 4:
        mix[2] = 0.0  # large objects do not fit
    if mix.sum() <= 0:
        raise ValueError(f"size_mix {list(size_mix)} leaves no object size that fits a {image_size}px image")
    mix = mix / mix.sum()
    images, anns = [], []
    ann_id = id_offset * 10 + 1
    for i in range(num_images):
        img_id = id_offset + i + 1
        arr = _background(rng, image_size, image_size)
        pil = Image.fromarray(arr)
        draw = ImageDraw.Draw(pil)
        placed: List[List[float]] = []
        n_obj = int(rng.integers(1, max_objects + 1))
        for _ in range(n_obj):
            bucket = buckets[int(rng.choice(3, p=mix))]
            lo, hi = ranges[bucket]
            for _try in range(20):
                s = int(rng.integers(lo, hi + 1))
                if s > image_size - 2:
                    continue
                x = int(rng.integers(0, image_size - s + 1))
                y = int(rng.integers(0, image_size - s + 1))
                box = [float(x), float(y), float(s), float(s)]
                if all(_overlap(box, p) < 0.05 for p in placed):
                    break
            else:
                continue
            cls = int(rng.integers(0, len(SHAPE_CLASSES)))
            colour = _PALETTE[int(rng.integers(0, len(_PALETTE)))]
            box = _draw(draw, cls, x, y, s, colour)
            placed.append(box)
            anns.append({
                "id": ann_id, "image_id": img_id, "category_id": cls + 1, "bbox": box,
                "area": box[2] * box[3], "iscrowd": 0, "size": bucket,
            })
            ann_id += 1
        name = f"{split}_{i:06d}.png"
        pil.save(img_dir / name)
        images.append({"id": img_id, "file_name": name, "width": image_size, "height": image_size})
    return {
        "info": {"description": f"moecnn synthetic shapes ({split})"},
        "licenses": [],
        "images": images,
        "annotations": anns,
        "categories": [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(SHAPE_CLASSES)],
    }


def generate_shapes(
    out_dir: str | Path,
    num_train: int = 400,
    num_val: int = 100,
    image_size: int = 160,
    seed: int = 0,
    size_mix: Sequence[float] = (1 / 3, 1 / 3, 1 / 3),
    max_objects: int = 4,
    overwrite: bool = False,
) -> Dict[str, str]:
    """Write the shapes set to ``out_dir`` and return its paths (train/val json and image dirs).

    If ``out_dir/shapes.json`` already records the same parameters, nothing is regenerated.
    """
    out = Path(out_dir)
    params = dict(num_train=int(num_train), num_val=int(num_val), image_size=int(image_size), seed=int(seed),
                  size_mix=[float(v) for v in size_mix], max_objects=int(max_objects), version=2)
    paths = {
        "train_json": str(out / "annotations" / "instances_train.json"),
        "train_images": str(out / "images" / "train"),
        "val_json": str(out / "annotations" / "instances_val.json"),
        "val_images": str(out / "images" / "val"),
    }
    meta = out / "shapes.json"
    if not overwrite and meta.is_file():
        try:
            if json.loads(meta.read_text()).get("params") == params and Path(paths["val_json"]).is_file():
                return paths
        except json.JSONDecodeError:
            pass
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    train_rng, val_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    for split, n, rng, off in (("train", num_train, train_rng, 0), ("val", num_val, val_rng, 1_000_000)):
        data = _make_split(out, split, n, image_size, rng, size_mix, max_objects, off)
        with open(paths[f"{split}_json"], "w") as f:
            json.dump(data, f)
    meta.write_text(json.dumps({"params": params, "paths": paths}, indent=1))
    return paths


def add_shapes_cli(subparsers) -> argparse.ArgumentParser:
    """Register ``shapes`` under an argparse ``subparsers`` (the ``moecnn data`` command)."""
    p = subparsers.add_parser("shapes", help="generate the synthetic COCO-format shapes detection set")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num-train", type=int, default=400)
    p.add_argument("--num-val", type=int, default=100)
    p.add_argument("--image-size", type=int, default=160)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-objects", type=int, default=4)
    p.add_argument("--size-mix", type=float, nargs=3, default=[1 / 3, 1 / 3, 1 / 3],
                   metavar=("SMALL", "MEDIUM", "LARGE"), help="relative frequency of object sizes")
    p.add_argument("--overwrite", action="store_true")

    def run(args) -> int:
        paths = generate_shapes(args.out, args.num_train, args.num_val, args.image_size, args.seed,
                                args.size_mix, args.max_objects, overwrite=args.overwrite)
        print(json.dumps(paths, indent=1))
        return 0

    p.set_defaults(func=run, handler=run)
    return p
