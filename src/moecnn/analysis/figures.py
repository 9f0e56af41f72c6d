"""Matplotlib figures of the routing analysis (Agg backend; every function returns PNG bytes)."""
from __future__ import annotations

import io
from typing import Dict, Optional, Sequence

import numpy as np

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402

DPI = 100


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def image_png(img: np.ndarray) -> bytes:
    """A uint8 H×W×3 array as PNG bytes (no axes)."""
    buf = io.BytesIO()
    plt.imsave(buf, np.asarray(img), format="png")
    return buf.getvalue()


def expert_palette(n: int) -> np.ndarray:
    """n distinct RGB uint8 colours."""
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return (np.array([cmap(i % cmap.N)[:3] for i in range(n)]) * 255).astype(np.uint8)


def bar_utilisation(util: Dict, title: str = "") -> bytes:
    n = util["num_experts"]
    x = np.arange(n)
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * n + 2), 3))
    wdt = 0.27
    ax.bar(x - wdt, util["mean_importance"], wdt, label="mean importance")
    ax.bar(x, util["top1_share"], wdt, label="top-1 share")
    ax.bar(x + wdt, util["routed_share"], wdt, label="routed share")
    ax.axhline(1.0 / n, color="grey", ls="--", lw=0.8, label="uniform 1/N")
    ax.set_xticks(x, [f"E{i}" for i in x])
    ax.set_ylabel("share of images")
    ax.set_title(title or f"CV_imp={util['cv_imp']:.3f}  CV_act={util['cv_act']:.3f}  living {util['n_living']}/{n}")
    ax.legend(fontsize=7, loc="best")
    return _png(fig)


def heatmap(mat: np.ndarray, row_names: Sequence[str], col_names: Sequence[str], title: str = "",
            cmap: str = "viridis", annotate: Optional[bool] = None, fmt: str = ".2f",
            xlabel: str = "expert", ylabel: str = "") -> bytes:
    mat = np.asarray(mat, dtype=np.float64)
    r, c = mat.shape
    annotate = (r * c <= 400) if annotate is None else annotate
    h = min(max(2.5, 0.18 * r + 1.2), 22)
    fig, ax = plt.subplots(figsize=(max(3.5, 0.55 * c + 2.5), h))
    im = ax.imshow(mat, aspect="auto", cmap=cmap, interpolation="nearest")
    ax.set_xticks(range(c), list(col_names), fontsize=8)
    fs = 8 if r <= 40 else 6 if r <= 110 else 4
    ax.set_yticks(range(r), list(row_names), fontsize=fs)
    if annotate:
        for i in range(r):
            for j in range(c):
                if np.isfinite(mat[i, j]):
                    rgb = im.cmap(im.norm(mat[i, j]))[:3]  # dark cell -> white text, light cell -> black
                    ax.text(j, i, format(mat[i, j], fmt), ha="center", va="center", fontsize=7,
                            color="white" if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] < 0.5 else "black")
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.04)
    return _png(fig)


def null_histogram(null_max: float, null_mean: float, observed: float, title: str) -> bytes:
    """A compact bar chart: observed score vs the permutation null's mean and max."""
    fig, ax = plt.subplots(figsize=(4, 2.2))
    ax.barh(["observed", "null max", "null mean"], [observed, null_max, null_mean],
            color=["tab:red", "tab:grey", "tab:grey"])
    ax.set_title(title, fontsize=9)
    return _png(fig)


def epochs_plot(ev: Dict, title: str = "") -> bytes:
    """Utilisation over training epochs: per-expert importance share and CV curves."""
    epochs = ev["epoch"]
    imp = [v for v in ev["importance"]]
    share = [v for v in ev["share"]]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3))
    ax = axes[0]
    series = imp if any(v is not None for v in imp) else share
    label = "importance share" if series is imp else "routed share"
    pts = [(e, v) for e, v in zip(epochs, series) if v is not None]
    if pts:
        arr = np.array([v for _, v in pts], dtype=np.float64)
        ep = [e for e, _ in pts]
        for i in range(arr.shape[1]):
            ax.plot(ep, arr[:, i], marker=".", label=f"E{i}")
        ax.legend(fontsize=7, ncol=2)
    ax.set_xlabel("epoch")
    ax.set_ylabel(label)
    ax = axes[1]
    for key in ("cv_imp", "cv_act"):
        pts = [(e, v) for e, v in zip(epochs, ev[key]) if v is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel("coefficient of variation")
    ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _png(fig)


def tsne_scatter(coords: np.ndarray, groups: np.ndarray, names: Sequence[str], title: str = "",
                 max_legend: int = 20) -> bytes:
    coords = np.asarray(coords)
    groups = np.asarray(groups)
    fig, ax = plt.subplots(figsize=(7.5, 6))
    uniq = np.unique(groups)
    cmap = plt.get_cmap("tab20" if len(uniq) > 10 else "tab10")
    for j, g in enumerate(uniq):
        sel = groups == g
        ax.scatter(coords[sel, 0], coords[sel, 1], s=5, color=cmap(j % cmap.N),
                   label=str(names[g]) if g < len(names) else str(g))
    if len(uniq) <= max_legend:
        ax.legend(fontsize=7, markerscale=2.5, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)
    return _png(fig)


def accuracy_bars(labels: Sequence[str], values: Sequence[float], title: str, ref: Optional[float] = None) -> bytes:
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(labels) + 2), 3))
    vals = [np.nan if v is None else float(v) for v in values]  # percent, as ``moecnn eval`` writes
    ax.bar(range(len(labels)), vals, color="tab:blue")
    for i, v in enumerate(vals):
        if np.isfinite(v):
            ax.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
    if ref is not None:
        ax.axhline(ref, color="tab:red", ls="--", lw=0.8, label="as trained")
        ax.legend(fontsize=7)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=10)
    return _png(fig)


def agreement_matrix(names: Sequence[str], agreement: np.ndarray, null: Optional[np.ndarray] = None) -> bytes:
    """Runs × runs heatmap of matched agreement (share of images sent to matched experts), in percent; with
    ``null`` (same shape) each cell also shows the within-class null mean below the observed value."""
    n = len(names)
    fig, ax = plt.subplots(figsize=(1.1 * n + 2.5, 0.9 * n + 1.5))
    im = ax.imshow(100 * agreement, cmap="viridis", vmin=0, vmax=100)
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            text = f"{100 * agreement[i, j]:.0f}"
            if null is not None:
                text += f"\n({100 * null[i, j]:.0f})"
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="black" if agreement[i, j] > 0.6 else "white")
    ax.set_xticks(range(n), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    fig.colorbar(im, ax=ax, label="matched agreement (%)")
    ax.set_title("images sent to matched experts, % (within-class null)" if null is not None
                 else "images sent to matched experts, %", fontsize=9)
    return _png(fig)


# ------------------------------------------------------------------ explain-the-experts figures
def _hwc(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim == 3 and img.shape[0] in (1, 3, 4) and img.shape[-1] not in (1, 3, 4):
        img = img.transpose(1, 2, 0)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim == 3 and img.shape[-1] == 4:
        img = img[..., :3]
    return img


def _show(ax, img, heat=None, cmap="jet", alpha=0.5, vmax=None):
    img = _hwc(img)
    if heat is None:
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
    else:
        grey = img.mean(-1) if img.ndim == 3 else img
        ax.imshow(grey, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        h = np.asarray(heat, dtype=np.float64)
        top = vmax if vmax is not None else (h.max() if h.max() > 0 else 1.0)
        ax.imshow(h, cmap=cmap, alpha=alpha, vmin=0, vmax=top, interpolation="bilinear")
    ax.set_xticks([])
    ax.set_yticks([])


def attribution_means(mean_images: Sequence[np.ndarray], rows: Sequence[tuple], counts: Sequence[int]) -> bytes:
    """Columns = experts; first row the mean image of the expert's routed images, then one row per
    (title, N×H×W maps) overlaid on it."""
    n = len(mean_images)
    fig, axes = plt.subplots(1 + len(rows), n, figsize=(1.9 * n + 1.2, 1.9 * (1 + len(rows))), squeeze=False)
    for e in range(n):
        _show(axes[0, e], mean_images[e])
        axes[0, e].set_title(f"E{e} ({counts[e]} images)", fontsize=8)
        for r, (title, maps) in enumerate(rows, start=1):
            _show(axes[r, e], mean_images[e], maps[e])
            if e == 0:
                axes[r, 0].set_ylabel(title, fontsize=7)
    axes[0, 0].set_ylabel("mean routed image", fontsize=7)
    fig.tight_layout()
    return _png(fig)


def attribution_examples(images: Sequence[Sequence[np.ndarray]], panels: Sequence[tuple],
                         notes: Optional[Sequence[Sequence[str]]] = None) -> bytes:
    """One row per expert: for each example image, the image and then each (title, per-expert K×H×W maps)
    overlay; ``notes`` (per expert, per example) are printed above the images."""
    n = len(images)
    k = max((len(x) for x in images), default=0)
    cols = max(1, k * (1 + len(panels)))
    fig, axes = plt.subplots(n, cols, figsize=(1.15 * cols + 0.6, 1.35 * n + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for e in range(n):
        for j, img in enumerate(images[e]):
            c0 = j * (1 + len(panels))
            ax = axes[e, c0]
            ax.axis("on")
            _show(ax, img)
            ax.set_title(notes[e][j] if notes else f"E{e}", fontsize=6)
            for p, (title, maps) in enumerate(panels, start=1):
                ax = axes[e, c0 + p]
                ax.axis("on")
                _show(ax, img, maps[e][j])
                ax.set_title(title, fontsize=6)
        axes[e, 0].set_ylabel(f"E{e}", fontsize=8)
    fig.tight_layout()
    return _png(fig)


def contribution_bars(per_expert: Sequence[Dict]) -> bytes:
    """Mean change of the true-class logit when each expert is forced (all images, images not routed to it)."""
    n = len(per_expert)
    x = np.arange(n)
    fig, ax = plt.subplots(figsize=(max(4, 0.7 * n + 2), 3))
    ax.bar(x - 0.2, [p["delta_true_mean"] for p in per_expert], 0.4, label="all images")
    if all(p.get("delta_true_mean_not_routed") is not None for p in per_expert):
        ax.bar(x + 0.2, [p["delta_true_mean_not_routed"] for p in per_expert], 0.4,
               label="images routed elsewhere")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(x, [f"E{i}" for i in x])
    ax.set_ylabel("Δ true-class logit")
    ax.set_title("forced to the expert − own routing", fontsize=9)
    ax.legend(fontsize=7)
    return _png(fig)


def attribute_panels(attrs: Dict[str, np.ndarray], chosen: np.ndarray, tests: Dict[str, Dict],
                     circular=("hue",)) -> bytes:
    """Small multiples, one per attribute: its distribution per top-1 expert (box plots; circular attributes:
    histograms over 0–360°), titled with the effect size and the BH-adjusted p-value."""
    names = list(attrs)
    cols = min(3, len(names))
    rws = -(-len(names) // cols)
    fig, axes = plt.subplots(rws, cols, figsize=(3.6 * cols, 2.6 * rws), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    experts = np.unique(chosen)
    pal = expert_palette(int(experts.max()) + 1 if experts.size else 1) / 255.0
    for ax, name in zip(axes.flat, names):
        v = np.asarray(attrs[name], dtype=np.float64)
        groups = [v[(chosen == e) & np.isfinite(v)] for e in experts]
        if name in circular:
            bins = np.linspace(0, 360, 37)
            for e, g in zip(experts, groups):
                if g.size:
                    h, _ = np.histogram(g, bins)
                    ax.step(bins[:-1], h / g.size, where="post", color=pal[e], label=f"E{e}")
            ax.set_xlim(0, 360)
            ax.set_xlabel("degrees", fontsize=7)
            ax.legend(fontsize=6)
        else:
            ax.boxplot([g if g.size else [np.nan] for g in groups], showfliers=False)
            ax.set_xticks(range(1, len(experts) + 1), [f"E{e}" for e in experts], fontsize=7)
        t = tests.get(name, {})
        p = t.get("p_bh", t.get("p_perm"))
        ptxt = f"{p:.3g}" if isinstance(p, (int, float)) else "–"
        ax.set_title(f"{name}: {t.get('effect_name', '')} {t.get('effect', 0):.3f}, p_BH {ptxt}", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return _png(fig)


def dynamics_plot(d: Dict, epochs: Sequence[int], title: str = "") -> bytes:
    """Specialisation (NMI vs its null max), stability (kept share, ARI) and top-1 shares over training."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
    ax = axes[0]
    for j, (lvl, s) in enumerate(d["specialisation"].items()):
        col = f"C{j}"
        ax.plot(epochs, s["nmi"], marker=".", color=col, label=f"NMI {lvl}")
        ax.plot(epochs, s["nmi_null_max"], ls="--", color=col, lw=0.8, label=f"null max {lvl}")
        if s.get("specialised_from") is not None:
            ax.axvline(s["specialised_from"], color=col, ls=":", lw=0.8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("NMI(top-1 expert, labels)")
    ax.legend(fontsize=7)
    ax = axes[1]
    if d["kept_share"]:
        ax.plot(epochs[1:], d["kept_share"], marker=".", label="kept top-1 expert")
        ax.plot(epochs[1:], d["ari"], marker=".", label="ARI to previous")
    ax.plot(epochs, d["agreement_with_final"], ls="--", label="same expert as at the end")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("epoch")
    ax.set_ylabel("share / ARI")
    ax.legend(fontsize=7)
    ax = axes[2]
    share = np.asarray(d["top1_share"])
    for e in range(share.shape[1]):
        ax.plot(epochs, share[:, e], marker=".", label=f"E{e}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("top-1 share of probe images")
    ax.legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _png(fig)
