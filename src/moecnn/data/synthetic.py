"""A procedurally generated 10-class RGB dataset with planted superclass structure.

Two superclasses drawn from clearly different image distributions, so that MoE experts have something
to specialise on:

* ``stripes`` (classes 0-4): sinusoidal gratings over the whole image: vertical bars, horizontal bars,
  diagonal bars (+-45 degrees, either sign), plaid (vertical + horizontal), each 2-5 cycles per image
  and jittered by up to +-15 degrees; "fine": 5-8 cycles per image at any orientation. Phase, contrast
  and the two colours are nuisances. Every class is closed under horizontal flips, so the default flip
  augmentation never turns one class into another.
* ``blobs`` (classes 5-9): one foreground shape on a smooth colour ramp; the class is the shape (disk,
  square, ring, plus, pair of small disks). Position, size, colours and ramp direction are nuisances.

All images get the same light Gaussian luminance noise. Generation is fully vectorised and deterministic
given ``seed`` (about 1 s per 6000 images on one busy CPU core).
"""
from __future__ import annotations

import math
from typing import List, Tuple

import torch

CLASS_NAMES: List[str] = [
    "vertical", "horizontal", "diagonal", "plaid", "fine",
    "disk", "square", "ring", "plus", "pair",
]
SUPERCLASS_NAMES: List[str] = ["stripes", "blobs"]
CLASS_TO_SUPER: List[int] = [0] * 5 + [1] * 5
NUM_CLASSES = len(CLASS_NAMES)


def _rand(g: torch.Generator, *shape: int, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    return torch.rand(*shape, generator=g) * (hi - lo) + lo


def make_synthetic(n: int, seed: int = 0, image_size: int = 32,
                   noise: float = 0.06) -> Tuple[torch.Tensor, torch.Tensor]:
    """Generate ``n`` images: returns (uint8 N x 3 x S x S, int64 labels N), classes balanced up to one."""
    g = torch.Generator().manual_seed(seed)
    s = image_size
    labels = (torch.arange(n) % NUM_CLASSES)[torch.randperm(n, generator=g)]
    coords = torch.arange(s, dtype=torch.float32) + 0.5 - s / 2
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")  # S x S, centred pixel coordinates
    bg = _rand(g, n, 3, lo=0.15, hi=0.85)
    fg = torch.remainder(bg + _rand(g, n, 3, lo=0.25, hi=0.75), 1.0)  # every channel 0.25-0.5 away from bg
    weight = torch.empty(n, s, s)  # 0 = background colour, 1 = foreground colour
    base = torch.zeros(n, s, s)  # additive, shared by the channels: smooth ramp (blobs only) + noise

    stripes = torch.nonzero(labels < 5).squeeze(1)
    m = len(stripes)
    kind = labels[stripes]
    # orientation: 0 vertical bars, pi/2 horizontal bars, +-pi/4 diagonal, plaid 0 (+ pi/2), fine: any
    theta = torch.tensor([0.0, math.pi / 2, math.pi / 4, 0.0, 0.0])[kind]
    theta = theta * torch.where(kind == 2, torch.randint(0, 2, (m,), generator=g) * 2.0 - 1, torch.ones(m))
    theta = torch.where(kind == 4, _rand(g, m, hi=math.pi), theta + _rand(g, m, lo=-1.0, hi=1.0) * math.radians(15))
    freq = torch.where(kind == 4, _rand(g, m, lo=5.0, hi=8.0), _rand(g, m, lo=2.0, hi=5.0))
    phase = _rand(g, 2, m, hi=2 * math.pi)
    contrast = _rand(g, m, lo=0.35, hi=1.0)[:, None, None]
    wave = _grating(xx, yy, theta, freq, phase[0], s)
    plaid = (kind == 3)[:, None, None]
    wave = torch.where(plaid, 0.5 * (wave + _grating(xx, yy, theta + math.pi / 2, freq, phase[1], s)), wave)
    weight[stripes] = 0.5 + 0.5 * contrast * wave

    blobs = torch.nonzero(labels >= 5).squeeze(1)
    m = len(blobs)
    shape = labels[blobs] - 5
    cx, cy = (_rand(g, 2, m, lo=-s / 5, hi=s / 5)).unbind(0)
    radius = _rand(g, m, lo=0.14 * s, hi=0.3 * s)[:, None, None]
    dx, dy = xx - cx[:, None, None], yy - cy[:, None, None]
    weight[blobs] = _shape_masks(shape, dx, dy, radius, g)
    ramp_dir = _rand(g, m, hi=2 * math.pi)[:, None, None]
    base[blobs] = (0.15 / s) * (xx * torch.cos(ramp_dir) + yy * torch.sin(ramp_dir))

    # luminance noise (shared by the channels) keeps generation cheap
    base.add_(torch.randn(base.shape, generator=g), alpha=noise)
    img = (fg - bg)[:, :, None, None] * weight[:, None]
    img.add_(bg[:, :, None, None]).add_(base[:, None])
    return img.clamp_(0, 1).mul_(255).round_().to(torch.uint8), labels.long()


def _grating(xx: torch.Tensor, yy: torch.Tensor, theta: torch.Tensor, freq: torch.Tensor, phase: torch.Tensor,
             size: int) -> torch.Tensor:
    """sin(2 pi f u / S + phase) with u the coordinate along direction theta (one grating per image)."""
    u = xx * torch.cos(theta)[:, None, None] + yy * torch.sin(theta)[:, None, None]
    return torch.sin(2 * math.pi * freq[:, None, None] * u / size + phase[:, None, None])


def _shape_masks(shape: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, radius: torch.Tensor,
                 g: torch.Generator) -> torch.Tensor:
    """Foreground masks (float, m x S x S) of the blob shapes, one shape code (0-4) per image."""
    out = torch.zeros_like(dx)
    ang = _rand(g, len(shape), hi=2 * math.pi)[:, None, None]
    for code in range(5):
        i = torch.nonzero(shape == code).squeeze(1)
        x, y, rad = dx[i], dy[i], radius[i]
        if code == 0:  # disk
            mask = x * x + y * y < rad * rad
        elif code == 1:  # square of about the disk's area
            mask = torch.maximum(x.abs(), y.abs()) < 0.87 * rad
        elif code == 2:  # ring
            r2 = x * x + y * y
            mask = (r2 < rad * rad) & (r2 > (0.55 * rad) ** 2)
        elif code == 3:  # plus
            ax, ay = x.abs(), y.abs()
            mask = ((ax < rad / 3) & (ay < rad)) | ((ay < rad / 3) & (ax < rad))
        else:  # pair of small disks on a random axis
            ox, oy, small = 0.55 * rad * torch.cos(ang[i]), 0.55 * rad * torch.sin(ang[i]), (0.42 * rad) ** 2
            mask = ((x - ox) ** 2 + (y - oy) ** 2 < small) | ((x + ox) ** 2 + (y + oy) ** 2 < small)
        out[i] = mask.float()
    return out
