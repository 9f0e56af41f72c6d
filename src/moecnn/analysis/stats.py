"""Pure numpy / scikit-learn statistics of MoE routing (SPEC §4).

Every function takes plain arrays, so it works on routing from any source (a model, an ``npz`` written by
``moecnn eval``, a test fixture). Shapes: M images, N experts, C classes.

- ``weights``: M×N sparse gate weights (rows sum to 1, zeros for experts the image is not routed to).
- ``logits``: M×N raw gate outputs (before noise and top-k).
- ``labels``: M integer class (or superclass) ids.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

LIVING_THRESHOLD = 0.01


def _cv(x: np.ndarray) -> float:
    """Population coefficient of variation std/mean (0 when the mean is 0)."""
    x = np.asarray(x, dtype=np.float64)
    m = x.mean()
    return float(x.std() / m) if m > 0 else 0.0


def top1(weights: np.ndarray, logits: Optional[np.ndarray] = None) -> np.ndarray:
    """Chosen (argmax-weight) expert per image; ties broken by the raw logits when given."""
    w = np.asarray(weights, dtype=np.float64)
    if logits is not None:
        w = w + 1e-9 * _row_rank(logits)
    return w.argmax(1)


def _row_rank(logits: np.ndarray) -> np.ndarray:
    """Per-row rank of each logit scaled into [0, 1) (higher logit → higher rank)."""
    lg = np.asarray(logits, dtype=np.float64)
    n = lg.shape[1]
    return np.argsort(np.argsort(lg, axis=1), axis=1) / max(n, 1)


def utilisation(weights: np.ndarray, logits: Optional[np.ndarray] = None,
                threshold: float = LIVING_THRESHOLD) -> Dict:
    """Expert utilisation over a set of images.

    Returns a dict with
    ``mean_importance`` (N; mean gate weight per expert = Imp_i / M, sums to 1),
    ``cv_imp`` (population std / mean of ``mean_importance``),
    ``routed_share`` (N; share of images with a non-zero weight for the expert, sums to k),
    ``cv_act`` (population std / mean of ``routed_share``),
    ``top1_share`` (N; share of images whose largest weight is the expert, sums to 1),
    ``living`` (N bools: mean importance > ``threshold``), ``n_living``, ``n_images``,
    ``mean_active`` (mean number of experts per image).
    """
    w = np.asarray(weights, dtype=np.float64)
    m, n = w.shape
    imp = w.mean(0) if m else np.zeros(n)
    act = (w > 0).mean(0) if m else np.zeros(n)
    t1 = np.bincount(top1(w, logits), minlength=n) / max(m, 1)
    living = imp > threshold
    return {
        "n_images": int(m),
        "num_experts": int(n),
        "mean_importance": imp.tolist(),
        "cv_imp": _cv(imp),
        "routed_share": act.tolist(),
        "cv_act": _cv(act),
        "top1_share": t1.tolist(),
        "living": living.tolist(),
        "n_living": int(living.sum()),
        "living_threshold": float(threshold),
        "mean_active": float((w > 0).sum(1).mean()) if m else 0.0,
    }


def top2_sets(weights: np.ndarray, logits: Optional[np.ndarray] = None) -> np.ndarray:
    """M×2 sorted expert pairs: the two largest gate weights per image (ties, e.g. k=1, broken by logits)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.shape[1] < 2:
        raise ValueError("co-activation needs at least 2 experts")
    key = w + 1e-9 * _row_rank(logits) if logits is not None else w
    top = np.argsort(-key, axis=1, kind="stable")[:, :2]
    return np.sort(top, axis=1)


def coactivation(weights: np.ndarray, logits: Optional[np.ndarray] = None) -> np.ndarray:
    """N×N symmetric counts of images whose top-2 expert set is {i, j} (diagonal 0)."""
    n = np.asarray(weights).shape[1]
    pairs = top2_sets(weights, logits)
    c = np.bincount(pairs[:, 0] * n + pairs[:, 1], minlength=n * n).reshape(n, n)
    return c + c.T


def top_pairs(coact: np.ndarray, n_images: int, n: int = 5) -> List[Dict]:
    """The ``n`` most frequent expert pairs: [{"pair": [i, j], "count": c, "share": c / n_images}]."""
    iu = np.triu_indices(coact.shape[0], 1)
    vals = coact[iu]
    order = np.argsort(-vals, kind="stable")[:n]
    return [{"pair": [int(iu[0][o]), int(iu[1][o])], "count": int(vals[o]),
             "share": float(vals[o] / max(n_images, 1))} for o in order]


def group_expert_matrix(weights: np.ndarray, labels: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """(G×N mean gate weight per expert over each group's images, G counts). Empty groups give NaN rows."""
    w = np.asarray(weights, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    sums = np.zeros((n_groups, w.shape[1]))
    np.add.at(sums, y, w)
    counts = np.bincount(y, minlength=n_groups)[:n_groups]
    with np.errstate(invalid="ignore", divide="ignore"):
        mat = sums / counts[:, None]
    mat[counts == 0] = np.nan
    return mat, counts


def top_groups_per_expert(matrix: np.ndarray, names: Sequence[str], n: int = 5) -> List[List[str]]:
    """For each expert (column), the names of the ``n`` groups with the largest mean gate weight."""
    mat = np.nan_to_num(np.asarray(matrix, dtype=np.float64), nan=-np.inf)
    out = []
    for e in range(mat.shape[1]):
        order = np.argsort(-mat[:, e], kind="stable")[:n]
        out.append([str(names[i]) for i in order])
    return out


# ---------------------------------------------------------------- specialisation scores
def _entropy_from_counts(counts: np.ndarray) -> np.ndarray:
    """Entropy (nats) along the last axis of a count array."""
    counts = np.asarray(counts, dtype=np.float64)
    tot = counts.sum(-1, keepdims=True)
    p = np.divide(counts, tot, out=np.zeros_like(counts), where=tot > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log(p), 0.0).sum(-1)


def _mi_from_contingency(cont: np.ndarray) -> np.ndarray:
    """Mutual information (nats) of ...×A×B contingency tables."""
    cont = np.asarray(cont, dtype=np.float64)
    tot = cont.sum((-2, -1), keepdims=True)
    pij = cont / tot
    pi = pij.sum(-1, keepdims=True)
    pj = pij.sum(-2, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        term = np.where(pij > 0, pij * (np.log(pij) - np.log(pi) - np.log(pj)), 0.0)
    return np.maximum(term.sum((-2, -1)), 0.0)


def _contingencies(labels: np.ndarray, clusters: np.ndarray, n_labels: int, n_clusters: int) -> np.ndarray:
    """(P×)L×K contingency tables of integer ``labels`` (P×M or M) against ``clusters`` (M)."""
    lab = np.atleast_2d(labels)
    p = lab.shape[0]
    flat = (np.arange(p)[:, None] * n_labels + lab) * n_clusters + clusters[None, :]
    return np.bincount(flat.ravel(), minlength=p * n_labels * n_clusters).reshape(p, n_labels, n_clusters)


def nmi_from_contingency(cont: np.ndarray) -> np.ndarray:
    """NMI with arithmetic-mean normalisation (sklearn's default) of ...×L×K contingency tables."""
    cont = np.asarray(cont, dtype=np.float64)
    mi = _mi_from_contingency(cont)
    h_l = _entropy_from_counts(cont.sum(-1))
    h_k = _entropy_from_counts(cont.sum(-2))
    denom = 0.5 * (h_l + h_k)
    out = np.divide(mi, denom, out=np.zeros_like(mi), where=denom > 1e-15)
    # sklearn: both partitions trivial (a single class and a single cluster) -> perfect agreement
    both_trivial = ((cont.sum(-1) > 0).sum(-1) <= 1) & ((cont.sum(-2) > 0).sum(-1) <= 1)
    return np.where(both_trivial, 1.0, np.clip(out, 0.0, 1.0))


def purity_from_contingency(cont: np.ndarray) -> np.ndarray:
    """Purity of the expert clusters: Σ_expert (count of its majority label) / M, for ...×L×K tables."""
    cont = np.asarray(cont, dtype=np.float64)
    return cont.max(-2).sum(-1) / np.maximum(cont.sum((-2, -1)), 1)


def specialisation(chosen: np.ndarray, labels: np.ndarray, n_perm: int = 200, seed: int = 0,
                   n_labels: Optional[int] = None, n_clusters: Optional[int] = None,
                   chunk: int = 50) -> Dict:
    """NMI and purity between the chosen (top-1) expert and labels, with a shuffled-label permutation null.

    The observed NMI is sklearn's ``normalized_mutual_info_score`` (arithmetic normalisation). The null
    shuffles the labels ``n_perm`` times and scores all permutations at once from batched contingency
    tables (same formula; marginals are unchanged by shuffling). p-value = (1 + #null ≥ observed) /
    (1 + n_perm). Purity = Σ_expert max_label count / M, with its own null and p-value; ``chance_purity``
    is the purity of routing every image to one expert (the majority-label share).
    """
    from sklearn.metrics import normalized_mutual_info_score

    y = np.asarray(labels, dtype=np.int64)
    z = np.asarray(chosen, dtype=np.int64)
    if y.shape != z.shape or y.ndim != 1:
        raise ValueError(f"labels and chosen experts must be 1-D arrays of one length, got {y.shape}, {z.shape}")
    # compact label/cluster ids so the contingency tables stay small
    _, y = np.unique(y, return_inverse=True)
    _, z = np.unique(z, return_inverse=True)
    nl = int(y.max()) + 1 if y.size else 1
    nk = int(z.max()) + 1 if z.size else 1
    obs_cont = _contingencies(y, z, nl, nk)[0]
    nmi_obs = float(normalized_mutual_info_score(y, z)) if y.size else 0.0
    pur_obs = float(purity_from_contingency(obs_cont))
    rng = np.random.default_rng(seed)
    null_nmi, null_pur = [], []
    for start in range(0, n_perm, chunk):
        p = min(chunk, n_perm - start)
        perm = rng.permuted(np.broadcast_to(y, (p, y.size)), axis=1)
        cont = _contingencies(perm, z, nl, nk)
        null_nmi.append(nmi_from_contingency(cont))
        null_pur.append(purity_from_contingency(cont))
    null_nmi = np.concatenate(null_nmi) if null_nmi else np.zeros(0)
    null_pur = np.concatenate(null_pur) if null_pur else np.zeros(0)
    tol = 1e-12
    return {
        "nmi": nmi_obs,
        "purity": pur_obs,
        "n_perm": int(n_perm),
        "seed": int(seed),
        "nmi_null_mean": float(null_nmi.mean()) if n_perm else None,
        "nmi_null_max": float(null_nmi.max()) if n_perm else None,
        "nmi_null_q99": float(np.quantile(null_nmi, 0.99)) if n_perm else None,
        "nmi_p": float((1 + (null_nmi >= nmi_obs - tol).sum()) / (1 + n_perm)),
        "purity_null_mean": float(null_pur.mean()) if n_perm else None,
        "purity_null_max": float(null_pur.max()) if n_perm else None,
        "purity_p": float((1 + (null_pur >= pur_obs - tol).sum()) / (1 + n_perm)),
        "chance_purity": float(np.bincount(y).max() / max(y.size, 1)),
        "n_labels": int(n_labels if n_labels is not None else nl),
        "n_clusters_used": int(nk),
    }


def extreme_images(weights: np.ndarray, n: int = 8, logits: Optional[np.ndarray] = None) -> Dict[str, List[List[int]]]:
    """Per expert, indices of the ``n`` images it weights most (``most``) and least (``least``).

    Images are ranked by the expert's sparse gate weight; ties (e.g. all the images not routed to the expert,
    weight 0, or weight 1 with k=1) are broken by the softmax of the raw ``logits`` when given, else by index.
    """
    w = np.asarray(weights, dtype=np.float64)
    if logits is not None:
        lg = np.asarray(logits, dtype=np.float64)
        p = np.exp(lg - lg.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
    else:
        p = np.zeros_like(w)
    idx = np.arange(w.shape[0])
    most, least = [], []
    for e in range(w.shape[1]):
        most.append(np.lexsort((idx, -p[:, e], -w[:, e]))[:n].tolist())
        least.append(np.lexsort((idx, p[:, e], w[:, e]))[:n].tolist())
    return {"most": most, "least": least}


def epoch_utilisation(records: Sequence[Dict]) -> Dict[str, Dict]:
    """Utilisation over training epochs from parsed ``metrics.jsonl`` records.

    Looks in each record for per-layer expert importance / routed share under keys such as
    ``routing``/``experts``/``utilisation`` → {layer: {"importance": [...], "share": [...]}} or flat keys
    ``"<layer>/importance"``. Returns {layer: {"epoch": [...], "importance": [[N]...], "share": [[N]...],
    "cv_imp": [...], "cv_act": [...]}} (layers without data are absent).
    """
    out: Dict[str, Dict] = {}
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            continue
        epoch = rec.get("epoch", i)
        for layer, vals in _iter_layer_util(rec):
            imp = vals.get("importance")
            share = vals.get("share")
            if imp is None and share is None:
                continue
            d = out.setdefault(layer, {"epoch": [], "importance": [], "share": [], "cv_imp": [], "cv_act": []})
            d["epoch"].append(epoch)
            imp_a = np.asarray(imp, dtype=np.float64) if imp is not None else None
            if imp_a is not None and imp_a.sum() > 0:
                imp_a = imp_a / imp_a.sum()  # normalise to mean-importance shares
            d["importance"].append(imp_a.tolist() if imp_a is not None else None)
            d["share"].append(list(map(float, share)) if share is not None else None)
            d["cv_imp"].append(_cv(imp_a) if imp_a is not None else None)
            d["cv_act"].append(_cv(np.asarray(share, dtype=np.float64)) if share is not None else None)
    return out


_IMP_KEYS = ("importance", "mean_importance", "imp")
_SHARE_KEYS = ("share", "routed_share", "routed", "load", "counts_share", "activation", "act_share")


def _pick(d: Dict, keys) -> Optional[list]:
    for k in keys:
        v = d.get(k)
        if isinstance(v, (list, tuple)) and v and all(isinstance(x, (int, float)) for x in v):
            return list(v)
    return None


def _iter_layer_util(rec: Dict):
    """Yield (layer, {"importance": list|None, "share": list|None}) from one metrics record (best effort)."""
    seen = set()
    # nested: {"routing": {layer: {...}}} possibly under a split key like "train"/"val"
    def nested(d, depth=0):
        if not isinstance(d, dict) or depth > 3:
            return
        for k, v in d.items():
            if isinstance(v, dict):
                imp, share = _pick(v, _IMP_KEYS), _pick(v, _SHARE_KEYS)
                if imp is not None or share is not None:
                    yield str(k), {"importance": imp, "share": share}
                else:
                    yield from nested(v, depth + 1)
    for key in ("routing", "experts", "utilisation", "utilization", "moe", "val", "train"):
        if key in rec:
            for layer, vals in nested(rec[key] if isinstance(rec[key], dict) else {}):
                if layer not in seen:
                    seen.add(layer)
                    yield layer, vals
    # flat: "<layer>/importance": [...]
    flat: Dict[str, Dict] = {}
    for k, v in rec.items():
        if not isinstance(k, str) or not isinstance(v, (list, tuple)):
            continue
        for kind, keys in (("importance", _IMP_KEYS), ("share", _SHARE_KEYS)):
            for suffix in keys:
                for sep in ("/", ".", ":"):
                    if k.endswith(sep + suffix):
                        layer = k[: -len(sep + suffix)]
                        for pre in ("routing/", "experts/", "val/", "train/"):
                            if layer.startswith(pre):
                                layer = layer[len(pre):]
                        flat.setdefault(layer, {"importance": None, "share": None})[kind] = list(v)
    for layer, vals in flat.items():
        if layer not in seen:
            seen.add(layer)
            yield layer, vals


# ---------------------------------------------------------------- attribute / concept association tests
def _perm_result(res, n_perm: int, seed: int) -> Dict:
    null = np.real(np.asarray(res.null_distribution)).astype(np.float64)
    # complex data (the circular test) makes scipy's p-value complex-typed
    return {"p_perm": float(np.real(res.pvalue)), "n_perm": int(n_perm), "seed": int(seed),
            "null_mean": float(null.mean()) if null.size else None,
            "null_q95": float(np.quantile(null, 0.95)) if null.size else None}


def _degenerate(kind: str, effect_name: str, n: int, groups: int, why: str) -> Dict:
    return {"test": kind, "statistic": 0.0, "p_perm": 1.0, "p_asymptotic": 1.0, "effect": 0.0,
            "effect_name": effect_name, "n": int(n), "n_groups": int(groups), "degenerate": why}


def _groups(values: np.ndarray, chosen: np.ndarray):
    """Expert ids and their values, experts with a single image left out (a permutation test needs two or more
    observations per group; such images are not counted in ``n``)."""
    ids, counts = np.unique(chosen, return_counts=True)
    ids = ids[counts >= 2]
    return ids, [values[chosen == g] for g in ids]


def association_continuous(values, chosen, n_perm: int = 200, seed: int = 0) -> Dict:
    """Does a scalar attribute differ between the images of each top-1 expert?

    Kruskal–Wallis H (:func:`scipy.stats.kruskal`) across the experts' groups, with a permutation null
    (:func:`scipy.stats.permutation_test`, images reassigned to experts at random, group sizes kept) and the
    effect size ε² = H / (n − 1) (Tomczak & Tomczak 2014). NaN values are left out. Also the median of the
    attribute per expert (``group_median``, keyed by expert id).
    """
    from scipy import stats as ss

    x = np.asarray(values, dtype=np.float64)
    z = np.asarray(chosen, dtype=np.int64)
    ok = np.isfinite(x)
    x, z = x[ok], z[ok]
    ids, groups = _groups(x, z)
    n = int(sum(len(g) for g in groups))
    x = np.concatenate(groups) if groups else x[:0]
    if len(ids) < 2:
        return _degenerate("kruskal", "epsilon2", n, len(ids), "fewer than two experts chosen")
    if np.ptp(x) == 0:
        return _degenerate("kruskal", "epsilon2", n, len(ids), "the attribute is constant")
    obs = ss.kruskal(*groups)
    res = ss.permutation_test(groups, lambda *s, axis: ss.kruskal(*s, axis=axis).statistic,
                              permutation_type="independent", vectorized=True, n_resamples=n_perm,
                              alternative="greater", rng=seed)
    return {"test": "kruskal", "statistic": float(obs.statistic), **_perm_result(res, n_perm, seed),
            "p_asymptotic": float(obs.pvalue), "effect": float(obs.statistic / max(n - 1, 1)),
            "effect_name": "epsilon2", "n": n, "n_groups": int(len(ids)),
            "group_median": {str(int(g)): float(np.median(v)) for g, v in zip(ids, groups)}}


def _eta2_unit(*samples, axis=-1):
    """Between-group share of the squared deviations of unit vectors (complex numbers) from their mean."""
    z = np.concatenate(samples, axis=axis)
    mu = z.mean(axis=axis, keepdims=True)
    total = (np.abs(z - mu) ** 2).sum(axis=axis)
    between = sum(s.shape[axis] * np.abs(s.mean(axis=axis) - np.squeeze(mu, axis)) ** 2 for s in samples)
    return between / np.where(total > 0, total, 1.0)


def association_circular(degrees, chosen, n_perm: int = 200, seed: int = 0) -> Dict:
    """Does a circular attribute (an angle in degrees, e.g. hue) differ between the experts' images?

    Each angle becomes the unit vector (cos θ, sin θ); the statistic is η² = between-expert sum of squares /
    total sum of squares of those vectors (the circular analogue of one-way ANOVA's η², as in the
    Watson–Williams test), with a permutation null (:func:`scipy.stats.permutation_test`). It is also the
    effect size (0 = same mean direction, 1 = every expert's images share one angle). NaN angles are left out.
    ``group_mean`` is each expert's circular mean angle (:func:`scipy.stats.circmean`).
    """
    from scipy import stats as ss

    a = np.asarray(degrees, dtype=np.float64)
    z = np.asarray(chosen, dtype=np.int64)
    ok = np.isfinite(a)
    a, z = a[ok], z[ok]
    ids, groups = _groups(np.exp(1j * np.radians(a)), z)
    keep = np.isin(z, ids)
    a, z = a[keep], z[keep]
    n = int(a.size)
    if len(ids) < 2:
        return _degenerate("circular_eta2", "eta2", n, len(ids), "fewer than two experts chosen")
    obs = float(_eta2_unit(*groups))
    if np.abs(np.exp(1j * np.radians(a)) - np.exp(1j * np.radians(a)).mean()).max() == 0:
        return _degenerate("circular_eta2", "eta2", n, len(ids), "the attribute is constant")
    res = ss.permutation_test(groups, _eta2_unit, permutation_type="independent", vectorized=True,
                              n_resamples=n_perm, alternative="greater", rng=seed)
    means = {str(int(g)): float(ss.circmean(a[z == g], high=360.0, low=0.0)) for g in ids}
    return {"test": "circular_eta2", "statistic": obs, **_perm_result(res, n_perm, seed), "p_asymptotic": None,
            "effect": obs, "effect_name": "eta2", "n": n, "n_groups": int(len(ids)), "group_mean": means}


def association_categorical(categories, chosen, n_perm: int = 200, seed: int = 0) -> Dict:
    """Is the top-1 expert independent of a categorical label (a concept, an FPN level)?

    Pearson χ² of the category × expert table (:func:`scipy.stats.chi2_contingency`, no continuity
    correction) with a permutation null (categories shuffled over images, :func:`scipy.stats.permutation_test`);
    effect sizes Cramér's V (:func:`scipy.stats.contingency.association`) and NMI (scikit-learn). Negative
    categories mean "unlabelled" and are left out. ``table`` = counts, rows = categories in sorted order
    (``categories``), columns = experts in sorted order (``experts``).
    """
    from scipy import stats as ss
    from scipy.stats.contingency import association, crosstab
    from sklearn.metrics import normalized_mutual_info_score

    c = np.asarray(categories, dtype=np.int64)
    z = np.asarray(chosen, dtype=np.int64)
    ok = c >= 0
    c, z = c[ok], z[ok]
    n = int(c.size)
    (cats, exps), table = crosstab(c, z)
    base = {"table": table.tolist(), "categories": cats.tolist(), "experts": exps.tolist()}
    if len(cats) < 2 or len(exps) < 2:
        return {**_degenerate("chi2", "cramers_v", n, len(exps), "fewer than two categories or experts"),
                **base, "nmi": 0.0}
    obs = ss.chi2_contingency(table, correction=False)

    def chi2(cc):
        return ss.chi2_contingency(crosstab(cc, z).count, correction=False).statistic

    res = ss.permutation_test((c,), chi2, permutation_type="pairings", vectorized=False, n_resamples=n_perm,
                              alternative="greater", rng=seed)
    return {"test": "chi2", "statistic": float(obs.statistic), **_perm_result(res, n_perm, seed),
            "p_asymptotic": float(obs.pvalue), "dof": int(obs.dof),
            "effect": float(association(table, method="cramer")), "effect_name": "cramers_v",
            "nmi": float(normalized_mutual_info_score(c, z)), "n": n, "n_groups": int(len(exps)), **base}


def bh_adjust(pvalues: Sequence[float], alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Benjamini–Hochberg (1995) over a family of p-values (statsmodels ``multipletests``, ``fdr_bh``):
    (reject bools, adjusted p-values)."""
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(list(pvalues), dtype=np.float64)
    if p.size == 0:
        return np.zeros(0, dtype=bool), np.zeros(0)
    reject, p_adj, _, _ = multipletests(p, alpha=alpha, method="fdr_bh")
    return reject, p_adj
