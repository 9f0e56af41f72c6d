"""Training and evaluation of RetinaNet(-MoE) detection runs.

``train_detection(cfg, run_dir)`` does everything for one run and keeps the run-dir layout::

    config.yaml     resolved DetectionRunConfig (task: detection)
    meta.json       seed, versions, device, start time(s), command line
    metrics.jsonl   one JSON line per epoch (losses, images/s, expert usage, val AP when evaluated)
    checkpoint.pt   last epoch (model, optimizer, scheduler, epoch, RNG); written atomically, used to resume
    final.json      last-epoch val AP + throughput + parameter counts
    eval/           written by evaluate_detection: detection_eval.json (+ per-setting files)
    analysis/       written by moecnn.analysis.detection.analyze_detection

Configs are :class:`DetectionRunConfig` dataclasses (OmegaConf structured configs); YAML files such as
``configs/detection_shapes.yaml`` merge into them. ``data.source: shapes`` generates the synthetic set
(``moecnn.data.shapes``) so the whole detection story runs without downloads.
"""
from __future__ import annotations

import json
import math
import platform
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from .loop import seed_all
from ..safeio import torch_load
from .runs import _jsonable, atomic_write_bytes, git_commit, rng_state, save_torch, set_rng_state
from .runs import save_json as _save_json

__all__ = [
    "ShapesDataConfig",
    "DetectionDataConfig",
    "DetectionModelConfig",
    "DetectionOptimConfig",
    "DetectionLogConfig",
    "DetectionRunConfig",
    "load_detection_config",
    "build_detection_data",
    "build_detector",
    "load_detection_run",
    "evaluate_model",
    "train_detection",
    "evaluate_detection",
]


# ---------------------------------------------------------------------------------------------------------
# Config schema
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ShapesDataConfig:
    out: Optional[str] = None  # folder for the generated set; None → <run_dir>/data/shapes
    num_train: int = 400
    num_val: int = 100
    image_size: int = 160
    seed: int = 0
    size_mix: List[float] = field(default_factory=lambda: [1 / 3, 1 / 3, 1 / 3])
    max_objects: int = 4


@dataclass
class DetectionDataConfig:
    source: str = "coco"  # coco (json + image folders below) | shapes (generated)
    train_json: str = "${oc.env:COCO_ROOT,data/coco}/annotations/instances_train2017.json"
    train_images: str = "${oc.env:COCO_ROOT,data/coco}/train2017"
    val_json: str = "${oc.env:COCO_ROOT,data/coco}/annotations/instances_val2017.json"
    val_images: str = "${oc.env:COCO_ROOT,data/coco}/val2017"
    shapes: ShapesDataConfig = field(default_factory=ShapesDataConfig)
    label_map: str = "contiguous"  # contiguous (1..K) | coco_id (torchvision COCO models: 91 classes)
    hflip: float = 0.5
    aspect_ratio_grouping: bool = True
    num_workers: int = 2
    max_train_images: Optional[int] = None
    max_val_images: Optional[int] = None


@dataclass
class DetectionModelConfig:
    name: str = "retinanet_resnet18_fpn_moe"  # registry name (moecnn.MODELS)
    num_classes: Optional[int] = None  # None → from the data (incl. background)
    num_experts: int = 4
    k: int = 2
    moe_heads: str = "both"  # both | cls | reg | none
    routing: str = "level"  # level (per image per FPN level) | anchor (per anchor position)
    gate: Optional[str] = None  # None → relu_gap_fc (level) / spatial (anchor)
    balance: Optional[str] = "kl"  # "kl", "relative", "kl:0.25,z_loss:0.001", "none"
    balance_weight: float = 0.25
    threshold: Optional[float] = None  # hard-constraint τ
    noisy: Optional[bool] = None
    weights: Optional[str] = None  # local weights file, or "torchvision" (needs the internet)
    weights_backbone: Optional[str] = None
    freeze_backbone: bool = False
    trainable_backbone_layers: Optional[int] = None
    min_size: int = 608
    max_size: int = 1024
    anchor_sizes: Optional[List[int]] = None
    head_norm: str = "none"
    fpn_channels: int = 256
    head_convs: int = 4
    stacked: bool = False  # MoE head experts as one channel-stacked grouped network (fewer kernel launches)
    expert_noise: float = 0.01
    score_thresh: float = 0.05
    detections_per_img: int = 100


@dataclass
class DetectionOptimConfig:
    optimizer: str = "adam"  # adam | adamw | sgd
    lr: float = 1e-4
    weight_decay: float = 0.0
    momentum: float = 0.9
    epochs: int = 12
    batch_size: int = 4
    grad_clip: Optional[float] = 0.1  # max grad norm; None = off
    schedule: str = "none"  # none | cosine | step
    milestones: List[int] = field(default_factory=list)  # epochs (step schedule)
    gamma: float = 0.1
    warmup_iters: int = 0
    bf16: bool = False  # bf16 autocast
    max_steps_per_epoch: Optional[int] = None


@dataclass
class DetectionLogConfig:
    print_every: int = 20  # steps; 0 = quiet
    eval_every: int = 1  # epochs; 0 = only after the last epoch
    eval_batch_size: int = 8
    eval_max_images: Optional[int] = None
    final_sweep: bool = False  # after training, evaluate_detection (each k, each forced expert)


@dataclass
class DetectionRunConfig:
    task: str = "detection"
    name: str = "detection"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:1 ...
    data: DetectionDataConfig = field(default_factory=DetectionDataConfig)
    model: DetectionModelConfig = field(default_factory=DetectionModelConfig)
    optim: DetectionOptimConfig = field(default_factory=DetectionOptimConfig)
    log: DetectionLogConfig = field(default_factory=DetectionLogConfig)


def load_detection_config(*sources: Any) -> DictConfig:
    """Merge YAML paths, dicts, dataclasses or DictConfigs (later wins) into the structured schema.

    Strings that are ``key=value`` are dotlist overrides (``optim.lr=1e-5``); other strings are YAML paths.
    """
    cfg = OmegaConf.structured(DetectionRunConfig)
    for src in sources:
        if src is None:
            continue
        if isinstance(src, (str, Path)) and "=" in str(src) and not Path(str(src)).is_file():
            part = OmegaConf.from_dotlist([str(src)])
        elif isinstance(src, (str, Path)):
            part = OmegaConf.load(str(src))
        elif isinstance(src, (DictConfig, dict)) or hasattr(src, "__dataclass_fields__"):
            part = OmegaConf.create(src) if not isinstance(src, DictConfig) else src
        else:
            raise TypeError(f"cannot read a detection config from {type(src).__name__}")
        cfg = OmegaConf.merge(cfg, part)
    if cfg.task != "detection":
        raise ValueError(f"not a detection config: task is '{cfg.task}'")
    return cfg


# ---------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------


def _device(spec: str) -> torch.device:
    if spec in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def _atomic_save(obj: Any, path: Path) -> None:
    """Text, bytes or a torch object, written atomically (tmp file + os.replace)."""
    if isinstance(obj, str):
        atomic_write_bytes(path, lambda p: Path(p).write_text(obj))
    elif isinstance(obj, bytes):
        atomic_write_bytes(path, lambda p: Path(p).write_bytes(obj))
    else:
        save_torch(path, obj)


def _data_paths(cfg: DictConfig, run_dir: Optional[Path]) -> Dict[str, str]:
    d = cfg.data
    if d.source == "shapes":
        from ..data.shapes import generate_shapes

        s = d.shapes
        out = s.out or (str(Path(run_dir) / "data" / "shapes") if run_dir is not None else None)
        if out is None:
            raise ValueError("data.shapes.out is needed when no run directory is given")
        return generate_shapes(out, s.num_train, s.num_val, s.image_size, s.seed, list(s.size_mix), s.max_objects)
    if d.source != "coco":
        raise ValueError(f"data.source must be 'coco' or 'shapes', got '{d.source}'")
    return {"train_json": d.train_json, "train_images": d.train_images, "val_json": d.val_json,
            "val_images": d.val_images}


def build_detection_data(cfg: DictConfig, run_dir: Optional[Path] = None, train: bool = True):
    """(train dataset or None, val dataset) for a detection config."""
    from ..data.coco import CocoDetection

    p = _data_paths(cfg, run_dir)
    d = cfg.data
    train_ds = (
        CocoDetection(p["train_json"], p["train_images"], label_map=d.label_map, hflip=d.hflip,
                      max_images=d.max_train_images, seed=cfg.seed)
        if train else None
    )
    val_ds = CocoDetection(p["val_json"], p["val_images"], label_map=d.label_map, max_images=d.max_val_images)
    return train_ds, val_ds


def _model_kwargs(m: DictConfig, for_loading: bool = False) -> Dict[str, Any]:
    kw = OmegaConf.to_container(m, resolve=True)
    name = kw.pop("name")
    if kw.get("anchor_sizes") is not None:
        kw["anchor_sizes"] = tuple(kw["anchor_sizes"])
    if kw.get("balance") in (None, "none", ""):
        kw["balance"] = None
    if for_loading:  # rebuild the architecture only; the checkpoint supplies every tensor
        pretrained = kw.get("weights") is not None or kw.get("weights_backbone") is not None
        kw["frozen_bn"] = pretrained or kw.get("freeze_backbone", False)
        from ..models.retinanet import uses_torchvision_coco_weights

        kw["torchvision_bn_eps"] = uses_torchvision_coco_weights(kw.get("weights"))
        kw["weights"] = kw["weights_backbone"] = None
    if name.endswith("_fpn") or kw.get("moe_heads") == "none":
        for key in ("num_experts", "k", "routing", "gate", "balance", "balance_weight", "threshold", "noisy"):
            kw.pop(key, None)
        kw["moe_heads"] = "none"
    return name, kw


def build_detector(cfg: DictConfig, num_classes: Optional[int] = None, for_loading: bool = False):
    """The detector of ``cfg.model`` (registry name + builder kwargs)."""
    from ..models import create_model

    name, kw = _model_kwargs(cfg.model, for_loading)
    if kw.get("num_classes") is None:
        if num_classes is None:
            raise ValueError("model.num_classes is unset and no dataset gives it")
        kw["num_classes"] = num_classes
    kw["seed"] = cfg.seed
    return create_model(name, **kw)


def _loader(ds, batch_size: int, train: bool, cfg: DictConfig, device: torch.device):
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

    from ..data.coco import GroupedBatchSampler, collate_detection

    if train and cfg.data.aspect_ratio_grouping:
        sampler = GroupedBatchSampler(ds.aspect_ratios(), batch_size, shuffle=True, seed=cfg.seed)
    elif train:
        sampler = BatchSampler(RandomSampler(ds, generator=torch.Generator().manual_seed(cfg.seed)), batch_size, False)
    else:
        sampler = BatchSampler(SequentialSampler(ds), batch_size, False)
    nw = int(cfg.data.num_workers)
    return DataLoader(ds, batch_sampler=sampler, collate_fn=collate_detection, num_workers=nw,
                      pin_memory=device.type == "cuda", persistent_workers=False)


def _autocast(device: torch.device, enabled: bool):
    if not enabled:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _to_device(images, targets, device):
    images = [im.to(device, non_blocking=True) for im in images]
    if targets is not None:
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
    return images, targets


@torch.no_grad()
def evaluate_model(
    model,
    dataset,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    max_images: Optional[int] = None,
    bf16: bool = False,
    backend: str = "auto",
    num_workers: int = 0,
) -> Dict[str, Any]:
    """COCO AP of ``model`` on ``dataset`` (a :class:`CocoDetection`), plus how many detections each
    expert produced. Returns AP, AP50, AP75, AP_S, AP_M, AP_L, num_images, detections_per_expert."""
    from torch.utils.data import DataLoader, Subset

    from ..data.coco import coco_evaluate, collate_detection, detections_to_coco

    device = torch.device(device)
    model.eval()
    n = len(dataset) if max_images is None else min(len(dataset), int(max_images))
    sub = Subset(dataset, range(n))
    loader = DataLoader(sub, batch_size=batch_size, shuffle=False, collate_fn=collate_detection,
                        num_workers=num_workers)
    results, ids = [], []
    per_expert: Dict[int, int] = {}
    t0 = time.perf_counter()
    for images, targets in loader:
        images, _ = _to_device(images, None, device)
        with _autocast(device, bf16):
            outs = model(images)
        outs = [{k: v.float() if v.is_floating_point() else v for k, v in o.items()} for o in outs]
        img_ids = [int(t["image_id"]) for t in targets]
        results.extend(detections_to_coco(outs, img_ids, dataset.label_to_cat))
        for o in outs:
            if "experts" in o:
                for e in o["experts"].tolist():
                    per_expert[int(e)] = per_expert.get(int(e), 0) + 1
        ids.extend(img_ids)
    elapsed = time.perf_counter() - t0
    gt = dataset.subset_gt()
    keep = set(ids)
    gt["images"] = [im for im in gt["images"] if im["id"] in keep]
    gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] in keep]
    metrics = coco_evaluate(gt, results, backend=backend)
    metrics.update(num_images=len(ids), eval_images_per_s=len(ids) / max(elapsed, 1e-9),
                   detections_per_expert={str(k): v for k, v in sorted(per_expert.items())})
    return metrics


def _make_optimizer(params, o: DictConfig) -> torch.optim.Optimizer:
    if o.optimizer == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    if o.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    if o.optimizer == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    raise ValueError(f"optim.optimizer must be adam, adamw or sgd, got '{o.optimizer}'")


def _lr_factor(o: DictConfig, steps_per_epoch: int):
    total = max(1, o.epochs * steps_per_epoch)
    milestones = [int(m) * steps_per_epoch for m in o.milestones]

    def f(step: int) -> float:
        w = min(1.0, (step + 1) / o.warmup_iters) if o.warmup_iters > 0 else 1.0
        if o.schedule == "cosine":
            return w * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
        if o.schedule == "step":
            return w * o.gamma ** sum(step >= m for m in milestones)
        if o.schedule != "none":
            raise ValueError(f"optim.schedule must be none, cosine or step, got '{o.schedule}'")
        return w

    return f


def _meta(cfg: DictConfig, device: torch.device, resumed: bool, run_dir: Path) -> None:
    import torchvision

    path = run_dir / "meta.json"
    meta = json.loads(path.read_text()) if path.is_file() else {}
    meta.update(task="detection", seed=cfg.seed, git_commit=git_commit(), torch=torch.__version__,
                torchvision=torchvision.__version__,
                python=platform.python_version(), device=str(device),
                gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                argv=sys.argv)
    meta.setdefault("started", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if resumed:
        meta.setdefault("resumed", []).append(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    _save_json(path, meta)


def _accumulate_usage(model, acc: Dict[str, torch.Tensor]) -> None:
    head = getattr(model, "head", None)
    recs = getattr(head, "level_records", None)
    if not isinstance(recs, dict):
        return
    for key, per_level in recs.items():
        for lvl, r in enumerate(per_level):
            imp = r.importance.detach().float()
            imp = imp / imp.sum().clamp_min(1e-9)
            name = f"{key}/P{lvl + 3}"
            acc[name] = acc.get(name, 0) + imp.cpu()
            acc[f"{key}/n"] = acc.get(f"{key}/n", 0) + (1.0 / len(per_level))


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------


def train_detection(cfg: Any, run_dir: str | Path) -> Dict[str, Any]:
    """Train (or resume) the detection run described by ``cfg`` in ``run_dir``; return final.json's dict.

    ``cfg``: a :class:`DetectionRunConfig`, a DictConfig/dict of it, or a YAML path. If
    ``run_dir/checkpoint.pt`` exists the run resumes after its last finished epoch.
    """
    cfg = load_detection_config(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = _device(cfg.device)
    seed_all(cfg.seed)
    train_ds, val_ds = build_detection_data(cfg, run_dir)
    if cfg.model.num_classes is None:
        cfg.model.num_classes = train_ds.num_classes
    model = build_detector(cfg).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _make_optimizer(params, cfg.optim)
    loader = _loader(train_ds, cfg.optim.batch_size, True, cfg, device)
    steps_per_epoch = len(loader)
    if cfg.optim.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, int(cfg.optim.max_steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(cfg.optim, steps_per_epoch))

    ckpt_path = run_dir / "checkpoint.pt"
    start_epoch, step, resumed = 0, 0, False
    if ckpt_path.is_file():
        ck = torch_load(ckpt_path)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        start_epoch, step, resumed = int(ck["epoch"]) + 1, int(ck["step"]), True
        rng = ck.get("rng") or {}
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "numpy" in rng or "python" in rng:
            set_rng_state({"torch": torch.get_rng_state(), **rng})
        print(f"[detection] resuming {run_dir} after epoch {start_epoch - 1}", flush=True)
    _atomic_save(OmegaConf.to_yaml(cfg, resolve=True), run_dir / "config.yaml")
    _meta(cfg, device, resumed, run_dir)

    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in params)
    o, lg = cfg.optim, cfg.log
    last_val: Dict[str, Any] = {}
    speeds: List[float] = []
    for epoch in range(start_epoch, o.epochs):
        if hasattr(loader.batch_sampler, "set_epoch"):
            loader.batch_sampler.set_epoch(epoch)
        model.train()
        sums: Dict[str, float] = {}
        usage: Dict[str, Any] = {}
        n_img, n_steps, clipped = 0, 0, 0
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for images, targets in loader:
            if n_steps >= steps_per_epoch:
                break
            images, targets = _to_device(images, targets, device)
            with _autocast(device, o.bf16):
                losses = model(images, targets)
            total = sum(losses.values())
            if not torch.isfinite(total):
                raise FloatingPointError(
                    f"non-finite detection loss at epoch {epoch} step {step}: "
                    + ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
                )
            opt.zero_grad(set_to_none=True)
            total.backward()
            if o.grad_clip:
                gn = torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
                clipped += int(gn.item() > o.grad_clip) if lg.print_every else 0
            opt.step()
            sched.step()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            sums["loss"] = sums.get("loss", 0.0) + float(total.detach())
            _accumulate_usage(model, usage)
            n_img += len(images)
            n_steps += 1
            step += 1
            if lg.print_every and step % lg.print_every == 0:
                el = time.perf_counter() - t0
                print(f"[detection] epoch {epoch} step {step} loss {float(total.detach()):.4f} "
                      f"lr {sched.get_last_lr()[0]:.3g} {n_img / max(el, 1e-9):.1f} img/s", flush=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_time = time.perf_counter() - t0
        ips = n_img / max(train_time, 1e-9)
        speeds.append(ips)
        row: Dict[str, Any] = {
            "epoch": epoch, "step": step, "lr": sched.get_last_lr()[0], "images": n_img,
            "train_time_s": train_time, "images_per_s": ips,
            **{f"train_{k}": v / max(n_steps, 1) for k, v in sums.items()},
        }
        if o.grad_clip:
            row["clipped_share"] = clipped / max(n_steps, 1)
        for key in [k for k in usage if not k.endswith("/n")]:
            row.setdefault("usage", {})[key] = (usage[key] / max(n_steps, 1)).tolist()
        last_epoch = epoch == o.epochs - 1
        if (lg.eval_every and (epoch + 1) % lg.eval_every == 0) or last_epoch:
            last_val = evaluate_model(model, val_ds, device, lg.eval_batch_size, lg.eval_max_images, o.bf16)
            row["val"] = last_val
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row, default=_jsonable) + "\n")
        ck = {
            "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "epoch": epoch, "step": step,
            "rng": {k: v for k, v in rng_state().items() if k != "cuda"},
            "config": OmegaConf.to_container(cfg, resolve=True),
        }
        _atomic_save(ck, ckpt_path)
        print(f"[detection] epoch {epoch}: loss {row.get('train_loss', float('nan')):.4f} "
              f"{ips:.1f} img/s" + (f" AP {row['val']['AP']:.4f}" if "val" in row else ""), flush=True)

    if not last_val and (run_dir / "metrics.jsonl").is_file():  # resumed after the last epoch
        rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
        last_val = next((r["val"] for r in reversed(rows) if "val" in r), {})
        speeds = speeds or [r["images_per_s"] for r in rows if "images_per_s" in r]
    final = {
        "task": "detection",
        "model": cfg.model.name,
        "epochs": int(o.epochs),
        "val": last_val,
        **{k: last_val.get(k) for k in ("AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L")},
        "images_per_s": float(np.mean(speeds[1:] if len(speeds) > 1 else speeds)) if speeds else None,
        "params": n_params,
        "trainable_params": n_train,
        "device": str(device),
    }
    _save_json(run_dir / "final.json", final)
    if lg.final_sweep:
        final["eval"] = evaluate_detection(run_dir, device=str(device))
    return final


# ---------------------------------------------------------------------------------------------------------
# Evaluation of a finished run
# ---------------------------------------------------------------------------------------------------------


def load_detection_run(run_dir: str | Path, device: str = "cpu"):
    """(model in eval mode with the last checkpoint, cfg, val dataset) of a detection run."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = load_detection_config(cfg_path)
    ck_path = run_dir / "checkpoint.pt"
    if not ck_path.is_file():
        raise FileNotFoundError(f"{run_dir}: no checkpoint.pt (train the run first)")
    _, val_ds = build_detection_data(cfg, run_dir, train=False)
    model = build_detector(cfg, val_ds.num_classes, for_loading=True)
    ck = torch_load(ck_path)
    model.load_state_dict(ck["model"])
    model.to(_device(device)).eval()
    return model, cfg, val_ds


def evaluate_detection(
    run_dir: str | Path,
    k: Optional[int] = None,
    force_expert: Optional[int] = None,
    disable_experts: Optional[List[int]] = None,
    dense: bool = False,
    sweep: Optional[bool] = None,
    max_images: Optional[int] = None,
    device: str = "auto",
    batch_size: Optional[int] = None,
    backend: str = "auto",
) -> Dict[str, Any]:
    """COCO AP of a trained run on its val set, written to ``run_dir/eval/``.

    With ``k``, ``force_expert``, ``disable_experts`` and/or ``dense`` (equal weights over all experts):
    that one setting (``eval/detection_ap_k{k}.json``, ``_force{e}``, ``_disable{i-j}``, ``_dense``). Otherwise the trained routing plus (``sweep``, default on for MoE
    models) every test-time k = 1..N and every expert forced alone in all MoE heads
    (``eval/detection_eval.json`` with keys ``default``, ``k``, ``forced``).
    """
    from ..layers.control import moe_layers, routing_override

    run_dir = Path(run_dir)
    dev = _device(device)
    model, cfg, val_ds = load_detection_run(run_dir, str(dev))
    bs = batch_size or cfg.log.eval_batch_size
    out_dir = run_dir / "eval"
    out_dir.mkdir(exist_ok=True)
    layers = moe_layers(model)
    n_exp = min((m.num_experts for m in layers.values()), default=0)

    def ev(**controls):
        ctx = routing_override(model, **controls) if controls else nullcontext()
        with ctx:
            return evaluate_model(model, val_ds, dev, bs, max_images, cfg.optim.bf16, backend)

    if k is not None or force_expert is not None or disable_experts or dense:
        if not layers:
            raise ValueError(f"{run_dir}: the model has no MoE layers; routing controls do not apply")
        controls: Dict[str, Any] = {}
        name = "detection_ap"
        if k is not None:
            controls["k"] = int(k)
            name += f"_k{k}"
        if force_expert is not None:
            controls["force"] = int(force_expert)
            name += f"_force{force_expert}"
        if disable_experts:
            controls["disabled"] = [int(i) for i in disable_experts]
            name += "_disable" + "-".join(str(i) for i in controls["disabled"])
        if dense:
            controls["dense"] = True
            name += "_dense"
        res = {"controls": controls, "metrics": ev(**controls)}
        _save_json(out_dir / f"{name}.json", res)
        return res

    result: Dict[str, Any] = {"default": ev(), "num_experts": n_exp, "trained_k": int(cfg.model.k)}
    if sweep is None:
        sweep = bool(layers)
    if sweep and layers:
        result["k"] = {str(kk): ev(k=kk) for kk in range(1, n_exp + 1)}
        result["forced"] = {str(e): ev(force=e) for e in range(n_exp)}
    _save_json(out_dir / "detection_eval.json", result)
    return result
