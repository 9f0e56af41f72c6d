"""Routing dynamics: when do experts specialise during training, and do they stay put?

Input: the probe set's routing at each evaluation (:func:`moecnn.analysis.rundir.read_probe_routing`,
``RUN_DIR/probe_routing.npz``). Per MoE layer and evaluation: NMI between the probe images' top-1 expert and their
superclass / class with a label-permutation null (:func:`moecnn.analysis.stats.specialisation`), the top-1 share
of each expert, and between consecutive evaluations the share of probe images that keep their top-1 expert and
the adjusted Rand index (scikit-learn; invariant to experts swapping roles).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np

from . import stats

STABLE_SHARE = 0.9


def _first_from(ok: List[bool], epochs: List[int]) -> Optional[int]:
    """First epoch from which ``ok`` holds at every later evaluation (None if it does not hold at the end)."""
    idx = None
    for i in range(len(ok) - 1, -1, -1):
        if not ok[i]:
            break
        idx = i
    return None if idx is None else int(epochs[idx])


def routing_dynamics(probe: Dict[str, Any], n_perm: int = 100, seed: int = 0,
                     layers: Optional[List[str]] = None) -> Dict[str, Any]:
    """Specialisation and stability curves of every layer of a probe-routing dict (schema: ``dynamics``)."""
    from sklearn.metrics import adjusted_rand_score

    epochs = [int(e) for e in probe["epochs"]]
    levels = {"class": probe["labels"]}
    if probe.get("superlabels") is not None:
        levels = {"superclass": probe["superlabels"], **levels}
    out: Dict[str, Any] = {"file": probe.get("file"), "epochs": epochs, "n_probe": int(probe["labels"].size),
                           "n_perm": int(n_perm), "stable_share": STABLE_SHARE, "per_layer": {}}
    for name, d in probe["layers"].items():
        if layers is not None and name not in layers:
            continue
        top1, w = d["top1"], d["weights"]
        n = w.shape[2]
        spec: Dict[str, Dict[str, list]] = {}
        for lvl, lab in levels.items():
            rows = [stats.specialisation(top1[i], lab, n_perm=n_perm, seed=seed) for i in range(len(epochs))]
            s = {"nmi": [r["nmi"] for r in rows], "nmi_null_max": [r["nmi_null_max"] for r in rows],
                 "nmi_p": [r["nmi_p"] for r in rows]}
            above = [r["nmi_null_max"] is not None and r["nmi"] > r["nmi_null_max"] for r in rows]
            s["specialised_from"] = _first_from(above, epochs)
            spec[lvl] = s
        kept = [float((top1[i] == top1[i - 1]).mean()) for i in range(1, len(epochs))]
        ari = [float(adjusted_rand_score(top1[i - 1], top1[i])) for i in range(1, len(epochs))]
        final = [float((top1[i] == top1[-1]).mean()) for i in range(len(epochs))]
        share = np.stack([np.bincount(t, minlength=n) / max(t.size, 1) for t in top1])
        out["per_layer"][name] = {
            "num_experts": int(n), "specialisation": spec, "top1_share": np.round(share, 5).tolist(),
            "mean_weight": np.round(w.astype(np.float64).mean(1), 5).tolist(),
            "kept_share": kept, "ari": ari, "agreement_with_final": final,
            # first evaluation whose routing is kept (≥ STABLE_SHARE of the probe images) at every later one
            "stable_from": _first_from([k >= STABLE_SHARE for k in kept] + [True], epochs)
            if kept and kept[-1] >= STABLE_SHARE else None,
        }
    return out
