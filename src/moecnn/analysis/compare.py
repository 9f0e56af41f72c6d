"""``moecnn compare RUN RUN ...``: do two trainings carve the data into the same experts?

Expert ids are arbitrary, so runs are compared through the partition of one image set that their top-1
experts induce (the same test images in the same order, from ``moecnn eval``'s routing file):

- NMI between the two partitions, with a permutation null (one run's assignments shuffled over the images;
  p = (1 + #null ≥ observed) / (1 + n_perm)), and the adjusted Rand index (0 for independent partitions);
- the one-to-one expert matching that maximises the images both runs send to matched experts (Hungarian
  algorithm on the expert × expert contingency table), with the share of images on which the matched runs
  agree, and for each matched pair the two experts' top superclasses;
- a within-class null for that agreement: one run's assignments shuffled among the images of each class, which
  keeps how each run routes every class and removes which images of a class it sends where. Agreement above
  this null means the runs agree image by image, beyond routing by class.

This goes beyond the analyses of the paper (arXiv 2204.10598; SPEC §4): it asks whether the specialisation
is a property of the data and the recipe or of one seed. Top superclasses are counted over the images each
expert gets as top-1.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from . import stats
from .rundir import load_routing, read_config, routing_file


def routing_of(run_dir: Path, split: str = "test") -> Dict[str, Any]:
    """The run's routing on ``split`` (``eval/`` from ``moecnn eval``, else ``analysis/`` from ``analyze``)."""
    f = routing_file(run_dir, split)
    if f is not None:
        return load_routing(f)
    if read_config(Path(run_dir)).get("task") == "detection":
        raise ValueError(f"'{run_dir}' is a detection run: moecnn compare matches per-image routing of classification "
                         f"runs; compare detection runs' expert usage with 'moecnn analyze'")
    raise FileNotFoundError(f"no routing file in '{run_dir}' (eval/routing_{split}.npz): run "
                            f"'moecnn eval {run_dir}' first")


def _layer(routing: Dict[str, Any], layer: Optional[str], run: Path) -> Dict[str, np.ndarray]:
    layers = routing["layers"]
    name = layer or next(iter(layers))
    if name not in layers:
        raise ValueError(f"'{run}' has no MoE layer '{name}' (it has {', '.join(layers)})")
    return layers[name]


def _matched(cont: np.ndarray):
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(-cont)
    return rows, cols, int(cont[rows, cols].sum())


def _within_class_null(a: np.ndarray, b: np.ndarray, classes: np.ndarray, na: int, nb: int, n_perm: int,
                       rng: np.random.Generator) -> np.ndarray:
    """Matched agreement of ``a`` with ``b`` shuffled among the images of each class, ``n_perm`` times."""
    by_class = np.argsort(classes, kind="stable")
    bp = np.empty((n_perm, b.size), dtype=b.dtype)
    for t in range(n_perm):
        bp[t, by_class] = b[np.lexsort((rng.random(classes.size), classes))]  # a random order inside each class
    conts = stats._contingencies(bp, a, nb, na)  # P × nb × na
    return np.array([_matched(c.T)[2] for c in conts], dtype=np.float64) / max(a.size, 1)


def compare_pair(a: np.ndarray, b: np.ndarray, superlabels: Optional[np.ndarray] = None,
                 superclass_names: Optional[Sequence[str]] = None, n_perm: int = 200, seed: int = 0,
                 classes: Optional[np.ndarray] = None) -> Dict:
    """Compare two top-1 expert assignments of the same images (1-D int arrays of one length); with
    ``classes`` (the images' labels) also the within-class null of the matched agreement."""
    from sklearn.metrics import adjusted_rand_score

    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"expert assignments must be 1-D arrays of one length, got {a.shape} and {b.shape}")
    spec = stats.specialisation(b, a, n_perm=n_perm, seed=seed)  # NMI(a, b), null: a shuffled over images
    na, nb = int(a.max()) + 1, int(b.max()) + 1
    cont = stats._contingencies(a, b, na, nb)[0]
    rows, cols, both = _matched(cont)
    agreement = both / max(a.size, 1)
    out: Dict[str, Any] = {
        "nmi": spec["nmi"], "nmi_null_max": spec["nmi_null_max"], "nmi_p": spec["nmi_p"], "n_perm": int(n_perm),
        "ari": float(adjusted_rand_score(a, b)), "matched_agreement": float(agreement),
        "contingency": cont.tolist(), "pairs": [],
    }
    if classes is not None:
        c = np.asarray(classes)
        if c.shape != a.shape:
            raise ValueError(f"classes must give one label per image ({a.size}), got shape {c.shape}")
        null = _within_class_null(a, b, c, na, nb, n_perm, np.random.default_rng(seed + 1))
        out.update(agreement_within_class_null_mean=float(null.mean()) if n_perm else None,
                   agreement_within_class_null_max=float(null.max()) if n_perm else None,
                   agreement_within_class_p=float((1 + (null >= agreement - 1e-12).sum()) / (1 + n_perm)))
    tops = {}  # superclass × expert image counts of each run
    if superlabels is not None:
        s = np.asarray(superlabels, dtype=np.int64)
        ns = int(s.max()) + 1
        names = list(superclass_names) if superclass_names is not None else [str(k) for k in range(ns)]
        tops = {"a": stats._contingencies(s, a, ns, na)[0], "b": stats._contingencies(s, b, ns, nb)[0]}
    for i, j in zip(rows.tolist(), cols.tolist()):
        pair: Dict[str, Any] = {"a": i, "b": j, "images_both": int(cont[i, j]),
                                "share_of_a": float(cont[i, j] / max(cont[i].sum(), 1)),
                                "share_of_b": float(cont[i, j] / max(cont[:, j].sum(), 1))}
        for side, e in (("a", i), ("b", j)):
            if tops:
                counts = tops[side][:, e]
                pair[f"top_{side}"] = [names[k] for k in np.argsort(-counts, kind="stable")[:3] if counts[k] > 0]
        out["pairs"].append(pair)
    return out


def compare_runs(runs: Sequence[Path], split: str = "test", layer: Optional[str] = None,
                 n_perm: int = 200) -> Dict[str, Any]:
    """Every pair of ``runs`` (at least two), compared on ``split``; see the module docstring."""
    runs = [Path(r) for r in runs]
    if len(runs) < 2:
        raise ValueError("compare needs at least two runs")
    routed = [routing_of(r, split) for r in runs]
    labels = routed[0]["labels"]
    for r, rt in zip(runs[1:], routed[1:]):
        if rt["labels"].shape != labels.shape or not np.array_equal(rt["labels"], labels):
            raise ValueError(f"'{r}' was evaluated on other images than '{runs[0]}' (labels differ): compare "
                             f"runs evaluated on the same split of the same dataset")
    chosen = [stats.top1(L["weights"], L["logits"]) for L in (_layer(rt, layer, r) for r, rt in zip(runs, routed))]
    sup = routed[0].get("superlabels")
    names = routed[0].get("superclass_names")
    names = [str(n) for n in names] if names is not None else None
    pairs = []
    for i, j in itertools.combinations(range(len(runs)), 2):
        res = compare_pair(chosen[i], chosen[j], sup, names, n_perm=n_perm, seed=i * len(runs) + j, classes=labels)
        pairs.append({"a": str(runs[i]), "b": str(runs[j]), **res})
    return {"split": split, "layer": layer or next(iter(routed[0]["layers"])), "n_images": int(labels.size),
            "runs": [str(r) for r in runs], "pairs": pairs}


def format_comparison(res: Dict[str, Any]) -> str:
    """Markdown: one row per pair, then the matched experts of each pair."""
    lines = [f"{res['n_images']} {res['split']} images, layer {res['layer']}", "",
             "| run A | run B | NMI (null max, p) | ARI | matched agreement | within-class null: mean (max, p) |",
             "|---|---|---|---|---|---|"]
    for p in res["pairs"]:
        null = "–"
        if p.get("agreement_within_class_null_mean") is not None:
            null = (f"{100 * p['agreement_within_class_null_mean']:.1f} % "
                    f"({100 * p['agreement_within_class_null_max']:.1f} %, {p['agreement_within_class_p']:.3f})")
        lines.append(f"| {Path(p['a']).name} | {Path(p['b']).name} | {p['nmi']:.3f} ({p['nmi_null_max']:.4f}, "
                     f"{p['nmi_p']:.3f}) | {p['ari']:.3f} | {100 * p['matched_agreement']:.1f} % | {null} |")
    for p in res["pairs"]:
        lines += ["", f"{Path(p['a']).name} ↔ {Path(p['b']).name}:"]
        for q in p["pairs"]:
            tops = (f"; top superclasses {', '.join(q.get('top_a', []))} ↔ {', '.join(q.get('top_b', []))}"
                    if "top_a" in q else "")
            lines.append(f"  expert {q['a']} ↔ expert {q['b']} ({100 * q['share_of_a']:.0f} % / "
                         f"{100 * q['share_of_b']:.0f} % of their images shared){tops}")
    return "\n".join(lines)


def agreement_figure(res: Dict[str, Any], labels: Optional[Sequence[str]] = None) -> bytes:
    """PNG: runs × runs matched agreement with the within-class null (see :func:`compare_runs`)."""
    from .figures import agreement_matrix

    runs = res["runs"]
    idx = {r: i for i, r in enumerate(runs)}
    agree, null = np.eye(len(runs)), np.full((len(runs), len(runs)), np.nan)
    for p in res["pairs"]:
        i, j = idx[p["a"]], idx[p["b"]]
        agree[i, j] = agree[j, i] = p["matched_agreement"]
        if p.get("agreement_within_class_null_mean") is not None:
            null[i, j] = null[j, i] = p["agreement_within_class_null_mean"]
    has_null = bool(np.isfinite(null).any())
    return agreement_matrix(list(labels) if labels else [Path(r).name for r in runs], agree,
                            null if has_null else None)


__all__: List[str] = ["compare_runs", "compare_pair", "format_comparison", "routing_of", "agreement_figure"]
