"""Self-contained HTML report of a run (all figures embedded as base64 PNGs; no external assets)."""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}h3{margin-top:1.5em}
p.explain{color:#555;font-size:.93em;max-width:900px}
table{border-collapse:collapse;margin:.6em 0;font-size:.85em}
th,td{border:1px solid #ccc;padding:2px 7px;text-align:right}th{background:#f3f3f3}
td.l,th.l{text-align:left}
img{max-width:100%;height:auto;border:1px solid #eee;margin:4px 0}
.grid{display:flex;flex-wrap:wrap;gap:12px}.grid figure{margin:0}figcaption{font-size:.8em;color:#555}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.4em .8em;font-size:.9em}
details{margin:.5em 0}summary{cursor:pointer;color:#0645ad}
.pill{display:inline-block;padding:0 .5em;border-radius:1em;background:#e8f0fe;font-size:.85em}
nav a{margin-right:1em}
"""


def _e(s: Any) -> str:
    return html.escape(str(s))


def _img(path: Path, alt: str, width: Optional[int] = None) -> str:
    if not path.is_file():
        return f'<p class="note">missing figure: {_e(path.name)}</p>'
    b64 = base64.b64encode(path.read_bytes()).decode("ascii")
    wattr = f' style="width:{width}px"' if width else ""
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{b64}"{wattr}>'


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if not np.isfinite(v):
            return "–"
        return f"{v:.{digits}f}"
    return _e(v)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], shade: Optional[List[List[Optional[float]]]] = None,
           left_cols: int = 1, digits: int = 3) -> str:
    """HTML table; ``shade`` (same shape as the numeric cells) colours cells by value in [0, 1]."""
    out = ["<table><tr>" + "".join(f'<th class="{"l" if i < left_cols else ""}">{_e(h)}</th>'
                                   for i, h in enumerate(header)) + "</tr>"]
    for r, row in enumerate(rows):
        cells = []
        for c, v in enumerate(row):
            cls = ' class="l"' if c < left_cols else ""
            style = ""
            if shade is not None and c >= left_cols:
                s = shade[r][c - left_cols]
                if s is not None and np.isfinite(s):
                    a = max(0.0, min(1.0, float(s)))
                    style = f' style="background:rgba(33,113,181,{0.85 * a:.2f});color:{"#fff" if a > .55 else "#000"}"'
            cells.append(f"<td{cls}{style}>{_fmt(v, digits)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _matrix_table(mat: List[List[Optional[float]]], counts: Sequence[int], names: Sequence[str], label: str) -> str:
    arr = np.array([[np.nan if v is None else v for v in row] for row in mat], dtype=np.float64)
    n = arr.shape[1] if arr.ndim == 2 else 0
    mx = np.nanmax(arr) if np.isfinite(arr).any() else 1.0
    shade = (arr / mx if mx > 0 else arr).tolist()
    rows = [[names[i], int(counts[i])] + [None if not np.isfinite(x) else float(x) for x in arr[i]]
            for i in range(arr.shape[0])]
    shade = [[None] + s for s in shade]
    return _table([label, "images"] + [f"E{j}" for j in range(n)], rows, shade=shade, left_cols=1)


def _spec_table(spec: Dict[str, Dict]) -> str:
    rows = []
    for lvl, s in spec.items():
        rows.append([lvl, s["nmi"], s["nmi_null_mean"], s["nmi_null_max"], s["nmi_p"], s["purity"],
                     s["purity_null_mean"], s["purity_null_max"], s["purity_p"], s["chance_purity"]])
    return _table(["labels", "NMI", "null mean", "null max", "p", "purity", "null mean", "null max", "p",
                   "majority share"], rows, digits=4)


def _verdict(s: Dict, what: str) -> str:
    sig = s["nmi_p"] <= 0.01
    return (f"<p><span class='pill'>{'significant' if sig else 'not significant'}</span> "
            f"NMI between the chosen expert and the {what} is {s['nmi']:.3f}; over {s['n_perm']} label "
            f"permutations the null reaches at most {s['nmi_null_max']:.4f} (p = {s['nmi_p']:.4f}). "
            + ("The experts' allocation depends on the " + what + "." if sig else
               "No evidence that experts specialise on the " + what + ".") + "</p>")


def _fig(path: Path, alt: str, caption: str, width: Optional[int] = None) -> str:
    """A figure with the one sentence under it that says what it shows."""
    return f"<figure>{_img(path, alt, width)}<figcaption>{_e(caption)}</figcaption></figure>"


def _p(v: Optional[float]) -> str:
    return "–" if v is None else f"{v:.3g}"


def _sig(t: Dict) -> str:
    s = t.get("significant_bh")
    return "–" if s is None else ("yes" if s else "no")


def _attribute_section(F: Dict[str, Path], L: Dict, alpha: float) -> str:
    tests = L.get("attribute_tests") or {}
    if not tests:
        return ""
    h = ["<h3>Which image attributes does routing follow?</h3><p class='explain'>Attributes computed from the "
         "pixels of every image (hue: angle of the mean opponent-colour vector, circular; saturation; brightness = "
         "mean luma; contrast = luma standard deviation; high-frequency share of the luma spectrum; share of Sobel "
         "edge pixels) against the image's top-1 expert. Hue: circular η² of unit hue vectors; the others: "
         "Kruskal–Wallis H with ε² = H/(n−1). p from a permutation null (images reassigned to experts at random); "
         f"p<sub>BH</sub> after Benjamini–Hochberg over all tests of this run (FDR {alpha:g}).</p>"]
    rows = []
    for a, t in tests.items():
        per = t.get("group_median") or t.get("group_mean") or {}
        rows.append([a, t["test"], t["statistic"], f"{t['effect_name']} {t['effect']:.3f}", _p(t["p_perm"]),
                     _p(t.get("p_bh")), _sig(t), ", ".join(f"E{k}: {v:.3g}" for k, v in per.items()),
                     t.get("degenerate") or ""])
    h.append(_table(["attribute", "test", "statistic", "effect size", "p (perm.)", "p BH", "significant",
                     "per expert (median; hue: circular mean °)", "note"], rows, digits=3))
    if "attributes" in F:
        h.append(_fig(F["attributes"], "attributes by expert", "Each panel shows how one pixel attribute is "
                      "distributed over the images of each top-1 expert (titles: effect size and BH-adjusted p)."))
    ct = L.get("concept_tests")
    if ct:
        t = ct["test"]
        h.append(f"<h4>Concept labels</h4><p class='explain'>Concepts from <code>{_e(ct['file'])}</code> "
                 f"({ct['n_labelled']} labelled images): χ² of the concept × top-1 expert table against a permutation "
                 "null; Cramér's V and NMI as effect sizes.</p>")
        h.append(f"<p>χ² = {t['statistic']:.3g}, Cramér's V = {t['effect']:.3f}, NMI = {t.get('nmi', 0):.3f}, "
                 f"p = {_p(t['p_perm'])}, p<sub>BH</sub> = {_p(t.get('p_bh'))} (significant: {_sig(t)}).</p>")
        n = len(ct["counts"][0]) if ct["counts"] else 0
        h.append(_table(["concept"] + [f"E{i}" for i in range(n)], [[c] + r for c, r in zip(ct["concepts"],
                                                                                          ct["counts"])]))
        if "concepts" in F:
            h.append(_fig(F["concepts"], "concepts by expert", "Each row shows how the images with one concept "
                          "label are shared among the top-1 experts.", 520))
    return "\n".join(h)


def _gate_attribution_section(F: Dict[str, Path], L: Dict) -> str:
    g = L.get("gate_attribution")
    if not g:
        return ""
    h = ["<h3>Why this expert? Gate attribution</h3><p class='explain'>Grad-CAM (Selvaraju et al. 2017) of each "
         "expert's gate logit" + (" and routing weight" if "weight" in g["targets"] else "") + " at the feature "
         f"map the gate reads ({g['feature_size'][0]}×{g['feature_size'][1]}, upsampled), averaged over the "
         f"{g['n_images']} attribution images routed to the expert (top-1); Integrated Gradients (Sundararajan et "
         f"al. 2017, {g['ig_steps']} steps, baseline = dataset-mean colour) of the same outputs at the pixels, "
         "positive part, averaged over each expert's example images (computed with captum).</p>"]
    com = g.get("logit", {}).get("gradcam_center_of_mass") or []
    if com:
        h.append(_table(["expert", "images routed", "Grad-CAM centre of mass (row, col; 0–1)"],
                        [[f"E{e}", g["routed"][e], "–" if c is None else f"({c[0]:.2f}, {c[1]:.2f})"]
                         for e, c in enumerate(com)]))
    if "attribution_mean" in F:
        h.append(_fig(F["attribution_mean"], "mean attribution maps", "Columns are experts: the mean of the images "
                      "routed to each expert, then where its gate logit/weight attends on average (Grad-CAM, IG+)."))
    if "attribution_examples" in F:
        h.append(_fig(F["attribution_examples"], "attribution examples", "Each row shows the images an expert's gate "
                      "weights most, each followed by its Grad-CAM and positive Integrated Gradients map for that "
                      "expert's logit."))
    return "\n".join(h)


def _contribution_section(F: Dict[str, Path], L: Dict) -> str:
    c = L.get("contribution")
    if not c:
        return ""
    h = ["<h3>What does each expert add? Expert contribution</h3><p class='explain'>For each of "
         f"{c['n_images']} images the layer is forced to one expert (all others off) and the logits are compared "
         "with the layer's own routing: Δ true-class logit (positive = the expert alone gives more evidence for "
         "the right class), the size of the whole change ‖Δ logits‖, accuracy when forced, and the share of "
         f"predictions that change. Accuracy with the own routing: {c['accuracy_default']:.1f} %.</p>"]
    rows = []
    for p in c["per_expert"]:
        rows.append([f"E{p['expert']}", p["delta_true_mean"], p.get("delta_true_mean_not_routed"),
                     p["delta_norm_mean"], p["accuracy_forced"], p["prediction_changed"],
                     ", ".join(f"{x['class']} ({x['delta_true']:+.2f})" for x in p["helps"]) or "–",
                     ", ".join(f"{x['class']} ({x['delta_true']:+.2f})" for x in p["hurts"]) or "–"])
    h.append(_table(["expert", "Δ true logit", "Δ (routed elsewhere)", "‖Δ logits‖", "accuracy forced %",
                     "predictions changed", "helps most (classes)", "hurts most (classes)"], rows, digits=3))
    pairs = c["interchangeability"]["pairs"][:5]
    if pairs:
        h.append("<p>Most interchangeable pairs (same prediction when forced to either): " + "; ".join(
            f"E{p['pair'][0]}–E{p['pair'][1]} {100 * p['prediction_agreement']:.0f} % (logit correlation "
            f"{p['logit_correlation']:.2f})" for p in pairs) + ".</p>")
    g = []
    if "contribution" in F:
        g.append(_fig(F["contribution"], "contribution", "Mean change of the true-class logit when the layer is "
                      "forced to each expert instead of its own routing.", 420))
    if "interchangeability" in F:
        g.append(_fig(F["interchangeability"], "interchangeability", "Share of images on which forcing the row "
                      "expert and forcing the column expert give the same prediction (high = interchangeable).", 420))
    h.append('<div class="grid">' + "".join(g) + "</div>")
    if "contribution_examples" in F:
        h.append(_fig(F["contribution_examples"], "contribution examples", "Per expert, the images where forcing "
                      "it raises (+) or lowers (−) the true-class logit most, each with the Integrated Gradients of "
                      "that change (positive part for +, negative part for −)."))
    return "\n".join(h)


def _tests_section(summary: Dict) -> str:
    t = summary.get("tests")
    if not t or not t.get("family"):
        return ""
    h = ["<h2 id='tests'>All tests of this run (Benjamini–Hochberg)</h2>",
         f"<p class='explain'>{t['n_tests']} tests (specialisation, attributes, concepts, layer flow) corrected "
         f"together with {_e(t['method'])} at FDR {t['alpha']:g}; {t['n_significant']} are significant.</p>"]
    rows = [[r["layer"], r["kind"], r["name"], r["statistic"], f"{r['effect_name']} {r['effect']:.3f}", _p(r["p"]),
             _p(r["p_bh"]), "yes" if r["significant"] else "no"] for r in t["family"]]
    h.append("<details><summary>the family of tests</summary>" + _table(
        ["layer", "kind", "test", "statistic", "effect", "p", "p BH", "significant"], rows, left_cols=3) + "</details>")
    return "\n".join(h)


def _flow_section(run_dir: Path, summary: Dict) -> str:
    fl = summary.get("flow")
    if not fl or not fl.get("pairs"):
        return ""
    an = run_dir / "analysis"
    h = ["<h2 id='flow'>Layer-to-layer flow</h2><p class='explain'>Does the expert an image takes in one MoE layer "
         "predict the expert it takes in the next? Rows: top-1 expert in the earlier layer; cells: share of those "
         "images going to each expert of the next layer. NMI between the two choices against a permutation null; "
         "Cramér's V.</p>"]
    for p in fl["pairs"]:
        key = f"{p['from']}->{p['to']}"
        h.append(f"<p><code>{_e(p['from'])}</code> → <code>{_e(p['to'])}</code>: NMI {p['nmi']:.3f} (null max "
                 f"{p['nmi_null_max']:.4f}, p = {_p(p['nmi_p'])}, p<sub>BH</sub> = {_p(p.get('p_bh'))}), Cramér's V "
                 f"{p['cramers_v']:.3f}.</p>")
        if key in fl.get("figures", {}):
            h.append(_fig(an / fl["figures"][key], f"flow {key}", "Each row shows where the images of one expert of "
                          "the earlier layer go in the next layer.", 520))
    return "\n".join(h)


def _dynamics_section(run_dir: Path, summary: Dict) -> str:
    dyn = summary.get("dynamics")
    if not dyn:
        return ""
    an = run_dir / "analysis"
    h = ["<h2 id='dynamics'>Routing dynamics during training</h2><p class='explain'>The routing of a fixed set of "
         f"{dyn['n_probe']} probe images at each of {len(dyn['epochs'])} evaluations: NMI between the top-1 expert "
         f"and the labels with its permutation null maximum ({dyn['n_perm']} permutations), the share of probe "
         "images that keep their top-1 expert from one evaluation to the next, the adjusted Rand index between "
         "consecutive routings (invariant to experts swapping roles), and each expert's top-1 share.</p>"]
    for name, d in dyn["per_layer"].items():
        parts = []
        for lvl, s in d["specialisation"].items():
            f = s.get("specialised_from")
            parts.append(f"above its null from epoch {f} on ({lvl})" if f is not None
                         else f"not above its null at the end ({lvl})")
        st = d.get("stable_from")
        stab = (f"from epoch {st} on every evaluation keeps ≥ {100 * dyn['stable_share']:.0f} % of the probe images' "
                "experts" if st is not None else f"routing never settles to ≥ {100 * dyn['stable_share']:.0f} % kept")
        h.append(f"<p><code>{_e(name)}</code>: NMI {'; '.join(parts)}; {stab}.</p>")
        if name in dyn.get("figures", {}):
            h.append(_fig(an / dyn["figures"][name], f"dynamics {name}", "Left: when the experts specialise (NMI "
                          "above the dashed null); middle: whether images stay with their expert; right: each "
                          "expert's share of the probe images over training."))
    return "\n".join(h)


def _layer_section(run_dir: Path, name: str, L: Dict, summary: Dict, idx: int) -> str:
    an = run_dir / "analysis"
    F = {k: an / v for k, v in L.get("figures", {}).items()}
    u = L["utilisation"]
    n = L["num_experts"]
    h = [f'<h2 id="layer{idx}">MoE layer <code>{_e(name)}</code> ({n} experts)</h2>']
    if L.get("spatial_averaged"):
        h.append('<p class="note">This layer routes per pixel; its routing was averaged over pixels per image.</p>')
    # utilisation
    h.append("<h3>Utilisation</h3><p class='explain'>Mean importance = mean sparse gate weight of the expert "
             "over all images (sums to 1); routed share = share of images sent to the expert at all (sums to k); "
             "top-1 share = share of images whose largest weight is the expert. CV = population standard "
             "deviation / mean across experts (0 = perfectly balanced). An expert is living when its mean "
             "importance exceeds 0.01.</p>")
    rows = [[f"E{i}", u["mean_importance"][i], u["routed_share"][i], u["top1_share"][i],
             "yes" if u["living"][i] else "no"] for i in range(n)]
    h.append(_table(["expert", "mean importance", "routed share", "top-1 share", "living"], rows))
    h.append(f"<p>CV<sub>imp</sub> = <b>{u['cv_imp']:.4f}</b>, CV<sub>act</sub> = <b>{u['cv_act']:.4f}</b>, "
             f"living experts {u['n_living']}/{n}, mean experts per image {u['mean_active']:.2f}.</p>")
    h.append(_img(F.get("utilisation", an / "-"), "utilisation"))
    if "coactivation" in L:
        h.append("<h3>Expert co-activation</h3><p class='explain'>Number of images whose two largest gate "
                 "weights (the top-2 set; with k=1 the runner-up by raw logit) are the pair {i, j}.</p>")
        tp = L["coactivation"]["top_pairs"]
        h.append(_table(["pair", "images", "share"], [[f"E{p['pair'][0]} + E{p['pair'][1]}", p["count"], p["share"]]
                                                       for p in tp]))
        h.append(_img(F["coactivation"], "co-activation", 420))
    # allocation
    h.append("<h3>Class-wise expert allocation</h3><p class='explain'>Each cell is the mean sparse gate weight "
             "of an expert over the test images of a class (\"Table III\" of the paper). The lists name the "
             "classes each expert weights most.</p>")
    if "superclass_expert" in L:
        h.append("<ul>" + "".join(f"<li>{_e(t)}</li>" for t in L["superclass_expert"]["top_text"]) + "</ul>")
    h.append("<ul>" + "".join(f"<li>{_e(t)}</li>" for t in L["class_expert"]["top_text"]) + "</ul>")
    figs_html = []
    if "superclass_expert" in F:
        figs_html.append(f"<figure>{_img(F['superclass_expert'], 'superclass x expert')}<figcaption>superclass × "
                         "expert</figcaption></figure>")
    figs_html.append(f"<figure>{_img(F['class_expert'], 'class x expert')}<figcaption>class × expert"
                     "</figcaption></figure>")
    h.append('<div class="grid">' + "".join(figs_html) + "</div>")
    if "superclass_expert" in L:
        se = L["superclass_expert"]
        h.append("<details open><summary>superclass × expert table</summary>"
                 + _matrix_table(se["matrix"], se["counts"], summary["superclass_names"], "superclass")
                 + "</details>")
    ce = L["class_expert"]
    h.append("<details><summary>class × expert table</summary>"
             + _matrix_table(ce["matrix"], ce["counts"], summary["class_names"], "class") + "</details>")
    # specialisation
    h.append("<h3>Specialisation tests</h3><p class='explain'>Normalised mutual information (scikit-learn, "
             "arithmetic normalisation) and purity between each image's chosen (top-1) expert and its label. "
             "The null distribution shuffles the labels (same class sizes, same routing); p = (1 + #null ≥ "
             "observed) / (1 + permutations). Purity = share of images whose expert's majority label is their "
             "own; the majority share is the purity of routing everything to one expert.</p>")
    h.append(_spec_table(L["specialisation"]))
    for lvl in ("superclass", "class"):
        if lvl in L["specialisation"]:
            h.append(_verdict(L["specialisation"][lvl], lvl))
    alpha = (summary.get("tests") or {}).get("alpha", 0.05)
    for part in (_attribute_section(F, L, alpha), _gate_attribution_section(F, L), _contribution_section(F, L)):
        if part:
            h.append(part)
    # t-SNE
    t = L.get("tsne", {})
    h.append(f"<h3>t-SNE of gate logits</h3><p class='explain'>t-SNE (scikit-learn, seed {t.get('seed')}) of the "
             f"raw gate logits (model in eval mode, before noise and top-k) of {t.get('n_points')} test images "
             "(stratified subsample). Images with similar routing land close together.</p>")
    g = []
    for key, cap in (("tsne_superclass", "coloured by superclass"), ("tsne_expert", "coloured by chosen expert"),
                     ("tsne_class", "coloured by class")):
        if key in F:
            g.append(f"<figure>{_img(F[key], cap, 520)}<figcaption>{cap}</figcaption></figure>")
    h.append('<div class="grid">' + "".join(g) + "</div>")
    if "tsne_thumbnails" in F:
        h.append("<h4>Thumbnail canvas (Fig. 3)</h4><p class='explain'>Each cell shows the image nearest to that "
                 "position of the t-SNE map; the frame colour is the chosen expert (same colours as above).</p>")
        h.append(_img(F["tsne_thumbnails"], "t-SNE thumbnails", 900))
        h.append("<h4>Images routed to each expert (Fig. 4)</h4><p class='explain'>The same map, one panel per "
                 "expert, showing only the images whose top-1 expert it is.</p>")
        h.append('<div class="grid">' + "".join(
            f"<figure>{_img(F[f'tsne_E{e}'], f'expert {e}', 360)}<figcaption>expert {e} "
            f"({100 * u['top1_share'][e]:.1f} % of images)</figcaption></figure>"
            for e in range(n) if f"tsne_E{e}" in F) + "</div>")
    # extremes
    ex = L.get("extreme_images")
    if ex:
        h.append("<h3>Images each expert weights most and least</h3><p class='explain'>Highest and lowest gate "
                 "weight of the expert over the test set (ties by image index; for sparse gates the least "
                 "weighted images are usually not routed to the expert at all).</p>")
        for e in range(n):
            most = ", ".join(f"{lab} ({wv:.2f})" for lab, wv in zip(ex["most_labels"][e], ex["most_weight"][e]))
            least = ", ".join(f"{lab} ({wv:.2f})" for lab, wv in zip(ex["least_labels"][e], ex["least_weight"][e]))
            h.append(f"<p><b>expert {e}</b> — most: {_e(most)}<br>least: {_e(least)}</p>")
            if f"most_E{e}" in F:
                h.append('<div class="grid">'
                         f"<figure>{_img(F[f'most_E{e}'], f'expert {e} most')}<figcaption>most</figcaption></figure>"
                         f"<figure>{_img(F[f'least_E{e}'], f'expert {e} least')}<figcaption>least</figcaption>"
                         "</figure></div>")
    # training
    tr = summary.get("training") or {}
    if name in tr.get("figures", {}):
        h.append("<h3>Utilisation over training</h3><p class='explain'>Per-epoch importance share of each expert "
                 "and the coefficients of variation, from metrics.jsonl.</p>")
        h.append(_img(an / tr["figures"][name], "training utilisation"))
    return "\n".join(h)


def _acc_section(run_dir: Path, acc: Dict, summary: Dict) -> str:
    an = run_dir / "analysis"
    h = ["<h2 id='accuracy'>Accuracy under routing controls</h2>",
         f"<p class='explain'>Top-1 accuracy in percent (source: {_e(acc.get('source', '?'))}). k sweep: test-time "
         "number of active experts; forced: every image sent to one expert alone; removed: the expert is masked "
         "and the others are used.</p>"]
    d = acc.get("default") or {}
    if d.get("top1") is not None:
        h.append(f"<p>As trained: <b>{d['top1']:.2f} %</b></p>")
    t = acc.get("tta_flip") or {}
    if t.get("top1") is not None:
        h.append(f"<p>With flip test-time augmentation (mean logits of each image and its mirror; beside, never "
                 f"instead of, the number above): {t['top1']:.2f} %</p>")
    rows, cols = [], []
    for group, lab in (("k_sweep", "k="), ("forced", "forced E"), ("disabled", "removed E")):
        for key, r in (acc.get(group) or {}).items():
            cols.append((f"{lab}{key}", r))
    if "dense" in acc and acc["dense"]:
        cols.append(("dense 1/N", acc["dense"]))
    if cols:
        h.append(_table(["setting", "top-1 %"], [[c, r.get("top1")] for c, r in cols], digits=2))
    h.append('<div class="grid">' + "".join(_img(an / p, k, 420) for k, p in (acc.get("figures") or {}).items())
             + "</div>")
    all_cols = ([("default", d)] if d else []) + cols
    for level, names_key in (("per_superclass", "superclass_names"), ("per_class", "class_names")):
        names = summary.get(names_key)
        if not names or not any(r.get(level) for _, r in all_cols):
            continue
        use = [(c, r) for c, r in all_cols if r.get(level)]
        rows = [[names[i]] + [r[level][i] if i < len(r[level]) else None for _, r in use] for i in range(len(names))]
        shade = [[None if v is None else v / 100.0 for v in row[1:]] for row in rows]
        tag = "superclass" if level == "per_superclass" else "class"
        h.append(f"<details{' open' if tag == 'superclass' else ''}><summary>accuracy per {tag} (%)</summary>"
                 + _table([tag] + [c for c, _ in use], rows, shade=shade, digits=1) + "</details>")
    return "\n".join(h)


def _detection_sections(run_dir: Path) -> List[Tuple[str, str]]:
    try:
        from .detection import detection_report_sections
    except ImportError as e:
        return [("Detection", f"<p class='note'>detection analyses unavailable in this install ({_e(e)})</p>")]
    try:
        return list(detection_report_sections(run_dir))
    except Exception as e:  # keep the rest of the report
        return [("Detection", f"<p class='note'>detection analyses failed: {_e(type(e).__name__)}: {_e(e)}</p>")]


def build_html(run_dir, summary: Dict, extra_sections: Sequence[Tuple[str, str]] = ()) -> str:
    run_dir = Path(run_dir)
    layers = summary.get("layers", [])
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>moecnn report: {_e(run_dir.name)}"
             f"</title><style>{CSS}</style></head><body>",
             f"<h1>moecnn report — <code>{_e(run_dir.name)}</code></h1>",
             f"<p>Task: {_e(summary.get('task'))}; split: {_e(summary.get('split'))}; images: "
             f"{_e(summary.get('n_images', '–'))}; generated {_e(summary.get('created'))}. Every number here is also in "
             "<code>analysis/summary.json</code> (schema: docs/analysis_schema.md).</p>"]
    nav = [f"<a href='#layer{i}'>{_e(n)}</a>" for i, n in enumerate(layers)]
    if summary.get("accuracy"):
        nav.append("<a href='#accuracy'>accuracy</a>")
    for key, label in (("tests", "tests"), ("flow", "flow"), ("dynamics", "dynamics")):
        if summary.get(key):
            nav.append(f"<a href='#{key}'>{label}</a>")
    if nav:
        parts.append("<nav>" + "".join(nav) + "</nav>")
    if layers:
        rows = []
        for n in layers:
            L = summary["per_layer"][n]
            u = L["utilisation"]
            s = L["specialisation"]
            rows.append([n, L["num_experts"], u["cv_imp"], u["cv_act"], f"{u['n_living']}/{L['num_experts']}",
                         (s.get("superclass") or {}).get("nmi"), (s.get("superclass") or {}).get("nmi_p"),
                         s["class"]["nmi"], s["class"]["nmi_p"]])
        parts.append("<h2>Overview</h2>" + _table(
            ["layer", "experts", "CV_imp", "CV_act", "living", "NMI superclass", "p", "NMI class", "p"], rows, digits=4))
    for note in summary.get("notes", []):
        parts.append(f"<p class='note'>{_e(note)}</p>")
    if summary.get("accuracy"):
        parts.append(_acc_section(run_dir, summary["accuracy"], summary))
    for i, n in enumerate(layers):
        parts.append(_layer_section(run_dir, n, summary["per_layer"][n], summary, i))
    for part in (_flow_section(run_dir, summary), _dynamics_section(run_dir, summary), _tests_section(summary)):
        if part:
            parts.append(part)
    for title, body in extra_sections:
        parts.append(f"<h2>{_e(title)}</h2>\n{body}")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(run_dir) -> Path:
    """Write RUN_DIR/report.html from RUN_DIR/analysis/summary.json (+ detection sections for detection runs)."""
    run_dir = Path(run_dir)
    f = run_dir / "analysis" / "summary.json"
    summary = json.loads(f.read_text()) if f.is_file() else {"layers": [], "per_layer": {}}
    extra: List[Tuple[str, str]] = []
    task = summary.get("task")
    if task is None:
        from .rundir import read_config

        task = read_config(run_dir).get("task")
    if task == "detection":
        extra = _detection_sections(run_dir)
    out = run_dir / "report.html"
    out.write_text(build_html(run_dir, summary, extra), encoding="utf-8")
    return out
