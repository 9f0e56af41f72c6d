"""Per-image attributes computed from uint8 pixels (vectorised numpy/scipy), for the attribute tests.

``image_attributes(images)`` returns, for M×C×H×W uint8 images (C = 1 grey, 3 RGB; a 4th channel is ignored),
{name: (M,) float64}. Pixel values are scaled to [0, 1]; luma is Rec. 601 (0.299 R + 0.587 G + 0.114 B).

- ``hue`` (RGB only, degrees in [0, 360), circular; 0 = red, 120 = green, 240 = blue): angle of the image's mean
  opponent-colour vector α = R − (G+B)/2, β = √3/2 (G − B), i.e. the chroma-weighted circular mean of the
  per-pixel (hexagonal) hue. NaN when that mean chroma is below ``HUE_MIN_CHROMA`` (a grey image has no hue).
- ``saturation`` (RGB only): mean HSV saturation (max − min) / max per pixel (0 for black pixels).
- ``brightness``: mean luma.
- ``contrast``: RMS contrast, the standard deviation of luma.
- ``high_freq``: share of the luma power spectrum (mean removed) at radial frequencies above 0.25 cycles/pixel
  (half the Nyquist frequency); 0 for a flat image.
- ``edge_density``: share of pixels whose Sobel gradient magnitude of luma exceeds ``EDGE_THRESHOLD`` (0.5, the
  response to a step of 1/8 of the value range), borders replicated.
"""
from __future__ import annotations

from typing import Dict

import numpy as np

ATTRIBUTES = ("hue", "saturation", "brightness", "contrast", "high_freq", "edge_density")
CIRCULAR = ("hue",)
HUE_MIN_CHROMA = 0.02
EDGE_THRESHOLD = 0.5
HIGH_FREQ_CUTOFF = 0.25


def _sobel_magnitude(luma: np.ndarray) -> np.ndarray:
    """Sobel gradient magnitude of a B×H×W stack, each image on its own (kernels 1×3×3, nearest borders)."""
    from scipy.ndimage import correlate

    kx = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float32)[None]
    gx = correlate(luma, kx, mode="nearest")
    gy = correlate(luma, np.ascontiguousarray(kx.transpose(0, 2, 1)), mode="nearest")
    return np.hypot(gx, gy)


def _high_freq_share(luma: np.ndarray) -> np.ndarray:
    h, w = luma.shape[-2:]
    x = luma - luma.mean((-2, -1), keepdims=True)
    power = np.abs(np.fft.rfft2(x)) ** 2
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    high = np.hypot(fy, fx) > HIGH_FREQ_CUTOFF
    # rfft2 keeps half the columns: every column but the first (and the Nyquist one for even w) stands for two
    mult = np.full(fx.shape[1], 2.0)
    mult[0] = 1.0
    if w % 2 == 0:
        mult[-1] = 1.0
    power = power * mult
    tot = power.sum((-2, -1))
    hi = (power * high).sum((-2, -1))
    return np.divide(hi, tot, out=np.zeros_like(tot), where=tot > 1e-12)


def image_attributes(images: np.ndarray, batch_size: int = 2048) -> Dict[str, np.ndarray]:
    """The attributes of the module docstring for uint8 M×C×H×W ``images`` -> {name: (M,) float64}."""
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"image_attributes needs uint8 M×C×H×W images, got {images.dtype} {images.shape}")
    m, c = images.shape[:2]
    rgb = c >= 3
    names = [a for a in ATTRIBUTES if rgb or a not in ("hue", "saturation")]
    out = {a: np.empty(m, dtype=np.float64) for a in names}
    for s in range(0, m, batch_size):
        x = images[s:s + batch_size].astype(np.float32) / 255.0
        sl = slice(s, s + len(x))
        if rgb:
            r, g, b = x[:, 0], x[:, 1], x[:, 2]
            luma = 0.299 * r + 0.587 * g + 0.114 * b
            alpha = (r - 0.5 * (g + b)).mean((1, 2))
            beta = (np.sqrt(3.0) / 2.0 * (g - b)).mean((1, 2))
            hue = np.degrees(np.arctan2(beta, alpha)) % 360.0
            out["hue"][sl] = np.where(np.hypot(alpha, beta) >= HUE_MIN_CHROMA, hue, np.nan)
            mx, mn = x[:, :3].max(1), x[:, :3].min(1)
            sat = np.divide(mx - mn, mx, out=np.zeros_like(mx), where=mx > 0)
            out["saturation"][sl] = sat.mean((1, 2))
        else:
            luma = x[:, 0]
        out["brightness"][sl] = luma.mean((1, 2))
        out["contrast"][sl] = luma.std((1, 2))
        out["high_freq"][sl] = _high_freq_share(luma)
        out["edge_density"][sl] = (_sobel_magnitude(luma) > EDGE_THRESHOLD).mean((1, 2))
    return out
