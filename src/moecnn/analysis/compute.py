"""Routing and accuracy computed with a model over in-memory uint8 images (for runs without ``moecnn eval`` files)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np


def load_for_analysis(run_dir, device: str = "cpu", with_model: bool = True):
    """(model in eval mode or None, DataBundle) of a classification run: the one place the analyses call into
    ``moecnn.train`` (the model from ``checkpoint.pt``; the data from ``config.yaml``)."""
    if with_model:
        from ..train.runs import load_run

        model, _cfg, task = load_run(run_dir, which="last", device=device)
        return model, task.bundle
    from ..registry import TASKS
    from ..train.config import load_config
    from ..train.runs import load_config_file

    cfg = load_config(base=load_config_file(run_dir))
    task = TASKS.get(cfg.task)(cfg, run_dir)
    task.setup(train=False)
    return None, task.bundle


def _norm_input(images, mean, std):
    import torch

    x = torch.as_tensor(np.asarray(images)).float() / 255.0
    if mean is not None and std is not None:
        m = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        s = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
        x = (x - m) / s
    return x


def _batches(images, labels, batch_size, mean, std):
    for i in range(0, len(images), batch_size):
        yield _norm_input(images[i:i + batch_size], mean, std), np.asarray(labels[i:i + batch_size])


def compute_routing(model, images: np.ndarray, labels: np.ndarray, mean=None, std=None, batch_size: int = 500,
                    device: str = "cpu", progress: bool = True) -> Dict[str, Any]:
    """Run ``model`` (eval mode, current routing controls) over uint8 ``images`` and collect routing + preds."""
    import torch
    from tqdm.auto import tqdm

    from ..layers import moe_layers, routing as get_routing

    was = model.training
    model.eval()
    names = list(moe_layers(model))
    acc: Dict[str, List] = {n: {"logits": [], "weights": []} for n in names}
    preds = []
    with torch.no_grad():
        for x, _ in tqdm(_batches(images, labels, batch_size, mean, std), total=-(-len(images) // batch_size),
                         desc="routing", disable=not progress, leave=False):
            out = model(x.to(device))
            preds.append(out.argmax(1).cpu().numpy())
            recs = get_routing(model)
            for n in names:
                acc[n]["logits"].append(recs[n].logits.float().cpu().numpy())
                acc[n]["weights"].append(recs[n].weights.float().cpu().numpy())
    model.train(was)
    layers = {}
    for n in names:
        w = np.concatenate(acc[n]["weights"])
        lg = np.concatenate(acc[n]["logits"])
        spatial = w.ndim == 4
        if spatial:
            w, lg = w.mean((2, 3)), lg.mean((2, 3))
        layers[n] = {"logits": lg, "weights": w, "spatial": spatial}
    return {"labels": np.asarray(labels).astype(np.int64), "preds": np.concatenate(preds) if preds else None,
            "layers": layers}


def _accuracy_from_preds(preds, labels, n_classes, class_to_super) -> Dict:
    """Eval-format accuracy (percent): top1, per_class, per_superclass."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    correct = (preds == labels).astype(np.float64)
    tot = np.bincount(labels, minlength=n_classes).astype(np.float64)
    hit = np.bincount(labels, weights=correct, minlength=n_classes)
    res = {"top1": float(100 * correct.mean()) if correct.size else None,
           "per_class": [float(100 * h / t) if t else None for h, t in zip(hit, tot)], "images": int(labels.size)}
    if class_to_super is not None:
        sup = np.asarray(class_to_super, dtype=np.int64)
        ns = int(sup.max()) + 1
        st = np.bincount(sup, weights=tot, minlength=ns)
        sh = np.bincount(sup, weights=hit, minlength=ns)
        res["per_superclass"] = [float(100 * h / t) if t else None for h, t in zip(sh, st)]
    return res


def compute_accuracy(model, images, labels, n_classes, class_to_super=None, mean=None, std=None,
                     layer: Optional[str] = None, batch_size: int = 500, device: str = "cpu",
                     progress: bool = True) -> Dict:
    """Accuracy suite with the model: default, every test-time k, each expert forced alone, each removed."""
    import torch
    from tqdm.auto import tqdm

    from ..layers import moe_layers, routing_override

    layers = moe_layers(model)
    if layer is not None:
        layers = {layer: layers[layer]}
    first = next(iter(layers.values()))
    n, k_train = first.num_experts, first.k
    settings = [("default", None, {})]
    settings += [("k_sweep", str(k), {"k": k}) for k in range(1, n + 1)]
    settings += [("forced", str(i), {"force": i}) for i in range(n)]
    if n > 1:
        settings += [("disabled", str(i), {"disabled": [i], "k": min(k_train, n - 1)}) for i in range(n)]
    res: Dict[str, Any] = {"source": "computed with the model", "layer_controls": layer or "all layers"}
    was = model.training
    model.eval()
    for group, key, controls in tqdm(settings, desc="accuracy", disable=not progress, leave=False):
        preds = []
        import contextlib

        ctx = routing_override(model, layer=layer, **controls) if controls else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            for x, _ in _batches(images, labels, batch_size, mean, std):
                preds.append(model(x.to(device)).argmax(1).cpu().numpy())
        acc = _accuracy_from_preds(np.concatenate(preds), labels, n_classes, class_to_super)
        if key is None:
            res[group] = acc
        else:
            res.setdefault(group, {})[key] = acc
    model.train(was)
    return res
