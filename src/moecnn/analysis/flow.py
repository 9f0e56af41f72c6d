"""Layer-to-layer flow: does the expert an image takes in one MoE layer predict the expert it takes in the next?

For each pair of consecutive MoE layers (in model order): the contingency table of top-1 experts (rows: the
earlier layer), NMI between the two choices with a permutation null (:func:`moecnn.analysis.stats.specialisation`,
the earlier layer's choices shuffled) and Cramér's V (:func:`scipy.stats.contingency.association`).
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np

from . import stats


def layer_flow(chosen: Dict[str, np.ndarray], num_experts: Dict[str, int], order: Sequence[str],
               n_perm: int = 200, seed: int = 0) -> List[Dict]:
    """One dict per consecutive pair of ``order`` (schema: ``flow.pairs``)."""
    from scipy.stats.contingency import association

    pairs = []
    for a, b in zip(order[:-1], order[1:]):
        za, zb = np.asarray(chosen[a], dtype=np.int64), np.asarray(chosen[b], dtype=np.int64)
        na, nb = int(num_experts[a]), int(num_experts[b])
        counts = np.bincount(za * nb + zb, minlength=na * nb).reshape(na, nb)
        spec = stats.specialisation(zb, za, n_perm=n_perm, seed=seed)
        sub = counts[counts.sum(1) > 0][:, counts.sum(0) > 0]
        v = float(association(sub, method="cramer")) if min(sub.shape) >= 2 else 0.0
        rows = counts.sum(1, keepdims=True)
        pairs.append({"from": a, "to": b, "counts": counts.tolist(),
                      "row_share": np.round(np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0),
                                            5).tolist(),
                      "nmi": spec["nmi"], "nmi_null_mean": spec["nmi_null_mean"], "nmi_null_max": spec["nmi_null_max"],
                      "nmi_p": spec["nmi_p"], "n_perm": int(n_perm), "cramers_v": v, "n": int(za.size)})
    return pairs
