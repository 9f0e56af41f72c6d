"""``moecnn table RUN ...``: the numbers of finished runs side by side, read from their files (no model, no torch).

One row per run: epochs done, test top-1 as trained (``moecnn eval``'s ``eval/test.json``, else the training
run's ``final.json``), test top-1 at every test-time k (``eval/k_sweep.json``), flip-TTA beside it
(``eval/test_tta_flip.json``), NMI between the top-1 expert and the superclass with its permutation-null
maximum (``analysis/summary.json``, first MoE layer), and from ``metrics.jsonl``: training seconds (the sum
of the epoch times, meaningful only for a run that had its device alone), the median epoch, the median
images/s and the first epoch (which includes compilation). Detection runs get a ``val AP`` column from their
``final.json`` instead of the classification numbers. ``group=True`` merges runs whose resolved configs differ
only in ``train.seed`` into one row of mean ± sample std.
"""
from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from .runs import is_current, read_metrics

COLUMNS = ["run", "epochs", "test_top1", "k_sweep", "tta_flip", "nmi_superclass", "nmi_null_max", "train_s",
           "median_epoch_s", "images_per_s", "first_epoch_s"]
NUMERIC = ["test_top1", "tta_flip", "nmi_superclass", "nmi_null_max", "train_s", "median_epoch_s", "images_per_s",
           "first_epoch_s", "val_ap"]  # averaged over seeds by group_rows


def _json(path: Path) -> Optional[Dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def find_runs(paths: Sequence[Path]) -> List[Path]:
    """Run directories (holding config.yaml) among ``paths`` and, one level down, inside them (``--seeds``
    output, a folder of runs). Raises ValueError when there is none."""
    runs: List[Path] = []
    for p in map(Path, paths):
        if (p / "config.yaml").is_file():
            runs.append(p)
        elif p.is_dir():
            runs += sorted(c for c in p.iterdir() if (c / "config.yaml").is_file())
    if not runs:
        raise ValueError(f"no run directory (a folder with config.yaml) among {', '.join(map(str, paths))}; "
                         f"train one with 'moecnn train --out DIR'")
    return runs


def run_row(run: Path) -> Dict[str, Any]:
    """The numbers of one run (missing ones are None)."""
    cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
    row: Dict[str, Any] = {c: None for c in COLUMNS + ["val_ap"]}
    row["run"], row["config"] = run.name, cfg
    times, speeds = [], []
    for rec in read_metrics(run):
        t = rec.get("time_s", rec.get("train_time_s"))  # train_time_s: detection runs of moecnn 0.1
        if t is not None:
            times.append(t)
            speeds += [rec["images_per_s"]] if rec.get("images_per_s") is not None else []
    total = (cfg.get("train") or {}).get("epochs") or (cfg.get("optim") or {}).get("epochs")
    row["epochs"] = f"{len(times)}/{total}" if total else str(len(times))
    if times:
        row["train_s"], row["median_epoch_s"], row["first_epoch_s"] = sum(times), statistics.median(times), times[0]
        row["images_per_s"] = statistics.median(speeds) if speeds else None
    ev, final = _json(run / "eval" / "test.json"), _json(run / "final.json")
    if not is_current(run, ev):  # from an earlier checkpoint of this run (e.g. before --resume): not shown
        ev = None
        row["stale_eval"] = True
    if ev is not None:
        row["test_top1"] = ev.get("top1")
    elif final is not None and final.get("test"):
        row["test_top1"] = final["test"].get("top1")
    if cfg.get("task") == "detection":
        ev_val = _json(run / "eval" / "val.json")
        val = (ev_val if is_current(run, ev_val) else None) or (final or {}).get("val") or {}
        row["val_ap"] = val.get("AP", (final or {}).get("AP"))
    ks = _json(run / "eval" / "k_sweep.json")
    if ks and ks.get("results") and is_current(run, ks):
        row["k_sweep"] = {int(k): v["top1"] for k, v in ks["results"].items()}
    tta = _json(run / "eval" / "test_tta_flip.json")
    row["tta_flip"] = tta.get("top1") if tta and is_current(run, tta) else None
    an = _json(run / "analysis" / "summary.json")
    head = (an or {}).get("headline") or {}
    layer = next((v for k, v in head.items() if not k.startswith("_") and isinstance(v, dict)), None)
    if layer:
        row["nmi_superclass"], row["nmi_null_max"] = layer.get("nmi_superclass"), layer.get("nmi_superclass_null_max")
    return row


def mean_std(vals: Sequence[float]) -> Dict[str, float]:
    """{"mean", "std"} of ``vals`` (sample std; 0 for a single value)."""
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}


def _config_key(cfg: Dict) -> str:
    c = json.loads(json.dumps(cfg))
    c.get("train", {}).pop("seed", None)
    return json.dumps(c, sort_keys=True)


def group_rows(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Merge rows whose configs differ only in train.seed: numbers become {"mean", "std", "n"}."""
    groups: Dict[str, List[Dict]] = {}
    for r in rows:
        groups.setdefault(_config_key(r["config"]), []).append(r)
    out = []
    for members in groups.values():
        g: Dict[str, Any] = {c: None for c in COLUMNS + ["val_ap"]}
        g["run"] = " + ".join(m["run"] for m in members)
        g["epochs"] = members[0]["epochs"] if len({m["epochs"] for m in members}) == 1 else "mixed"
        for col in NUMERIC:
            vals = [m[col] for m in members if m[col] is not None]
            if vals:
                g[col] = {**mean_std(vals), "n": len(vals)}
        sweeps = [m["k_sweep"] for m in members if m["k_sweep"]]
        if sweeps and all(s.keys() == sweeps[0].keys() for s in sweeps):
            g["k_sweep"] = {k: statistics.fmean(s[k] for s in sweeps) for k in sweeps[0]}
        g["seeds"] = [(m["config"].get("train") or {}).get("seed") for m in members]
        out.append(g)
    return out


def _cell(v: Any, digits: int) -> str:
    if v is None:
        return "–"
    if isinstance(v, dict) and "mean" in v:
        if v["n"] == 1:
            return _cell(v["mean"], digits)
        return f"{v['mean']:.{digits}f} ± {v['std']:.{digits}f} (n={v['n']})"
    if isinstance(v, dict):
        return " / ".join(f"{x:.2f}" for _, x in sorted(v.items()))
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


DIGITS = {"val_ap": 4, "test_top1": 2, "tta_flip": 2, "nmi_superclass": 3, "nmi_null_max": 4, "train_s": 1,
          "median_epoch_s": 3, "images_per_s": 0, "first_epoch_s": 1}
HEADERS = {"run": "run", "epochs": "epochs", "test_top1": "test top-1 %", "k_sweep": "k = 1 / 2 / … %",
           "tta_flip": "flip-TTA %", "nmi_superclass": "NMI superclass", "nmi_null_max": "null max",
           "train_s": "training s", "median_epoch_s": "median epoch s", "images_per_s": "images/s",
           "first_epoch_s": "first epoch s", "val_ap": "val AP"}


def format_table(rows: List[Dict[str, Any]], fmt: str = "md") -> str:
    """Markdown (``md``), ``csv`` or ``json``."""
    if fmt == "json":
        return json.dumps([{k: v for k, v in r.items() if k != "config"} for r in rows], indent=1)
    columns = COLUMNS + (["val_ap"] if any(r.get("val_ap") is not None for r in rows) else [])
    cells = [[_cell(r.get(c), DIGITS.get(c, 2)) for c in columns] for r in rows]
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(columns)
        w.writerows(cells)
        return buf.getvalue()
    if fmt != "md":
        raise ValueError(f"unknown table format '{fmt}': use md, csv or json")
    lines = ["| " + " | ".join(HEADERS[c] for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def table(paths: Sequence[Path], group: bool = False, fmt: str = "md") -> str:
    rows = [run_row(r) for r in find_runs(paths)]
    return format_table(group_rows(rows) if group else rows, fmt)
