"""Evaluation: accuracy (overall, per class, per superclass), routing collection and the MoE control suite.

``moecnn eval RUN_DIR`` (:func:`run_eval`) writes RUN_DIR/eval/:

- ``{split}.json``  default routing: top-1/top-5 (percent), loss, per-class and per-superclass top-1
- ``k_sweep.json``  the same for every test-time k = 1..N      (MoE models only)
- ``forced.json``   each expert forced alone (one-hot gate)
- ``disabled.json`` each expert disabled (masked; k capped at the enabled count)
- ``dense.json``    equal weights 1/N over all experts
- ``{split}_tta_flip.json`` default routing with flip test-time augmentation: logits averaged over each image
  and its mirror image (only for runs trained with ``data.augment.flip``; reported beside, never instead of,
  the plain number)
- ``summary.json``  top-1/top-5 of every setting in one table
- ``routing_{split}.npz`` per-image routing of the default model (see :func:`collect_routing`)
With ``--k/--force-expert/--disable-experts/--dense/--tta flip`` only that one setting is evaluated
(``custom_<tag>.json``). The names above are the test split's; ``--split val`` writes ``val_k_sweep.json``,
``val_summary.json``, ``val_custom_<tag>.json`` … beside them, so the two splits never overwrite each other.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..layers import moe_layers, routing, routing_override


def autocast(device: torch.device, precision: str = "fp32"):
    if device.type == "cuda" and precision in ("bf16", "fp16"):
        return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()


TTA_MODES = ("none", "flip")


def _check_tta(tta: str) -> None:
    if tta not in TTA_MODES:
        raise ValueError(f"tta must be one of {', '.join(TTA_MODES)}, got '{tta}'")


def suite_prefix(split: str) -> str:
    """Prefix of the suite files (k_sweep.json, summary.json, custom_*.json …) of ``split``: none for test."""
    return "" if split == "test" else f"{split}_"


def _pct(num: torch.Tensor, den: torch.Tensor) -> list:
    acc = (100.0 * num / den.clamp_min(1)).tolist()
    return [a if d > 0 else None for a, d in zip(acc, den.tolist())]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    num_classes: int,
    device: torch.device,
    precision: str = "fp32",
    class_to_super: Optional[Sequence[int]] = None,
    details: bool = False,
    tta: str = "none",
) -> Dict:
    """Top-1/top-5 in percent and mean loss; with ``details`` also per-class / per-superclass top-1.

    ``tta="flip"``: the logits are the mean of the model's logits for each image and its horizontal mirror."""
    _check_tta(tta)
    was = model.training
    model.eval()
    tot = torch.zeros(num_classes, device=device)
    c1 = torch.zeros(num_classes, device=device)
    c5 = torch.zeros(num_classes, device=device)
    loss = torch.zeros((), device=device)
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, precision):
            out = model(x).float()
            if tta == "flip":
                out = 0.5 * (out + model(x.flip(-1)).float())
        loss += F.cross_entropy(out, y, reduction="sum")
        top = out.topk(min(5, out.shape[1]), dim=1).indices
        ones = torch.ones_like(y, dtype=torch.float)
        tot.index_add_(0, y, ones)
        c1.index_add_(0, y, (top[:, 0] == y).float())
        c5.index_add_(0, y, (top == y[:, None]).any(1).float())
    model.train(was)
    n = tot.sum().clamp_min(1)
    res = {"top1": (100 * c1.sum() / n).item(), "top5": (100 * c5.sum() / n).item(),
           "loss": (loss / n).item(), "images": int(tot.sum().item())}
    if details:
        res["per_class"] = _pct(c1, tot)
        if class_to_super is not None and len(class_to_super) == num_classes:
            sup = torch.as_tensor(list(class_to_super), device=device, dtype=torch.long)
            ns = int(sup.max().item()) + 1
            res["per_superclass"] = _pct(torch.zeros(ns, device=device).index_add_(0, sup, c1),
                                         torch.zeros(ns, device=device).index_add_(0, sup, tot))
    return res


@torch.no_grad()
def collect_routing(model: nn.Module, loader, device: Optional[torch.device] = None, precision: str = "fp32") -> Dict[str, np.ndarray]:
    """Per-image routing over a whole loader (model in eval mode, current routing controls).

    Returns numpy arrays: ``labels`` (B,) int64, ``preds`` (B,) int64, ``layers`` (L,) str, and per MoE
    layer name L: ``L/logits`` B×N float32 raw gate logits (before noise/top-k), ``L/weights`` B×N float32
    sparse gate weights (rows sum to 1), ``L/top1`` (B,) int64 expert with the largest weight.
    Spatial gates give B×N×H×W / B×H×W instead.
    """
    device = device or next(model.parameters()).device
    was = model.training
    model.eval()
    names = list(moe_layers(model))
    acc: Dict[str, list] = {"labels": [], "preds": []}
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        with autocast(device, precision):
            out = model(x)
        acc["labels"].append(y.cpu())
        acc["preds"].append(out.argmax(1).cpu())
        recs = routing(model)
        for name in names:
            rec = recs[name]
            acc.setdefault(f"{name}/logits", []).append(rec.logits.float().cpu())
            acc.setdefault(f"{name}/weights", []).append(rec.weights.float().cpu())
            acc.setdefault(f"{name}/top1", []).append(rec.weights.argmax(1).cpu())
    model.train(was)
    res = {k: torch.cat(v).numpy() for k, v in acc.items()}
    res["labels"] = res["labels"].astype(np.int64)
    res["layers"] = np.array(names, dtype=str)
    return res


def _tag(k, force, disabled, dense, tta="none") -> str:
    parts = ([f"k{k}"] if k is not None else []) + ([f"force{force}"] if force is not None else [])
    parts += ([f"disable{'-'.join(map(str, disabled))}"] if disabled else []) + (["dense"] if dense else [])
    parts += [f"tta{tta}"] if tta != "none" else []
    return "_".join(parts)


def run_eval(
    run_dir,
    k: Optional[int] = None,
    force_expert: Optional[int] = None,
    disable: Sequence[int] = (),
    dense: bool = False,
    which: str = "last",
    split: str = "test",
    device: str = "auto",
    batch_size: int = 512,
    tta: str = "none",
) -> Dict:
    """Evaluate a classification run; see the module docstring for what is written. Returns the summary."""
    from ..data import make_loader
    from .distributed import pick_device
    from .runs import load_run, save_json

    _check_tta(tta)
    run_dir = Path(run_dir)
    dev = pick_device(device)
    model, cfg, bundle = load_run(run_dir, which=which, device=dev)
    ds = getattr(bundle, split, None)
    if ds is None or len(ds) == 0:
        other = "test" if split == "val" else "val"
        raise ValueError(f"the run's data has no '{split}' split (empty or data.val_size=0); use --split {other}")
    loader = make_loader(ds, batch_size, train=False, device=dev, mean=bundle.mean, std=bundle.std,
                         augment=None, num_workers=cfg.data.num_workers,
                         gpu_resident=cfg.data.gpu_resident)
    prec = cfg.train.precision
    c2s = bundle.class_to_super

    def ev(tta_mode: str = "none", **controls):
        with routing_override(model, **controls) if controls else contextlib.nullcontext():
            return evaluate(model, loader, bundle.num_classes, dev, prec, c2s, details=True, tta=tta_mode)

    out_dir = run_dir / "eval"
    prefix = suite_prefix(split)
    out_dir.mkdir(parents=True, exist_ok=True)
    layers = moe_layers(model)
    info = {"run": str(run_dir), "checkpoint": which, "split": split, "class_names": list(bundle.class_names),
            "superclass_names": list(bundle.superclass_names or [])}
    routed = k is not None or force_expert is not None or bool(disable) or dense
    if routed or tta != "none":
        if routed and not layers:
            raise ValueError("routing controls (--k/--force-expert/--disable-experts/--dense) need an MoE model")
        controls = dict(k=k, force=force_expert, dense=dense, disabled=list(disable)) if routed else {}
        try:
            res = ev(tta, **controls)
        except ValueError as e:
            raise ValueError(f"bad routing control: {e}") from None
        tag = _tag(k, force_expert, list(disable), dense, tta)
        f = out_dir / f"{prefix}custom_{tag}.json"
        save_json(f, {**info, "controls": tag, **res})
        return {"setting": tag, "top1": res["top1"], "top5": res["top5"], "file": str(f)}

    default = ev()
    save_json(out_dir / f"{split}.json", {**info, **default})
    summary = {"default": {"top1": default["top1"], "top5": default["top5"]}}
    if cfg.data.get("augment", {}).get("flip", False):
        flip = ev("flip")
        save_json(out_dir / f"{split}_tta_flip.json", {**info, "tta": "flip", **flip})
        summary["tta_flip"] = {"top1": flip["top1"], "top5": flip["top5"]}
    if layers:
        n = next(iter(layers.values())).num_experts
        k_train = next(iter(layers.values())).k
        suites = {
            "k_sweep": {str(kk): ev(k=kk) for kk in range(1, n + 1)},
            "forced": {str(i): ev(force=i) for i in range(n)},
            "disabled": {str(i): ev(disabled=[i], k=min(k_train, n - 1)) for i in range(n)} if n > 1 else {},
            "dense": ev(dense=True),
        }
        for name, res in suites.items():
            save_json(out_dir / f"{prefix}{name}.json", {**info, "results": res})
            summary[name] = ({"top1": res["top1"], "top5": res["top5"]} if name == "dense"
                             else {s: {"top1": r["top1"], "top5": r["top5"]} for s, r in res.items()})
        rt = collect_routing(model, loader, dev, prec)
        if c2s is not None:
            rt["superlabels"] = np.asarray(c2s, dtype=np.int64)[rt["labels"]]
        rt["class_names"] = np.array(list(bundle.class_names), dtype=str)
        if bundle.superclass_names:
            rt["superclass_names"] = np.array(list(bundle.superclass_names), dtype=str)
        np.savez_compressed(out_dir / f"routing_{split}.npz", **rt)
    save_json(out_dir / f"{prefix}summary.json", {**info, **summary})
    return summary
