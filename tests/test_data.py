"""Tests for moecnn.data: file-format readers, splits, loaders, augmentation, synthetic set."""
from __future__ import annotations

import gzip
import json
import lzma
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from moecnn.data import (
    ArrayDataset,
    AugmentConfig,
    DataConfig,
    GPULoader,
    TorchLoader,
    build_data,
    color_jitter,
    cutout,
    make_loader,
    make_synthetic,
    random_crop,
    random_flip,
    read_cifar_arrays,
    read_idx,
    stratified_split,
)
from moecnn.registry import DATASETS

from _shared_data import CIFAR100 as REAL_CIFAR100  # noqa: E402
NAMES100 = [f"fine{i}" for i in range(100)]
COARSE_NAMES = [f"coarse{i}" for i in range(20)]
FINE_TO_COARSE = np.random.default_rng(0).permutation(np.repeat(np.arange(20), 5))




def _tiny_cifar100(n: int, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    fine = rng.permutation(np.arange(n) % 100).astype(np.uint8)
    return x, fine, FINE_TO_COARSE[fine].astype(np.uint8)


def _write_arrays(root: Path, xz: bool) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", 300), ("test", 100)):
        x, fine, coarse = _tiny_cifar100(n, seed=len(split))
        if xz:
            with lzma.open(root / f"{split}_x.npy.xz", "wb") as f:
                np.save(f, x)
        else:
            np.save(root / f"{split}_x.npy", x)
        np.save(root / f"{split}_y_fine.npy", fine)
        np.save(root / f"{split}_y_coarse.npy", coarse)
        out[split] = (x, fine, coarse)
    (root / "label_names.json").write_text(json.dumps({"fine_label_names": NAMES100, "coarse_label_names": COARSE_NAMES}))
    return out


# ----------------------------------------------------------------------------------------- readers
@pytest.mark.parametrize("xz", [False, True])
def test_cifar_arrays_reader(tmp_path, xz):
    data = _write_arrays(tmp_path, xz)
    b = build_data(DataConfig(name="cifar100", root=str(tmp_path), val_size=50, seed=3))
    assert (len(b.train), len(b.val), len(b.test)) == (250, 50, 100)
    assert b.num_classes == 100 and b.in_channels == 3 and b.image_size == 32
    assert b.class_names == NAMES100 and b.superclass_names == COARSE_NAMES
    assert b.class_to_super == FINE_TO_COARSE.tolist()
    assert b.mean == pytest.approx((0.5071, 0.4865, 0.4409))
    x, fine, _ = data["test"]
    assert b.test.images.dtype == torch.uint8 and b.test.images.shape == (100, 3, 32, 32)
    assert torch.equal(b.test.images, torch.from_numpy(x).permute(0, 3, 1, 2))  # HWC -> CHW
    assert torch.equal(b.test.labels, torch.from_numpy(fine).long())


def _write_pickles(root: Path) -> dict:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = {}
    for split, n in (("train", 200), ("test", 100)):
        x, fine, coarse = _tiny_cifar100(n, seed=7 + len(split))
        d = {b"data": x.transpose(0, 3, 1, 2).reshape(n, 3072), b"fine_labels": fine.tolist(),
             b"coarse_labels": coarse.tolist(), b"filenames": [b"x.png"] * n, b"batch_label": b"b"}
        with open(folder / split, "wb") as f:
            pickle.dump(d, f, protocol=2)
        out[split] = (x, fine, coarse)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": NAMES100, b"coarse_label_names": COARSE_NAMES}, f, protocol=2)
    return out


def test_cifar100_pickle_reader(tmp_path):
    data = _write_pickles(tmp_path)
    b = build_data(DataConfig(name="cifar100", root=str(tmp_path), val_size=0))
    assert b.val is None and len(b.train) == 200 and len(b.test) == 100
    x, fine, _ = data["train"]
    assert torch.equal(b.train.images, torch.from_numpy(x).permute(0, 3, 1, 2))
    assert b.train.labels.tolist() == fine.tolist()
    assert b.class_names == NAMES100 and b.superclass_names == COARSE_NAMES
    assert b.class_to_super == FINE_TO_COARSE.tolist()


def test_cifar10_pickle_reader(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {b"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8), b"labels": (np.arange(20) % 10).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(d, f, protocol=2)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names}, f, protocol=2)
    b = build_data(DataConfig(name="cifar10", root=str(tmp_path), val_size=10))
    assert (len(b.train), len(b.val), len(b.test)) == (90, 10, 20)
    assert b.superclass_names == ["vehicles", "animals"]
    assert b.class_to_super == [0, 0, 1, 1, 1, 1, 1, 1, 0, 0]


def test_corrupt_files_give_clear_errors(tmp_path):
    _write_pickles(tmp_path)
    (tmp_path / "cifar-100-python" / "test").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"cifar-100-python/test"):
        build_data(DataConfig(name="cifar100", root=str(tmp_path), val_size=0))
    arr = tmp_path / "arr"
    _write_arrays(arr, xz=False)
    np.save(arr / "test_y_fine.npy", np.zeros(99, np.uint8))  # label count mismatch
    with pytest.raises(ValueError, match=r"test_y_fine\.npy.*100 labels"):
        read_cifar_arrays(arr, 100, "test")
    np.save(arr / "test_x.npy", np.zeros((100, 3, 32, 32), np.uint8))  # CHW instead of HWC
    with pytest.raises(ValueError, match=r"test_x\.npy"):
        read_cifar_arrays(arr, 100, "test")


def _idx_bytes(a: np.ndarray) -> bytes:
    return struct.pack(">BBBB", 0, 0, 8, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()


@pytest.mark.parametrize("gz", [False, True])
def test_idx_reader_and_fashion_mnist(tmp_path, gz):
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, n in (("train", 60), ("t10k", 20)):
        arrays[prefix] = (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), (np.arange(n) % 10).astype(np.uint8))
        for kind, a in (("images-idx3", arrays[prefix][0]), ("labels-idx1", arrays[prefix][1])):
            path = tmp_path / (f"{prefix}-{kind}-ubyte" + (".gz" if gz else ""))
            path.write_bytes(gzip.compress(_idx_bytes(a)) if gz else _idx_bytes(a))
    suffix = ".gz" if gz else ""
    np.testing.assert_array_equal(read_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}"), arrays["t10k"][0])
    b = build_data(DataConfig(name="fashion_mnist", root=str(tmp_path), val_size=10))
    assert b.in_channels == 1 and b.image_size == 28 and b.test.images.shape == (20, 1, 28, 28)
    assert torch.equal(b.test.images[:, 0], torch.from_numpy(arrays["t10k"][0]))
    assert b.superclass_names == ["tops", "bottoms", "footwear", "bags"]
    assert [b.superclass_names[s] for s in b.class_to_super][:3] == ["tops", "bottoms", "tops"]
    assert len(b.mean) == 1 and abs(b.mean[0] - 127.5 / 255) < 0.05
    bad = tmp_path / "bad-idx"
    bad.write_bytes(_idx_bytes(arrays["t10k"][0])[:-5])  # truncated
    with pytest.raises(ValueError, match="bad-idx"):
        read_idx(bad)


def test_real_cifar100_test_split():
    if not (REAL_CIFAR100 / "test_x.npy.xz").is_file():
        pytest.skip(f"real CIFAR-100 copy not present at {REAL_CIFAR100}")
    test, info = read_cifar_arrays(REAL_CIFAR100, 100, "test")
    assert test.images.shape == (10000, 3, 32, 32) and test.images.dtype == torch.uint8
    assert torch.bincount(test.labels).tolist() == [100] * 100
    names, supers, c2s = info["class_names"], info["superclass_names"], info["class_to_super"]
    assert len(supers) == 20 and len(c2s) == 100
    assert supers[c2s[names.index("orchid")]] == "flowers"
    assert supers[c2s[names.index("whale")]] == "aquatic_mammals"
    assert sorted(np.bincount(c2s).tolist()) == [5] * 20
    mean = test.images.double().mean((0, 2, 3)) / 255
    assert torch.allclose(mean, torch.tensor([0.5071, 0.4865, 0.4409], dtype=torch.double), atol=0.01)


def test_missing_data_message(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"CIFAR-100 not found under .*data\.download=true.*data\.root="):
        build_data(DataConfig(name="cifar100", root=str(tmp_path / "nope")))
    with pytest.raises(FileNotFoundError, match=r"Fashion-MNIST not found.*data\.root="):
        build_data(DataConfig(name="fashion_mnist", root=str(tmp_path)))
    with pytest.raises(ValueError, match="unknown dataset"):
        build_data(DataConfig(name="imagenet"))


def test_registry_names():
    for name in ("synthetic", "cifar100", "cifar10", "fashion_mnist", "image_folder", "digits"):
        assert name in DATASETS


# ----------------------------------------------------------------------------------------- splits
def test_val_split_disjoint_deterministic_stratified():
    labels = torch.arange(1000) % 10
    keep, held = stratified_split(labels, 100, seed=5)
    assert len(held) == 100 and len(keep) == 900
    assert not set(keep.tolist()) & set(held.tolist())
    assert sorted(keep.tolist() + held.tolist()) == list(range(1000))
    assert torch.bincount(labels[held]).tolist() == [10] * 10
    keep2, held2 = stratified_split(labels, 100, seed=5)
    assert torch.equal(held, held2) and torch.equal(keep, keep2)
    assert not torch.equal(held, stratified_split(labels, 100, seed=6)[1])


@pytest.fixture(scope="module")
def syn():
    return build_data(DataConfig(synthetic_train_size=1500, synthetic_test_size=300, val_size=300, seed=1))


def test_build_data_val_split_from_train(syn):
    full = make_synthetic(1500, seed=0)[0]
    assert len(syn.train) == 1200 and len(syn.val) == 300 and len(syn.test) == 300
    # every train/val image is a distinct training image; none comes from test
    keys = lambda imgs: {hash(im.numpy().tobytes()) for im in imgs}  # noqa: E731
    assert keys(syn.train.images) | keys(syn.val.images) == keys(full)
    assert not keys(syn.val.images) & keys(syn.train.images)
    assert syn.class_to_super == [0] * 5 + [1] * 5 and syn.superclass_names == ["stripes", "blobs"]
    sub = build_data({"synthetic_train_size": 1500, "synthetic_test_size": 300, "val_size": 300, "seed": 1,
                      "train_subset": 100, "test_subset": 50})
    assert torch.equal(sub.train.images, syn.train.images[:100]) and len(sub.test) == 50
    assert torch.equal(sub.val.images, syn.val.images)
    with pytest.raises(ValueError, match="val_size"):
        build_data(DataConfig(synthetic_train_size=100, synthetic_test_size=10, val_size=100))


# ----------------------------------------------------------------------------------------- GPU loader
def _ds(n: int = 103) -> ArrayDataset:
    imgs = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).clone()
    return ArrayDataset(imgs, torch.arange(n))


def _loader(ds, **kw):
    args = dict(train=True, device="cpu", mean=(0.0,), std=(1.0,), augment=None, seed=0)
    args.update(kw)
    return make_loader(ds, 10, **args)


def test_gpu_loader_epoch_covers_each_index_once():
    ld = _loader(_ds(), drop_last=False)
    assert isinstance(ld, GPULoader) and len(ld) == 11
    ys = torch.cat([y for _, y in ld])
    assert sorted(ys.tolist()) == list(range(103))
    assert ys.tolist() != list(range(103))  # shuffled
    for x, y in ld:  # images follow their labels
        assert torch.allclose(x[:, 0, 0, 0], y.float() / 255)
    assert len(_loader(_ds())) == 10  # train default drops the last partial batch


def test_gpu_loader_deterministic_and_epoch_dependent():
    a, b = _loader(_ds(), augment=AugmentConfig(color_jitter=0.3)), _loader(_ds(), augment=AugmentConfig(color_jitter=0.3))
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    e0 = torch.cat([y for _, y in a])
    a.set_epoch(1)
    e1 = torch.cat([y for _, y in a])
    assert not torch.equal(e0, e1)
    a.set_epoch(0)
    assert torch.equal(torch.cat([y for _, y in a]), e0)
    assert not torch.equal(torch.cat([y for _, y in _loader(_ds(), seed=1)]), e0)


def test_gpu_loader_rank_shards():
    ds = _ds(100)
    shards = [torch.cat([y for _, y in _loader(ds, rank=r, world_size=4, drop_last=False)]) for r in range(4)]
    assert all(len(s) == 25 for s in shards)
    assert sorted(torch.cat(shards).tolist()) == list(range(100))  # disjoint, covering
    # eval: contiguous shards in order, last partial batch kept
    ev = [torch.cat([y for _, y in _loader(ds, train=False, rank=r, world_size=3)]) for r in range(3)]
    assert torch.cat(ev).tolist() == list(range(100))
    ld = _loader(_ds(), train=False)
    assert len(ld) == 11 and torch.cat([y for _, y in ld]).tolist() == list(range(103))


def test_eval_loader_normalises_without_augmentation():
    ds = ArrayDataset(torch.randint(0, 256, (20, 3, 8, 8), dtype=torch.uint8), torch.zeros(20, dtype=torch.long))
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    ld = make_loader(ds, 8, train=False, device="cpu", mean=mean, std=std, augment=AugmentConfig(color_jitter=0.5),
                     channels_last=True)
    x = torch.cat([b for b, _ in ld])
    ref = (ds.images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert x.dtype == torch.float32 and torch.allclose(x, ref, atol=1e-5)


# ----------------------------------------------------------------------------------------- augmentation
def test_random_crop_is_a_window_of_the_padded_image():
    x = torch.randint(1, 256, (16, 3, 8, 8), dtype=torch.uint8)
    out = random_crop(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    windows = padded.unfold(2, 8, 1).unfold(3, 8, 1)  # N C 5 5 8 8
    for i in range(16):
        assert any(torch.equal(out[i], windows[i, :, a, b]) for a in range(5) for b in range(5))
    assert not all(torch.equal(out[i], x[i]) for i in range(16))
    assert torch.equal(random_crop(x, 0, torch.Generator()), x)


def test_random_flip_matches_manual_flip():
    x = torch.randint(0, 256, (32, 3, 5, 7), dtype=torch.uint8)
    out = random_flip(x, torch.Generator().manual_seed(3))
    mask = torch.rand(32, generator=torch.Generator().manual_seed(3)) < 0.5
    assert 0 < mask.sum() < 32
    for i in range(32):
        assert torch.equal(out[i], x[i].flip(-1) if mask[i] else x[i])


def test_color_jitter():
    x = torch.rand(8, 3, 6, 6)
    assert torch.equal(color_jitter(x, 0.0, torch.Generator()), x)
    y = color_jitter(x.clone(), 0.3, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1 and not torch.allclose(x, y)
    grey = torch.rand(4, 1, 6, 6)
    assert color_jitter(grey.clone(), 0.3, torch.Generator().manual_seed(0)).shape == grey.shape


def _square(size: int, cy: int, cx: int, h: int, w: int) -> torch.Tensor:
    m = torch.zeros(h, w, dtype=torch.bool)
    m[max(0, cy - size // 2):max(0, cy - size // 2 + size), max(0, cx - size // 2):max(0, cx - size // 2 + size)] = True
    return m


def test_cutout_zeroes_one_clipped_square_per_image():
    x = torch.rand(4, 3, 9, 9) + 1
    centres = torch.tensor([[4, 0, 8, 1], [4, 0, 2, 8]])  # (row, col): middle, corner, bottom edge, right edge
    out = cutout(x.clone(), 4, centres=centres)
    for i in range(4):
        square = _square(4, int(centres[0, i]), int(centres[1, i]), 9, 9)
        assert torch.equal((out[i] == 0), square.expand(3, 9, 9))  # zero exactly on the square, all channels
        assert torch.equal(out[i][:, ~square], x[i][:, ~square])  # untouched elsewhere
    assert [int(_square(4, int(centres[0, i]), int(centres[1, i]), 9, 9).sum()) for i in range(4)] == [16, 4, 12, 9]
    assert torch.equal(cutout(x.clone(), 0, torch.Generator()), x)
    drawn = cutout(x.clone(), 3, torch.Generator().manual_seed(0))
    assert ((drawn == 0).sum((1, 2, 3)) > 0).all() and ((drawn == 0).sum((1, 2, 3)) <= 27).all()


@pytest.mark.parametrize("gpu_resident", [True, False])
def test_loaders_apply_cutout_after_the_same_crops(gpu_resident):
    """With the same seed, a loader with cutout yields the crop/flip images of one without, each with one
    square set to 0 after normalisation (the mean; at most size x size pixels, the same on every channel) and
    nothing else changed. Mean 0.5: no pixel, padding included, is 0 before the erasing."""
    imgs = torch.randint(1, 256, (40, 3, 8, 8), dtype=torch.uint8)
    ds = ArrayDataset(imgs, torch.arange(40))
    kw = dict(train=True, device="cpu", mean=(0.5,) * 3, std=(1, 1, 1), gpu_resident=gpu_resident, num_workers=0)
    plain = list(make_loader(ds, 8, augment=AugmentConfig(crop_padding=2), **kw))
    cut = list(make_loader(ds, 8, augment=AugmentConfig(crop_padding=2, cutout=3), **kw))
    assert len(plain) == len(cut) == 5
    sizes = []
    for (xp, yp), (xc, yc) in zip(plain, cut):
        assert torch.equal(yp, yc)
        erased = (xc == 0) & (xp != 0)
        assert torch.equal(erased[:, 0:1].expand_as(erased), erased)  # same square on every channel
        assert torch.equal(xc[~erased], xp[~erased])
        for e in erased[:, 0]:
            rows, cols = e.any(1).nonzero().flatten(), e.any(0).nonzero().flatten()
            assert len(rows) and len(cols) and len(rows) <= 3 and len(cols) <= 3
            assert e[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # a filled rectangle
            sizes.append(int(e.sum()))
    assert 9 in sizes and min(sizes) < 9  # full squares inside, clipped ones at the border
    kw["train"] = False
    ev = make_loader(ds, 8, augment=AugmentConfig(cutout=3), **kw)
    assert all((x != 0).all() for x, _ in ev)  # evaluation never erases
    kw["train"] = True
    with pytest.raises(ValueError, match="cutout=9 is larger than the 8x8 images: use at most 8"):
        make_loader(ds, 8, augment=AugmentConfig(cutout=9), **kw)


def test_reference_augment_batch_applies_cutout():
    from moecnn.data import augment_batch

    x = torch.randint(1, 256, (16, 3, 8, 8), dtype=torch.uint8)
    mean, std = torch.full((1, 3, 1, 1), 0.5), torch.ones(1, 3, 1, 1)
    plain = augment_batch(x, AugmentConfig(crop_padding=0, flip=False), torch.Generator().manual_seed(0), mean, std)
    cut = augment_batch(x, AugmentConfig(crop_padding=0, flip=False, cutout=4), torch.Generator().manual_seed(0),
                        mean, std)
    erased = (cut == 0).all(1)  # N x H x W, every channel
    assert torch.equal(cut == 0, erased.unsqueeze(1).expand_as(cut)) and (plain != 0).all()
    assert ((erased.sum((1, 2)) >= 4) & (erased.sum((1, 2)) <= 16)).all()  # a clipped 4 x 4 square, at least 2 x 2
    assert torch.equal(cut[~(cut == 0)], plain[~(cut == 0)])


# ----------------------------------------------------------------------------------------- synthetic
def _band_energy(x: torch.Tensor) -> torch.Tensor:
    """Share of the (non-DC) spectral energy between 1.5 and 9 cycles per image."""
    f = x.float() / 255
    power = torch.fft.fft2(f - f.mean((2, 3), keepdim=True)).abs().pow(2).sum(1)
    k = torch.fft.fftfreq(x.shape[-1]) * x.shape[-1]
    radius = (k[:, None] ** 2 + k[None, :] ** 2).sqrt()
    return (power * ((radius >= 1.5) & (radius <= 9))).sum((1, 2)) / power.sum((1, 2))


def test_synthetic_deterministic_with_planted_superclasses():
    x1, y1 = make_synthetic(600, seed=4)
    x2, y2 = make_synthetic(600, seed=4)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(make_synthetic(600, seed=5)[0], x1)
    assert x1.shape == (600, 3, 32, 32) and torch.bincount(y1).tolist() == [60] * 10
    # one spectral feature + a threshold fitted on one sample separates the superclasses on another
    feat, sup = _band_energy(x1), y1 >= 5
    thr = max(torch.linspace(0.0, 1.0, 101).tolist(), key=lambda t: ((feat < t) == sup).float().mean().item())
    x3, y3 = make_synthetic(600, seed=6)
    assert ((_band_energy(x3) < thr) == (y3 >= 5)).float().mean() > 0.9


# ----------------------------------------------------------------------------------------- other sets
def test_digits():
    b = build_data(DataConfig(name="digits", val_size=200, image_size=16))
    assert b.in_channels == 1 and b.image_size == 16 and b.train.images.shape[1:] == (1, 16, 16)
    assert len(b.train) + len(b.val) + len(b.test) == 1797 and len(b.val) == 200
    assert [b.superclass_names[s] for s in b.class_to_super].count("loops") == 4


def test_image_folder_and_torch_loader(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 2)):
        for c in ("cat", "dog", "car"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                size = (12, 12) if i else (10, 14)  # a differently sized image gets resized
                Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(tmp_path / split / c / f"{i}.png")
    smap = tmp_path / "supers.json"
    smap.write_text(json.dumps({"cat": "animal", "dog": "animal", "car": "vehicle"}))
    b = build_data(DataConfig(name="image_folder", root=str(tmp_path), val_size=3, superclass_map=str(smap), image_size=12))
    assert b.class_names == ["car", "cat", "dog"] and b.superclass_names == ["animal", "vehicle"]
    assert b.class_to_super == [1, 0, 0] and (len(b.train), len(b.val), len(b.test)) == (15, 3, 6)
    assert b.in_channels == 3 and len(b.mean) == 3
    smap.write_text(json.dumps({"cat": "animal", "dog": "animal"}))
    with pytest.raises(ValueError, match=r"supers\.json: no superclass for classes \['car'\]"):
        build_data(DataConfig(name="image_folder", root=str(tmp_path), val_size=3, superclass_map=str(smap)))
    kw = dict(train=True, device="cpu", mean=b.mean, std=b.std, augment=AugmentConfig(color_jitter=0.3), num_workers=0)
    ld = make_loader(b.train, 4, **kw)
    assert isinstance(ld, TorchLoader) and len(ld) == 3
    r1, r2 = list(ld), list(make_loader(b.train, 4, **kw))
    assert all(torch.equal(a[0], c[0]) and torch.equal(a[1], c[1]) for a, c in zip(r1, r2))
    assert r1[0][0].shape == (4, 3, 12, 12) and r1[0][0].dtype == torch.float32
    ev = make_loader(b.test, 4, train=False, device="cpu", mean=b.mean, std=b.std, augment=None, num_workers=0)
    assert len(ev) == 2 and torch.cat([y for _, y in ev]).tolist() == b.test.labels.tolist()
    shards = [torch.cat([y for _, y in make_loader(b.train, 2, rank=r, world_size=2, drop_last=False, **kw)])
              for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 7


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_loader_on_cuda_matches_cpu_eval():
    ds = ArrayDataset(torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8), torch.arange(50) % 10)
    kw = dict(train=False, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), augment=None)
    cpu = torch.cat([x for x, _ in make_loader(ds, 16, device="cpu", **kw)])
    gpu = torch.cat([x for x, _ in make_loader(ds, 16, device="cuda", **kw)])
    assert gpu.is_cuda and torch.allclose(cpu, gpu.cpu(), atol=1e-6)
    aug = AugmentConfig(crop_padding=2, flip=True, color_jitter=0.3)
    runs = [[x for x, _ in make_loader(ds, 16, train=True, device="cuda", mean=kw["mean"], std=kw["std"], augment=aug)]
            for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs)) and runs[0][0].shape == (16, 3, 8, 8)


def test_custom_registered_builder_with_plain_dataset():
    class Plain(torch.utils.data.Dataset):
        def __len__(self):
            return 40

        def __getitem__(self, i):
            return torch.full((1, 4, 4), i, dtype=torch.uint8), i % 4

    def builder(cfg):
        from moecnn.data import DataBundle

        return DataBundle("plain", Plain(), None, Plain(), 4, list("abcd"), None, None, 1, 4, (), ())

    DATASETS.register("_test_plain")(builder)
    try:
        b = build_data(DataConfig(name="_test_plain", val_size=8, train_subset=20))
    finally:
        DATASETS._items.pop("_test_plain")
    assert len(b.train) == 20 and len(b.val) == 8
    val_labels = [b.val[i][1] for i in range(8)]
    assert sorted(val_labels) == [0, 0, 1, 1, 2, 2, 3, 3]  # stratified
    assert {int(b.train[i][0][0, 0, 0]) for i in range(20)}.isdisjoint({int(b.val[i][0][0, 0, 0]) for i in range(8)})
    assert len(b.mean) == 1 and b.mean[0] > 0


def test_crop_flip_gather_matches_slicing():
    from moecnn.data import crop_flip_gather, crop_grid

    imgs = torch.randint(0, 256, (40, 3, 9, 7), dtype=torch.uint8)
    padded = torch.nn.functional.pad(imgs, (2, 2, 2, 2))
    index = torch.tensor([5, 0, 39, 5, 17, 8])
    top, left = torch.tensor([0, 4, 2, 1, 3, 4]), torch.tensor([4, 0, 2, 3, 1, 4])
    flip = torch.tensor([True, False, True, False, False, True])
    out = crop_flip_gather(padded, index, top, left, flip, crop_grid(3, (9, 7), (13, 11)))
    for k in range(6):
        ref = padded[index[k], :, top[k]:top[k] + 9, left[k]:left[k] + 7]
        assert torch.equal(out[k], ref.flip(-1) if flip[k] else ref)


def test_gpu_loader_augmentation_is_crop_flip_of_the_original():
    imgs = torch.randint(1, 256, (30, 3, 6, 6), dtype=torch.uint8)
    ds = ArrayDataset(imgs, torch.arange(30))
    ld = make_loader(ds, 8, train=True, device="cpu", mean=(0, 0, 0), std=(1, 1, 1), augment=AugmentConfig(crop_padding=1))
    flipped = 0
    for x, y in ld:
        assert x.shape == (8, 3, 6, 6)
        for xi, yi in zip(x, y):
            img = (xi * 255).round().to(torch.uint8)
            windows = torch.nn.functional.pad(imgs[yi], (1, 1, 1, 1)).unfold(1, 6, 1).unfold(2, 6, 1)  # C 3 3 6 6
            plain = any(torch.equal(img, windows[:, a, b]) for a in range(3) for b in range(3))
            mirror = any(torch.equal(img, windows[:, a, b].flip(-1)) for a in range(3) for b in range(3))
            assert plain or mirror
            flipped += mirror and not plain
    assert 0 < flipped < 24
