"""``analyze(run_dir)`` writes RUN_DIR/analysis/ (summary.json + figures) with every routing analysis of SPEC §4;
``report(run_dir)`` analyzes when needed and writes the self-contained report.html.

Inputs come through :mod:`moecnn.analysis.rundir` (the run's files) or :mod:`moecnn.analysis.compute` (the model);
everything can also be passed as arrays (``routing=``, ``images=``, names, ``accuracy=``), so the analyses run
without a checkpoint or the training stack. The output schema is documented in docs/analysis_schema.md.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import json

import numpy as np

from . import explain, stats
from .compute import _accuracy_from_preds, compute_accuracy, compute_routing, load_for_analysis
from .rundir import (SCHEMA_VERSION, checkpoint_record, is_current, _finite, _json_default, _slug, _write, load_routing, read_concepts, read_config,
                     read_eval_accuracy, read_metrics, routing_file, save_routing)


def _has_arrays(ds) -> bool:
    return ds is not None and hasattr(ds, "images") and hasattr(ds, "labels")


def _super_from_labels(labels, superlabels, n_classes) -> Optional[List[int]]:
    c2s = np.full(n_classes, -1, dtype=np.int64)
    c2s[np.asarray(labels)] = np.asarray(superlabels)
    return c2s.tolist() if (c2s >= 0).all() else None


# ----------------------------------------------------------------------------------------- analyze
def analyze(run_dir, split: str = "test", layer: Optional[str] = None, max_tsne: int = 2000, n_perm: int = 200,
            device: str = "cpu", *, routing=None, images=None, labels=None, class_names: Optional[Sequence[str]] = None,
            superclass_names: Optional[Sequence[str]] = None, class_to_super: Optional[Sequence[int]] = None,
            accuracy: Optional[Dict] = None, model=None, seed: int = 0, n_extreme: int = 8,
            compute_accuracy_with_model: bool = True, progress: bool = True, attribution: int = 0,
            attribution_examples: int = 4, ig_steps: int = 16, concepts=None, alpha: float = 0.05,
            mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None) -> Dict:
    """Run every routing analysis of SPEC §4 and write RUN_DIR/analysis/{summary.json, figures/*.png}.

    Args:
        run_dir: run directory (created if it does not exist).
        split: which split's routing to analyse ("test" or "val").
        layer: analyse only this MoE layer (default: every MoE layer, one section each).
        max_tsne: t-SNE on at most this many images (stratified, seeded subsample).
        n_perm: label permutations for the specialisation null.
        device: where the model runs when routing has to be computed.
        routing: precomputed routing (dict or .npz path, see :func:`load_routing`) instead of the run's files.
        images: uint8 M×C×H×W images aligned with the routing rows (for thumbnails; else taken from the
            routing file's ``images`` or the run's data).
        class_names, superclass_names, class_to_super: label names / class → superclass map.
        accuracy: accuracy suite in ``moecnn eval`` format (else read from RUN_DIR/eval or computed).
        labels: class ids of ``images`` (with ``model``: routing is computed from the model, no run files needed).
        model: an already-built model (with ``images`` and ``labels``) to compute routing / accuracy from.
        attribution: images (stratified subsample) for gate attribution (Grad-CAM, Integrated Gradients) and
            expert contribution (forced vs own routing); 0 = off. Needs the model (``model=`` or the run's
            checkpoint) and the images.
        attribution_examples: example images per expert with IG maps (contribution: max(1, K // 4) per direction).
        ig_steps: Integrated-Gradients steps.
        concepts: CSV of ``image_id,concept`` rows (image_id = routing row) for the concept test.
        alpha: false-discovery rate of the Benjamini–Hochberg correction over all tests of the run.
        mean, std: input normalisation of ``model`` (else the run's data bundle's, else none).
    Returns the summary dict (also written to RUN_DIR/analysis/summary.json).
    """
    from tqdm.auto import tqdm

    from . import figures as figs
    from .tsne import subsample, thumbnail_canvas, tsne_embed, montage

    t_start = time.perf_counter()
    timing: Dict[str, float] = {}
    run_dir = Path(run_dir)
    out = run_dir / "analysis"
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    cfg = read_config(run_dir)
    task = str(cfg.get("task", "classification")) if isinstance(cfg, dict) else "classification"
    notes: List[str] = []
    summary: Dict[str, Any] = {"schema_version": SCHEMA_VERSION, "run_dir": str(run_dir), "split": split,
                               "task": task, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if task == "detection" and routing is None:
        det, note = None, "detection run without checkpoint.pt: size/level analysis skipped (train it first)"
        if (run_dir / "checkpoint.pt").is_file():
            from .detection import analyze_detection  # size buckets, FPN levels, independence tests, figures

            det = analyze_detection(run_dir, device=device, n_perm=n_perm, alpha=alpha)
            summary["tests"] = det.get("tests")
            summary["checkpoint"] = checkpoint_record(run_dir)
            note = "detection run: size/level analysis in analysis/detection_summary.json (also under 'detection')"
        summary.update({"layers": [], "per_layer": {}, "detection": det, "notes": [note]})
        (out / "summary.json").write_text(json.dumps(_finite(summary), indent=1, default=_json_default))
        return summary

    bundle = None
    from_run = routing is None and model is None  # routing and model come from the run's own files
    steps = tqdm(total=8, desc="analyze", disable=not progress)
    try:

        def _load_model():
            nonlocal model, bundle, mean, std
            if model is not None and bundle is not None:
                return
            m, b = load_for_analysis(run_dir, device=device)
            model = model or m
            bundle = b
            mean, std = getattr(b, "mean", None), getattr(b, "std", None)

        # ---- routing
        t0 = time.perf_counter()
        source = None
        if routing is not None:
            rt = load_routing(routing)
            source = str(routing) if isinstance(routing, (str, Path)) else "arrays passed to analyze()"
        elif model is not None and images is not None and labels is not None:
            rt = compute_routing(model, images, np.asarray(labels), mean, std, device=device, progress=progress)
            source = "computed with the model passed to analyze()"
        else:
            f = routing_file(run_dir, split)
            if f is not None:
                rt, source = load_routing(f), str(f)
            else:
                if model is None or images is None:
                    _load_model()
                ds = getattr(bundle, split, None) if bundle is not None else None
                if images is None:
                    if not _has_arrays(ds):
                        raise ValueError(f"no routing file for {run_dir} and its '{split}' data is not an in-memory "
                                         f"array dataset; run 'moecnn eval {run_dir}' first")
                    images = np.asarray(ds.images)
                    labels_arr = np.asarray(ds.labels)
                else:
                    raise ValueError("images without labels: pass labels= or routing= (with labels)")
                rt = compute_routing(model, images, labels_arr, mean, std, device=device, progress=progress)
                save_routing(out / f"routing_{split}.npz", rt, checkpoint_record(run_dir))
                source = f"computed with the model ({out / f'routing_{split}.npz'})"
        labels = rt["labels"]
        m_img = labels.shape[0]
        concept_codes = read_concepts(concepts, m_img, split) if concepts is not None else None  # fail early
        timing["routing"] = time.perf_counter() - t0
        steps.update(1)

        # ---- names and images
        if images is None and "images" in rt:
            images = rt["images"]
        if images is None or class_names is None:
            try:
                if bundle is None and (run_dir / "config.yaml").is_file():
                    _, bundle = load_for_analysis(run_dir, with_model=False)
                    mean, std = bundle.mean, bundle.std
            except Exception as e:  # data not available here: analyses without thumbnails
                notes.append(f"run data not loaded ({type(e).__name__}: {e}); image figures need it")
        if bundle is not None:
            ds = getattr(bundle, split, None)
            if images is None and _has_arrays(ds) and len(ds) == m_img:
                if np.array_equal(np.asarray(ds.labels), labels):
                    images = np.asarray(ds.images)
                else:
                    notes.append(f"the run's {split} labels do not match the routing file; no thumbnails")
            if class_names is None:
                class_names = list(bundle.class_names)
            if superclass_names is None and bundle.superclass_names:
                superclass_names = list(bundle.superclass_names)
            if class_to_super is None and bundle.class_to_super:
                class_to_super = list(bundle.class_to_super)
        if class_names is None and "class_names" in rt:
            class_names = [str(s) for s in rt["class_names"]]
        if superclass_names is None and "superclass_names" in rt and len(rt["superclass_names"]):
            superclass_names = [str(s) for s in rt["superclass_names"]]
        class_names = [str(c) for c in class_names] if class_names is not None else None
        superclass_names = [str(c) for c in superclass_names] if superclass_names is not None else None
        n_classes = max(int(labels.max()) + 1 if m_img else 0, len(class_names) if class_names is not None else 0)
        if class_names is None:
            class_names = [f"class {i}" for i in range(n_classes)]
        if class_to_super is None and "class_to_super" in rt:
            class_to_super = [int(v) for v in rt["class_to_super"]]
        if class_to_super is None and "superlabels" in rt:
            class_to_super = _super_from_labels(labels, rt["superlabels"], n_classes)
        superlabels = np.asarray(class_to_super, dtype=np.int64)[labels] if class_to_super is not None else None
        if superlabels is not None and superclass_names is None:
            superclass_names = [f"superclass {i}" for i in range(int(np.max(class_to_super)) + 1)]
        if images is not None and len(images) != m_img:
            notes.append(f"{len(images)} images but {m_img} routing rows; no thumbnails")
            images = None
        summary.update({"n_images": int(m_img), "class_names": list(class_names),
                        "superclass_names": list(superclass_names) if superclass_names else None,
                        "class_to_super": list(map(int, class_to_super)) if class_to_super is not None else None,
                        "sources": {"routing": source}})
        if from_run and checkpoint_record(run_dir) is not None:
            summary["checkpoint"] = checkpoint_record(run_dir)  # what report() checks before reusing this summary
        if (run_dir / "eval" / f"{split}.json").is_file() and read_eval_accuracy(run_dir, split) is None:
            notes.append(f"eval/{split}*.json came from an earlier checkpoint of this run and were not used; run "
                         f"'moecnn eval {run_dir}' again")
        steps.update(1)

        # ---- layers
        layer_names = list(rt["layers"])
        if layer is not None:
            if layer not in rt["layers"]:
                raise ValueError(f"no MoE layer named '{layer}' in the routing; layers: {', '.join(layer_names)}")
            layer_names = [layer]
        summary["layers"] = layer_names
        steps.total = 6 + 4 * len(layer_names) + (len(layer_names) if attribution else 0)
        steps.refresh()
        per_layer: Dict[str, Dict] = {}
        tsne_idx = subsample(m_img, max_tsne, seed, labels=labels)
        chosen_all: Dict[str, np.ndarray] = {}
        for name in layer_names:
            d = rt["layers"][name]
            w, lg = d["weights"].astype(np.float64), d["logits"]
            n_exp = w.shape[1]
            slug = _slug(name)
            L: Dict[str, Any] = {"num_experts": int(n_exp), "spatial_averaged": bool(d.get("spatial", False))}
            figures: Dict[str, str] = {}
            expert_names = [f"E{i}" for i in range(n_exp)]
            t0 = time.perf_counter()
            util = stats.utilisation(w, lg)
            L["utilisation"] = util
            figures["utilisation"] = _write(fig_dir / f"{slug}_utilisation.png", figs.bar_utilisation(util))
            if n_exp >= 2:
                co = stats.coactivation(w, lg)
                L["coactivation"] = {"counts": co.tolist(), "top_pairs": stats.top_pairs(co, m_img)}
                figures["coactivation"] = _write(fig_dir / f"{slug}_coactivation.png", figs.heatmap(
                    co, expert_names, expert_names, "images whose top-2 experts are {row, column}", cmap="Blues",
                    fmt=".0f", ylabel="expert"))
            chosen = stats.top1(w, lg)
            chosen_all[name] = chosen
            # class / superclass matrices
            mat, counts = stats.group_expert_matrix(w, labels, n_classes)
            tops = stats.top_groups_per_expert(mat, class_names, n=5)
            L["class_expert"] = {"matrix": np.where(np.isfinite(mat), mat, None).tolist(), "counts": counts.tolist(),
                                 "top": tops, "top_text": [f"expert {e}: {', '.join(t)}" for e, t in enumerate(tops)]}
            figures["class_expert"] = _write(fig_dir / f"{slug}_class_expert.png", figs.heatmap(
                mat, class_names, expert_names, "mean gate weight per class", ylabel="class"))
            if superlabels is not None:
                ns = len(superclass_names)
                smat, scounts = stats.group_expert_matrix(w, superlabels, ns)
                stops = stats.top_groups_per_expert(smat, superclass_names, n=3)
                L["superclass_expert"] = {"matrix": np.where(np.isfinite(smat), smat, None).tolist(),
                                          "counts": scounts.tolist(), "top": stops,
                                          "top_text": [f"expert {e}: {', '.join(t)}" for e, t in enumerate(stops)]}
                figures["superclass_expert"] = _write(fig_dir / f"{slug}_superclass_expert.png", figs.heatmap(
                    smat, superclass_names, expert_names, "mean gate weight per superclass", ylabel="superclass"))
            steps.update(1)
            # specialisation
            spec = {"class": stats.specialisation(chosen, labels, n_perm=n_perm, seed=seed, n_labels=n_classes)}
            if superlabels is not None:
                spec["superclass"] = stats.specialisation(chosen, superlabels, n_perm=n_perm, seed=seed,
                                                          n_labels=len(superclass_names))
            L["specialisation"] = spec
            timing[f"{name}/stats"] = time.perf_counter() - t0
            steps.update(1)
            # extremes
            ext = stats.extreme_images(w, n_extreme, lg)
            L["extreme_images"] = {
                "most": ext["most"], "least": ext["least"],
                "most_weight": [[float(w[i, e]) for i in ids] for e, ids in enumerate(ext["most"])],
                "least_weight": [[float(w[i, e]) for i in ids] for e, ids in enumerate(ext["least"])],
                "most_labels": [[class_names[labels[i]] for i in ids] for ids in ext["most"]],
                "least_labels": [[class_names[labels[i]] for i in ids] for ids in ext["least"]],
            }
            if images is not None:
                for kind in ("most", "least"):
                    for e, ids in enumerate(ext[kind]):
                        figures[f"{kind}_E{e}"] = _write(fig_dir / f"{slug}_{kind}_E{e}.png",
                                                          figs.image_png(montage(images[ids], cols=n_extreme, min_side=48)))
            # t-SNE of raw gate logits
            t0 = time.perf_counter()
            coords = tsne_embed(lg[tsne_idx], seed=seed)
            timing[f"{name}/tsne"] = time.perf_counter() - t0
            steps.update(1)
            L["tsne"] = {"n_points": int(len(tsne_idx)), "seed": int(seed), "input": "raw gate logits",
                         "indices": tsne_idx.tolist(), "coords": np.round(coords, 4).tolist()}
            if superlabels is not None:
                figures["tsne_superclass"] = _write(fig_dir / f"{slug}_tsne_superclass.png", figs.tsne_scatter(
                    coords, superlabels[tsne_idx], superclass_names, "t-SNE of gate logits, coloured by superclass"))
            figures["tsne_class"] = _write(fig_dir / f"{slug}_tsne_class.png", figs.tsne_scatter(
                coords, labels[tsne_idx], class_names, "t-SNE of gate logits, coloured by class"))
            figures["tsne_expert"] = _write(fig_dir / f"{slug}_tsne_expert.png", figs.tsne_scatter(
                coords, chosen[tsne_idx], expert_names, "t-SNE of gate logits, coloured by chosen expert"))
            if images is not None:
                t0 = time.perf_counter()
                pal = figs.expert_palette(n_exp)
                sub_imgs = images[tsne_idx]
                side = max(np.asarray(images).shape[-2:]) if np.asarray(images).shape[1] in (1, 3, 4) else 32
                thumb = 32 if side < 32 else (48 if side > 48 else None)  # readable, bounded canvas size
                figures["tsne_thumbnails"] = _write(fig_dir / f"{slug}_tsne_thumbnails.png", figs.image_png(
                    thumbnail_canvas(coords, sub_imgs, grid=30, thumb=thumb, borders=chosen[tsne_idx], palette=pal)))
                for e in range(n_exp):
                    sel = chosen[tsne_idx] == e
                    figures[f"tsne_E{e}"] = _write(fig_dir / f"{slug}_tsne_E{e}.png", figs.image_png(
                        thumbnail_canvas(coords[sel], sub_imgs[sel], grid=18, thumb=thumb) if sel.any()
                        else np.full((32, 32, 3), 255, np.uint8)))
                timing[f"{name}/thumbnails"] = time.perf_counter() - t0
            steps.update(1)
            L["figures"] = {k: f"figures/{v}" for k, v in figures.items()}
            per_layer[name] = L
        summary["per_layer"] = per_layer

        # ---- explain: attribute and concept tests, layer-to-layer flow, routing dynamics
        t0 = time.perf_counter()
        attrs = None
        if images is not None:
            attrs = explain.run_attribute_tests(per_layer, chosen_all, np.asarray(images), n_perm, seed)
        else:
            notes.append("no images: attribute tests skipped")
        if concept_codes is not None:
            explain.run_concept_tests(per_layer, chosen_all, *concept_codes, str(concepts), n_perm, seed, fig_dir)
        timing["attribute_tests"] = time.perf_counter() - t0
        if len(layer_names) >= 2:
            explain.run_flow(summary, chosen_all, {n: per_layer[n]["num_experts"] for n in layer_names}, layer_names,
                             n_perm, seed, fig_dir)
        else:
            summary["flow"] = None
        t0 = time.perf_counter()
        explain.run_dynamics(summary, run_dir, [layer] if layer is not None else None, n_perm=min(n_perm, 100),
                             seed=seed, fig_dir=fig_dir, notes=notes)
        timing["dynamics"] = time.perf_counter() - t0
        steps.update(1)

        # ---- accuracy
        t0 = time.perf_counter()
        acc = accuracy
        if acc is None:
            acc = read_eval_accuracy(run_dir, split)
        if acc is None and compute_accuracy_with_model and (model is not None or (run_dir / "checkpoint.pt").is_file()):
            try:
                if model is None or (images is None and bundle is None):
                    _load_model()
                ds = getattr(bundle, split, None) if bundle is not None else None
                img_acc = images if images is not None else (np.asarray(ds.images) if _has_arrays(ds) else None)
                if img_acc is not None:
                    acc = compute_accuracy(model, img_acc, labels, n_classes, class_to_super, mean, std, layer=layer,
                                           device=device, progress=progress)
            except Exception as e:
                notes.append(f"accuracy not computed ({type(e).__name__}: {e})")
        if acc is None and rt.get("preds") is not None:
            acc = {"source": "predictions in the routing file", "default": _accuracy_from_preds(
                rt["preds"], labels, n_classes, class_to_super)}
        if acc is not None:
            acc = dict(acc)
            afig = {}
            for group, title in (("k_sweep", "accuracy vs test-time k"), ("forced", "each expert forced alone"),
                                 ("disabled", "each expert removed")):
                if acc.get(group):
                    keys = list(acc[group])
                    lab = [f"k={k}" if group == "k_sweep" else f"E{k}" for k in keys]
                    afig[group] = "figures/" + _write(fig_dir / f"accuracy_{group}.png", figs.accuracy_bars(
                        lab, [acc[group][k].get("top1") for k in keys], title,
                        ref=(acc.get("default") or {}).get("top1")))
            # which expert, forced alone, serves which superclass (or class) best
            forced = acc.get("forced") or {}
            for level, names in (("per_superclass", superclass_names), ("per_class", class_names)):
                if forced and names and all(r.get(level) for r in forced.values()) and len(names) <= 120:
                    keys = list(forced)
                    mat = np.array([[np.nan if v is None else v for v in forced[k][level]] for k in keys],
                                   dtype=np.float64).T
                    afig[f"forced_{level}"] = "figures/" + _write(fig_dir / f"accuracy_forced_{level}.png",
                                                                  figs.heatmap(mat, names, [f"E{k}" for k in keys],
                                                                               f"accuracy (%) {level.replace('_', ' ')}"
                                                                               ", one expert forced", fmt=".0f",
                                                                               xlabel="forced expert"))
                    break
            acc["figures"] = afig
        summary["accuracy"] = acc
        timing["accuracy"] = time.perf_counter() - t0
        steps.update(1)

        # ---- utilisation over training
        ev = stats.epoch_utilisation(read_metrics(run_dir))
        train_figs = {}
        for name, d in ev.items():
            if layer is not None and name != layer:
                continue
            train_figs[name] = "figures/" + _write(fig_dir / f"{_slug(name)}_epochs.png",
                                                   figs.epochs_plot(d, f"utilisation during training: {name}"))
        summary["training"] = {"per_layer": {k: v for k, v in ev.items() if layer is None or k == layer},
                               "figures": train_figs} if ev else None
        steps.update(1)

        # ---- gate attribution and expert contribution (need the model)
        if attribution and attribution > 0:
            why = None
            try:
                if model is None:
                    if (run_dir / "checkpoint.pt").is_file():
                        _load_model()
                    else:
                        why = "no model= and no checkpoint.pt"
                if why is None and images is None:
                    why = "no images"
            except Exception as e:
                why = f"model not loaded ({type(e).__name__}: {e})"
            if why is None:
                explain.run_attribution(per_layer, model, layer_names, np.asarray(images), labels, class_names, mean,
                                        std, n_images=int(attribution), n_examples=int(attribution_examples),
                                        ig_steps=int(ig_steps), seed=seed, device=device, fig_dir=fig_dir, out_dir=out,
                                        notes=notes, timing=timing)
            else:
                notes.append(f"attribution skipped: {why}")
            steps.update(len(layer_names))

        # ---- Benjamini-Hochberg over every test, then the figures that show adjusted p-values
        explain.apply_bh(summary, alpha=alpha)
        if attrs is not None:
            explain.attribute_figures(per_layer, chosen_all, attrs, fig_dir)
        steps.update(1)
    finally:
        steps.close()
    timing["total"] = time.perf_counter() - t_start
    summary["timing_s"] = {k: round(v, 3) for k, v in timing.items()}
    summary["notes"] = notes
    summary["params"] = {"max_tsne": int(max_tsne), "n_perm": int(n_perm), "seed": int(seed),
                         "living_threshold": stats.LIVING_THRESHOLD, "n_extreme": int(n_extreme),
                         "attribution": int(attribution or 0), "attribution_examples": int(attribution_examples),
                         "ig_steps": int(ig_steps), "alpha": float(alpha),
                         "concepts": str(concepts) if concepts is not None else None}
    summary["per_layer"] = {n: {k: L[k] for k in _LAYER_ORDER if k in L}
                            for n, L in summary.get("per_layer", {}).items()}
    summary["headline"] = headline(summary)
    summary = _finite({k: summary[k] for k in _TOP_ORDER if k in summary})
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=_json_default, allow_nan=False))
    return summary


_TOP_ORDER = ("schema_version", "run_dir", "split", "task", "created", "checkpoint", "n_images", "layers", "headline",
              "sources",
              "notes", "params", "timing_s", "tests", "per_layer", "flow", "dynamics", "accuracy", "training",
              "detection", "class_names", "superclass_names", "class_to_super")
_LAYER_ORDER = ("num_experts", "spatial_averaged", "utilisation", "specialisation", "attribute_tests",
                "concept_tests", "gate_attribution", "contribution", "superclass_expert", "class_expert",
                "coactivation", "extreme_images", "figures", "tsne")


def headline(summary: Dict) -> Dict[str, Dict]:
    """Per layer, the key numbers in one small dict (also stored as ``summary["headline"]``)."""
    out = {}
    for name, L in summary.get("per_layer", {}).items():
        u, s = L["utilisation"], L["specialisation"]
        h = {"mean_importance": [round(v, 4) for v in u["mean_importance"]], "cv_imp": round(u["cv_imp"], 4),
             "cv_act": round(u["cv_act"], 4), "n_living": u["n_living"], "num_experts": L["num_experts"]}
        for lvl in ("superclass", "class"):
            if s.get(lvl):
                h[f"nmi_{lvl}"] = round(s[lvl]["nmi"], 4)
                h[f"nmi_{lvl}_p"] = round(s[lvl]["nmi_p"], 4)
                h[f"nmi_{lvl}_null_max"] = round(s[lvl]["nmi_null_max"], 4) if s[lvl]["nmi_null_max"] is not None \
                    else None
                h[f"purity_{lvl}"] = round(s[lvl]["purity"], 4)
        h["top"] = (L.get("superclass_expert") or L["class_expert"])["top_text"]
        if L.get("attribute_tests"):
            h["attributes_significant"] = [a for a, t in L["attribute_tests"].items() if t.get("significant_bh")]
        out[name] = h
    acc = summary.get("accuracy") or {}
    if acc.get("default", {}).get("top1") is not None:
        out["_accuracy"] = {"top1": acc["default"]["top1"],
                            **{f"k{k}": r.get("top1") for k, r in (acc.get("k_sweep") or {}).items()}}
    return out


def brief(summary: Dict) -> str:
    """A few human-readable lines of a summary (what the CLI prints)."""
    det = summary.get("detection")
    n = det.get("num_images", 0) if det else summary.get("n_images", 0)
    lines = [f"analysis of {summary.get('run_dir')} ({summary.get('task')}, {n} images)"]
    for head, h in (det or {}).get("heads", {}).items():
        bt = h["bucket_test"]
        lines.append(f"[{head} head] expert × object size: p = {bt['p_value']:.3g}; within FPN levels: "
                     + ", ".join(f"{lvl} p = {t['p_value']:.3g}" for lvl, t in h["bucket_test_within_level"].items()))
    for name, L in summary.get("per_layer", {}).items():
        u = L["utilisation"]
        lines.append(f"[{name}] importance {', '.join(f'{v:.3f}' for v in u['mean_importance'])}; CV_imp "
                     f"{u['cv_imp']:.3f}; CV_act {u['cv_act']:.3f}; living {u['n_living']}/{u['num_experts']}")
        for lvl, s in L["specialisation"].items():
            lines.append(f"  NMI(top-1 expert, {lvl}) = {s['nmi']:.3f} (null max {s['nmi_null_max']:.3f}, "
                         f"p = {s['nmi_p']:.4f}); purity {s['purity']:.3f} (p = {s['purity_p']:.4f})")
        top = (L.get("superclass_expert") or L["class_expert"])["top_text"]
        lines += ["  " + t for t in top]
        at = L.get("attribute_tests")
        if at:
            lines.append("  attributes (BH): " + ", ".join(
                f"{a} {t['effect_name']} {t['effect']:.3f}{' *' if t.get('significant_bh') else ''}"
                for a, t in at.items()) + "   (* significant)")
        ct = (L.get("concept_tests") or {}).get("test")
        if ct:
            lines.append(f"  concepts: Cramér's V {ct['effect']:.3f}, p_BH = {ct.get('p_bh', ct['p_perm']):.3g}")
        for p in (L.get("contribution") or {}).get("per_expert", []):
            lines.append(f"  forced E{p['expert']}: Δ true-class logit {p['delta_true_mean']:+.3f}, helps "
                         + (", ".join(x["class"] for x in p["helps"][:3]) or "-") + "; hurts "
                         + (", ".join(x["class"] for x in p["hurts"][:3]) or "-"))
    for p in (summary.get("flow") or {}).get("pairs", []):
        lines.append(f"[{p['from']} -> {p['to']}] NMI {p['nmi']:.3f} (null max {p['nmi_null_max']:.3f}, "
                     f"p = {p['nmi_p']:.4f}), Cramér's V {p['cramers_v']:.3f}")
    for name, d in ((summary.get("dynamics") or {}).get("per_layer") or {}).items():
        sp = {lvl: v.get("specialised_from") for lvl, v in d["specialisation"].items()}
        lines.append(f"[{name} over training] specialised from epoch " + ", ".join(
            f"{v} ({k})" for k, v in sp.items()) + f"; stable from epoch {d.get('stable_from')}")
    if summary.get("tests"):
        t = summary["tests"]
        lines.append(f"{t['n_significant']}/{t['n_tests']} tests significant after Benjamini-Hochberg "
                     f"(FDR {t['alpha']:g})")
    lines.append(f"written to {Path(summary.get('run_dir', '.')) / 'analysis' / 'summary.json'}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- report
def report(run_dir) -> Path:
    """Write RUN_DIR/report.html (one self-contained file; runs :func:`analyze` first when needed)."""
    from .html_report import write_report

    run_dir = Path(run_dir)
    f = run_dir / "analysis" / "summary.json"
    if not f.is_file() or not is_current(run_dir, json.loads(f.read_text()).get("checkpoint")):
        analyze(run_dir)  # none yet, or made from an earlier checkpoint of this run
    return write_report(run_dir)
