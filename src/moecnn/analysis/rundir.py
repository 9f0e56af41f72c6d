"""A run directory's analysis inputs and outputs, read and written here (no analysis, no model).

Inputs read from a run directory (each optional except a routing source):

- ``config.yaml``                       task (classification / detection), model settings
- ``eval/routing_<split>.npz``          per-image routing written by ``moecnn eval`` (see ``load_routing``)
- ``analysis/routing_<split>.npz``      the same format, cached by ``analyze`` when it had to run the model
- ``eval/{<split>,k_sweep,forced,disabled,dense}.json``  accuracies from ``moecnn eval``
- ``metrics.jsonl``                     per-epoch utilisation during training
- ``probe_routing.npz``                 a fixed probe set's routing at each evaluation during training
                                        (``read_probe_routing``)

and, named on the command line, a concepts CSV ``image_id,concept`` (``read_concepts``).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import numpy as np

from . import stats

SCHEMA_VERSION = 2
PROBE_FILE = "probe_routing.npz"
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


def checkpoint_record(run_dir) -> Optional[Dict[str, str]]:
    """{"checkpoint": "last", "checkpoint_sha256": ...} of the run's checkpoint as it is now (None without one)."""
    from ..train.runs import checkpoint_path, fingerprint

    ck = checkpoint_path(Path(run_dir), "last")
    return {"checkpoint": "last", "checkpoint_sha256": fingerprint(ck)} if ck.is_file() else None


def is_current(run_dir, record: Optional[Mapping[str, Any]]) -> bool:
    """Whether a derived file (its ``checkpoint`` / ``checkpoint_sha256`` fields) comes from the checkpoint the run
    has now; files without a fingerprint (moecnn 0.1) count as current."""
    from ..train.runs import is_current as _current

    return _current(Path(run_dir), dict(record) if record is not None else None)


def _npz_record(path: Path) -> Optional[Dict[str, str]]:
    with np.load(path, allow_pickle=False) as z:
        if "checkpoint_sha256" not in z.files:
            return None
        return {"checkpoint": "last", "checkpoint_sha256": str(z["checkpoint_sha256"])}


def routing_file(run_dir, split: str = "test") -> Optional[Path]:
    """The run's saved routing on ``split``: ``eval/routing_<split>.npz`` (``moecnn eval``), else
    ``analysis/routing_<split>.npz``; a file made from another checkpoint than the run's current one is passed
    over (files without a fingerprint: the analysis copy only when it is newer than the checkpoint). None when
    there is none."""
    run_dir = Path(run_dir)
    ck = run_dir / "checkpoint.pt"
    evaluated, analysed = run_dir / "eval" / f"routing_{split}.npz", run_dir / "analysis" / f"routing_{split}.npz"
    if evaluated.is_file() and is_current(run_dir, _npz_record(evaluated)):
        return evaluated
    if analysed.is_file():
        rec = _npz_record(analysed)
        if rec is not None and is_current(run_dir, rec):
            return analysed
        if rec is None and not (ck.is_file() and ck.stat().st_mtime > analysed.stat().st_mtime):
            return analysed
    return None


def save_routing(path, routing: Mapping[str, Any], checkpoint: Optional[Mapping[str, str]] = None) -> None:
    """Write normalised routing (from :func:`load_routing` or :func:`compute_routing`) as ``.npz`` (with the
    fingerprint of the ``checkpoint`` record it was computed from, when given)."""
    arrays = {"labels": np.asarray(routing["labels"]), "layers": np.array(list(routing["layers"]), dtype=str)}
    if checkpoint is not None:
        arrays["checkpoint_sha256"] = np.array(checkpoint["checkpoint_sha256"])
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
    if not is_current(run_dir, d):  # made from an earlier checkpoint (e.g. before --resume): not this model's
        return None
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


def read_concepts(path, n_images: int, split: str = "test") -> tuple[np.ndarray, List[str]]:
    """Concept labels from a CSV of ``image_id,concept`` rows (a header line ``image_id,concept`` is optional;
    ``image_id`` = row index in the analysed split's routing file, one concept per image).

    Returns (codes (n_images,) int64, -1 for images without a concept; concept names, code i = names[i], in
    order of first appearance). Bad files raise a one-line ``ValueError`` naming the file, the line and the fix.
    """
    import csv

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"concepts file {path} not found (expected a CSV of image_id,concept rows)")
    codes = np.full(int(n_images), -1, dtype=np.int64)
    names: Dict[str, int] = {}
    first_line = {}
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except UnicodeDecodeError as e:
        raise ValueError(f"concepts file {path} is not UTF-8 text ({e.reason}); write it as a UTF-8 CSV") from None
    for line, row in enumerate(rows, start=1):
        if not row or all(not c.strip() for c in row):
            continue
        cells = [c.strip() for c in row]
        if line == 1 and cells[0].lower() == "image_id":
            continue
        if len(cells) != 2:
            raise ValueError(f"{path}, line {line}: expected 2 fields 'image_id,concept', got {len(cells)}: "
                             f"{','.join(cells)[:80]!r}")
        sid, concept = cells
        try:
            i = int(sid)
        except ValueError:
            raise ValueError(f"{path}, line {line}: image_id {sid[:40]!r} is not an integer (use the row index of "
                             f"the image in the {split} routing file)") from None
        if not 0 <= i < n_images:
            raise ValueError(f"{path}, line {line}: image_id {i} is outside 0..{n_images - 1} (the analysed {split} "
                             f"split has {n_images} images)")
        if not concept:
            raise ValueError(f"{path}, line {line}: empty concept for image_id {i}")
        if codes[i] >= 0:
            raise ValueError(f"{path}, line {line}: image_id {i} already has a concept (line {first_line[i]}); "
                             "give one concept per image")
        codes[i] = names.setdefault(concept, len(names))
        first_line[i] = line
    if len(names) < 2:
        raise ValueError(f"{path}: found {len(names)} distinct concept(s) in {int((codes >= 0).sum())} rows; a "
                         "concept test needs at least 2")
    return codes, list(names)


def read_probe_routing(run_dir) -> Optional[Dict[str, Any]]:
    """The probe set's routing over training from ``RUN_DIR/probe_routing.npz`` (None when the file is absent).

    Layout (written by the training loop at each evaluation): ``epochs`` (E,) int (0-based epoch of each row),
    ``labels`` (P,) int, optional ``superlabels`` (P,) int, ``layers`` (L,) str, and per layer name
    ``<layer>/top1`` (E, P) int and ``<layer>/weights`` (E, P, N) float. Returns {"epochs", "labels",
    "superlabels" (or None), "layers": {name: {"top1", "weights"}}, "file"}; a malformed file raises a one-line
    ``ValueError`` naming the file and the key.
    """
    f = Path(run_dir) / PROBE_FILE
    if not f.is_file():
        return None
    try:
        with np.load(f, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as e:
        raise ValueError(f"{f}: not a readable .npz file ({type(e).__name__}: {e}); delete it or rewrite it") from None

    def need(key):
        if key not in data:
            raise ValueError(f"{f}: missing key '{key}' (expected epochs, labels, layers, <layer>/top1, "
                             "<layer>/weights)")
        return data[key]

    epochs = np.asarray(need("epochs")).astype(np.int64).reshape(-1)
    labels = np.asarray(need("labels")).astype(np.int64).reshape(-1)
    e, p = epochs.size, labels.size
    sup = data.get("superlabels")
    if sup is not None:
        sup = np.asarray(sup).astype(np.int64).reshape(-1)
        if sup.size != p:
            raise ValueError(f"{f}: 'superlabels' has {sup.size} entries but 'labels' has {p}")
    if e == 0 or np.any(np.diff(epochs) <= 0):
        raise ValueError(f"{f}: 'epochs' must be a non-empty increasing array, got {epochs.tolist()[:10]}")
    layers = {}
    for name in [str(s) for s in np.asarray(need("layers")).reshape(-1)]:
        top1 = np.asarray(need(f"{name}/top1")).astype(np.int64)
        w = np.asarray(need(f"{name}/weights")).astype(np.float32)
        if top1.shape != (e, p):
            raise ValueError(f"{f}: '{name}/top1' has shape {top1.shape}, expected (epochs, probe images) = {(e, p)}")
        if w.ndim != 3 or w.shape[:2] != (e, p):
            raise ValueError(f"{f}: '{name}/weights' has shape {w.shape}, expected ({e}, {p}, experts)")
        if top1.size and (top1.min() < 0 or top1.max() >= w.shape[2]):
            raise ValueError(f"{f}: '{name}/top1' holds expert ids outside 0..{w.shape[2] - 1}")
        layers[name] = {"top1": top1, "weights": w}
    if not layers:
        raise ValueError(f"{f}: 'layers' is empty")
    return {"epochs": epochs, "labels": labels, "superlabels": sup, "layers": layers, "file": str(f)}


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
