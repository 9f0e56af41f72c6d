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
All N + 1 routings share one forward of the network before the layer: the input of the layer (or of the
innermost enclosing block for which this works, e.g. a residual block whose skip connection bypasses the layer)
is repeated along the batch and each copy routed under one setting; the result is checked on 8 images against
separate forwards, which are used instead when no block passes.
"""
from __future__ import annotations

import contextlib
import time
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


def chosen_experts(layer: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """Bool mask, the shape of the raw gate ``logits`` (B×N or B×N×H×W): the experts the layer routes each image
    (pixel) to in eval mode — the top-k of the logits, disabled experts excluded."""
    lg = logits.detach()
    if layer.disabled:
        blocked = torch.zeros(layer.num_experts, dtype=torch.bool, device=lg.device)
        blocked[list(layer.disabled)] = True
        lg = lg.masked_fill(blocked.view(1, -1, *[1] * (lg.dim() - 2)), float("-inf"))
    idx = lg.topk(layer.active_k, dim=1).indices
    return torch.zeros_like(lg, dtype=torch.bool).scatter(1, idx, True)


def gate_outputs(layer: nn.Module, feat: torch.Tensor, what: str = "logit",
                 chosen: Optional[torch.Tensor] = None) -> torch.Tensor:
    """B×N gate logits (``what="logit"``) or routing weights (``"weight"``) of ``layer`` for its input ``feat``
    (undetached; per-pixel gates averaged over pixels).

    The weight is the softmax of the logits over the chosen experts, 0 elsewhere — the layer's weight. ``chosen``
    (a :func:`chosen_experts` mask) fixes which experts are chosen (for IG along a path, so that the function
    stays continuous); by default they are the top-k at ``feat``.
    """
    logits = layer.gate(feat.float()).float()
    spatial = logits.dim() == 4
    if what == "logit":
        return logits.mean((2, 3)) if spatial else logits
    if what != "weight":
        raise ValueError(f"what must be 'logit' or 'weight', got '{what}'")
    mask = chosen_experts(layer, logits) if chosen is None else chosen.to(logits.device)
    w = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=1)
    return w.mean((2, 3)) if spatial else w


def _layer(model: nn.Module, name: str):
    from ..layers import moe_layers

    layers = moe_layers(model)
    if name not in layers:
        raise ValueError(f"no MoE layer named '{name}' in the model; layers: {', '.join(layers) or '(none)'}")
    return layers[name]


def _chosen_at(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's chosen-expert mask for the images ``x`` (see :func:`chosen_experts`)."""
    with torch.no_grad():
        return chosen_experts(layer, layer.gate(gate_input(model, layer, x).float()).float())


@contextlib.contextmanager
def _patched_forward(layer: nn.Module, fn: Callable):
    """``layer.forward`` is ``fn`` inside the block (an instance attribute; the previous one comes back)."""
    prev = layer.__dict__.get("forward")
    layer.forward = fn
    try:
        yield
    finally:
        if prev is None:
            del layer.forward
        else:
            layer.forward = prev


@contextlib.contextmanager
def _fixed_sets(layer: nn.Module, holder: Dict[str, torch.Tensor]):
    """Inside the block, the gate's logits outside the mask ``holder["mask"]`` (a :func:`chosen_experts` mask,
    one row per image of the layer's input batch) are −inf, so the layer's top-k keeps choosing those experts
    while their softmax weights still follow the gate. Used to integrate along a path on which top-k would
    switch experts."""
    gate_forward = layer.gate.forward

    def fixed(x, *args, **kwargs):
        out = gate_forward(x, *args, **kwargs)
        mask = holder.get("mask")
        return out if mask is None else out.masked_fill(~mask.to(out.device), float("-inf"))

    with _patched_forward(layer.gate, fixed):
        yield


def upsample(maps: np.ndarray | torch.Tensor, size: Sequence[int]) -> np.ndarray:
    """Bilinear upsampling of ...×h×w maps to ``size`` (captum's ``LayerAttribution.interpolate``)."""
    from captum.attr import LayerAttribution

    t = torch.as_tensor(np.asarray(maps), dtype=torch.float32)
    lead = t.shape[:-2]
    t = t.reshape(-1, 1, *t.shape[-2:])
    up = LayerAttribution.interpolate(t, tuple(int(s) for s in size), interpolate_mode="bilinear")
    return up.reshape(*lead, *up.shape[-2:]).numpy()


def _ig_pixels(fn: Callable, x: torch.Tensor, target, steps: int, internal_batch: int, deltas: Optional[list] = None,
               extra: Optional[torch.Tensor] = None) -> np.ndarray:
    """Signed K×H×W IG maps (summed over channels) of ``fn(x[, extra])``; ``extra`` (one row per image) is passed
    along every step (captum ``additional_forward_args``). Appends (|convergence delta|, |f(x) − f(baseline)|)
    pairs to ``deltas`` (captum's completeness check)."""
    from captum.attr import IntegratedGradients

    if len(x) == 0:
        return np.zeros((0, *x.shape[-2:]), dtype=np.float32)
    ig = IntegratedGradients(fn)
    base = torch.zeros_like(x)
    args = (extra,) if extra is not None else ()
    a, delta = ig.attribute(x, baselines=base, target=target, n_steps=steps, internal_batch_size=internal_batch,
                            additional_forward_args=args or None, return_convergence_delta=True)
    if deltas is not None:
        with torch.no_grad():
            idx = torch.as_tensor(target, device=x.device).view(-1, 1)
            change = (fn(x, *args).gather(1, idx) - fn(base, *args).gather(1, idx)).abs().view(-1)
        deltas.extend(zip(delta.detach().abs().cpu().tolist(), change.cpu().tolist()))
    return a.detach().sum(1).float().cpu().numpy()


def _relative_delta(deltas: list) -> Optional[float]:
    """Σ|convergence delta| / Σ|f(x) − f(baseline)| over the attributed examples (0 = exact completeness)."""
    if not deltas:
        return None
    d, c = np.asarray(deltas, dtype=np.float64).T
    return float(d.sum() / c.sum()) if c.sum() > 0 else None


def gate_attribution(model: nn.Module, layer_name: str, x: torch.Tensor, *, n_examples: int = 4,
                     ig_steps: int = 16, batch_size: int = 200, ig_batch: int = 64) -> Dict[str, object]:
    """Grad-CAM (all images, every expert) and IG (examples) of the gate of MoE layer ``layer_name``.

    ``x``: normalised M×C×H×W float input. Returns numpy arrays:
    ``logits``, ``weights`` (M×N, the layer's routing), ``top1`` (M,), ``gradcam`` {"logit"[, "weight"]:
    M×N×h×w at the gate input's resolution}, ``examples`` (per expert the indices of up to ``n_examples``
    images routed to it, highest weight first), ``ig`` {"logit"[, "weight"]: list per expert of K×H×W signed
    pixel maps of the expert's own output on its examples}, ``targets`` (the attributed outputs) and
    ``feature_size`` (h, w), ``ig_relative_delta`` {target: Σ|IG completeness error| / Σ|f(x) − f(baseline)|}.
    """
    from captum.attr import LayerGradCam

    layer = _layer(model, layer_name)
    n = layer.num_experts
    targets = ["logit"] + (["weight"] if layer.active_k > 1 else [])
    was = model.training
    model.eval()
    logits, weights, cams = [], [], {t: [] for t in targets}
    t0 = time.perf_counter()
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
        t_cam = time.perf_counter() - t0
        ig: Dict[str, List[np.ndarray]] = {}
        ig_delta: Dict[str, Optional[float]] = {}
        for t in targets:
            def fn(inp, chosen=None, t=t):
                return gate_outputs(layer, gate_input(model, layer, inp), t, chosen)

            deltas: list = []
            ig[t] = []
            for e, ids in enumerate(examples):
                chosen = _chosen_at(model, layer, x[ids]) if t == "weight" and ids else None
                ig[t].append(_ig_pixels(fn, x[ids], [e] * len(ids), ig_steps, ig_batch, deltas, chosen))
            ig_delta[t] = _relative_delta(deltas)
    finally:
        model.train(was)
    return {"logits": logits_a, "weights": weights_a, "top1": top1,
            "gradcam": {t: np.concatenate(v) for t, v in cams.items()}, "examples": examples, "ig": ig,
            "ig_relative_delta": ig_delta,
            "targets": targets, "feature_size": tuple(cams["logit"][0].shape[-2:]),
            "timing_s": {"gradcam": t_cam, "ig": time.perf_counter() - t0 - t_cam}}


def summarise_gate_attribution(res: Dict, image_size: Sequence[int]) -> Dict[str, object]:
    """Per expert and target: the mean Grad-CAM map over the images routed to the expert (top-1), normalised
    to sum 1, and its centre of mass; the mean positive-IG share map over the expert's examples."""
    top1 = res["top1"]
    n = res["logits"].shape[1]
    out: Dict[str, object] = {"n_images": int(len(top1)), "targets": list(res["targets"]),
                              "ig_relative_delta": dict(res.get("ig_relative_delta") or {}),
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


@contextlib.contextmanager
def _stacked_routings(model: nn.Module, layer: nn.Module, layer_name: str, settings: Sequence[Optional[int]],
                      at: nn.Module):
    """Inside the block, one forward of B images returns len(settings)·B rows, one group of B per routing setting
    (None = the layer's own routing, i = forced to expert i): a pre-hook repeats the input of module ``at`` (the
    MoE layer or one of its ancestors) along the batch, and the layer's forward runs each group under its
    setting. The network before ``at`` runs once. Valid when ``at`` and what follows treat images independently
    (the caller checks it against plain forwards)."""
    from ..layers import routing_override

    k = len(settings)
    forward = layer.forward

    def stacked_forward(x, *args, **kwargs):
        b = x.shape[0] // k
        outs = []
        for i, st in enumerate(settings):
            ctx = routing_override(model, force=st, layer=layer_name) if st is not None else contextlib.nullcontext()
            with ctx:
                outs.append(forward(x[i * b:(i + 1) * b], *args, **kwargs))
        return torch.cat(outs)

    def repeat(_m, args):
        return tuple(torch.cat([a] * k) if torch.is_tensor(a) and a.dim() > 0 else a for a in args)

    h = at.register_forward_pre_hook(repeat)
    try:
        with _patched_forward(layer, stacked_forward):
            yield
    finally:
        h.remove()


def _stack_point(model: nn.Module, layer: nn.Module, layer_name: str, n: int, probe: torch.Tensor):
    """The innermost module (the MoE layer, then its ancestors) where stacking the routings gives the logits of
    separate forwards on ``probe`` (rtol 1e-4), or None."""
    from ..layers import routing_override

    with torch.no_grad():
        ref = [model(probe).float()]
        for e in range(n):
            with routing_override(model, force=e, layer=layer_name):
                ref.append(model(probe).float())
    ref_t = torch.cat(ref)
    tol = 1e-4 * float(ref_t.abs().max().clamp_min(1))
    parts = layer_name.split(".") if layer_name else []
    named = dict(model.named_modules())
    for depth in range(len(parts), -1, -1):
        at = named.get(".".join(parts[:depth]))
        if at is None:
            continue
        try:
            with torch.no_grad(), _stacked_routings(model, layer, layer_name, [None] + list(range(n)), at):
                st = model(probe).float()
        except RuntimeError:  # e.g. a skip connection around ``at`` meets the stacked batch
            continue
        if st.shape == ref_t.shape and torch.allclose(st, ref_t, rtol=1e-4, atol=tol):
            return at
    return None


def _all_logits(model: nn.Module, layer: nn.Module, layer_name: str, x: torch.Tensor, batch_size: int,
                single_pass: Optional[bool] = None):
    """(own-routing logits M×C, forced logits N×M×C, the module where the routings were stacked or None)."""
    from ..layers import routing_override

    n = layer.num_experts
    at = None if single_pass is False else _stack_point(model, layer, layer_name, n, x[:min(len(x), 8)])
    if at is not None:
        chunk = max(1, batch_size // (n + 1) * 2)
        outs = []
        with torch.no_grad(), _stacked_routings(model, layer, layer_name, [None] + list(range(n)), at):
            for s in range(0, len(x), chunk):
                b = min(chunk, len(x) - s)
                outs.append(model(x[s:s + b]).float().cpu().numpy().reshape(n + 1, b, -1))
        allv = np.concatenate(outs, axis=1)
        return allv[0], allv[1:], at
    default = _logits(model, x, batch_size)
    forced = []
    for e in range(n):
        with routing_override(model, force=e, layer=layer_name):
            forced.append(_logits(model, x, batch_size))
    return default, np.stack(forced), None


def expert_contribution(model: nn.Module, layer_name: str, x: torch.Tensor, labels: np.ndarray, *,
                        n_examples: int = 2, ig_steps: int = 16, batch_size: int = 200,
                        ig_batch: int = 32, single_pass: Optional[bool] = None) -> Dict[str, object]:
    """What each expert adds: logits with the layer's own routing vs. forced to each expert.

    Returns ``default`` (M×C logits), ``forced`` (N×M×C), ``delta_true`` (N×M: forced − own routing, true-class
    logit), ``examples`` (per expert the images where forcing it raises / lowers the true-class logit most:
    {"helps": [i], "hurts": [i]}) and ``ig`` (per expert {"helps"/"hurts": K×H×W signed pixel IG of that
    difference, baseline 0}) and ``single_pass`` (whether the N + 1 routings shared one forward of the network
    before the layer; ``single_pass=None`` decides by a check on 8 images, False forces separate forwards — the
    two agree up to float rounding).
    """
    from ..layers import routing_override

    layer = _layer(model, layer_name)
    n = layer.num_experts
    y = np.asarray(labels, dtype=np.int64)
    was = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        default, forced_a, stacked = _all_logits(model, layer, layer_name, x, batch_size, single_pass)
        t_fwd = time.perf_counter() - t0
        delta_true = forced_a[:, np.arange(len(y)), y] - default[np.arange(len(y)), y][None]
        examples, ig, deltas = [], [], []
        for e in range(n):
            order = np.lexsort((np.arange(len(y)), -delta_true[e]))
            ex = {"helps": order[:n_examples].tolist(), "hurts": order[::-1][:n_examples].tolist()}
            examples.append(ex)

            def diff(inp, chosen=None, e=e):
                with _fixed_sets(layer, {"mask": chosen}):
                    if stacked is not None:  # one pass before the stacking point: rows [forced e; own routing]
                        with _stacked_routings(model, layer, layer_name, [e, None], stacked):
                            both = model(inp)
                        return both[:len(inp)] - both[len(inp):]
                    with routing_override(model, force=e, layer=layer_name):
                        f = model(inp)
                    return f - model(inp)

            ig.append({k: _ig_pixels(diff, x[v], y[v].tolist(), ig_steps, ig_batch, deltas,
                                     _chosen_at(model, layer, x[v])) for k, v in ex.items()})
    finally:
        model.train(was)
    return {"default": default, "forced": forced_a, "delta_true": delta_true, "examples": examples, "ig": ig,
            "single_pass": stacked is not None, "ig_relative_delta": _relative_delta(deltas),
            "timing_s": {"forward": t_fwd, "ig": time.perf_counter() - t0 - t_fwd}}


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
