"""The one evaluation entry: ``moecnn eval RUN_DIR`` (:func:`run_eval`) for every task.

Writes RUN_DIR/eval/ (names for the test split; ``--split val`` writes ``val_k_sweep.json``,
``val_summary.json``, ``val_custom_<tag>.json`` … beside them, so two splits never overwrite each other; a task
with a validation split only, like detection, writes the ``val_`` names):

- ``{split}.json``  the trained routing: the task's metrics (classification: top-1/top-5, loss, per class and
  superclass; detection: COCO AP, AP50, AP75, AP_S/M/L, detections per expert)
- ``k_sweep.json``  the same for every test-time k = 1..N      (MoE models only)
- ``forced.json``   each expert forced alone (one-hot gate)
- ``disabled.json`` each expert disabled (masked; k capped at the enabled count)
- ``dense.json``    equal weights 1/N over all experts
- ``{split}_tta_flip.json`` classification runs trained with flips: logits averaged over each image and its mirror
  (beside, never instead of, the plain number)
- ``summary.json``  the headline metrics of every setting in one table
- ``routing_{split}.npz`` per-image routing of the trained model (classification; see ``collect_routing``)

With a :class:`~moecnn.layers.control.RoutingControls` (``--k/--force-expert/--disable-experts/--dense/--layer``)
or ``--tta flip`` only that setting is evaluated (``custom_<tag>.json``). Every file records the checkpoint it
came from (``checkpoint`` and its ``checkpoint_sha256``), so analyses can tell a stale file from a current one.
The names above are those of the last checkpoint (what ``analyze``, ``table`` and ``report`` read);
``--which best`` writes ``best_test.json``, ``best_k_sweep.json`` … and a checkpoint file ``F.pt`` ``F_test.json`` ….
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

from ..layers import RoutingControls, moe_layers
from ..tasks.classification import TTA_MODES, autocast, check_tta, collect_routing, evaluate  # noqa: F401

HEADLINE = ("top1", "top5", "AP", "AP50", "AP75")


def suite_prefix(split: str) -> str:
    """Prefix of the suite files (k_sweep.json, summary.json, custom_*.json …) of ``split``: none for test."""
    return "" if split == "test" else f"{split}_"


def _head(res: Dict) -> Dict:
    return {k: res[k] for k in HEADLINE if k in res}


def run_eval(
    run_dir,
    controls: Optional[RoutingControls] = None,
    which: str = "last",
    split: Optional[str] = None,
    device: str = "auto",
    batch_size: Optional[int] = None,
    tta: str = "none",
    *,
    k: Optional[int] = None,
    force_expert: Optional[int] = None,
    disable: Sequence[int] = (),
    dense: bool = False,
) -> Dict:
    """Evaluate a run of any task (see the module docstring for what is written); returns the summary.

    ``k``/``force_expert``/``disable``/``dense`` are shorthands for ``controls``."""
    from .distributed import pick_device
    from .runs import checkpoint_path, fingerprint, load_run, save_json

    check_tta(tta)
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if controls is None:
        controls = RoutingControls(k=k, force=force_expert, dense=dense, disabled=tuple(int(i) for i in disable))
    run_dir = Path(run_dir)
    dev = pick_device(device)
    model, cfg, task = load_run(run_dir, which=which, device=dev)
    split = split or task.splits[-1]
    if not task.has_split(split):
        choices = [s for s in task.splits if task.has_split(s)]
        why = " (empty or data.val_size=0)" if split in task.splits else ""
        raise ValueError(f"this {cfg.task} run has no '{split}' split{why}; use --split "
                         f"{' or '.join(choices) or 'another split'}")
    bs = batch_size or cfg.train.eval_batch_size or task.eval_batch_size()
    layers = moe_layers(model)
    ck = checkpoint_path(run_dir, which)
    named = which if which in ("last", "best") else str(ck.resolve())
    tagc = "" if which == "last" else ("best_" if which == "best" else f"{ck.stem}_")  # never the last's files
    info = {"run": str(run_dir), "task": cfg.task, "checkpoint": named, "checkpoint_sha256": fingerprint(ck),
            "split": split, **{k_: task.info[k_] for k_ in ("class_names", "superclass_names") if k_ in task.info}}

    def ev(c: RoutingControls = RoutingControls(), tta_mode: str = "none") -> Dict:
        try:
            with c.apply(model):
                return task.evaluate(model, split, bs, details=True, tta=tta_mode)
        except ValueError as e:
            if c.active:
                raise ValueError(f"bad routing control: {e}") from None
            raise

    out_dir = run_dir / "eval"
    prefix = tagc + suite_prefix(split)
    out_dir.mkdir(parents=True, exist_ok=True)
    if controls.active or tta != "none":
        if controls.active and not layers:
            raise ValueError("routing controls (--k/--force-expert/--disable-experts/--dense) need an MoE model")
        res = ev(controls, tta)
        tag = "_".join(t for t in (controls.tag(), f"tta{tta}" if tta != "none" else "") if t)
        f = out_dir / f"{prefix}custom_{tag}.json"
        save_json(f, {**info, "controls": tag, **res})
        return {"setting": tag, **_head(res), "file": str(f)}

    default = ev()
    save_json(out_dir / f"{tagc}{split}.json", {**info, **default})
    summary: Dict = {"default": _head(default)}
    if cfg.task == "classification" and cfg.data.get("augment", {}).get("flip", False):
        flip = ev(tta_mode="flip")
        save_json(out_dir / f"{tagc}{split}_tta_flip.json", {**info, "tta": "flip", **flip})
        summary["tta_flip"] = _head(flip)
    if layers:
        first = next(iter(layers.values()))
        n, k_train = first.num_experts, first.k
        suites = {
            "k_sweep": {str(kk): ev(RoutingControls(k=kk)) for kk in range(1, n + 1)},
            "forced": {str(i): ev(RoutingControls(force=i)) for i in range(n)},
            "disabled": ({str(i): ev(RoutingControls(disabled=(i,), k=min(k_train, n - 1))) for i in range(n)}
                         if n > 1 else {}),
            "dense": ev(RoutingControls(dense=True)),
        }
        for name, res in suites.items():
            save_json(out_dir / f"{prefix}{name}.json", {**info, "results": res})
            summary[name] = _head(res) if name == "dense" else {s: _head(r) for s, r in res.items()}
        rt = task.routing_dump(model, split, bs)
        if rt is not None:
            rt["checkpoint_sha256"] = np.array(info["checkpoint_sha256"])
            np.savez_compressed(out_dir / f"{tagc}routing_{split}.npz", **rt)
    save_json(out_dir / f"{prefix}summary.json", {**info, **summary})
    return summary
