"""Explain the experts (issue 15): the analyses ``analyze`` runs after the routing statistics.

- attribute tests (pixel attributes vs the top-1 expert) and concept tests (user labels vs the top-1 expert);
- layer-to-layer flow of expert choices;
- routing dynamics over training from ``probe_routing.npz``;
- gate attribution (Grad-CAM + Integrated Gradients) and expert contribution (forced vs own routing), which need
  the model and run only when ``attribution`` > 0;
- Benjamini–Hochberg over every test of the run.

Each function fills its part of the summary dict (keys in docs/analysis_schema.md) and writes its figures.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from . import stats
from .rundir import _slug, _write

IG_DELTA_WARN = 0.05  # relative IG completeness error above which the summary notes it


def attribute_tests(attrs: Dict[str, np.ndarray], chosen: np.ndarray, n_perm: int = 200,
                    seed: int = 0) -> Dict[str, Dict]:
    """Every pixel attribute against the top-1 expert: circular attributes (hue) with the circular η² test,
    the others with Kruskal–Wallis (see :mod:`moecnn.analysis.stats`)."""
    from .attributes import CIRCULAR

    out = {}
    for name, v in attrs.items():
        test = stats.association_circular if name in CIRCULAR else stats.association_continuous
        out[name] = {**test(v, chosen, n_perm=n_perm, seed=seed), "n_missing": int(np.isnan(v).sum())}
    return out


def run_attribute_tests(per_layer: Dict, chosen: Dict[str, np.ndarray], images: np.ndarray, n_perm: int,
                        seed: int) -> Dict[str, np.ndarray]:
    """Pixel attributes of ``images`` tested against each layer's top-1 expert; returns the attributes."""
    from .attributes import image_attributes

    attrs = image_attributes(images)
    for name, z in chosen.items():
        per_layer[name]["attribute_tests"] = attribute_tests(attrs, z, n_perm=n_perm, seed=seed)
    return attrs


def attribute_figures(per_layer: Dict, chosen: Dict[str, np.ndarray], attrs: Dict[str, np.ndarray],
                      fig_dir: Path) -> None:
    """One figure per layer (drawn after BH, whose adjusted p-values the panel titles show)."""
    from . import figures as figs
    from .attributes import CIRCULAR

    for name, L in per_layer.items():
        if "attribute_tests" not in L:
            continue
        L.setdefault("figures", {})["attributes"] = "figures/" + _write(
            fig_dir / f"{_slug(name)}_attributes.png",
            figs.attribute_panels(attrs, chosen[name], L["attribute_tests"], circular=CIRCULAR))


def run_concept_tests(per_layer: Dict, chosen: Dict[str, np.ndarray], codes: np.ndarray, names: List[str],
                      source: str, n_perm: int, seed: int, fig_dir: Path) -> None:
    from . import figures as figs

    lab = codes >= 0
    for layer, z in chosen.items():
        n = per_layer[layer]["num_experts"]
        t = stats.association_categorical(codes, z, n_perm=n_perm, seed=seed)
        counts = np.zeros((len(names), n), dtype=np.int64)
        np.add.at(counts, (codes[lab], z[lab]), 1)
        rows = counts.sum(1, keepdims=True)
        share = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
        per_layer[layer]["concept_tests"] = {"file": source, "concepts": list(names), "n_labelled": int(lab.sum()),
                                             "counts": counts.tolist(), "share": np.round(share, 5).tolist(),
                                             "test": t}
        per_layer[layer].setdefault("figures", {})["concepts"] = "figures/" + _write(
            fig_dir / f"{_slug(layer)}_concepts.png",
            figs.heatmap(share, [f"{c} ({r})" for c, r in zip(names, rows[:, 0])], [f"E{i}" for i in range(n)],
                         "share of each concept's images per top-1 expert", cmap="Blues", ylabel="concept"))


def run_flow(summary: Dict, chosen: Dict[str, np.ndarray], num_experts: Dict[str, int], order: Sequence[str],
             n_perm: int, seed: int, fig_dir: Path) -> None:
    from . import figures as figs
    from .flow import layer_flow

    pairs = layer_flow(chosen, num_experts, order, n_perm=n_perm, seed=seed)
    fig_paths = {}
    for p in pairs:
        key = f"{p['from']}->{p['to']}"
        mat = np.asarray(p["row_share"])
        fig_paths[key] = "figures/" + _write(fig_dir / f"flow_{_slug(p['from'])}__{_slug(p['to'])}.png", figs.heatmap(
            mat, [f"E{i} ({c})" for i, c in enumerate(np.asarray(p["counts"]).sum(1))],
            [f"E{j}" for j in range(mat.shape[1])],
            f"{p['from']} → {p['to']}: NMI {p['nmi']:.3f} (null max {p['nmi_null_max']:.3f})", cmap="Blues",
            xlabel=f"top-1 expert in {p['to']}", ylabel=f"top-1 expert in {p['from']}"))
    summary["flow"] = {"pairs": pairs, "figures": fig_paths}


def run_dynamics(summary: Dict, run_dir: Path, layers: Optional[List[str]], n_perm: int, seed: int,
                 fig_dir: Path, notes: List[str]) -> None:
    from . import figures as figs
    from .dynamics import routing_dynamics
    from .rundir import PROBE_FILE, read_probe_routing

    probe = read_probe_routing(run_dir)
    if probe is None:
        summary["dynamics"] = None
        notes.append(f"no {PROBE_FILE} in the run directory: routing-dynamics section skipped (the training loop "
                     "writes it when it routes a probe set at each evaluation)")
        return
    dyn = routing_dynamics(probe, n_perm=n_perm, seed=seed, layers=layers)
    dyn["figures"] = {name: "figures/" + _write(fig_dir / f"{_slug(name)}_dynamics.png", figs.dynamics_plot(
        d, dyn["epochs"], f"routing of {dyn['n_probe']} probe images during training: {name}"))
        for name, d in dyn["per_layer"].items()}
    summary["dynamics"] = dyn


def _mean_images(images: np.ndarray, top1: np.ndarray, n: int) -> List[np.ndarray]:
    out = []
    for e in range(n):
        sel = top1 == e
        out.append(images[sel].astype(np.float64).mean(0).astype(np.uint8) if sel.any()
                   else np.full(images.shape[1:], 255, np.uint8))
    return out


def run_attribution(per_layer: Dict, model, layer_names: Sequence[str], images: np.ndarray, labels: np.ndarray,
                    class_names: Sequence[str], mean, std, *, n_images: int, n_examples: int, ig_steps: int,
                    seed: int, device: str, fig_dir: Path, out_dir: Path, notes: List[str],
                    timing: Dict[str, float]) -> None:
    """Gate attribution and expert contribution on a stratified subsample of ``n_images`` images."""
    from . import figures as figs
    from .attribution import (expert_contribution, gate_attribution, summarise_contribution,
                              summarise_gate_attribution, upsample)
    from .compute import _norm_input
    from .tsne import subsample
    from ..layers import moe_layers

    idx = subsample(len(labels), n_images, seed, labels=labels)
    dev = next(iter(model.parameters())).device if any(True for _ in model.parameters()) else device
    x = _norm_input(images[idx], mean, std).to(dev)
    imgs, y = np.asarray(images)[idx], np.asarray(labels)[idx]
    size = imgs.shape[-2:]
    have = moe_layers(model)
    for name in layer_names:
        if name not in have:
            notes.append(f"attribution skipped for '{name}': the model has no MoE layer of that name")
            continue
        t0 = time.perf_counter()
        slug = _slug(name)
        L = per_layer[name]
        F = L.setdefault("figures", {})
        ga = gate_attribution(model, name, x, n_examples=n_examples, ig_steps=ig_steps)
        gs = summarise_gate_attribution(ga, size)
        n = ga["logits"].shape[1]
        rows_ex = [[int(idx[i]) for i in ids] for ids in ga["examples"]]
        rows = []
        for t in ga["targets"]:
            rows.append((f"Grad-CAM {t}", upsample(np.asarray(gs[t]["gradcam_mean"]), size)))
        for t in ga["targets"]:
            rows.append((f"IG+ {t}", gs[t]["ig_mean_positive"]))
        F["attribution_mean"] = "figures/" + _write(fig_dir / f"{slug}_attribution_mean.png", figs.attribution_means(
            _mean_images(imgs, ga["top1"], n), rows, gs["routed"]))
        ex_imgs = [[imgs[i] for i in ids] for ids in ga["examples"]]
        cam_up = [upsample(ga["gradcam"]["logit"][ids, e], size) if ids else [] for e, ids in enumerate(ga["examples"])]
        ig_pos = [np.clip(m, 0, None) for m in ga["ig"]["logit"]]
        notes_ex = [[f"{class_names[y[i]] if y[i] < len(class_names) else y[i]} w={ga['weights'][i, e]:.2f}"
                     for i in ids] for e, ids in enumerate(ga["examples"])]
        F["attribution_examples"] = "figures/" + _write(fig_dir / f"{slug}_attribution_examples.png",
                                                        figs.attribution_examples(ex_imgs, [("Grad-CAM", cam_up),
                                                                                            ("IG+", ig_pos)], notes_ex))
        gate_json = {k: v for k, v in gs.items() if k not in ga["targets"]}
        gate_json["examples"] = rows_ex
        gate_json["image_indices_file"] = f"attribution_{slug}.npz"
        for t in ga["targets"]:
            gate_json[t] = {"gradcam_mean": gs[t]["gradcam_mean"],
                            "gradcam_center_of_mass": gs[t]["gradcam_center_of_mass"]}
        gate_json.update({"ig_steps": int(ig_steps), "ig_baseline": "0 in normalised input (dataset-mean colour)",
                          "method": "captum LayerGradCam at the gate input (ReLU) + IntegratedGradients at pixels"})
        L["gate_attribution"] = gate_json
        for t, d in (ga.get("ig_relative_delta") or {}).items():
            if d is not None and d > IG_DELTA_WARN:
                notes.append(f"{name}: Integrated Gradients of the gate {t} miss completeness by {100 * d:.0f} % with "
                             f"{ig_steps} steps; raise --ig-steps")
        timing[f"{name}/gate_attribution"] = time.perf_counter() - t0
        for k, v in ga["timing_s"].items():
            timing[f"{name}/gate_attribution/{k}"] = v

        t0 = time.perf_counter()
        # IG of the forced-expert difference runs the layer and what follows twice per step: fewer examples
        ec = expert_contribution(model, name, x, y, n_examples=max(1, n_examples // 4), ig_steps=ig_steps)
        ec["top1"] = ga["top1"]
        cs = summarise_contribution(ec, y, class_names)
        cs["examples"] = [{k: [int(idx[i]) for i in v] for k, v in ex.items()} for ex in ec["examples"]]
        cs["ig_steps"] = int(ig_steps)
        cs["single_pass"] = bool(ec["single_pass"])
        cs["ig_relative_delta"] = ec["ig_relative_delta"]
        if ec["ig_relative_delta"] is not None and ec["ig_relative_delta"] > IG_DELTA_WARN:
            notes.append(f"{name}: Integrated Gradients of the forced-expert difference miss completeness by "
                         f"{100 * ec['ig_relative_delta']:.0f} % with {ig_steps} steps; raise --ig-steps")
        for k, v in ec["timing_s"].items():
            timing[f"{name}/contribution/{k}"] = v
        L["contribution"] = cs
        F["contribution"] = "figures/" + _write(fig_dir / f"{slug}_contribution.png",
                                                figs.contribution_bars(cs["per_expert"]))
        agree = np.asarray(cs["interchangeability"]["prediction_agreement"])
        F["interchangeability"] = "figures/" + _write(fig_dir / f"{slug}_interchangeability.png", figs.heatmap(
            agree, [f"E{i}" for i in range(n)], [f"E{i}" for i in range(n)],
            "share of images with the same prediction when forced to row / column expert", cmap="Blues",
            ylabel="forced expert", xlabel="forced expert"))
        c_imgs, c_maps, c_notes = [], [], []
        for e, ex in enumerate(ec["examples"]):
            ids = ex["helps"] + ex["hurts"]
            c_imgs.append([imgs[i] for i in ids])
            c_maps.append([np.clip(m, 0, None) for m in ec["ig"][e]["helps"]]
                          + [np.clip(-m, 0, None) for m in ec["ig"][e]["hurts"]])
            c_notes.append([f"{'+' if k == 'helps' else '−'} {ec['delta_true'][e, i]:+.2f}"
                            for k in ("helps", "hurts") for i in ex[k]])
        F["contribution_examples"] = "figures/" + _write(fig_dir / f"{slug}_contribution_examples.png",
                                                         figs.attribution_examples(c_imgs, [("IG of Δ", c_maps)],
                                                                                   c_notes))
        arrays = {"indices": idx, "top1": ga["top1"], "gate_logits": ga["logits"], "gate_weights": ga["weights"],
                  "default_logits": ec["default"].astype(np.float16), "forced_logits": ec["forced"].astype(np.float16),
                  "delta_true": ec["delta_true"].astype(np.float32)}
        for t in ga["targets"]:
            arrays[f"gradcam_{t}"] = ga["gradcam"][t].astype(np.float16)
        np.savez_compressed(out_dir / f"attribution_{slug}.npz", **arrays)
        timing[f"{name}/contribution"] = time.perf_counter() - t0


def apply_bh(summary: Dict, alpha: float = 0.05) -> None:
    """Benjamini–Hochberg over every test of the run: specialisation NMI (class, superclass), attribute and
    concept tests of every layer, flow between layers. Adds ``p_bh`` / ``significant_bh`` to each test (for
    specialisation ``nmi_p_bh`` / ``nmi_significant_bh``) and the family table ``summary["tests"]``."""
    fam: List[tuple] = []
    for name, L in summary.get("per_layer", {}).items():
        for lvl, s in (L.get("specialisation") or {}).items():
            if s is not None:
                fam.append((s, "nmi_p", {"layer": name, "kind": "specialisation", "name": lvl, "statistic": s["nmi"],
                                         "effect": s["nmi"], "effect_name": "nmi"}))
        for a, t in (L.get("attribute_tests") or {}).items():
            fam.append((t, "p_perm", {"layer": name, "kind": "attribute", "name": a, "statistic": t["statistic"],
                                      "effect": t["effect"], "effect_name": t["effect_name"]}))
        ct = (L.get("concept_tests") or {}).get("test")
        if ct is not None:
            fam.append((ct, "p_perm", {"layer": name, "kind": "concept", "name": "concepts",
                                       "statistic": ct["statistic"], "effect": ct["effect"],
                                       "effect_name": ct["effect_name"]}))
    for p in (summary.get("flow") or {}).get("pairs", []):
        fam.append((p, "nmi_p", {"layer": f"{p['from']}->{p['to']}", "kind": "flow", "name": "nmi",
                                 "statistic": p["nmi"], "effect": p["cramers_v"], "effect_name": "cramers_v"}))
    reject, p_adj = stats.bh_adjust([d[k] for d, k, _ in fam], alpha=alpha)
    table = []
    for (d, k, meta), r, pa in zip(fam, reject, p_adj):
        pre = "nmi_" if k == "nmi_p" and meta["kind"] == "specialisation" else ""
        d[f"{pre}p_bh"] = float(pa)
        d[f"{pre}significant_bh"] = bool(r)
        table.append({**meta, "p": float(d[k]), "p_bh": float(pa), "significant": bool(r)})
    summary["tests"] = {"method": "Benjamini-Hochberg 1995 (statsmodels multipletests, fdr_bh)", "alpha": float(alpha),
                        "n_tests": len(table), "n_significant": int(sum(t["significant"] for t in table)),
                        "family": table}
