"""Classification data: dataset readers/builders (registered in ``moecnn.DATASETS``) and fast loaders.

Typical use::

    bundle = build_data(DataConfig(name="cifar100", root="/data/cifar100"))
    train = make_loader(bundle.train, 128, train=True, device="cuda", mean=bundle.mean, std=bundle.std,
                        augment=AugmentConfig(color_jitter=0.3))
    for epoch in range(epochs):
        train.set_epoch(epoch)
        for x, y in train: ...
"""
from .config import AugmentConfig, DataConfig
from .datasets import (
    ArrayDataset,
    DataBundle,
    ImageFolderDataset,
    as_data_config,
    build_data,
    class_to_super_from_labels,
    compute_mean_std,
    default_root,
    load_cifar_split,
    load_fashion_split,
    read_cifar_arrays,
    read_cifar_pickles,
    read_idx,
    stratified_split,
)
from .loader import (
    GPULoader,
    TorchLoader,
    augment_batch,
    color_jitter,
    crop_flip_gather,
    crop_grid,
    cutout,
    jitter_factors,
    make_loader,
    mix_seed,
    normalize,
    random_crop,
    random_flip,
    torchvision_transform,
)
from .synthetic import make_synthetic

__all__ = [
    "AugmentConfig", "DataConfig", "ArrayDataset", "DataBundle", "ImageFolderDataset", "build_data",
    "as_data_config", "make_loader", "GPULoader", "TorchLoader", "augment_batch", "random_crop", "random_flip",
    "color_jitter", "crop_flip_gather", "crop_grid", "cutout", "jitter_factors", "normalize", "mix_seed",
    "make_synthetic", "stratified_split", "compute_mean_std",
    "read_idx", "read_cifar_pickles", "read_cifar_arrays", "load_cifar_split", "load_fashion_split",
    "class_to_super_from_labels", "default_root", "torchvision_transform",
]
