"""COCO-format loading/validation, aspect-ratio grouping and the synthetic shapes generator."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moecnn.data.coco import (
    CocoDetection,
    CocoFormatError,
    GroupedBatchSampler,
    area_bucket,
    collate_detection,
)
from moecnn.data.shapes import generate_shapes

from _shared_data import COCO, needs_coco  # noqa: E402


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    return out, generate_shapes(out, num_train=12, num_val=6, image_size=128, seed=3, max_objects=4)


def test_shapes_deterministic_and_sized(shapes, tmp_path):
    out, paths = shapes
    again = generate_shapes(tmp_path / "b", num_train=12, num_val=6, image_size=128, seed=3, max_objects=4)
    a = json.loads(Path(paths["train_json"]).read_text())
    b = json.loads(Path(again["train_json"]).read_text())
    assert a["annotations"] == b["annotations"]
    assert (Path(paths["train_images"]) / a["images"][0]["file_name"]).read_bytes() == (
        Path(again["train_images"]) / b["images"][0]["file_name"]
    ).read_bytes()
    buckets = {area_bucket(x["area"]) for x in a["annotations"]}
    assert buckets == {0, 1, 2}
    for ann in a["annotations"]:  # the recorded size agrees with COCO's bucket of the box area
        assert ["small", "medium", "large"][area_bucket(ann["bbox"][2] * ann["bbox"][3])] == ann["size"]
    other = generate_shapes(tmp_path / "c", num_train=12, num_val=6, image_size=128, seed=4)
    assert json.loads(Path(other["train_json"]).read_text())["annotations"] != a["annotations"]


def test_shapes_dataset_targets(shapes):
    _, paths = shapes
    ds = CocoDetection(paths["train_json"], paths["train_images"], hflip=1.0)
    assert len(ds) == 12 and ds.num_classes == 4
    img, t = ds[0]
    assert img.shape == (3, 128, 128) and img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1
    assert t["boxes"].shape[1] == 4 and t["labels"].min() >= 1 and t["labels"].max() <= 3
    assert (t["boxes"][:, 2:] > t["boxes"][:, :2]).all()
    images, targets = collate_detection([ds[0], ds[1]])
    assert len(images) == 2 and len(targets) == 2


def test_shapes_cli(tmp_path):
    import argparse

    from moecnn.data.shapes import add_shapes_cli

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    add_shapes_cli(sub)
    args = parser.parse_args(["shapes", "--out", str(tmp_path / "s"), "--num-train", "2", "--num-val", "1",
                              "--image-size", "64"])
    assert args.func(args) == 0
    assert (tmp_path / "s" / "annotations" / "instances_val.json").is_file()


def test_grouped_batch_sampler():
    ratios = [1.5, 0.7, 1.3, 0.6, 1.2, 0.8, 1.1]
    s = GroupedBatchSampler(ratios, batch_size=2, seed=0)
    batches = list(s)
    assert sorted(i for b in batches for i in b) == list(range(7))
    for b in batches:
        assert len({ratios[i] >= 1 for i in b}) == 1  # one aspect-ratio group per batch
    s.set_epoch(1)
    assert sorted(i for b in s for i in b) == list(range(7))
    assert len(s) == len(batches)


def _write_bad(tmp_path, shapes, mutate):
    _, paths = shapes
    data = json.loads(Path(paths["val_json"]).read_text())
    mutate(data)
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(data))
    return p, paths["val_images"]


def test_bad_coco_files(tmp_path, shapes):
    def missing_file(d):
        d["images"][0]["file_name"] = "nope.png"

    p, imgs = _write_bad(tmp_path, shapes, missing_file)
    with pytest.raises(CocoFormatError, match=r"bad.json: image \d+: file not found: .*nope.png"):
        CocoDetection(p, imgs)

    def outside(d):
        a = d["annotations"][0]
        a["bbox"] = [100.0, 100.0, 60.0, 10.0]

    p, imgs = _write_bad(tmp_path, shapes, outside)
    with pytest.raises(CocoFormatError, match=r"annotation \d+ \(image \d+ '.*'\): bbox .* outside the 128x128 image"):
        CocoDetection(p, imgs)

    def unknown_cat(d):
        d["annotations"][1]["category_id"] = 77

    p, imgs = _write_bad(tmp_path, shapes, unknown_cat)
    with pytest.raises(CocoFormatError, match=r"annotation \d+ .*unknown category_id 77"):
        CocoDetection(p, imgs)

    for err in (CocoFormatError("x"),):
        assert "\n" not in str(err)
    with pytest.raises(CocoFormatError, match="annotation file not found"):
        CocoDetection(tmp_path / "none.json", imgs)


@needs_coco
def test_coco_subset_loader():
    ds = CocoDetection(COCO / "annotations" / "instances_val2017_subset.json", COCO / "images" / "val2017")
    assert len(ds) == 206 and ds.num_classes == 81
    img, t = ds[0]
    im = ds.images[0]
    assert img.shape == (3, im["height"], im["width"])
    assert t["image_id"].item() == im["id"]
    assert (t["boxes"][:, 2] <= im["width"]).all() and (t["boxes"][:, 3] <= im["height"]).all()
    ds_id = CocoDetection(COCO / "annotations" / "instances_val2017_subset.json", COCO / "images" / "val2017",
                          label_map="coco_id", max_images=5)
    assert len(ds_id) == 5 and ds_id.num_classes == 91
    sampler = GroupedBatchSampler(ds.aspect_ratios(), batch_size=4)
    assert sum(len(b) for b in sampler) == 206
