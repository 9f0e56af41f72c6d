"""Dataset containers, readers for the official file formats, and the registered dataset builders.

Every builder is registered in :data:`moecnn.registry.DATASETS` under its name and has the signature
``builder(cfg: DataConfig) -> DataBundle`` returning the *full* training split (``val=None``) and empty
``mean``/``std`` when they are not known constants; :func:`build_data` then holds out the validation
split, applies the subsets and computes the statistics. Register your own builder the same way.
"""
from __future__ import annotations

import gzip
import json
import lzma
import os
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from ..registry import DATASETS
from .config import DataConfig
from .synthetic import CLASS_NAMES as SYN_CLASSES
from .synthetic import CLASS_TO_SUPER as SYN_C2S
from .synthetic import SUPERCLASS_NAMES as SYN_SUPERS
from .synthetic import make_synthetic

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_SUPERS = ["tops", "bottoms", "footwear", "bags"]
FASHION_C2S = [0, 1, 0, 0, 0, 2, 0, 2, 3, 2]
DIGITS_SUPERS = ["loops", "strokes"]  # digits with a closed loop {0, 6, 8, 9} vs the rest
DIGITS_C2S = [0, 1, 1, 1, 1, 1, 0, 1, 0, 0]

# Official archives (the same URLs and checksums torchvision uses).
CIFAR_ARCHIVES = {
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),
}
FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_FILES = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
FASHION_DEBIAN_ROOT = "/usr/share/datasets/fashion-mnist"
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


# --------------------------------------------------------------------------------------------- containers
@dataclass
class ArrayDataset:
    """An in-memory image classification set: uint8 N x C x H x W images and int64 labels, on the CPU."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"ArrayDataset.images must be uint8 N x C x H x W, got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        self.labels = self.labels.long()
        if self.labels.shape != (len(self.images),):
            raise ValueError(f"ArrayDataset: {len(self.images)} images but labels of shape {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])

    @property
    def targets(self) -> torch.Tensor:
        return self.labels

    def subset(self, idx: Union[torch.Tensor, Sequence[int]]) -> "ArrayDataset":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return ArrayDataset(self.images[idx], self.labels[idx])


class ImageFolderDataset(Dataset):
    """Images on disk, ``root/<class>/<file>``; yields (uint8 C x H x W tensor, label).

    Every image is converted to RGB (or to L when the first image is greyscale) and resized (bilinear) to
    ``size`` = (H, W) when it differs, so that batches can be stacked.
    """

    def __init__(self, samples: Sequence[Tuple[str, int]], size: Tuple[int, int], mode: str = "RGB") -> None:
        self.samples = list(samples)
        self.size = size
        self.mode = mode
        self.labels = torch.tensor([s[1] for s in self.samples], dtype=torch.long)

    @property
    def targets(self) -> torch.Tensor:
        return self.labels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.samples[i]
        with Image.open(path) as im:
            im = im.convert(self.mode)
            if (im.height, im.width) != self.size:
                im = im.resize((self.size[1], self.size[0]), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
        arr = arr[:, :, None] if arr.ndim == 2 else arr
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous(), label

    def subset(self, idx: Union[torch.Tensor, Sequence[int]]) -> "ImageFolderDataset":
        return ImageFolderDataset([self.samples[int(i)] for i in idx], self.size, self.mode)


@dataclass
class DataBundle:
    """Everything the trainer and the analyses need to know about one dataset."""

    name: str
    train: Union[ArrayDataset, Dataset]
    val: Optional[Union[ArrayDataset, Dataset]]
    test: Union[ArrayDataset, Dataset]
    num_classes: int
    class_names: List[str]
    superclass_names: Optional[List[str]]
    class_to_super: Optional[List[int]]  # length num_classes
    in_channels: int
    image_size: int
    mean: Tuple[float, ...]  # per channel, [0, 1] units, of the training split
    std: Tuple[float, ...]


# --------------------------------------------------------------------------------------------- helpers
def default_root(name: str) -> Path:
    """``$MOECNN_DATA_DIR/<name>`` when set, else ``~/.cache/moecnn/<name>``."""
    base = os.environ.get("MOECNN_DATA_DIR")
    return Path(base) / name if base else Path.home() / ".cache" / "moecnn" / name


def _root(cfg: DataConfig, name: str) -> Path:
    return Path(cfg.root).expanduser() if cfg.root else default_root(name)


def _missing(what: str, root: Path, expected: str, can_download: bool = True) -> FileNotFoundError:
    how = "pass data.download=true where the internet exists, or " if can_download else "pass "
    return FileNotFoundError(f"{what} not found under {root}: expected {expected}; {how}data.root=DIR (see README)")


def _open(path: Path):
    """Open ``path`` for binary reading, transparently decompressing .gz and .xz."""
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    if path.suffix == ".xz":
        return lzma.open(path, "rb")
    return open(path, "rb")


def _find(root: Path, stem: str, suffixes: Sequence[str] = ("", ".xz", ".gz")) -> Optional[Path]:
    for suf in suffixes:
        p = root / f"{stem}{suf}"
        if p.is_file():
            return p
    return None


def _load_npy(path: Path) -> np.ndarray:
    try:
        with _open(path) as f:
            return np.load(f, allow_pickle=False)
    except Exception as e:  # truncated, corrupt or not a .npy at all
        raise ValueError(f"cannot read {path}: {type(e).__name__}: {e}") from None


def _hwc_to_tensor(x: np.ndarray, path: Path, channels: int, size: int) -> torch.Tensor:
    if x.dtype != np.uint8 or x.shape[1:] != (size, size, channels):
        raise ValueError(f"{path}: expected uint8 N x {size} x {size} x {channels} images, "
                         f"got {x.dtype} {x.shape}")
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _labels(y: Any, n: int, num_classes: int, path: Path) -> torch.Tensor:
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise ValueError(f"{path}: expected {n} labels (one per image), got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer) or (n and (y.min() < 0 or y.max() >= num_classes)):
        raise ValueError(f"{path}: labels must be integers in [0, {num_classes}), got {y.dtype} "
                         f"range [{y.min() if n else '-'}, {y.max() if n else '-'}]")
    return torch.from_numpy(y.astype(np.int64))


def class_to_super_from_labels(fine: np.ndarray, coarse: np.ndarray, num_fine: int) -> List[int]:
    """Derive the fine -> coarse map from paired label arrays; raises if a fine class has two parents."""
    fine, coarse = np.asarray(fine).astype(np.int64), np.asarray(coarse).astype(np.int64)
    out = [-1] * num_fine
    pairs = np.unique(np.stack([fine, coarse], 1), axis=0)
    for f, c in pairs:
        if out[f] not in (-1, c):
            raise ValueError(f"fine class {f} appears with coarse labels {out[f]} and {c}")
        out[f] = int(c)
    if -1 in out:
        raise ValueError(f"fine classes {[i for i, c in enumerate(out) if c < 0]} never occur in the labels")
    return out


# --------------------------------------------------------------------------------------------- CIFAR
def _unpickle(path: Path) -> Dict[str, Any]:
    """An official CIFAR pickle, read with a restricted unpickler (builtins and numpy arrays only)."""
    from ..safeio import load_pickle

    d = load_pickle(path)
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(d).__name__}")
    return {_str(k): v for k, v in d.items()}


def _str(v: Any) -> Any:
    return v.decode("latin1") if isinstance(v, bytes) else v


def _cifar_batch(path: Path, label_key: str,
                 num_classes: int) -> Tuple[torch.Tensor, torch.Tensor, Optional[np.ndarray]]:
    """One official CIFAR pickle -> (uint8 N x 3 x 32 x 32, int64 labels, coarse labels or None)."""
    d = _unpickle(path)
    if "data" not in d or label_key not in d:
        raise ValueError(f"{path}: missing key 'data' or '{label_key}' (keys: {sorted(d)})")
    x = np.asarray(d["data"])
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        raise ValueError(f"{path}: expected uint8 'data' of shape N x 3072, got {x.dtype} {x.shape}")
    y = _labels(d[label_key], len(x), num_classes, path)
    coarse = np.asarray(d["coarse_labels"]) if "coarse_labels" in d else None
    if coarse is not None:
        _labels(coarse, len(x), 20, path)
    return torch.from_numpy(x.reshape(-1, 3, 32, 32).copy()), y, coarse


def read_cifar_pickles(root: Path, num_classes: int, split: str) -> Tuple[ArrayDataset, Dict[str, Any]]:
    """Read ``cifar-100-python/{train,test,meta}`` or ``cifar-10-batches-py/{data_batch_*,test_batch,batches.meta}``.

    Returns the split and a dict with ``class_names`` and, for CIFAR-100, ``superclass_names`` and
    ``class_to_super`` (derived from the fine/coarse label pairs of the split).
    """
    if num_classes == 100:
        folder = root / "cifar-100-python"
        x, y, coarse = _cifar_batch(folder / split, "fine_labels", 100)
        meta = _unpickle(folder / "meta")
        if "fine_label_names" not in meta or "coarse_label_names" not in meta:
            raise ValueError(f"{folder / 'meta'}: missing 'fine_label_names' or 'coarse_label_names'")
        info: Dict[str, Any] = {"class_names": [_str(c) for c in meta["fine_label_names"]],
                                "superclass_names": [_str(c) for c in meta["coarse_label_names"]]}
        if coarse is None:
            raise ValueError(f"{folder / split}: missing 'coarse_labels'")
        info["class_to_super"] = class_to_super_from_labels(y.numpy(), coarse, 100)
    else:
        folder = root / "cifar-10-batches-py"
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        parts = [_cifar_batch(folder / n, "labels", 10) for n in names]
        x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        meta = _unpickle(folder / "batches.meta")
        info = {"class_names": [_str(c) for c in meta.get("label_names", CIFAR10_CLASSES)]}
    if len(info["class_names"]) != num_classes:
        raise ValueError(f"{folder}: meta lists {len(info['class_names'])} class names, expected {num_classes}")
    return ArrayDataset(x, y), info


def read_cifar_arrays(root: Path, num_classes: int, split: str) -> Tuple[ArrayDataset, Dict[str, Any]]:
    """Read ``{split}_x.npy[.xz]`` (uint8 N x 32 x 32 x 3) and ``{split}_y_fine.npy`` (or ``{split}_y.npy``),
    plus ``{split}_y_coarse.npy`` and ``label_names.json`` when present."""
    xp = _find(root, f"{split}_x.npy")
    yp = _find(root, f"{split}_y_fine.npy") or _find(root, f"{split}_y.npy")
    if xp is None or yp is None:
        raise FileNotFoundError(f"{root}: {split}_x.npy[.xz] or {split}_y_fine.npy missing")
    x = _hwc_to_tensor(_load_npy(xp), xp, 3, 32)
    y = _labels(_load_npy(yp), len(x), num_classes, yp)
    info: Dict[str, Any] = {}
    names_path = root / "label_names.json"
    if names_path.is_file():
        try:
            names = json.loads(names_path.read_text())
        except ValueError as e:
            raise ValueError(f"{names_path}: invalid JSON ({e})") from None
        info["class_names"] = list(names.get("fine_label_names") or names.get("label_names") or [])
        if names.get("coarse_label_names"):
            info["superclass_names"] = list(names["coarse_label_names"])
    if num_classes == 10 and not info.get("class_names"):
        info["class_names"] = list(CIFAR10_CLASSES)
    if not info.get("class_names"):
        info["class_names"] = [f"class_{i}" for i in range(num_classes)]
    if len(info["class_names"]) != num_classes:
        raise ValueError(f"{names_path}: lists {len(info['class_names'])} class names, expected {num_classes}")
    cp = _find(root, f"{split}_y_coarse.npy")
    if num_classes == 100 and cp is not None:
        coarse = _load_npy(cp)
        _labels(coarse, len(x), 20, cp)
        info["class_to_super"] = class_to_super_from_labels(y.numpy(), coarse, 100)
        info.setdefault("superclass_names", [f"superclass_{i}" for i in range(20)])
    return ArrayDataset(x, y), info


def load_cifar_split(root: Path, num_classes: int, split: str,
                     download: bool = False) -> Tuple[ArrayDataset, Dict[str, Any]]:
    """Load one split of CIFAR-10/100 from the official pickle folder or the .npy arrays under ``root``."""
    name = f"cifar{num_classes}"
    folder = "cifar-100-python" if num_classes == 100 else "cifar-10-batches-py"
    if root.name == folder:  # root given as the extracted folder itself
        root = root.parent
    if not (root / folder).is_dir() and _find(root, f"{split}_x.npy") is None and download:
        from torchvision.datasets.utils import download_and_extract_archive

        url, md5 = CIFAR_ARCHIVES[name]
        download_and_extract_archive(url, str(root), md5=md5)
    if (root / folder).is_dir():
        return read_cifar_pickles(root, num_classes, split)
    if _find(root, f"{split}_x.npy") is not None:
        return read_cifar_arrays(root, num_classes, split)
    label = "CIFAR-100" if num_classes == 100 else "CIFAR-10"
    raise _missing(label, root, f"{folder}/ or {split}_x.npy[.xz]")


def _build_cifar(cfg: DataConfig, num_classes: int) -> DataBundle:
    name = f"cifar{num_classes}"
    root = _root(cfg, name)
    train, info = load_cifar_split(root, num_classes, "train", cfg.download)
    test, _ = load_cifar_split(root, num_classes, "test", False)
    if num_classes == 100:
        supers, c2s = info.get("superclass_names"), info.get("class_to_super")
        mean, std = CIFAR100_MEAN, CIFAR100_STD
    else:
        supers = ["vehicles", "animals"]
        vehicles = {"airplane", "automobile", "ship", "truck"}
        c2s = [0 if c in vehicles else 1 for c in info["class_names"]]
        mean, std = CIFAR10_MEAN, CIFAR10_STD
    return DataBundle(name, train, None, test, num_classes, info["class_names"], supers, c2s, 3, 32, mean, std)


@DATASETS.register("cifar100")
def build_cifar100(cfg: DataConfig) -> DataBundle:
    """CIFAR-100 (50k/10k, 32 x 32 RGB), superclasses = the 20 official coarse classes."""
    return _build_cifar(cfg, 100)


@DATASETS.register("cifar10")
def build_cifar10(cfg: DataConfig) -> DataBundle:
    """CIFAR-10 (50k/10k, 32 x 32 RGB), superclasses = vehicles {airplane, automobile, ship, truck} vs animals."""
    return _build_cifar(cfg, 10)


# --------------------------------------------------------------------------------------------- Fashion-MNIST
def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format; plain or .gz): big-endian magic 0x0000TTNN, NN int32 dims, data."""
    types = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
             0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
    try:
        with _open(path) as f:
            raw = f.read()
    except Exception as e:
        raise ValueError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in types:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4: 4 + 4 * ndim])
    dtype = np.dtype(types[raw[2]])
    count = int(np.prod(dims)) if dims else 1
    if len(raw) - 4 - 4 * ndim != count * dtype.itemsize:
        raise ValueError(f"{path}: IDX header says {dims} ({count * dtype.itemsize} bytes) but the file holds "
                         f"{len(raw) - 4 - 4 * ndim} data bytes")
    return np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim).reshape(dims).astype(dtype.newbyteorder("="))


def load_fashion_split(root: Path, split: str, download: bool = False) -> ArrayDataset:
    """Load ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` from ``root``."""
    prefix = "train" if split == "train" else "t10k"
    stems = [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]
    if download and any(_find(root, s) is None for s in stems):
        from torchvision.datasets.utils import download_url

        for fname, md5 in FASHION_FILES.items():
            if not (root / fname).is_file():
                download_url(FASHION_URL + fname, str(root), filename=fname, md5=md5)
    paths = [_find(root, s) for s in stems]
    if paths[0] is None or paths[1] is None:
        raise _missing("Fashion-MNIST", root, f"{stems[0]}[.gz] and {stems[1]}[.gz] "
                       "(Debian: apt install dataset-fashion-mnist)")
    x, y = read_idx(paths[0]), read_idx(paths[1])
    if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != (28, 28):
        raise ValueError(f"{paths[0]}: expected uint8 N x 28 x 28 images, got {x.dtype} {x.shape}")
    return ArrayDataset(torch.from_numpy(x.copy())[:, None], _labels(y, len(x), 10, paths[1]))


@DATASETS.register("fashion_mnist")
def build_fashion_mnist(cfg: DataConfig) -> DataBundle:
    """Fashion-MNIST (60k/10k, 28 x 28 grey); superclasses tops/bottoms/footwear/bags."""
    if cfg.root:
        root = Path(cfg.root).expanduser()
    else:
        root = Path(FASHION_DEBIAN_ROOT) if Path(FASHION_DEBIAN_ROOT).is_dir() else default_root("fashion_mnist")
    train = load_fashion_split(root, "train", cfg.download)
    test = load_fashion_split(root, "test", False)
    return DataBundle("fashion_mnist", train, None, test, 10, list(FASHION_CLASSES), list(FASHION_SUPERS),
                      list(FASHION_C2S), 1, 28, (), ())


# --------------------------------------------------------------------------------------------- digits
@DATASETS.register("digits")
def build_digits(cfg: DataConfig) -> DataBundle:
    """scikit-learn's 1797 8 x 8 digits, bilinearly upscaled to ``image_size`` (default 32), 1 channel.

    The fixed test split is a stratified 20 % (seed 0, independent of ``cfg.seed``). Superclasses: digits
    drawn with a closed loop {0, 6, 8, 9} vs open strokes {1, 2, 3, 4, 5, 7}.
    """
    from sklearn.datasets import load_digits

    size = cfg.image_size or 32
    d = load_digits()
    x = torch.from_numpy(d.images).float()[:, None] / 16.0
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    full = ArrayDataset((x.clamp(0, 1) * 255).round().to(torch.uint8), torch.from_numpy(d.target))
    train_idx, test_idx = stratified_split(full.labels, len(full) // 5, seed=0)
    return DataBundle("digits", full.subset(train_idx), None, full.subset(test_idx), 10,
                      [str(i) for i in range(10)], list(DIGITS_SUPERS), list(DIGITS_C2S), 1, size, (), ())


# --------------------------------------------------------------------------------------------- synthetic
@DATASETS.register("synthetic")
def build_synthetic(cfg: DataConfig) -> DataBundle:
    """The procedurally generated stripes-vs-blobs set (see :mod:`moecnn.data.synthetic`).

    The images depend only on the sizes (train seed 0, test seed 1), not on ``cfg.seed``, which only
    moves the validation split.
    """
    size = cfg.image_size or 32
    train = ArrayDataset(*make_synthetic(cfg.synthetic_train_size, seed=0, image_size=size))
    test = ArrayDataset(*make_synthetic(cfg.synthetic_test_size, seed=1, image_size=size))
    return DataBundle("synthetic", train, None, test, len(SYN_CLASSES), list(SYN_CLASSES), list(SYN_SUPERS),
                      list(SYN_C2S), 3, size, (), ())


# --------------------------------------------------------------------------------------------- image folders
def _scan(folder: Path, classes: Optional[List[str]] = None) -> Tuple[List[str], List[Tuple[str, int]]]:
    found = sorted(p.name for p in folder.iterdir() if p.is_dir())
    classes = classes if classes is not None else found
    unknown = set(found) - set(classes)
    if unknown:
        raise ValueError(f"{folder}: class folders {sorted(unknown)} do not exist in the train split")
    index = {c: i for i, c in enumerate(classes)}
    samples = [(str(p), index[c]) for c in found for p in sorted((folder / c).iterdir())
               if p.suffix.lower() in IMAGE_EXTS]
    return classes, samples


@DATASETS.register("image_folder")
def build_image_folder(cfg: DataConfig) -> DataBundle:
    """``root/train/<class>/*.png|jpg`` and ``root/test/<class>/...``; loaded lazily (DataLoader path).

    Images are resized to ``image_size`` x ``image_size`` when that is set, else to the size of the first
    training image. Greyscale first image -> 1 channel, else RGB. ``superclass_map``: JSON
    {class_name: superclass_name} covering every class; superclasses are numbered in sorted name order.
    """
    from PIL import Image

    root = _root(cfg, "image_folder")
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise _missing("image folder", root, "train/<class>/*.png|jpg and test/<class>/...", can_download=False)
    classes, train_samples = _scan(root / "train")
    _, test_samples = _scan(root / "test", classes)
    if not train_samples:
        raise ValueError(f"{root / 'train'}: no images ({', '.join(sorted(IMAGE_EXTS))}) found")
    with Image.open(train_samples[0][0]) as im:
        mode = "L" if im.mode in ("L", "1", "I", "I;16", "F") else "RGB"
        size = (cfg.image_size, cfg.image_size) if cfg.image_size else (im.height, im.width)
    supers = c2s = None
    if cfg.superclass_map:
        try:
            mapping = json.loads(Path(cfg.superclass_map).expanduser().read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read superclass map {cfg.superclass_map}: {e}") from None
        missing = [c for c in classes if c not in mapping]
        if missing:
            raise ValueError(f"{cfg.superclass_map}: no superclass for classes {missing}")
        supers = sorted({str(mapping[c]) for c in classes})
        c2s = [supers.index(str(mapping[c])) for c in classes]
    return DataBundle("image_folder", ImageFolderDataset(train_samples, size, mode), None,
                      ImageFolderDataset(test_samples, size, mode), len(classes), classes, supers, c2s,
                      1 if mode == "L" else 3, size[0], (), ())


# --------------------------------------------------------------------------------------------- assembly
def stratified_split(labels: torch.Tensor, n_val: int, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Seeded stratified hold-out: returns sorted (keep_idx, held_out_idx) with ``len(held_out) == n_val``.

    Each class contributes in proportion to its frequency: samples are shuffled, ranked within their
    class, and the ones with the smallest within-class rank fraction are held out.
    """
    labels = torch.as_tensor(labels).long()
    n = len(labels)
    if not 0 <= n_val < n:
        raise ValueError(f"cannot hold out {n_val} of {n} images")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    lab = labels[perm]
    order = torch.sort(lab, stable=True).indices  # positions in perm, grouped by class, random within class
    counts = torch.bincount(lab)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(n) - starts[lab[order]]
    frac = (rank.double() + 0.5) / counts[lab].double()
    chosen = perm[torch.sort(frac, stable=True).indices]
    return torch.sort(chosen[n_val:]).values, torch.sort(chosen[:n_val]).values


def _take(ds: Any, idx: torch.Tensor) -> Any:
    """``ds.subset(idx)`` where the dataset has it, else a ``torch.utils.data.Subset``."""
    return ds.subset(idx) if hasattr(ds, "subset") else torch.utils.data.Subset(ds, idx.tolist())


def _targets(ds: Any) -> torch.Tensor:
    """Labels of every sample (``ds.targets`` when present, else read one by one)."""
    if hasattr(ds, "targets"):
        return torch.as_tensor(ds.targets).long()
    return torch.tensor([int(ds[i][1]) for i in range(len(ds))])


def _subset(ds: Any, n: Optional[int]) -> Any:
    return ds if n is None or n >= len(ds) else _take(ds, torch.arange(n))


def compute_mean_std(ds: Any, max_samples: Optional[int] = None) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units over evenly spaced images of ``ds``: all images of an
    :class:`ArrayDataset`, at most 2000 of a lazily loaded dataset (unless ``max_samples`` says otherwise)."""
    n = len(ds)
    if max_samples is None:
        max_samples = n if isinstance(ds, ArrayDataset) else 2000
    idx = torch.linspace(0, n - 1, min(n, max_samples)).round().long().unique()
    if isinstance(ds, ArrayDataset):
        s = s2 = 0.0
        for chunk in idx.split(4096):
            x = ds.images[chunk].double()
            s = s + x.sum((0, 2, 3))
            s2 = s2 + (x * x).sum((0, 2, 3))
        count = len(idx) * ds.images.shape[2] * ds.images.shape[3]
    else:
        s = s2 = 0.0
        count = 0
        for i in idx.tolist():
            x = ds[i][0].double()
            s, s2, count = s + x.sum((1, 2)), s2 + (x * x).sum((1, 2)), count + x[0].numel()
    mean = s / count
    std = (s2 / count - mean * mean).clamp_min(0).sqrt()
    return tuple((mean / 255).tolist()), tuple((std / 255).clamp_min(1e-3).tolist())


def build_data(cfg: Union[DataConfig, Any]) -> DataBundle:
    """Build the registered dataset ``cfg.name``: hold out ``val_size`` stratified training images
    (seeded by ``cfg.seed``, never from test), apply the subsets and fill in mean/std."""
    cfg = as_data_config(cfg)
    bundle: DataBundle = DATASETS.get(cfg.name)(cfg)
    train, val = bundle.train, None
    if cfg.val_size > 0:
        if cfg.val_size >= len(train):
            raise ValueError(f"data.val_size={cfg.val_size} leaves no training images ({cfg.name} train has "
                             f"{len(train)}); lower data.val_size")
        keep, held = stratified_split(_targets(train), cfg.val_size, cfg.seed)
        train, val = _take(train, keep), _take(train, held)
    train = _subset(train, cfg.train_subset)
    test = _subset(bundle.test, cfg.test_subset)
    mean, std = bundle.mean, bundle.std
    if not mean:
        mean, std = compute_mean_std(train)
    return replace(bundle, train=train, val=val, test=test, mean=tuple(mean), std=tuple(std))


def as_data_config(cfg: Any) -> DataConfig:
    """Accept a DataConfig, an OmegaConf DictConfig or a plain dict (missing keys take the defaults)."""
    if isinstance(cfg, DataConfig):
        return cfg
    from omegaconf import OmegaConf

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), cfg))
