"""Detection analyses (SPEC §4): do RetinaNet-MoE experts specialise on object size?

For every ground-truth box of the val set, the box is assigned to the anchor that matches it best (highest
IoU, the anchor torchvision's matcher always keeps as a positive); its FPN level and the gate weights there
are read from the MoE heads' per-level routing (per-level routing: the image's weights at that level;
per-anchor routing: the weights at that anchor's feature-map cell). From this:

* expert usage — mean sparse gate weight and share of top-1 — per COCO area bucket (small < 32²,
  medium < 96², large) and per FPN level (GT-matched, and image-level routing of every level);
* tests of independence (chi-square on the bucket × top-1-expert table, with a permutation fallback),
  also within each FPN level (size specialisation that is not just FPN level);
* heatmaps and example images with predicted boxes coloured by the expert that produced them.

``analyze_detection(run_dir)`` writes ``analysis/detection_summary.json`` and PNGs;
``detection_report_sections(run_dir)`` turns them into HTML sections for the run report.
"""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "size_expert_independence",
    "usage_table",
    "analyze_detection",
    "detection_report_sections",
    "BUCKET_NAMES",
    "detection_attribute_tests",
]

BUCKET_NAMES = ("small", "medium", "large")
LEVEL_NAMES = ("P3", "P4", "P5", "P6", "P7")
_COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c",
            "#fabebe", "#008080", "#e6beff", "#9a6324"]


def _contingency(groups: Sequence[int], experts: Sequence[int], num_groups: int, num_experts: int) -> np.ndarray:
    t = np.zeros((num_groups, num_experts), dtype=np.int64)
    np.add.at(t, (np.asarray(groups, dtype=int), np.asarray(experts, dtype=int)), 1)
    return t


def _chi2_stat(table: np.ndarray) -> float:
    n = table.sum()
    exp = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / max(n, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.nansum(np.where(exp > 0, (table - exp) ** 2 / exp, 0.0)))


def size_expert_independence(
    groups: Sequence[int],
    experts: Sequence[int],
    num_groups: Optional[int] = None,
    num_experts: Optional[int] = None,
    method: str = "chi2",
    permutations: int = 2000,
    seed: int = 0,
) -> Dict[str, Any]:
    """Test whether the top-1 expert is independent of the group (size bucket, FPN level) of objects.

    ``method="chi2"``: Pearson chi-square on the groups × experts table (empty rows/columns dropped),
    via :func:`scipy.stats.chi2_contingency`; ``"permutation"``: the same statistic against ``permutations``
    shuffles of the expert labels. Returns statistic, p_value, dof, Cramér's V, n and the table. With fewer
    than two non-empty rows or columns there is nothing to test: p_value 1.0 and ``degenerate: True``.
    """
    groups = np.asarray(groups, dtype=int)
    experts = np.asarray(experts, dtype=int)
    if groups.shape != experts.shape:
        raise ValueError(f"groups and experts differ in length: {groups.shape} vs {experts.shape}")
    g = int(num_groups if num_groups is not None else (groups.max() + 1 if groups.size else 1))
    e = int(num_experts if num_experts is not None else (experts.max() + 1 if experts.size else 1))
    table = _contingency(groups, experts, g, e)
    sub = table[table.sum(1) > 0][:, table.sum(0) > 0]
    out: Dict[str, Any] = {"method": method, "n": int(table.sum()), "table": table.tolist()}
    if sub.shape[0] < 2 or sub.shape[1] < 2:
        return {**out, "statistic": 0.0, "p_value": 1.0, "dof": 0, "cramers_v": 0.0, "degenerate": True}
    n = sub.sum()
    if method == "chi2":
        from scipy.stats import chi2_contingency

        stat, p, dof, _ = chi2_contingency(sub, correction=False)
        stat, p, dof = float(stat), float(p), int(dof)
    elif method == "permutation":
        rng = np.random.default_rng(seed)
        keep = np.isin(groups, np.nonzero(table.sum(1) > 0)[0])
        gg, ee = groups[keep], experts[keep]
        stat = _chi2_stat(sub)
        null = np.array([_chi2_stat(_contingency(gg, rng.permutation(ee), g, e)) for _ in range(permutations)])
        p = float((1 + np.sum(null >= stat - 1e-12)) / (permutations + 1))
        dof = int((sub.shape[0] - 1) * (sub.shape[1] - 1))
    else:
        raise ValueError(f"method must be 'chi2' or 'permutation', got '{method}'")
    v = float(np.sqrt(stat / (n * (min(sub.shape) - 1))))
    return {**out, "statistic": stat, "p_value": p, "dof": dof, "cramers_v": v, "degenerate": False}


def detection_attribute_tests(areas: Sequence[float], aspects: Sequence[float], levels: Sequence[int],
                              experts: Sequence[int], n_perm: int = 200, seed: int = 0) -> Dict[str, Dict]:
    """Does an object's top-1 expert depend on its size, aspect ratio or FPN level?

    Per ground-truth box: ``object_area`` = log10 of the area and ``aspect_ratio`` = log2(width / height), each
    with Kruskal–Wallis across experts (ε²), ``fpn_level`` categorical (χ², Cramér's V, NMI); all with a permutation
    null (:mod:`moecnn.analysis.stats`). Benjamini–Hochberg is applied by the caller over every head's tests.
    """
    from . import stats

    z = np.asarray(experts, dtype=np.int64)
    area = np.log10(np.clip(np.asarray(areas, dtype=np.float64), 1e-6, None))
    aspect = np.log2(np.clip(np.asarray(aspects, dtype=np.float64), 1e-6, None))
    return {"object_area": stats.association_continuous(area, z, n_perm=n_perm, seed=seed),
            "aspect_ratio": stats.association_continuous(aspect, z, n_perm=n_perm, seed=seed),
            "fpn_level": stats.association_categorical(np.asarray(levels, dtype=np.int64), z, n_perm=n_perm,
                                                       seed=seed)}


def apply_bh_heads(summary: Dict[str, Any], alpha: float = 0.05) -> None:
    """Benjamini–Hochberg over the attribute tests of every head; adds ``p_bh``/``significant_bh`` to each and
    the family table ``summary["tests"]`` (same layout as the classification summary)."""
    from . import stats

    fam = [(head, name, t) for head, h in summary.get("heads", {}).items()
           for name, t in (h.get("attribute_tests") or {}).items()]
    reject, p_adj = stats.bh_adjust([t["p_perm"] for _, _, t in fam], alpha=alpha)
    table = []
    for (head, name, t), r, pa in zip(fam, reject, p_adj):
        t["p_bh"], t["significant_bh"] = float(pa), bool(r)
        table.append({"layer": f"{head} head", "kind": "attribute", "name": name, "statistic": t["statistic"],
                      "effect": t["effect"], "effect_name": t["effect_name"], "p": t["p_perm"], "p_bh": float(pa),
                      "significant": bool(r)})
    summary["tests"] = {"method": "Benjamini-Hochberg 1995 (statsmodels multipletests, fdr_bh)", "alpha": float(alpha),
                        "n_tests": len(table), "n_significant": int(sum(t["significant"] for t in table)),
                        "family": table}


def usage_table(groups: Sequence[int], weights: np.ndarray, num_groups: int, names: Sequence[str]) -> Dict[str, Any]:
    """Per group: count, mean sparse gate weight per expert, share of top-1 per expert."""
    groups = np.asarray(groups, dtype=int)
    weights = np.asarray(weights, dtype=float).reshape(len(groups), -1)
    n_exp = weights.shape[1]
    top1 = weights.argmax(1) if len(groups) else np.zeros(0, dtype=int)
    out = {}
    for gi in range(num_groups):
        m = groups == gi
        cnt = int(m.sum())
        out[names[gi]] = {
            "n": cnt,
            "mean_weight": (weights[m].mean(0) if cnt else np.zeros(n_exp)).tolist(),
            "top1_share": (np.bincount(top1[m], minlength=n_exp) / max(cnt, 1)).tolist(),
        }
    return out


# ---------------------------------------------------------------------------------------------------------
# The analysis of a run
# ---------------------------------------------------------------------------------------------------------


def _collect(model, dataset, device, max_images, batch_size, keep_examples: int, score_thresh: float):
    from ..data.coco import area_bucket

    n = len(dataset) if max_images is None else min(len(dataset), int(max_images))
    gt_rows: Dict[str, List] = {"bucket": [], "level": [], "image": [], "area": [], "aspect": []}
    gt_w: Dict[str, List[np.ndarray]] = {}
    lvl_w: Dict[str, List[List[np.ndarray]]] = {}
    det_rows: Dict[str, List] = {"bucket": [], "level": [], "expert": []}
    examples = []
    for start in range(0, n, batch_size):
        batch = [dataset[i] for i in range(start, min(n, start + batch_size))]
        images = [b[0].to(device) for b in batch]
        targets = [{k: v.to(device) for k, v in b[1].items()} for b in batch]
        dets, info = model.analyze(images, targets)
        for key, per_level in info["level_weights"].items():
            store = lvl_w.setdefault(key, [[] for _ in per_level])
            for l, w in enumerate(per_level):
                store[l].append(w.float().cpu().numpy())
        for b, (t, g) in enumerate(zip(targets, info["gt"])):
            areas = t["area"].cpu().tolist()
            gt_rows["bucket"].extend(area_bucket(a) for a in areas)
            gt_rows["level"].extend(g["levels"].tolist())
            gt_rows["image"].extend([int(t["image_id"])] * len(areas))
            gt_rows["area"].extend(areas)
            wh = (t["boxes"][:, 2:] - t["boxes"][:, :2]).clamp_min(1e-6).cpu()
            gt_rows["aspect"].extend((wh[:, 0] / wh[:, 1]).tolist())
            for key in info["level_weights"]:
                gt_w.setdefault(key, []).append(g[f"weights_{key}"].numpy())
        for b, d in enumerate(dets):
            keep = d["scores"] >= score_thresh
            boxes = d["boxes"][keep].cpu()
            wh = (boxes[:, 2:] - boxes[:, :2]).clamp_min(0)
            det_rows["bucket"].extend(area_bucket(float(a)) for a in (wh[:, 0] * wh[:, 1]).tolist())
            det_rows["level"].extend(d["levels"][keep].cpu().tolist())
            if "experts" in d:
                det_rows["expert"].extend(d["experts"][keep].cpu().tolist())
            if len(examples) < keep_examples:
                examples.append({
                    "image": batch[b][0].cpu(),
                    "boxes": boxes.numpy(),
                    "scores": d["scores"][keep].cpu().numpy(),
                    "labels": d["labels"][keep].cpu().numpy(),
                    "experts": d["experts"][keep].cpu().numpy() if "experts" in d else None,
                    "gt": batch[b][1]["boxes"].numpy(),
                    "image_id": int(batch[b][1]["image_id"]),
                })
    gt_weights = {k: (np.concatenate(v) if v else np.zeros((0, 1))) for k, v in gt_w.items()}
    level_weights = {k: [np.concatenate(l) for l in v] for k, v in lvl_w.items()}
    return n, gt_rows, gt_weights, level_weights, det_rows, examples


def _heatmaps(summary: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = list(summary["heads"])
    fig, axes = plt.subplots(len(heads), 3, figsize=(13, 3.2 * len(heads)), squeeze=False)
    for r, key in enumerate(heads):
        h = summary["heads"][key]
        panels = [
            ("GT boxes: top-1 share by size", h["by_bucket"], "top1_share"),
            ("GT boxes: top-1 share by FPN level", h["by_level"], "top1_share"),
            ("all images: mean gate weight per level", h["level_routing"], "mean_weight"),
        ]
        for c, (title, table, field) in enumerate(panels):
            ax = axes[r, c]
            rows = [name for name, v in table.items() if v["n"] > 0]
            if not rows:
                ax.axis("off")
                continue
            m = np.array([table[name][field] for name in rows])
            im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            ax.set_yticks(range(len(rows)), [f"{name} (n={table[name]['n']})" for name in rows])
            ax.set_xticks(range(m.shape[1]), [f"E{i}" for i in range(m.shape[1])])
            for i in range(m.shape[0]):
                for j in range(m.shape[1]):
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center",
                            color="white" if m[i, j] < 0.6 else "black", fontsize=8)
            ax.set_title(f"{key} head — {title}", fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _examples_png(examples: List[Dict[str, Any]], num_experts: int, path: Path, categories: Dict[int, str],
                  label_to_cat: Dict[int, int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    cols = min(3, max(1, len(examples)))
    rows = max(1, int(np.ceil(len(examples) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, ex in zip(axes.flat, examples):
        ax.imshow(ex["image"].permute(1, 2, 0).clamp(0, 1).numpy())
        for g in ex["gt"]:
            ax.add_patch(Rectangle((g[0], g[1]), g[2] - g[0], g[3] - g[1], fill=False, ls=":", lw=1, ec="white"))
        for i, b in enumerate(ex["boxes"][:30]):
            e = int(ex["experts"][i]) if ex["experts"] is not None else -1
            col = _COLOURS[e % len(_COLOURS)] if e >= 0 else "yellow"
            ax.add_patch(Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, lw=1.6, ec=col))
            name = categories.get(label_to_cat.get(int(ex["labels"][i]), -1), str(int(ex["labels"][i])))
            ax.text(b[0], b[1], f"{name} {ex['scores'][i]:.2f}", color=col, fontsize=6, va="bottom")
        ax.set_title(f"image {ex['image_id']}", fontsize=8)
    handles = [Patch(color=_COLOURS[e % len(_COLOURS)], label=f"expert {e}") for e in range(num_experts)]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8)
    fig.suptitle("detections coloured by the expert that produced them (dotted: ground truth)", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def analyze_detection(
    run_dir: str | Path,
    max_images: Optional[int] = None,
    device: str = "auto",
    batch_size: int = 8,
    num_examples: int = 6,
    score_thresh: float = 0.3,
    method: str = "chi2",
    n_perm: int = 200,
    alpha: float = 0.05,
) -> Dict[str, Any]:
    """Expert usage by object size and FPN level for a trained detection run; writes ``analysis/``.

    Files: ``detection_summary.json``, ``detection_usage.png`` (heatmaps), ``detection_examples.png``.
    Returns the summary dict: per MoE head (``cls``/``reg``) ``by_bucket``, ``by_level``,
    ``level_routing``, ``bucket_test``, ``level_test``, ``bucket_test_within_level``, ``attribute_tests``
    (object area, aspect ratio, FPN level vs the top-1 expert, permutation nulls, BH over all heads: ``tests``);
    plus ``detections`` (share of detections per expert by size).
    """
    from ..train.distributed import pick_device
    from ..train.runs import load_run

    run_dir = Path(run_dir)
    dev = pick_device(device)
    model, cfg, task = load_run(run_dir, device=dev)
    val_ds = task.val_ds
    out = run_dir / "analysis"
    out.mkdir(exist_ok=True)
    moe_heads = model.head.moe_head_names() if hasattr(model.head, "moe_head_names") else []
    if not moe_heads:
        summary = {"task": "detection", "moe": False, "note": "dense model: no routing to analyse"}
        (out / "detection_summary.json").write_text(json.dumps(summary, indent=2))
        return summary
    n, gt_rows, gt_w, lvl_w, det_rows, examples = _collect(
        model, val_ds, dev, max_images, batch_size, num_examples, score_thresh
    )
    buckets = np.asarray(gt_rows["bucket"], dtype=int)
    levels = np.asarray(gt_rows["level"], dtype=int)
    areas = np.asarray(gt_rows["area"], dtype=float)
    aspects = np.asarray(gt_rows["aspect"], dtype=float)
    n_levels = len(LEVEL_NAMES)
    summary: Dict[str, Any] = {
        "task": "detection", "moe": True, "num_images": n, "num_gt": int(len(buckets)),
        "routing": cfg.model.routing, "method": method,
        "gt_per_bucket_level": _contingency(buckets, levels, 3, n_levels).tolist(),
        "note": ("objects are assigned to FPN levels by size, so with per-level routing any difference "
                 "between levels shows up as size dependence (even untrained); bucket_test_within_level "
                 "tests size vs expert inside each level, which per-anchor routing can make significant"),
        "heads": {},
    }
    for key, w in gt_w.items():
        n_exp = w.shape[1]
        top1 = w.argmax(1) if len(w) else np.zeros(0, dtype=int)
        lw = lvl_w[key]
        level_routing = {}
        for l, arr in enumerate(lw):
            level_routing[LEVEL_NAMES[l]] = {
                "n": int(len(arr)),
                "mean_weight": arr.mean(0).tolist(),
                "top1_share": (np.bincount(arr.argmax(1), minlength=n_exp) / max(len(arr), 1)).tolist(),
            }
        within = {}
        for l in range(n_levels):
            m = levels == l
            if m.sum() >= 2:
                within[LEVEL_NAMES[l]] = size_expert_independence(buckets[m], top1[m], 3, n_exp, method)
        summary["heads"][key] = {
            "num_experts": n_exp,
            "by_bucket": usage_table(buckets, w, 3, BUCKET_NAMES),
            "by_level": usage_table(levels, w, n_levels, LEVEL_NAMES),
            "level_routing": level_routing,
            "bucket_test": size_expert_independence(buckets, top1, 3, n_exp, method),
            "level_test": size_expert_independence(levels, top1, n_levels, n_exp, method),
            "bucket_test_within_level": within,
            "attribute_tests": detection_attribute_tests(areas, aspects, levels, top1, n_perm=n_perm),
        }
    if det_rows["expert"]:
        n_exp = max(h["num_experts"] for h in summary["heads"].values())
        summary["detections"] = {
            "score_thresh": score_thresh,
            "n": len(det_rows["expert"]),
            "by_bucket": {
                BUCKET_NAMES[b]: (np.bincount(np.asarray(det_rows["expert"])[np.asarray(det_rows["bucket"]) == b],
                                              minlength=n_exp)).tolist()
                for b in range(3)
            },
            "bucket_test": size_expert_independence(det_rows["bucket"], det_rows["expert"], 3, n_exp, method),
        }
    apply_bh_heads(summary, alpha=alpha)
    _heatmaps(summary, out / "detection_usage.png")
    if examples:
        n_exp = max(h["num_experts"] for h in summary["heads"].values())
        _examples_png(examples, n_exp, out / "detection_examples.png", val_ds.categories, val_ds.label_to_cat)
    summary["figures"] = sorted(p.name for p in out.glob("detection_*.png"))
    (out / "detection_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------


def _img_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" style="max-width:100%" src="data:image/png;base64,{data}">'


def _ap_row(name: str, m: Dict[str, Any]) -> str:
    cells = "".join(
        f"<td>{100 * m[k]:.1f}</td>" if isinstance(m.get(k), (int, float)) and m[k] >= 0 else "<td>–</td>"
        for k in ("AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L")
    )
    return f"<tr><td>{html.escape(name)}</td>{cells}</tr>"


def detection_report_sections(run_dir: str | Path) -> List[Tuple[str, str]]:
    """(title, html) sections for a detection run's report: AP (trained routing, per test-time k, per
    forced expert), size/level usage tables with independence tests, and the analysis figures embedded
    as base64 PNG data URIs. Sections whose files are missing are left out."""
    run_dir = Path(run_dir)
    sections: List[Tuple[str, str]] = []
    head = "<table><tr><th>setting</th><th>AP</th><th>AP50</th><th>AP75</th><th>AP_S</th><th>AP_M</th><th>AP_L</th></tr>"
    ev = run_dir / "eval"
    final_path = run_dir / "final.json"
    if (ev / "val.json").is_file():  # moecnn eval's suite of a detection run (its validation split)
        rows = [_ap_row("trained routing", json.loads((ev / "val.json").read_text()))]
        for name, label in (("k_sweep", "k = {}"), ("forced", "expert {} forced")):
            f = ev / f"val_{name}.json"
            if f.is_file():
                rows += [_ap_row(label.format(k), m) for k, m in json.loads(f.read_text())["results"].items()]
        sections.append(("Detection AP (COCO, %)", head + "".join(rows) + "</table>"))
    elif final_path.is_file():
        fin = json.loads(final_path.read_text())
        if fin.get("val"):
            sections.append(("Detection AP (COCO, %)", head + _ap_row("last epoch", fin["val"]) + "</table>"))
    sp = run_dir / "analysis" / "detection_summary.json"
    if sp.is_file():
        s = json.loads(sp.read_text())
        for key, h in s.get("heads", {}).items():
            n_exp = h["num_experts"]
            th = "".join(f"<th>E{i}</th>" for i in range(n_exp))
            parts = []
            for title, table in (("by object size (GT boxes)", h["by_bucket"]), ("by FPN level (GT boxes)", h["by_level"])):
                rows = "".join(
                    f"<tr><td>{html.escape(g)}</td><td>{v['n']}</td>"
                    + "".join(f"<td>{x:.2f}</td>" for x in v["top1_share"]) + "</tr>"
                    for g, v in table.items() if v["n"] > 0
                )
                parts.append(f"<p>Top-1 expert share {title}</p><table><tr><th></th><th>n</th>{th}</tr>{rows}</table>")
            for name, t in (("size bucket", h["bucket_test"]), ("FPN level", h["level_test"])):
                parts.append(
                    f"<p>Independence of top-1 expert and {name}: {t['method']} statistic {t['statistic']:.2f}, "
                    f"dof {t['dof']}, p = {t['p_value']:.3g}, Cramér's V {t['cramers_v']:.2f} (n = {t['n']})</p>"
                )
            at = h.get("attribute_tests") or {}
            if at:
                rows = "".join(
                    f"<tr><td>{html.escape(a)}</td><td>{html.escape(t['test'])}</td><td>{t['statistic']:.3g}</td>"
                    f"<td>{html.escape(t['effect_name'])} {t['effect']:.3f}</td><td>{t['p_perm']:.3g}</td>"
                    f"<td>{t.get('p_bh', float('nan')):.3g}</td>"
                    f"<td>{'yes' if t.get('significant_bh') else 'no'}</td></tr>"
                    for a, t in at.items())
                parts.append("<p>Object attributes vs top-1 expert (GT boxes; permutation null; Benjamini–Hochberg "
                             "over both heads): log10 area and log2 aspect ratio by Kruskal–Wallis, FPN level "
                             "by χ².</p>"
                             "<table><tr><th>attribute</th><th>test</th><th>statistic</th><th>effect</th><th>p</th>"
                             f"<th>p BH</th><th>significant</th></tr>{rows}</table>")
            within = [f"{lvl}: p = {t['p_value']:.3g} (n = {t['n']})" for lvl, t in h.get("bucket_test_within_level", {}).items()]
            if within:
                parts.append("<p>Size vs expert within each FPN level: " + "; ".join(within) + "</p>")
            sections.append((f"Expert usage by size and FPN level — {key} head", "\n".join(parts)))
    for name, title in (("detection_usage.png", "Expert usage heatmaps"),
                        ("detection_examples.png", "Detections coloured by expert")):
        p = run_dir / "analysis" / name
        if p.is_file():
            sections.append((title, _img_tag(p, title)))
    return sections
