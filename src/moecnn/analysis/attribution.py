"""Why this expert, and what does it add? Attribution of MoE gates and experts with captum.

**Gate attribution** (one MoE layer, every expert i):

- Grad-CAM (Selvaraju et al. 2017, arXiv 1610.02391) of expert i's gate logit and of its routing weight at the
  feature map the gate reads (the MoE layer's input): :class:`captum.attr.LayerGradCam` on ``layer.gate`` with
  ``attribute_to_layer_input=True`` and ReLU, upsampled bilinearly to the image
  (:meth:`captum.attr.LayerAttribution.interpolate`).
- Integrated Gradients (Sundararajan et al. 2017, arXiv 1703.01365) of the same outputs to the input pixels
  (:class:`captum.attr.IntegratedGradients`, Gauss–Legendre steps), baseline 0 in normalised input space (the
  dataset-mean colour), summed over colour channels.

Only the part of the model before the MoE layer influences its gate, so the forward functions stop there: a
forward pre-hook on the layer captures its input and ends the forward. Grad-CAM then needs one forward of that
prefix per batch (the gate alone runs per target); IG runs the prefix forward and backward ``ig_steps`` times.

The routing weight is the layer's (eval mode, no noise): softmax over the top-k logits, 0 for the other experts
(per-pixel gates: averaged over pixels). With k = 1 it is constant (1 for the chosen expert), so it has no
gradient and only the logit is attributed.

**Expert contribution**: the model's logits with the layer's own routing against the layer forced to expert i
(:func:`moecnn.layers.routing_override` ``force=i, layer=name``); IG of the difference in the true-class logit.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn


class _GateInput(Exception):
    """Raised by the pre-hook to end a forward at the MoE layer, carrying the layer's input."""

    def __init__(self, x: torch.Tensor) -> None:
        super().__init__("MoE layer reached")
        self.x = x


@contextlib.contextmanager
def _stop_at(layer: nn.Module):
    def hook(_m, args):
        raise _GateInput(args[0])

    h = layer.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        h.remove()


def gate_input(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of MoE ``layer`` for the batch ``x``: ``model`` runs only up to the layer (the autograd graph
    to ``x`` is kept when gradients are enabled)."""
    with _stop_at(layer):
        try:
            model(x)
        except _GateInput as reached:
            return reached.x
    raise RuntimeError("the model's forward did not reach the MoE layer")


def gate_outputs(layer: nn.Module, feat: torch.Tensor, what: str = "logit") -> torch.Tensor:
    """B×N gate logits (``what="logit"``) or routing weights (``"weight"``) of ``layer`` for its input ``feat``
    (undetached; per-pixel gates averaged over pixels)."""
    logits = layer.gate(feat.float()).float()
    spatial = logits.dim() == 4
    if what == "logit":
        return logits.mean((2, 3)) if spatial else logits
    if what != "weight":
        raise ValueError(f"what must be 'logit' or 'weight', got '{what}'")
    n = layer.num_experts
    units = logits.movedim(1, -1).reshape(-1, n) if spatial else logits
    if layer.disabled:
        blocked = torch.zeros(n, dtype=torch.bool, device=units.device)
        blocked[list(layer.disabled)] = True
        units = units.masked_fill(blocked, float("-inf"))
    vals, idx = units.topk(layer.active_k, dim=1)
    w = torch.zeros_like(units).scatter(1, idx, torch.softmax(vals, dim=1))
    if spatial:
        w = w.view(logits.shape[0], *logits.shape[2:], n).movedim(-1, 1).mean((2, 3))
    return w


def _layer(model: nn.Module, name: str):
    from ..layers import moe_layers

    layers = moe_layers(model)
    if name not in layers:
        raise ValueError(f"no MoE layer named '{name}' in the model; layers: {', '.join(layers) or '(none)'}")
    return layers[name]


def upsample(maps: np.ndarray | torch.Tensor, size: Sequence[int]) -> np.ndarray:
    """Bilinear upsampling of ...×h×w maps to ``size`` (captum's ``LayerAttribution.interpolate``)."""
    from captum.attr import LayerAttribution

    t = torch.as_tensor(np.asarray(maps), dtype=torch.float32)
    lead = t.shape[:-2]
    t = t.reshape(-1, 1, *t.shape[-2:])
    up = LayerAttribution.interpolate(t, tuple(int(s) for s in size), interpolate_mode="bilinear")
    return up.reshape(*lead, *up.shape[-2:]).numpy()


def _ig_pixels(fn: Callable, x: torch.Tensor, target, steps: int, internal_batch: int) -> np.ndarray:
    from captum.attr import IntegratedGradients

    if len(x) == 0:
        return np.zeros((0, *x.shape[-2:]), dtype=np.float32)
    ig = IntegratedGradients(fn)
    a = ig.attribute(x, baselines=torch.zeros_like(x), target=target, n_steps=steps,
                     internal_batch_size=internal_batch)
    return a.detach().sum(1).float().cpu().numpy()


def gate_attribution(model: nn.Module, layer_name: str, x: torch.Tensor, *, n_examples: int = 4,
                     ig_steps: int = 32, batch_size: int = 200, ig_batch: int = 64) -> Dict[str, object]:
    """Grad-CAM (all images, every expert) and IG (examples) of the gate of MoE layer ``layer_name``.

    ``x``: normalised M×C×H×W float input. Returns numpy arrays:
    ``logits``, ``weights`` (M×N, the layer's routing), ``top1`` (M,), ``gradcam`` {"logit"[, "weight"]:
    M×N×h×w at the gate input's resolution}, ``examples`` (per expert the indices of up to ``n_examples``
    images routed to it, highest weight first), ``ig`` {"logit"[, "weight"]: list per expert of K×H×W signed
    pixel maps of the expert's own output on its examples}, ``targets`` (the attributed outputs) and
    ``feature_size`` (h, w).
    """
    from captum.attr import LayerGradCam

    layer = _layer(model, layer_name)
    n = layer.num_experts
    targets = ["logit"] + (["weight"] if layer.active_k > 1 else [])
    was = model.training
    model.eval()
    logits, weights, cams = [], [], {t: [] for t in targets}
    try:
        for s in range(0, len(x), batch_size):
            with torch.no_grad():
                feat = gate_input(model, layer, x[s:s + batch_size]).detach().float()
                logits.append(gate_outputs(layer, feat, "logit").cpu().numpy())
                weights.append(gate_outputs(layer, feat, "weight").cpu().numpy())
            for t in targets:
                gc = LayerGradCam(lambda f, t=t: gate_outputs(layer, f, t), layer.gate)
                per_exp = [gc.attribute(feat, target=e, attribute_to_layer_input=True, relu_attributions=True)
                           .detach()[:, 0].float().cpu().numpy() for e in range(n)]
                cams[t].append(np.stack(per_exp, 1))
        logits_a = np.concatenate(logits)
        weights_a = np.concatenate(weights)
        top1 = (weights_a + 1e-9 * logits_a.argsort(1).argsort(1)).argmax(1)
        examples: List[List[int]] = []
        for e in range(n):
            idx = np.flatnonzero(top1 == e)
            order = idx[np.lexsort((idx, -weights_a[idx, e], -logits_a[idx, e]))] if idx.size else idx
            examples.append(order[:n_examples].tolist())
        ig: Dict[str, List[np.ndarray]] = {}
        for t in targets:
            def fn(inp, t=t):
                return gate_outputs(layer, gate_input(model, layer, inp), t)

            ig[t] = [_ig_pixels(fn, x[ids], [e] * len(ids), ig_steps, ig_batch) for e, ids in enumerate(examples)]
    finally:
        model.train(was)
    return {"logits": logits_a, "weights": weights_a, "top1": top1,
            "gradcam": {t: np.concatenate(v) for t, v in cams.items()}, "examples": examples, "ig": ig,
            "targets": targets, "feature_size": tuple(cams["logit"][0].shape[-2:])}


def summarise_gate_attribution(res: Dict, image_size: Sequence[int]) -> Dict[str, object]:
    """Per expert and target: the mean Grad-CAM map over the images routed to the expert (top-1), normalised
    to sum 1, and its centre of mass; the mean positive-IG share map over the expert's examples."""
    top1 = res["top1"]
    n = res["logits"].shape[1]
    out: Dict[str, object] = {"n_images": int(len(top1)), "targets": list(res["targets"]),
                              "feature_size": list(res["feature_size"]), "examples": res["examples"],
                              "routed": np.bincount(top1, minlength=n).tolist()}
    for t in res["targets"]:
        cams = res["gradcam"][t]
        means, com, ig_means = [], [], []
        for e in range(n):
            sel = top1 == e
            m = cams[sel, e].mean(0) if sel.any() else np.zeros(cams.shape[-2:])
            tot = m.sum()
            m = m / tot if tot > 0 else m
            means.append(m)
            yy, xx = np.mgrid[0:m.shape[0], 0:m.shape[1]]
            com.append([float((m * (yy + 0.5)).sum() / m.shape[0]), float((m * (xx + 0.5)).sum() / m.shape[1])]
                       if tot > 0 else None)
            maps = res["ig"][t][e]
            if len(maps):
                pos = np.clip(maps, 0, None)
                s = pos.sum((1, 2), keepdims=True)
                ig_means.append(np.divide(pos, s, out=np.zeros_like(pos), where=s > 0).mean(0))
            else:
                ig_means.append(np.zeros(tuple(image_size)))
        out[t] = {"gradcam_mean": np.round(np.stack(means), 5).tolist(), "gradcam_center_of_mass": com,
                  "ig_mean_positive": np.stack(ig_means)}
    return out


# ----------------------------------------------------------------------------------------- contribution
def _logits(model: nn.Module, x: torch.Tensor, batch_size: int) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([model(x[s:s + batch_size]).float().cpu().numpy() for s in range(0, len(x), batch_size)])


def expert_contribution(model: nn.Module, layer_name: str, x: torch.Tensor, labels: np.ndarray, *,
                        n_examples: int = 2, ig_steps: int = 32, batch_size: int = 200,
                        ig_batch: int = 32) -> Dict[str, object]:
    """What each expert adds: logits with the layer's own routing vs. forced to each expert.

    Returns ``default`` (M×C logits), ``forced`` (N×M×C), ``delta_true`` (N×M: forced − own routing, true-class
    logit), ``examples`` (per expert the images where forcing it raises / lowers the true-class logit most:
    {"helps": [i], "hurts": [i]}) and ``ig`` (per expert {"helps"/"hurts": K×H×W signed pixel IG of that
    difference, baseline 0}).
    """
    from ..layers import routing_override

    layer = _layer(model, layer_name)
    n = layer.num_experts
    y = np.asarray(labels, dtype=np.int64)
    was = model.training
    model.eval()
    try:
        default = _logits(model, x, batch_size)
        forced = []
        for e in range(n):
            with routing_override(model, force=e, layer=layer_name):
                forced.append(_logits(model, x, batch_size))
        forced_a = np.stack(forced)
        delta_true = forced_a[:, np.arange(len(y)), y] - default[np.arange(len(y)), y][None]
        examples, ig = [], []
        for e in range(n):
            order = np.lexsort((np.arange(len(y)), -delta_true[e]))
            ex = {"helps": order[:n_examples].tolist(), "hurts": order[::-1][:n_examples].tolist()}
            examples.append(ex)

            def diff(inp, e=e):
                with routing_override(model, force=e, layer=layer_name):
                    f = model(inp)
                return f - model(inp)

            ig.append({k: _ig_pixels(diff, x[v], y[v].tolist(), ig_steps, ig_batch) for k, v in ex.items()})
    finally:
        model.train(was)
    return {"default": default, "forced": forced_a, "delta_true": delta_true, "examples": examples, "ig": ig}


def summarise_contribution(res: Dict, labels: np.ndarray, class_names: Sequence[str], n_top: int = 5,
                           min_images: int = 3) -> Dict[str, object]:
    """JSON-ready summary of :func:`expert_contribution` (see docs/analysis_schema.md, ``contribution``)."""
    y = np.asarray(labels, dtype=np.int64)
    default, forced, dt = res["default"], res["forced"], res["delta_true"]
    n, m, c = forced.shape
    own = default.argmax(1)
    preds = forced.argmax(2)  # N×M
    top1 = res.get("top1")
    counts = np.bincount(y, minlength=c)
    per_expert = []
    cls_mat = np.full((c, n), np.nan)
    for e in range(n):
        sums = np.bincount(y, weights=dt[e], minlength=c)
        with np.errstate(invalid="ignore", divide="ignore"):
            cls_mean = sums / counts
        cls_mat[:, e] = cls_mean
        ok = np.flatnonzero(counts >= min_images)
        ranked = ok[np.argsort(-cls_mean[ok], kind="stable")]
        d = forced[e] - default
        rec = {"expert": e, "delta_true_mean": float(dt[e].mean()),
               "delta_norm_mean": float(np.linalg.norm(d, axis=1).mean()),
               "accuracy_forced": float(100 * (preds[e] == y).mean()),
               "prediction_changed": float((preds[e] != own).mean()),
               "helps": [{"class": str(class_names[i]), "delta_true": float(cls_mean[i]), "n": int(counts[i])}
                         for i in ranked[:n_top] if cls_mean[i] > 0],
               "hurts": [{"class": str(class_names[i]), "delta_true": float(cls_mean[i]), "n": int(counts[i])}
                         for i in ranked[::-1][:n_top] if cls_mean[i] < 0]}
        if top1 is not None:
            other = np.asarray(top1) != e
            rec["delta_true_mean_not_routed"] = float(dt[e][other].mean()) if other.any() else None
        per_expert.append(rec)
    agree = np.zeros((n, n))
    corr = np.zeros((n, n))
    cen = forced - forced.mean(2, keepdims=True)
    nrm = np.linalg.norm(cen, axis=2)
    for i in range(n):
        for j in range(n):
            agree[i, j] = (preds[i] == preds[j]).mean()
            den = nrm[i] * nrm[j]
            r = np.divide((cen[i] * cen[j]).sum(1), den, out=np.ones(m), where=den > 0)
            corr[i, j] = r.mean()
    pairs = [{"pair": [i, j], "prediction_agreement": float(agree[i, j]), "logit_correlation": float(corr[i, j])}
             for i in range(n) for j in range(i + 1, n)]
    pairs.sort(key=lambda p: -p["prediction_agreement"])
    return {"n_images": int(m), "accuracy_default": float(100 * (own == y).mean()), "per_expert": per_expert,
            "class_delta_true": np.where(np.isfinite(cls_mat), np.round(cls_mat, 5), None).tolist(),
            "interchangeability": {"prediction_agreement": agree.round(5).tolist(),
                                   "logit_correlation": corr.round(5).tolist(), "pairs": pairs},
            "examples": res["examples"], "min_images_per_class": int(min_images)}
