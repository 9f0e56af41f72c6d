"""Batch iterators: a GPU-resident loader with vectorised on-device augmentation, and a DataLoader path.

Both yield ``(x, y)``: float32 normalised N x C x H x W images and int64 labels, on ``device``; both have
``__len__`` (batches per epoch on this rank) and ``set_epoch(epoch)``. Shuffling and augmentation are
deterministic functions of ``(seed, epoch)`` (and the rank / sample index), never of the global RNG.
"""
from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Subset

from .config import AugmentConfig
from .datasets import ArrayDataset

Batch = Tuple[torch.Tensor, torch.Tensor]


def mix_seed(*values: int) -> int:
    """Combine integers into one well-mixed 63-bit seed (order-sensitive)."""
    state = np.random.SeedSequence([int(v) % 2**32 for v in values]).generate_state(2)
    return (int(state[0]) << 31 | int(state[1])) & (2**63 - 1)


# --------------------------------------------------------------------------------------------- augmentation
def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Per-image random crop of the original size from the zero-padded batch (N x C x H x W, any dtype)."""
    if padding <= 0:
        return x
    n, c, h, w = x.shape
    dev = x.device
    off = torch.randint(0, 2 * padding + 1, (2, n), generator=generator, device=dev)
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = (off[0, :, None] + torch.arange(h, device=dev)).view(n, 1, h, 1)
    cols = (off[1, :, None] + torch.arange(w, device=dev)).view(n, 1, 1, w)
    sample, channel = torch.arange(n, device=dev).view(n, 1, 1, 1), torch.arange(c, device=dev).view(1, c, 1, 1)
    return padded[sample, channel, rows, cols]


def random_flip(x: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Flip each image horizontally with probability ``p``."""
    flip = torch.rand(len(x), generator=generator, device=x.device) < p
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def crop_grid(channels: int, out_hw: Tuple[int, int], padded_hw: Tuple[int, int],
              device: Union[torch.device, str, None] = None) -> torch.Tensor:
    """Linear offsets (2 x C x H x W, int64) of an H x W window at (0, 0) inside one C x Hp x Wp image;
    index 0 plain, index 1 horizontally flipped. See :func:`crop_flip_gather`."""
    (h, w), (hp, wp) = out_hw, padded_hw
    c = torch.arange(channels, device=device).view(-1, 1, 1) * (hp * wp)
    grid = c + torch.arange(h, device=device).view(1, -1, 1) * wp + torch.arange(w, device=device).view(1, 1, -1)
    return torch.stack([grid, grid.flip(-1)])


def crop_flip_gather(padded: torch.Tensor, index: torch.Tensor, top: torch.Tensor, left: torch.Tensor,
                     flip: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Crop ``padded[index[k], :, top[k]:top[k]+H, left[k]:left[k]+W]`` (flipped where ``flip[k]``) for every k
    in one gather from the contiguous uint8 N x C x Hp x Wp tensor; ``grid`` comes from :func:`crop_grid`.

    A handful of kernel launches per batch whatever the batch size: the random crop + flip hot path of
    :class:`GPULoader` (the dataset is kept zero-padded on the device, so no per-batch padding either).
    """
    return _gather(padded, crop_starts(padded.shape, index, top, left), flip.long(), grid)


def crop_starts(padded_shape: Sequence[int], index: torch.Tensor, top: torch.Tensor,
                left: torch.Tensor) -> torch.Tensor:
    """Linear position of each crop's first element in the flattened padded tensor."""
    _, c, hp, wp = padded_shape
    return index * (c * hp * wp) + top * wp + left


def _gather(padded: torch.Tensor, starts: torch.Tensor, flip: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    return padded.view(-1)[grid[flip] + starts.view(-1, 1, 1, 1)]


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def color_jitter(x: torch.Tensor, strength: float, generator: Optional[torch.Generator] = None,
                 factors: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Brightness, contrast and saturation jitter like ``ColorJitter(s, s, s)`` on float images in [0, 1].

    Per-image factors are uniform in [max(0, 1 - s), 1 + s]; applied in the fixed order brightness,
    contrast (blend with the mean grey level), saturation (blend with the grey image; no-op for 1 channel).
    ``factors`` (3 x N, brightness/contrast/saturation) replaces the draw from ``generator``.
    """
    if strength <= 0:
        return x
    if factors is None:
        factors = jitter_factors(len(x), strength, generator, x.device)
    f = factors.view(3, -1, 1, 1, 1)
    x = (x * f[0]).clamp_(0, 1)
    mean_grey = _gray(x).mean((1, 2, 3), keepdim=True)
    x.mul_(f[1]).add_((1 - f[1]) * mean_grey).clamp_(0, 1)
    if x.shape[1] == 3:
        x.mul_(f[2]).add_((1 - f[2]) * _gray(x)).clamp_(0, 1)
    return x


def jitter_factors(n: int, strength: float, generator: Optional[torch.Generator],
                   device: Union[torch.device, str, None] = None) -> torch.Tensor:
    """3 x n brightness/contrast/saturation factors, uniform in [max(0, 1 - s), 1 + s]."""
    lo, hi = max(0.0, 1 - strength), 1 + strength
    return torch.empty(3, n, device=device).uniform_(lo, hi, generator=generator)


def cutout(x: torch.Tensor, size: int, generator: Optional[torch.Generator] = None,
           centres: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Set one ``size`` x ``size`` square per image to 0 (in place; ``x`` is the normalised float batch, so 0 is
    the dataset mean). Centres (2 x N, row/column) are uniform over the image, drawn from ``generator`` unless
    given; the square is clipped at the border (Cutout, DeVries & Taylor 2017)."""
    if size <= 0:
        return x
    n, _, h, w = x.shape
    if centres is None:
        centres = cutout_centres(n, (h, w), generator, x.device)
    top, left = (centres - size // 2).unbind(0)
    rows = torch.arange(h, device=x.device) - top.view(n, 1)  # position inside the square when in [0, size)
    cols = torch.arange(w, device=x.device) - left.view(n, 1)
    inside = ((rows >= 0) & (rows < size)).view(n, 1, h, 1) & ((cols >= 0) & (cols < size)).view(n, 1, 1, w)
    return x.masked_fill_(inside, 0.0)


def cutout_centres(n: int, hw: Sequence[int], generator: Optional[torch.Generator],
                   device: Union[torch.device, str, None] = None) -> torch.Tensor:
    """2 x n (row, column) square centres for :func:`cutout`, uniform over an H x W image."""
    return torch.stack([torch.randint(0, hw[0], (n,), generator=generator, device=device),
                        torch.randint(0, hw[1], (n,), generator=generator, device=device)])


def _check_cutout(size: int, hw: Sequence[int]) -> int:
    if size > min(hw):
        raise ValueError(f"data.augment.cutout={size} is larger than the {hw[0]}x{hw[1]} images: use at most "
                         f"{min(hw)} (8 is the usual value for 32x32 CIFAR), or 0 for off")
    return int(size)


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (0-255) or float ([0, 1]) batch -> float32 ``(x - mean) / std`` with 1 x C x 1 x 1 mean/std."""
    scale = 1 / (std * 255) if x.dtype == torch.uint8 else 1 / std
    return (x * scale).sub_(mean / std)  # uint8 * float32 promotes: one kernel, no separate cast


def augment_batch(x: torch.Tensor, augment: Optional[AugmentConfig], generator: torch.Generator,
                  mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Reference batch augmentation: uint8 batch -> crop, flip, jitter, normalise, cutout (float32, x's device).

    :class:`GPULoader` does the same with precomputed per-epoch random draws (fewer kernel launches).
    """
    if augment is not None:
        x = random_crop(x, augment.crop_padding, generator)
        if augment.flip:
            x = random_flip(x, generator)
        if augment.color_jitter > 0:
            x = color_jitter(x.float() / 255, augment.color_jitter, generator)
    x = normalize(x, mean, std)
    if augment is not None and augment.cutout > 0:
        x = cutout(x, augment.cutout, generator)
    return x


def _stats(mean: Sequence[float], std: Sequence[float], device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(list(mean), dtype=torch.float32, device=device).view(1, -1, 1, 1),
            torch.tensor(list(std), dtype=torch.float32, device=device).view(1, -1, 1, 1))


def _eval_shard(n: int, rank: int, world_size: int) -> torch.Tensor:
    """Contiguous shard of range(n) for ``rank`` (sizes differ by at most one; all shards cover range(n))."""
    return torch.tensor_split(torch.arange(n), world_size)[rank]


# --------------------------------------------------------------------------------------------- GPU loader
class GPULoader:
    """Iterate over an :class:`ArrayDataset` held entirely on ``device`` as uint8.

    Training: a fresh permutation per epoch from ``(seed, epoch)`` (identical on all ranks); rank ``r`` takes
    the slice ``perm[r * m:(r + 1) * m]`` with ``m = N // world_size`` (disjoint, equal sizes; the
    < world_size leftover images change every epoch). Batches are augmented on the device with random draws
    made once per epoch from a generator seeded by ``(seed, epoch, rank)``. With crop/flip on, the training
    set is stored zero-padded (N x C x (H+2p) x (W+2p) uint8) so a crop + flip is one gather.
    Evaluation: original order, no augmentation, last partial batch kept, rank ``r`` gets the r-th
    contiguous shard.
    """

    def __init__(self, dataset: ArrayDataset, batch_size: int, *, train: bool, device: Union[torch.device, str],
                 mean: Sequence[float], std: Sequence[float], augment: Optional[AugmentConfig],
                 channels_last: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: Optional[bool] = None) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.dataset = dataset
        self.device = torch.device(device)
        self.batch_size, self.train, self.seed = int(batch_size), bool(train), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.drop_last = self.train if drop_last is None else bool(drop_last)
        self.augment = augment if self.train else None
        self.channels_last = channels_last
        self.mean, self.std = _stats(mean, std, self.device)
        self.epoch = 0
        self.labels = dataset.labels.to(self.device, non_blocking=True)
        self.images = dataset.images.to(self.device, non_blocking=True)
        self.num_images = len(self.images)
        self.pad = self.augment.crop_padding if self.augment is not None else 0
        self.flip = bool(self.augment is not None and self.augment.flip)
        self.jitter = float(self.augment.color_jitter) if self.augment is not None else 0.0
        self.cutout = _check_cutout(self.augment.cutout, dataset.images.shape[-2:]) if self.augment is not None else 0
        self.grid: Optional[torch.Tensor] = None
        if self.pad > 0 or self.flip:  # keep the set zero-padded on the device; crops are single gathers
            p = self.pad
            self.images = F.pad(self.images, (p, p, p, p)).contiguous()
            h, w = dataset.images.shape[-2:]
            self.grid = crop_grid(self.images.shape[1], (h, w), self.images.shape[-2:], self.device)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def num_samples(self) -> int:
        n = self.num_images
        return n // self.world_size if self.train else len(_eval_shard(n, self.rank, self.world_size))

    def indices(self) -> torch.Tensor:
        """This rank's sample indices for the current epoch, in iteration order (CPU int64)."""
        n = self.num_images
        if not self.train:
            return _eval_shard(n, self.rank, self.world_size)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(self.seed, self.epoch)))
        m = n // self.world_size
        return perm[self.rank * m:(self.rank + 1) * m]

    def __len__(self) -> int:
        m = self.num_samples
        return m // self.batch_size if self.drop_last else math.ceil(m / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        idx = self.indices().to(self.device, non_blocking=True)
        m, dev = len(idx), self.device
        gen = torch.Generator(device=dev)
        gen.manual_seed(mix_seed(self.seed, self.epoch, self.rank))
        # all random draws of the epoch up front: 3 launches per epoch instead of several per batch
        if self.grid is not None:
            top_left = torch.randint(0, 2 * self.pad + 1, (2, m), generator=gen, device=dev)
            flips = torch.zeros(m, dtype=torch.long, device=dev)
            if self.flip:
                flips = (torch.rand(m, generator=gen, device=dev) < 0.5).long()
            starts = crop_starts(self.images.shape, idx, top_left[0], top_left[1])
        if self.jitter > 0:
            factors = jitter_factors(m, self.jitter, gen, dev)
        if self.cutout > 0:
            centres = cutout_centres(m, self.dataset.images.shape[-2:], gen, dev)
        for b in range(len(self)):
            sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
            i = idx[sl]
            if self.grid is not None:
                x = _gather(self.images, starts[sl], flips[sl], self.grid)
            else:
                x = self.images[i]
            if self.jitter > 0:
                x = color_jitter(x.float() / 255, self.jitter, factors=factors[:, sl])
            x = normalize(x, self.mean, self.std)
            if self.cutout > 0:
                x = cutout(x, self.cutout, centres=centres[:, sl])
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[i]


# --------------------------------------------------------------------------------------------- DataLoader path
class _Augmented(Dataset):
    """Applies a torchvision transform to uint8 C x H x W images with a per-(seed, epoch, index) seed."""

    def __init__(self, base: Dataset, transform, seed: int) -> None:
        self.base, self.transform, self.seed, self.epoch = base, transform, seed, 0

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        x, y = self.base[i]
        x = torch.as_tensor(x)
        if self.transform is not None:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(mix_seed(self.seed, self.epoch, i))
                x = self.transform(x)
        return x, int(y)


def torchvision_transform(augment: Optional[AugmentConfig], image_size: Tuple[int, int]):
    """The torchvision (v2) equivalent of :func:`augment_batch` minus normalisation and cutout (uint8 in, uint8
    out; :class:`TorchLoader` applies cutout batch-wise after normalisation)."""
    from torchvision.transforms import v2

    if augment is None:
        return None
    ops = []
    if augment.crop_padding > 0:
        ops.append(v2.RandomCrop(image_size, padding=augment.crop_padding))
    if augment.flip:
        ops.append(v2.RandomHorizontalFlip())
    if augment.color_jitter > 0:
        s = augment.color_jitter
        ops.append(v2.ColorJitter(s, s, s))
    return v2.Compose(ops) if ops else None


class TorchLoader:
    """A standard ``DataLoader`` over a map-style dataset yielding (uint8 C x H x W image, label).

    Augmentation runs per sample in the workers (torchvision transforms, seeded per sample and epoch);
    normalisation runs batch-wise on ``device``. ``world_size > 1``: training uses ``DistributedSampler``
    (shuffle, drop_last), evaluation gives each rank a contiguous shard.
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, train: bool, device: Union[torch.device, str],
                 mean: Sequence[float], std: Sequence[float], augment: Optional[AugmentConfig],
                 channels_last: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: Optional[bool] = None, num_workers: int = 2) -> None:
        self.device = torch.device(device)
        self.batch_size, self.train, self.seed = int(batch_size), bool(train), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.drop_last = self.train if drop_last is None else bool(drop_last)
        self.num_workers, self.channels_last = int(num_workers), channels_last
        self.mean, self.std = _stats(mean, std, self.device)
        self.cutout = 0
        transform = None
        if self.train and augment is not None and len(dataset) > 0:  # type: ignore[arg-type]
            first = torch.as_tensor(dataset[0][0])
            transform = torchvision_transform(augment, tuple(first.shape[-2:]))
            self.cutout = _check_cutout(augment.cutout, first.shape[-2:])
        self.dataset = dataset
        self.data = _Augmented(dataset, transform, self.seed)
        self.sampler: Optional[DistributedSampler] = None
        if self.train and self.world_size > 1:
            self.sampler = DistributedSampler(self.data, num_replicas=self.world_size, rank=self.rank,
                                              shuffle=True, seed=self.seed, drop_last=True)
        self.source: Dataset = self.data
        if not self.train and self.world_size > 1:
            self.source = Subset(self.data, _eval_shard(len(self.data), self.rank, self.world_size).tolist())
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = self.data.epoch = int(epoch)
        if self.sampler is not None:
            self.sampler.set_epoch(self.epoch)

    @property
    def num_samples(self) -> int:
        return len(self.sampler) if self.sampler is not None else len(self.source)  # type: ignore[arg-type]

    def __len__(self) -> int:
        m = self.num_samples
        return m // self.batch_size if self.drop_last else math.ceil(m / self.batch_size)

    def _loader(self) -> DataLoader:
        sampler = self.sampler
        if self.train and sampler is None:
            gen = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
            sampler = RandomSampler(self.source, generator=gen)
        return DataLoader(self.source, batch_size=self.batch_size, sampler=sampler, drop_last=self.drop_last,
                          num_workers=self.num_workers, pin_memory=self.device.type == "cuda",
                          generator=torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, 1)))

    def __iter__(self) -> Iterator[Batch]:
        gen = None
        if self.cutout > 0:  # batch-wise on the device after normalisation, as in GPULoader
            gen = torch.Generator(device=self.device)
            gen.manual_seed(mix_seed(self.seed, self.epoch, self.rank, 2))
        for x, y in self._loader():
            x = normalize(x.to(self.device, non_blocking=True), self.mean, self.std)
            if gen is not None:
                x = cutout(x, self.cutout, gen)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y.to(self.device, non_blocking=True)


def make_loader(dataset: Union[ArrayDataset, Dataset], batch_size: int, *, train: bool,
                device: Union[torch.device, str], mean: Sequence[float], std: Sequence[float],
                augment: Optional[AugmentConfig], channels_last: bool = False, seed: int = 0, rank: int = 0,
                world_size: int = 1, drop_last: Optional[bool] = None, num_workers: int = 2,
                gpu_resident: bool = True) -> Union[GPULoader, TorchLoader]:
    """A :class:`GPULoader` for an :class:`ArrayDataset` (unless ``gpu_resident=False``), else a
    :class:`TorchLoader`. ``drop_last=None`` means True for training and False for evaluation;
    ``augment`` is ignored when ``train=False``."""
    kwargs = dict(train=train, device=device, mean=mean, std=std, augment=augment, channels_last=channels_last,
                  seed=seed, rank=rank, world_size=world_size, drop_last=drop_last)
    if isinstance(dataset, ArrayDataset) and gpu_resident:
        return GPULoader(dataset, batch_size, **kwargs)
    return TorchLoader(dataset, batch_size, num_workers=num_workers, **kwargs)
