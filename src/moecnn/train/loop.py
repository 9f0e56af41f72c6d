"""The classification training loop (single process or DDP under torchrun).

``train(cfg, run_dir, resume=False) -> final metrics``. Per step everything stays on the device; metrics
are summed in device tensors and read once per epoch (plus one small non-finite check every
``log.check_every`` steps). Only rank 0 writes files.
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..layers import aux_loss, moe_layers, routing
from . import distributed as D
from .evaluate import autocast, evaluate
from .runs import (load_model_state, read_checkpoint, rng_state, save_config, save_json, save_torch,
                   set_rng_state, write_meta)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_determinism(deterministic: bool) -> None:
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def build_optimizer(model: nn.Module, o: DictConfig, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    if o.name == "sgd":
        # not fused: an expert that first receives images after step 1 has no momentum buffer yet, which
        # fused SGD rejects ("expected Tensor ... got NoneType"); foreach handles it
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                               weight_decay=o.weight_decay, foreach=True)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, **fast)


def lr_lambda(o: DictConfig, epochs: int, steps_per_epoch: int):
    """LR factor as a function of the optimiser step (the scheduler steps every iteration)."""
    milestones = sorted(int(m) for m in o.milestones)
    warm = o.warmup_epochs * steps_per_epoch
    total = epochs * steps_per_epoch

    def f(step: int) -> float:
        if o.schedule == "constant":
            return 1.0
        if o.schedule == "step":
            epoch = step // steps_per_epoch
            return o.gamma ** sum(epoch >= m for m in milestones)
        if step < warm:
            return (step + 1) / warm
        prog = min(1.0, (step - warm) / max(1.0, total - warm))
        shape = 1.0 - prog if o.schedule == "onecycle" else 0.5 * (1.0 + math.cos(math.pi * prog))
        return o.final_lr_factor + (1.0 - o.final_lr_factor) * shape

    return f


class Progress:
    """tqdm bar on a terminal, plain epoch lines otherwise; silent off rank 0."""

    def __init__(self, mode: str, main: bool) -> None:
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode = mode if main else "none"
        self.bar = None

    def start(self, loader, epoch: int, epochs: int):
        if self.mode != "bar":
            return loader
        from tqdm import tqdm

        self.bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True)
        return self.bar

    def postfix(self, **kw) -> None:
        if self.bar is not None:
            self.bar.set_postfix(**kw)

    def line(self, msg: str) -> None:
        if self.mode == "none":
            return
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        print(msg, flush=True)


def _fmt(x: Optional[float], pct: bool = True) -> str:
    return "-" if x is None else (f"{x:.2f}%" if pct else f"{x:.4f}")


def train(cfg: DictConfig, run_dir, resume: bool = False) -> Dict:
    """Train a classification model into ``run_dir``; returns final.json's content (or a stop notice)."""
    return run(cfg, run_dir, resume)[0]


def run(cfg: DictConfig, run_dir, resume: bool = False):
    """Like :func:`train` but returns ``(result, trained model)`` (the model of this rank, unwrapped)."""
    threads = torch.get_num_threads()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    try:
        return _run(cfg, run_dir, resume)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: DictConfig, run_dir, resume: bool):
    from ..data import build_data, make_loader
    from ..models import build_model

    run_dir = Path(run_dir)
    d = D.init(cfg.train.device, cfg.train.get("dist_backend", "auto"))
    t, o = cfg.train, cfg.optim
    set_determinism(t.deterministic)
    seed_all(t.seed)
    cuda = d.device.type == "cuda"

    ck = None
    if resume:
        ck = read_checkpoint(run_dir / "checkpoint.pt")
    elif d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if (run_dir / "checkpoint.pt").exists() or (run_dir / "final.json").exists():
            raise ValueError(f"'{run_dir}' already holds a run; use --resume {run_dir} or another --out")
    D.barrier()

    data_cfg = OmegaConf.to_object(cfg.data)
    bundle = build_data(data_cfg)
    model = build_model(cfg.model, bundle.num_classes, bundle.in_channels)
    raw = model.to(d.device)
    channels_last = t.channels_last and cuda
    if channels_last:
        raw = raw.to(memory_format=torch.channels_last)
    layers = moe_layers(raw)
    if cuda and not t.deterministic:
        variable = any(m.capacity_factor is None for m in layers.values())
        torch.backends.cudnn.benchmark = (not variable) if t.cudnn_benchmark is None else t.cudnn_benchmark

    if d.world_size > 1 and o.batch_size % d.world_size:
        raise ValueError(f"optim.batch_size={o.batch_size} (global) must be divisible by {d.world_size} ranks")
    per_rank = o.batch_size // d.world_size
    loader = make_loader(bundle.train, per_rank, train=True, device=d.device, mean=bundle.mean, std=bundle.std,
                         augment=data_cfg.augment, channels_last=channels_last, seed=t.seed, rank=d.rank,
                         world_size=d.world_size, num_workers=data_cfg.num_workers,
                         gpu_resident=data_cfg.gpu_resident)
    if len(loader) == 0:
        raise ValueError(f"the training set ({len(bundle.train)} images) is smaller than one batch "
                         f"({per_rank}); lower optim.batch_size")
    eval_bs = max(per_rank, 256)

    def eval_loader(ds):
        if ds is None or len(ds) == 0:
            return None
        return make_loader(ds, eval_bs, train=False, device=d.device, mean=bundle.mean, std=bundle.std,
                           augment=None, channels_last=channels_last, num_workers=data_cfg.num_workers,
                           gpu_resident=data_cfg.gpu_resident)

    val_loader = eval_loader(bundle.val)

    opt = build_optimizer(raw, o, d.device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(o, t.epochs, len(loader)))
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and t.precision == "fp16")
    start, best, streak = 0, {"epoch": None, "top1": None}, {n: 0 for n in layers}
    if ck is not None:
        load_model_state(raw, ck["model"], run_dir / "checkpoint.pt")
        try:
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            scaler.load_state_dict(ck["scaler"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise RuntimeError(f"checkpoint optimizer/scheduler state does not fit this config ({e}); "
                               f"was the config changed?") from None
        start, best, streak = ck["epoch"], ck["best"], ck.get("collapse_streak", streak)
        set_rng_state(ck["rng"])
        if d.rank > 0:
            seed_all(t.seed * 1000 + start * 7919 + d.rank)
    elif d.rank > 0:
        seed_all(t.seed + 1000003 * d.rank)  # same init (DDP broadcasts rank 0's), different noise/augment
    # every epoch done but no final.json of this length: the run was stopped during its final evaluation, and
    # only that is left (rank 0 reads the run directory and decides for all ranks)
    finishing = start == t.epochs
    done = D.broadcast_object(_final_epochs(run_dir) == start if d.main and finishing else None)
    if start > t.epochs or done:
        raise ValueError(f"run '{run_dir}' already finished {start} of {t.epochs} epochs; "
                         f"raise train.epochs to continue it")
    if d.main and resume and not finishing and (run_dir / "final.json").exists():  # a shorter run's result:
        old = _final_epochs(run_dir)  # keep it under its length, the new one is written at the end
        (run_dir / "final.json").replace(run_dir / f"final_{old if old is not None else 'old'}_epochs.json")

    model = raw
    if d.enabled:
        # find_unused_parameters only for exact dispatch, where an expert may get no images in a step
        # (capacity dispatch runs every expert on a full buffer). No per-step buffer broadcast: BatchNorm
        # statistics are averaged once per epoch (D.average_buffers) and the hard-constraint state is
        # all-reduced by the MoE layer itself.
        unused = any(m.capacity_factor is None for m in layers.values())
        model = nn.parallel.DistributedDataParallel(
            raw, device_ids=[d.device.index] if cuda else None, find_unused_parameters=unused,
            broadcast_buffers=False, gradient_as_bucket_view=True)
    if t.compile:
        model = torch.compile(model, mode=t.compile_mode)

    writer = None
    if d.main and resume and (run_dir / "metrics.jsonl").exists():  # drop lines of epochs being redone
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        keep = [ln for ln in lines if ln.strip() and json.loads(ln).get("epoch", 0) < start]
        (run_dir / "metrics.jsonl").write_text("".join(ln + "\n" for ln in keep))
    if d.main:
        save_config(run_dir, cfg)
        write_meta(run_dir, cfg, d.device, d.world_size, resumed=resume)
        if cfg.log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                writer = SummaryWriter(str(run_dir / "tb"))
            except ImportError:
                writer = None
    progress = Progress(cfg.log.progress, d.main)
    if d.main and start == 0:
        nparams = sum(p.numel() for p in raw.parameters())
        progress.line(f"training {cfg.model.name} (moe={cfg.model.moe}, {nparams / 1e6:.2f} M params) on "
                      f"{bundle.name}: {len(bundle.train)} train / {len(bundle.val or [])} val images, "
                      f"{d.world_size} x {d.device}; run dir {run_dir}")
    elif d.main and finishing:
        progress.line(f"resuming {run_dir}: all {start} epochs are done, running the final evaluation")
    elif d.main:
        progress.line(f"resuming {run_dir} after epoch {start}")

    amp = lambda: autocast(d.device, t.precision)  # noqa: E731
    ls = float(o.label_smoothing)
    stopped_early = False
    val = None
    for epoch in range(start, t.epochs):
        model.train()
        loader.set_epoch(epoch)
        t0 = time.perf_counter()
        sums: Dict[str, torch.Tensor] = {}
        imp = {n: torch.zeros(m.num_experts, device=d.device) for n, m in layers.items()}
        cnt = {n: torch.zeros(m.num_experts, device=d.device) for n, m in layers.items()}
        correct = torch.zeros((), device=d.device)
        seen = torch.zeros((), device=d.device)
        bad = torch.zeros((), device=d.device, dtype=torch.bool)
        n_img = 0
        for step, (x, y) in enumerate(progress.start(loader, epoch, t.epochs)):
            with amp():
                out = model(x)
                task = F.cross_entropy(out.float(), y, label_smoothing=ls)
                aux, terms = aux_loss(layers or raw)  # dense model: a zero on its device
            loss = task + aux
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if o.grad_clip:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(raw.parameters(), o.grad_clip)
            scaler.step(opt)
            scaler.update()
            lr = opt.param_groups[0]["lr"]  # the lr this step used (a host float: no sync)
            sched.step()
            b = y.shape[0]
            n_img += b
            with torch.no_grad():
                bad |= ~torch.isfinite(loss.detach())
                for k, v in (("task", task), *terms.items()):
                    sums[k] = sums.get(k, 0) + v.detach().float() * b
                correct += (out.argmax(1) == y).sum()
                seen += b
                for n, rec in routing(layers).items():
                    imp[n] += rec.importance.float()
                    cnt[n] += rec.counts.float()
            if (step + 1) % cfg.log.check_every == 0:
                if D.all_reduce_sum(bad.float()).item() > 0:
                    _nonfinite(run_dir, epoch, step)
                progress.postfix(loss=f"{loss.item():.3f}")
        if D.all_reduce_sum(bad.float()).item() > 0:
            _nonfinite(run_dir, epoch, len(loader) - 1)

        D.average_buffers(raw)
        # one reduction + one host copy for all epoch statistics
        keys = list(sums)
        flat = torch.cat([torch.stack([sums[k] for k in keys] + [correct.float(), seen.float()])]
                         + [imp[n] for n in layers] + [cnt[n] for n in layers])
        vals = D.all_reduce_sum(flat).tolist()
        elapsed = time.perf_counter() - t0
        total_seen = vals[len(keys) + 1]
        losses = {k: vals[i] / total_seen for i, k in enumerate(keys)}
        rec = {"epoch": epoch, "lr": lr,
               "train": {"loss": sum(losses.values()), **{f"loss/{k}": v for k, v in losses.items()},
                         "top1": 100 * vals[len(keys)] / total_seen},
               "images_per_s": n_img * d.world_size / elapsed, "time_s": elapsed, "warnings": []}
        pos = len(keys) + 2
        rec["routing"] = {}
        for arr in ("importance", "routed"):
            for n, m in layers.items():
                v = vals[pos: pos + m.num_experts]
                pos += m.num_experts
                rec["routing"].setdefault(n, {})[arr] = v
        rec["warnings"] += routing_health(rec["routing"], streak, t.collapse_patience)
        last = epoch + 1 == t.epochs
        if val_loader is not None and ((epoch + 1) % t.eval_every == 0 or last):
            val = evaluate(raw, val_loader, bundle.num_classes, d.device, t.precision)
            rec["val"] = val
        improved = val is not None and "val" in rec and (best["top1"] is None or val["top1"] > best["top1"])
        if improved:
            best = {"epoch": epoch, "top1": val["top1"]}

        if d.main:
            _log(run_dir, rec, writer, progress, epoch, t.epochs)
            state = {"model": raw.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "scaler": scaler.state_dict(), "epoch": epoch + 1, "rng": rng_state(), "best": best,
                     "collapse_streak": streak, "config": OmegaConf.to_container(cfg),
                     "data": {"num_classes": bundle.num_classes, "in_channels": bundle.in_channels}}
            save_torch(run_dir / "checkpoint.pt", state)
            if improved and t.save_best:
                save_torch(run_dir / "best.pt", {"model": state["model"], "epoch": epoch, "val": val,
                                                 "data": state["data"]})
        D.barrier()
        if t.stop_after_epochs is not None and epoch + 1 - start >= t.stop_after_epochs and not last:
            stopped_early = True
            break

    if finishing and val_loader is not None:  # the last epoch's validation, as an uninterrupted run reports it
        val = evaluate(raw, val_loader, bundle.num_classes, d.device, t.precision)
    if writer is not None:
        writer.close()
    if stopped_early:
        if d.main:
            progress.line(f"stopped after epoch {epoch} as asked (train.stop_after_epochs); "
                          f"continue with: moecnn train --resume {run_dir}")
        return {"stopped_after_epoch": epoch, "run_dir": str(run_dir)}, raw

    final = None
    if d.main:
        test_loader = eval_loader(bundle.test)
        test = evaluate(raw, test_loader, bundle.num_classes, d.device, t.precision) if test_loader else None
        final = {"reported": "last epoch (test set never used for selection)", "checkpoint": "checkpoint.pt",
                 "epoch": t.epochs - 1, "seed": int(t.seed), "test": test, "val": val, "best_val": best}
        save_json(run_dir / "final.json", final)
        msg = f"done: test top-1 {_fmt(test and test['top1'])}, top-5 {_fmt(test and test['top5'])}"
        progress.line(f"{msg} (last epoch); val top-1 {_fmt(val and val['top1'])}. "
                      f"Results: {run_dir / 'final.json'}, per-epoch metrics: {run_dir / 'metrics.jsonl'}")
    return D.broadcast_object(final), raw


def _final_epochs(run_dir: Path) -> Optional[int]:
    """Number of epochs behind RUN_DIR/final.json (None when it is absent or unreadable)."""
    try:
        return int(json.loads((run_dir / "final.json").read_text())["epoch"]) + 1
    except (OSError, ValueError, KeyError, TypeError):
        return None


def routing_health(stats: Dict[str, Dict], streak: Dict[str, int], patience: int) -> list:
    """Normalise epoch sums to shares, count living experts (share > 0.01), update collapse streaks.

    ``stats[layer]`` holds summed ``importance`` and ``routed`` counts; afterwards ``importance`` is the mean
    gate-weight share (sums to 1), ``routed`` the share of images routed to each expert (sums to k).
    Returns warnings for layers with < N/2 living experts for ``patience`` epochs in a row.
    """
    warnings = []
    for n, r in stats.items():
        num = len(r["importance"])
        tot_units = sum(r["importance"]) or 1.0
        r["importance"] = [v / tot_units for v in r["importance"]]
        r["routed"] = [v / tot_units for v in r["routed"]]
        r["living"] = sum(v > 0.01 for v in r["importance"])
        streak[n] = streak.get(n, 0) + 1 if r["living"] < num / 2 else 0
        if streak[n] >= patience:
            warnings.append(f"routing collapse in '{n or 'moe'}': only {r['living']} of {num} experts alive "
                            f"(importance share > 0.01) for {streak[n]} epochs in a row")
    return warnings


def _nonfinite(run_dir: Path, epoch: int, step: int) -> None:
    raise RuntimeError(
        f"non-finite loss at epoch {epoch}, step {step}; training stopped. The last good checkpoint "
        f"({run_dir / 'checkpoint.pt'}) is kept — lower optim.lr or set optim.grad_clip, then retrain "
        f"or continue with --resume"
    )


def _log(run_dir: Path, rec: Dict, writer, progress: Progress, epoch: int, epochs: int) -> None:
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")
    if writer is not None:
        writer.add_scalar("lr", rec["lr"], epoch)
        writer.add_scalar("images_per_s", rec["images_per_s"], epoch)
        for k, v in rec["train"].items():
            writer.add_scalar(f"train/{k}", v, epoch)
        for k, v in rec.get("val", {}).items():
            if isinstance(v, (int, float)):
                writer.add_scalar(f"val/{k}", v, epoch)
        for n, r in rec["routing"].items():
            for i, v in enumerate(r["importance"]):
                writer.add_scalar(f"routing/{n}/importance_{i}", v, epoch)
            for i, v in enumerate(r["routed"]):
                writer.add_scalar(f"routing/{n}/routed_{i}", v, epoch)
        writer.flush()
    tr = rec["train"]
    aux = sum(v for k, v in tr.items() if k.startswith("loss/") and k != "loss/task")
    val = rec.get("val")
    progress.line(
        f"epoch {epoch + 1}/{epochs} | loss {tr['loss']:.4f} (task {tr['loss/task']:.4f}, aux {aux:.4f}) | "
        f"train {tr['top1']:.2f}% | val {_fmt(val and val['top1'])} | lr {rec['lr']:.2e} | "
        f"{rec['images_per_s']:.0f} img/s"
        + "".join(f" | living {n or 'moe'}: {r['living']}" for n, r in rec["routing"].items())
    )
    for w in rec["warnings"]:
        progress.line(f"warning: {w}")
