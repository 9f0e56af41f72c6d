"""t-SNE of raw gate logits and the thumbnail canvases of the paper's Fig. 3 / Fig. 4."""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np


def subsample(n: int, max_points: int, seed: int = 0, labels: Optional[np.ndarray] = None) -> np.ndarray:
    """Sorted indices of at most ``max_points`` of ``n`` items (seeded; stratified by ``labels`` if given)."""
    if n <= max_points:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    if labels is None:
        return np.sort(rng.choice(n, max_points, replace=False))
    labels = np.asarray(labels)
    # stratified: shuffle, then take items in order of their within-class rank
    perm = rng.permutation(n)
    lab = labels[perm]
    order = np.argsort(lab, kind="stable")
    rank = np.empty(n, dtype=np.int64)
    sorted_lab = lab[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_lab)) + 1]
    run_start = np.repeat(starts, np.diff(np.r_[starts, n]))
    rank[order] = np.arange(n) - run_start
    pick = perm[np.argsort(rank, kind="stable")[:max_points]]
    return np.sort(pick)


def tsne_embed(x: np.ndarray, seed: int = 0, perplexity: float = 30.0, max_iter: int = 500) -> np.ndarray:
    """2-D t-SNE (sklearn, PCA init, seeded) of the rows of ``x`` (M×D) -> M×2 float array."""
    from sklearn.manifold import TSNE

    x = np.asarray(x, dtype=np.float32)
    m = x.shape[0]
    if m < 5:
        return np.zeros((m, 2), dtype=np.float32) + np.arange(m, dtype=np.float32)[:, None]
    x = x - x.mean(0)
    # tiny jitter: identical rows (e.g. a constant gate) would make the affinities degenerate
    x = x + np.random.default_rng(seed).normal(0, 1e-4 * (x.std() + 1e-6), x.shape).astype(np.float32)
    perp = float(min(perplexity, max(2.0, (m - 1) / 3.0)))
    kwargs = dict(n_components=2, perplexity=perp, init="pca", learning_rate="auto", random_state=seed)
    try:
        tsne = TSNE(max_iter=max_iter, **kwargs)
    except TypeError:  # older scikit-learn
        tsne = TSNE(n_iter=max_iter, **kwargs)
    try:  # one OpenMP thread: with torch's own pool loaded, more threads oversubscribe small machines badly
        from threadpoolctl import threadpool_limits

        limit = threadpool_limits(limits=1, user_api="openmp")
    except Exception:  # pragma: no cover - threadpoolctl ships with scikit-learn
        limit = None
    try:
        return tsne.fit_transform(x).astype(np.float32)
    finally:
        if limit is not None:
            limit.restore_original_limits()


def to_hwc(images: np.ndarray) -> np.ndarray:
    """uint8 M×C×H×W (C = 1 or 3) or M×H×W×C -> uint8 M×H×W×3."""
    im = np.asarray(images)
    if im.ndim == 3:
        im = im[:, None]
    if im.ndim == 4 and im.shape[1] in (1, 3, 4) and im.shape[-1] not in (1, 3, 4):
        im = im.transpose(0, 2, 3, 1)
    elif im.ndim == 4 and im.shape[1] in (1, 3, 4) and im.shape[-1] in (1, 3, 4) and im.shape[1] < im.shape[-1]:
        im = im.transpose(0, 2, 3, 1)
    if im.dtype != np.uint8:
        f = im.astype(np.float32)
        if f.max() <= 1.0 + 1e-6:
            f = f * 255.0
        im = np.clip(f, 0, 255).astype(np.uint8)
    if im.shape[-1] == 1:
        im = np.repeat(im, 3, axis=-1)
    elif im.shape[-1] == 4:
        im = im[..., :3]
    return im


def grid_assign(coords: np.ndarray, grid: int) -> Tuple[np.ndarray, np.ndarray]:
    """Place points on a ``grid``×``grid`` canvas: each cell keeps the point nearest its centre.

    Returns (point indices, cell indices) of the placed points (row-major cells, y grows downwards).
    """
    c = np.asarray(coords, dtype=np.float64)
    if c.shape[0] == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    lo, hi = c.min(0), c.max(0)
    u = (c - lo) / np.where(hi - lo > 0, hi - lo, 1.0)  # [0, 1]
    u[:, 1] = 1.0 - u[:, 1]
    cell_xy = np.minimum((u * grid).astype(np.int64), grid - 1)
    centre = (cell_xy + 0.5) / grid
    dist = ((u - centre) ** 2).sum(1)
    cell = cell_xy[:, 1] * grid + cell_xy[:, 0]
    order = np.lexsort((dist, cell))
    first = np.r_[True, np.diff(cell[order]) != 0]
    pts = order[first]
    return pts, cell[pts]


def thumbnail_canvas(coords: np.ndarray, images: np.ndarray, grid: int = 30, thumb: Optional[int] = None,
                     background: int = 255, borders: Optional[np.ndarray] = None,
                     palette: Optional[np.ndarray] = None) -> np.ndarray:
    """Fig. 3 canvas: image thumbnails placed at their t-SNE coordinates on a ``grid``×``grid`` canvas.

    ``images``: uint8 M×C×H×W (or M×H×W×C), aligned with ``coords`` (M×2). ``borders`` (M ints) with
    ``palette`` (K×3 uint8) draws a 1-px coloured frame per thumbnail (e.g. the chosen expert).
    Returns an H'×W'×3 uint8 array.
    """
    im = to_hwc(images)
    h, w = im.shape[1:3] if im.shape[0] else (32, 32)
    if thumb is not None and (h, w) != (thumb, thumb) and im.shape[0]:
        im = _resize_nearest(im, thumb)
        h = w = thumb
    canvas = np.full((grid * h, grid * w, 3), background, dtype=np.uint8)
    pts, cells = grid_assign(coords, grid)
    for p, cidx in zip(pts, cells):
        r, col = divmod(int(cidx), grid)
        tile = im[p]
        if borders is not None and palette is not None:
            tile = tile.copy()
            colr = palette[int(borders[p]) % len(palette)]
            tile[0, :], tile[-1, :], tile[:, 0], tile[:, -1] = colr, colr, colr, colr
        canvas[r * h:(r + 1) * h, col * w:(col + 1) * w] = tile
    return canvas


def _resize_nearest(im: np.ndarray, size: int) -> np.ndarray:
    h, w = im.shape[1:3]
    ys = (np.arange(size) * h / size).astype(np.int64)
    xs = (np.arange(size) * w / size).astype(np.int64)
    return im[:, ys][:, :, xs]


def montage(images: np.ndarray, cols: int = 8, pad: int = 2, background: int = 255,
            max_side: int = 64, min_side: int = 0) -> np.ndarray:
    """Images side by side in rows of ``cols`` (uint8 H×W×3), resized (nearest) into [min_side, max_side]."""
    im = to_hwc(images)
    if im.shape[0] == 0:
        return np.full((8, 8, 3), background, dtype=np.uint8)
    if max(im.shape[1:3]) > max_side:
        im = _resize_nearest(im, max_side)
    elif max(im.shape[1:3]) < min_side:
        im = _resize_nearest(im, min_side)
    m, h, w = im.shape[:3]
    rows = -(-m // cols)
    cols = min(cols, m)
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), background, dtype=np.uint8)
    for i in range(m):
        r, c = divmod(i, cols)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = im[i]
    return out
