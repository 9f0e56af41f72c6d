"""A run directory's analysis inputs and outputs, read and written here (no analysis, no model).

Inputs read from a run directory (each optional except a routing source):

- ``config.yaml``                       task (classification / detection), model settings
- ``eval/routing_<split>.npz``          per-image routing written by ``moecnn eval`` (see ``load_routing``)
- ``analysis/routing_<split>.npz``      the same format, cached by ``analyze`` when it had to run the model
- ``eval/{<split>,k_sweep,forced,disabled,dense}.json``  accuracies from ``moecnn eval``
- ``metrics.jsonl``                     per-epoch utilisation during training
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import numpy as np

from . import stats

SCHEMA_VERSION = 1
ROUTING_FIELDS = ("logits", "weights", "top1")


# ----------------------------------------------------------------------------------------- inputs
def load_routing(src) -> Dict[str, Any]:
    """Parse routing arrays (a dict or an ``.npz`` path) into a normalised dict.

    Accepted layout (the one ``moecnn.train.evaluate.collect_routing`` writes): ``labels`` (M,), optional
    ``preds`` (M,), ``superlabels`` (M,), ``class_names``, ``superclass_names``, ``images`` (M×C×H×W uint8),
    ``layers`` (L,) and per layer ``<layer>/logits`` (M×N), ``<layer>/weights`` (M×N), optional
    ``<layer>/top1``. ``logits/<layer>`` and ``<layer>.logits`` are accepted too; a file with plain ``logits``
    / ``weights`` keys is one layer named ``moe``. Per-pixel (spatial) routing M×N×H×W is averaged over
    pixels to per-image routing. Returns {"labels", "layers": {name: {"logits", "weights"}}, ...extras}.
    """
    if isinstance(src, (str, Path)):
        with np.load(src, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    else:
        data = {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)) for k, v in dict(src).items()}
    if "labels" not in data:
        raise ValueError("routing arrays need 'labels' (one class id per image)")
    layers: Dict[str, Dict[str, np.ndarray]] = {}
    for key, val in data.items():
        for f in ("logits", "weights"):
            name = None
            if key == f:
                name = "moe"
            elif key.endswith(f) and key[-len(f) - 1] in "/.:_":
                name = key[: -len(f) - 1]
            elif key.startswith(f) and len(key) > len(f) and key[len(f)] in "/.:_":
                name = key[len(f) + 1:]
            if name is not None:
                layers.setdefault(name, {})[f] = np.asarray(val, dtype=np.float32)
    order = [str(s) for s in data.get("layers", [])] if "layers" in data else []
    names = [n for n in order if n in layers] + [n for n in layers if n not in order]
    out_layers = {}
    for n in names:
        d = layers[n]
        if "weights" not in d:
            if "logits" not in d:
                continue
            raise ValueError(f"routing for layer '{n}' has logits but no sparse 'weights'")
        w = d["weights"]
        lg = d.get("logits")
        spatial = w.ndim == 4
        if spatial:  # B×N×H×W -> per-image mean routing
            w = w.mean((2, 3))
            lg = lg.mean((2, 3)) if lg is not None else None
        if lg is None:
            lg = np.log(np.clip(w, 1e-6, None))
        out_layers[n] = {"logits": lg, "weights": w, "spatial": spatial}
    if not out_layers:
        raise ValueError("no per-layer routing found (expected keys '<layer>/weights' and '<layer>/logits')")
    res = {"labels": np.asarray(data["labels"]).astype(np.int64).reshape(-1), "layers": out_layers}
    for k in ("preds", "superlabels", "images", "class_names", "superclass_names", "class_to_super", "indices"):
        if k in data:
            res[k] = data[k]
    m = res["labels"].shape[0]
    for n, d in out_layers.items():
        if d["weights"].shape[0] != m:
            raise ValueError(f"layer '{n}': {d['weights'].shape[0]} routing rows but {m} labels")
    return res


def routing_file(run_dir, split: str = "test") -> Optional[Path]:
    """The run's saved routing on ``split``: ``eval/routing_<split>.npz`` (``moecnn eval``), else
    ``analysis/routing_<split>.npz`` unless the checkpoint is newer than it; None when there is none."""
    run_dir = Path(run_dir)
    ck = run_dir / "checkpoint.pt"
    evaluated, analysed = run_dir / "eval" / f"routing_{split}.npz", run_dir / "analysis" / f"routing_{split}.npz"
    if evaluated.is_file():
        return evaluated
    if analysed.is_file() and not (ck.is_file() and ck.stat().st_mtime > analysed.stat().st_mtime):
        return analysed
    return None


def save_routing(path, routing: Mapping[str, Any]) -> None:
    """Write normalised routing (from :func:`load_routing` or :func:`compute_routing`) as ``.npz``."""
    arrays = {"labels": np.asarray(routing["labels"]), "layers": np.array(list(routing["layers"]), dtype=str)}
    for n, d in routing["layers"].items():
        arrays[f"{n}/logits"] = d["logits"]
        arrays[f"{n}/weights"] = d["weights"]
        arrays[f"{n}/top1"] = stats.top1(d["weights"], d["logits"])
    for k in ("preds", "superlabels"):
        if routing.get(k) is not None:
            arrays[k] = np.asarray(routing[k])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)



def read_eval_accuracy(run_dir: Path, split: str = "test") -> Optional[Dict]:
    """Accuracy suite from ``moecnn eval`` output (RUN_DIR/eval/*.json), or None."""
    ev = Path(run_dir) / "eval"
    if not (ev / f"{split}.json").is_file():
        return None
    keep = ("top1", "top5", "per_class", "per_superclass", "images", "loss")
    out: Dict[str, Any] = {"source": str(ev)}
    d = json.loads((ev / f"{split}.json").read_text())
    out["default"] = {k: d[k] for k in keep if k in d}
    from ..train.evaluate import suite_prefix

    prefix = suite_prefix(split)  # moecnn eval's names (test: plain; val: val_k_sweep.json …)
    for name in ("k_sweep", "forced", "disabled", "dense"):
        f = ev / f"{prefix}{name}.json"
        if not f.is_file():
            continue
        r = json.loads(f.read_text()).get("results", {})
        if name == "dense":
            out[name] = {k: r[k] for k in keep if k in r}
        else:
            out[name] = {s: {k: v[k] for k in keep if k in v} for s, v in r.items()}
    tta = ev / f"{split}_tta_flip.json"  # flip test-time augmentation, reported beside the default
    if tta.is_file():
        t = json.loads(tta.read_text())
        out["tta_flip"] = {k: t[k] for k in keep if k in t}
    return out


def read_config(run_dir: Path) -> Dict:
    f = run_dir / "config.yaml"
    if not f.is_file():
        return {}
    try:
        import yaml

        return yaml.safe_load(f.read_text()) or {}
    except Exception:  # pragma: no cover - malformed config
        return {}


def read_metrics(run_dir: Path) -> List[Dict]:
    f = run_dir / "metrics.jsonl"
    if not f.is_file():
        return []
    recs = []
    for line in f.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return recs


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name or "moe").strip("_") or "moe"


def _write(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path.name



def _finite(o):
    """Replace NaN/inf by None (strict JSON) and numpy scalars/arrays by Python values, recursively."""
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    if isinstance(o, np.ndarray):
        return _finite(o.tolist())
    if isinstance(o, np.generic):
        o = o.item()
    if isinstance(o, float) and not np.isfinite(o):
        return None
    return o


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
