"""The one training loop: every task, any model, one process or DDP under torchrun.

``train(cfg, run_dir, resume=False) -> final metrics``. The task (:class:`moecnn.tasks.base.Task`) supplies data,
model, losses and evaluation; this loop owns devices, DDP, precision, ``torch.compile``, optimiser, schedule,
checkpoints, resume, the run lock, logging and the routing statistics of every MoE layer. Per step everything
stays on the device; sums are read once per epoch (plus one small non-finite check every ``log.check_every``
steps). Only rank 0 writes files and evaluates.
"""
from __future__ import annotations

import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..registry import TASKS
from ..tasks.base import autocast
from . import distributed as D
from .runs import (atomic_write_bytes, load_model_state, read_checkpoint, read_metrics, rng_state, run_lock,
                   save_config, save_json, save_torch, set_rng_state, write_meta, write_metrics)

DIVERGENCE_FACTOR = 50.0  # warn when an epoch's training loss exceeds this multiple of the task's reference loss


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
    """LR factor as a function of the optimiser step (the scheduler steps every iteration). A linear warm-up of
    ``warmup_epochs`` starts every schedule; onecycle/cosine then decay over the remaining steps."""
    milestones = sorted(int(m) for m in o.milestones)
    warm = o.warmup_epochs * steps_per_epoch
    total = epochs * steps_per_epoch

    def f(step: int) -> float:
        if step < warm:
            ramp = (step + 1) / warm
            if o.schedule in ("onecycle", "cosine"):
                return ramp
        else:
            ramp = 1.0
        if o.schedule == "constant":
            return ramp
        if o.schedule == "step":
            epoch = step // steps_per_epoch
            return ramp * o.gamma ** sum(epoch >= m for m in milestones)
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


def _fmt(x: Optional[float], metric: str = "top1") -> str:
    if x is None:
        return "-"
    return f"{x:.2f}%" if metric.startswith("top") else f"{x:.4f}"


def train(cfg: DictConfig, run_dir, resume: bool = False) -> Dict:
    """Train ``cfg`` (any task) into ``run_dir``; returns final.json's content (or a stop notice)."""
    return run(cfg, run_dir, resume)[0]


def run(cfg: DictConfig, run_dir, resume: bool = False):
    """Like :func:`train` but returns ``(result, trained model)`` (the model of this rank, unwrapped)."""
    threads = torch.get_num_threads()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    try:
        d = D.init(cfg.train.device, cfg.train.get("dist_backend", "auto"))
        with run_lock(Path(run_dir), enabled=d.main):
            return _run(cfg, Path(run_dir), resume, d)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: DictConfig, run_dir: Path, resume: bool, d: D.Dist):
    t, o = cfg.train, cfg.optim
    set_determinism(t.deterministic)
    seed_all(t.seed)
    cuda = d.device.type == "cuda"

    ck = None
    if resume:
        ck = read_checkpoint(run_dir / "checkpoint.pt")
    elif d.main and ((run_dir / "checkpoint.pt").exists() or (run_dir / "final.json").exists()):
        raise ValueError(f"'{run_dir}' already holds a run; use --resume {run_dir} or another --out")
    D.barrier()

    channels_last = t.channels_last and cuda
    task = TASKS.get(cfg.task)(cfg, run_dir, d.device, channels_last)
    task.setup(train=True)
    raw = task.build_model().to(d.device)
    if channels_last:
        raw = raw.to(memory_format=torch.channels_last)
    task.bind(raw)
    layers = task.layers
    static = all(m.static_shapes for m in layers.values())  # few, fixed shapes: cuDNN may autotune them
    idle = any(m.skips_idle_experts for m in layers.values())  # an expert may get no images (and no gradient)
    if cuda and not t.deterministic:
        torch.backends.cudnn.benchmark = static if t.cudnn_benchmark is None else t.cudnn_benchmark

    if d.world_size > 1 and o.batch_size % d.world_size:
        raise ValueError(f"optim.batch_size={o.batch_size} (global) must be divisible by {d.world_size} ranks")
    per_rank = o.batch_size // d.world_size
    loader = task.train_loader(per_rank, seed=int(t.seed), rank=d.rank, world_size=d.world_size)
    steps = min(len(loader), t.max_steps_per_epoch or len(loader))
    eval_bs = t.eval_batch_size or task.eval_batch_size(per_rank)

    opt = build_optimizer(raw, o, d.device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(o, t.epochs, steps))
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and t.precision == "fp16")
    start, best, streak, first_loss = 0, {"epoch": None, task.metric: None}, {}, None
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
        first_loss = ck.get("first_loss")
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
        # find_unused_parameters only where an expert may get no images (and so no gradient) in a step.
        # No per-step buffer broadcast: BatchNorm statistics are averaged once per epoch (D.average_buffers) and
        # the hard-constraint state is all-reduced by the MoE layer itself.
        model = nn.parallel.DistributedDataParallel(
            raw, device_ids=[d.device.index] if cuda else None, find_unused_parameters=idle,
            broadcast_buffers=False, gradient_as_bucket_view=True)
    if t.compile:
        model = torch.compile(model, mode=t.compile_mode)

    writer = None
    if d.main and resume:  # drop lines of epochs being redone (and a torn last line)
        write_metrics(run_dir, [r for r in read_metrics(run_dir) if r.get("epoch", 0) < start])
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(run_dir, cfg)
        write_meta(run_dir, cfg, d.device, d.world_size, resumed=resume)
        if cfg.log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                writer = SummaryWriter(str(run_dir / "tb"))
            except ImportError:
                writer = None
    progress = Progress(cfg.log.progress, d.main)
    metric = task.metric
    if d.main and start == 0:
        nparams = sum(p.numel() for p in raw.parameters())
        progress.line(f"training {cfg.model.name} ({cfg.task}, {len(layers)} MoE layer(s), {nparams / 1e6:.2f} M "
                      f"params) on {task.info.get('dataset')}, {d.world_size} x {d.device}; run dir {run_dir}")
    elif d.main and finishing:
        progress.line(f"resuming {run_dir}: all {start} epochs are done, running the final evaluation")
    elif d.main:
        progress.line(f"resuming {run_dir} after epoch {start}")

    amp = lambda: autocast(d.device, t.precision)  # noqa: E731
    stopped_early = False
    val = None
    epoch = start - 1
    for epoch in range(start, t.epochs):
        if t.stop_after_epochs is not None and epoch - start >= t.stop_after_epochs:  # as asked: stop here
            stopped_early = True
            break
        model.train()
        loader.set_epoch(epoch)
        t0 = time.perf_counter()
        sums: Dict[str, torch.Tensor] = {}
        counts: Dict[str, torch.Tensor] = {}
        imp: Dict[str, torch.Tensor] = {}
        cnt: Dict[str, torch.Tensor] = {}
        bad = torch.zeros((), device=d.device, dtype=torch.bool)
        n_img = 0
        lr = opt.param_groups[0]["lr"]
        for step, batch in enumerate(progress.start(loader, epoch, t.epochs)):
            if step >= steps:
                break
            with amp():
                terms, stats = task.losses(model, batch)
            loss = torch.stack([v.float() for v in terms.values()]).sum()
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if o.grad_clip:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(raw.parameters(), o.grad_clip)
            scaler.step(opt)
            scaler.update()
            lr = opt.param_groups[0]["lr"]  # the lr this step used (a host float: no sync)
            sched.step()
            if step == 0 and epoch == start and cuda and not t.deterministic and t.cudnn_benchmark is None:
                # a layer knows whether its padded buffers are exact only after its first forward
                torch.backends.cudnn.benchmark = all(m.static_shapes for m in layers.values())
            b = task.batch_size(batch)
            n_img += b
            with torch.no_grad():
                bad |= ~torch.isfinite(loss.detach())
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0) + v.detach().float() * b
                sums["_images"] = sums.get("_images", 0) + torch.full((), float(b), device=d.device)
                for k, v in stats.items():
                    counts[k] = counts.get(k, 0) + v.detach().float()
                for n, rec in task.records().items():
                    imp[n] = imp.get(n, 0) + rec.importance.float()
                    cnt[n] = cnt.get(n, 0) + rec.counts.float()
            if (step + 1) % cfg.log.check_every == 0:
                if D.all_reduce_sum(bad.float()).item() > 0:
                    _nonfinite(run_dir, epoch, step)
                progress.postfix(loss=f"{loss.item():.3f}")
        if D.all_reduce_sum(bad.float()).item() > 0:
            _nonfinite(run_dir, epoch, steps - 1)

        D.average_buffers(raw)
        # one reduction + one host copy for all epoch statistics
        keys, ckeys, units = list(sums), list(counts), list(imp)
        parts = [torch.stack([sums[k] for k in keys] + [counts[k] for k in ckeys])]
        parts += [imp[n] for n in units] + [cnt[n] for n in units]
        vals = D.all_reduce_sum(torch.cat(parts)).tolist()
        elapsed = time.perf_counter() - t0
        total = vals[keys.index("_images")]
        losses = {k: vals[i] / total for i, k in enumerate(keys) if k != "_images"}
        csum = {k: vals[len(keys) + i] for i, k in enumerate(ckeys)}
        rec = {"epoch": epoch, "lr": lr,
               "train": {"loss": sum(losses.values()), **{f"loss/{k}": v for k, v in losses.items()},
                         **task.train_summary(csum)},
               "images_per_s": n_img * d.world_size / elapsed, "time_s": elapsed, "warnings": []}
        pos = len(keys) + len(ckeys)
        rec["routing"] = {}
        for arr in ("importance", "routed"):
            for n in units:
                size = len(imp[n])
                rec["routing"].setdefault(n, {})[arr] = vals[pos: pos + size]
                pos += size
        rec["warnings"] += routing_health(rec["routing"], streak, t.collapse_patience)
        if first_loss is None:
            first_loss = rec["train"]["loss"]
        ref = task.reference_loss() or first_loss
        if rec["train"]["loss"] > DIVERGENCE_FACTOR * max(ref, 1e-8):
            rec["warnings"].append(f"training is diverging: loss {rec['train']['loss']:.4g} is over {DIVERGENCE_FACTOR:g}x "
                                   f"{'that of a uniform guess' if task.reference_loss() else 'the first epoch'} "
                                   f"({ref:.4g}); lower optim.lr or set optim.grad_clip")
        last = epoch + 1 == t.epochs
        if task.has_split("val") and ((epoch + 1) % t.eval_every == 0 or last):
            val = D.broadcast_object(task.evaluate(raw, "val", eval_bs) if d.main else None)
            rec["val"] = val
            if d.main and t.probe_size:
                _append_probe(run_dir, task.probe(raw, t.probe_size), epoch)
        improved = "val" in rec and val.get(metric) is not None and (
            best.get(metric) is None or val[metric] > best[metric])
        if improved:
            best = {"epoch": epoch, metric: val[metric]}

        if d.main:
            _log(run_dir, rec, writer, progress, epoch, t.epochs, metric)
            state = {"model": raw.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "scaler": scaler.state_dict(), "epoch": epoch + 1, "rng": rng_state(), "best": best,
                     "collapse_streak": streak, "first_loss": first_loss, "config": OmegaConf.to_container(cfg),
                     "data": task.info}
            save_torch(run_dir / "checkpoint.pt", state)
            if improved and t.save_best:
                save_torch(run_dir / "best.pt", {"model": state["model"], "epoch": epoch, "val": val,
                                                 "data": state["data"]})
        D.barrier()

    if finishing and task.has_split("val"):  # the last epoch's validation, as an uninterrupted run reports it
        val = D.broadcast_object(task.evaluate(raw, "val", eval_bs) if d.main else None)
    if writer is not None:
        writer.close()
    if stopped_early:
        if d.main:
            progress.line(f"stopped after {epoch - start} epoch(s) as asked (train.stop_after_epochs); "
                          f"continue with: moecnn train --resume {run_dir}")
        return {"stopped_after_epoch": epoch - 1, "run_dir": str(run_dir)}, raw

    final = None
    if d.main:
        test = task.evaluate(raw, "test", eval_bs) if "test" in task.splits and task.has_split("test") else None
        final = {"task": cfg.task, "reported": "last epoch (test set never used for selection)",
                 "checkpoint": "checkpoint.pt", "epoch": t.epochs - 1, "seed": int(t.seed), "metric": metric,
                 "test": test, "val": val, "best_val": best,  # times: metrics.jsonl (moecnn table)
                 "params": sum(p.numel() for p in raw.parameters()),
                 "trainable_params": sum(p.numel() for p in raw.parameters() if p.requires_grad)}
        save_json(run_dir / "final.json", final)
        head = test if test is not None else val
        msg = f"done: {'test' if test is not None else 'val'} {metric} {_fmt(head and head.get(metric), metric)}"
        progress.line(f"{msg} (last epoch). Results: {run_dir / 'final.json'}, per-epoch metrics: "
                      f"{run_dir / 'metrics.jsonl'}")
    return D.broadcast_object(final), raw


def _append_probe(run_dir: Path, probe: Optional[Dict[str, np.ndarray]], epoch: int) -> None:
    """Add this evaluation's probe routing to RUN_DIR/probe_routing.npz (rows: evaluations, atomic rewrite).

    Layout: ``epochs`` (E,), ``labels`` (P,), optional ``superlabels`` (P,), ``layers`` (L,), per layer
    ``<layer>/top1`` E×P int16 and ``<layer>/weights`` E×P×N float16."""
    if probe is None:
        return
    path = run_dir / "probe_routing.npz"
    old: Dict[str, np.ndarray] = {}
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            old = {k: z[k] for k in z.files}
        if not np.array_equal(old.get("labels"), probe["labels"]) or list(old.get("layers", [])) != list(probe["layers"]):
            old = {}  # another probe set (config changed): start over
        else:  # drop evaluations of epochs being redone
            keep = old["epochs"] < epoch
            old = {k: (v[keep] if k == "epochs" or k.endswith(("/top1", "/weights")) else v) for k, v in old.items()}
    out = {"epochs": np.append(old.get("epochs", np.zeros(0, np.int64)), epoch).astype(np.int64),
           "labels": probe["labels"], "layers": probe["layers"], "split": probe.get("split", np.array("val"))}
    if "superlabels" in probe:
        out["superlabels"] = probe["superlabels"]
    for name in probe["layers"]:
        w = probe[f"{name}/weights"].astype(np.float16)[None]
        top = probe[f"{name}/weights"].argmax(1).astype(np.int16)[None]
        out[f"{name}/weights"] = np.concatenate([old[f"{name}/weights"], w]) if old else w
        out[f"{name}/top1"] = np.concatenate([old[f"{name}/top1"], top]) if old else top

    def write(p):
        with open(p, "wb") as f:
            np.savez_compressed(f, **out)

    atomic_write_bytes(path, write)


def _final_epochs(run_dir: Path) -> Optional[int]:
    """Number of epochs behind RUN_DIR/final.json (None when it is absent or unreadable)."""
    import json

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
    if (run_dir / "checkpoint.pt").exists() and epoch > 0:
        kept = (f"the last good checkpoint ({run_dir / 'checkpoint.pt'}, {epoch} finished epochs) is kept — lower "
                f"optim.lr or set optim.grad_clip, then continue with --resume or retrain")
    else:
        kept = "no checkpoint was written yet — lower optim.lr or set optim.grad_clip and retrain"
    raise FloatingPointError(f"non-finite loss at epoch {epoch}, step {step}; training stopped. {kept}")


def _log(run_dir: Path, rec: Dict, writer, progress: Progress, epoch: int, epochs: int, metric: str) -> None:
    import json

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
    aux = sum(v for k, v in tr.items() if k.startswith("loss/") and ("/" in k[5:] or k == "loss/aux"))
    val = rec.get("val")
    extra = f" | train {tr['top1']:.2f}%" if "top1" in tr else ""
    progress.line(
        f"epoch {epoch + 1}/{epochs} | loss {tr['loss']:.4f} (aux {aux:.4f}){extra} | "
        f"val {metric} {_fmt(val and val.get(metric), metric)} | lr {rec['lr']:.2e} | {rec['images_per_s']:.0f} img/s"
        + "".join(f" | living {n or 'moe'}: {r['living']}" for n, r in rec["routing"].items() if "@" not in n)
    )
    for w in rec["warnings"]:
        progress.line(f"warning: {w}")
