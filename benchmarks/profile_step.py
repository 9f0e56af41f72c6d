"""Whole-model train-step time of the dense and ResBlock-MoE ResNet-18 under several executions, side by side.

    python benchmarks/profile_step.py [--out DIR] [--variants a,b,...] [--steps 40]

Each variant: CIFAR-100-shaped batch 512, bf16 autocast, channels_last, SGD (foreach), the loop's aux loss,
distinct random batches per step (so the exact dispatch sees varying per-expert sizes, as in training).
Reports wall-clock ms per step (synchronised once at the end) and, with --profile, the GPU kernel time per
step and the top kernels (to tell launch-bound from compute-bound). A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from moecnn import aux_loss
from moecnn.models import create_model

MOE = dict(moe="resblock", position=4, num_experts=4, k=2, balance={"kl": 0.5})
VARIANTS = {
    # name: (model kwargs, cudnn.benchmark, compile mode or None)
    "dense": (dict(moe="none"), True, None),
    "moe_exact_bench_off": (MOE, False, None),
    "moe_exact_bench_on": (MOE, True, None),
    "moe_cap1.25_bench_on": ({**MOE, "capacity_factor": 1.25}, True, None),
    "moe_cap1.0_bench_on": ({**MOE, "capacity_factor": 1.0}, True, None),
    "dense_compile": (dict(moe="none"), True, "default"),
    "moe_cap1.25_compile": ({**MOE, "capacity_factor": 1.25}, True, "default"),
    "dense_compile_ro": (dict(moe="none"), True, "reduce-overhead"),
    "moe_cap1.25_compile_ro": ({**MOE, "capacity_factor": 1.25}, True, "reduce-overhead"),
    "moe_stacked_cap1.25_bench_on": ({**MOE, "capacity_factor": 1.25, "stacked": True}, True, None),
    "moe_stacked_cap1.25_compile": ({**MOE, "capacity_factor": 1.25, "stacked": True}, True, "default"),
    "moe_stacked_cap1.25_compile_ro": ({**MOE, "capacity_factor": 1.25, "stacked": True}, True, "reduce-overhead"),
}


def make_step(model, opt, batches, labels, dev):
    i = [0]

    def step():
        x = batches[i[0] % len(batches)]
        y = labels[i[0] % len(labels)]
        i[0] += 1
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            out = model(x)
            loss = F.cross_entropy(out.float(), y, label_smoothing=0.1) + aux_loss(raw_of(model))[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step


def raw_of(model):
    return getattr(model, "_orig_mod", model)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=15)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--profile", default="dense,moe_exact_bench_off,moe_cap1.25_bench_on,moe_stacked_cap1.25_bench_on")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    out_dir = Path(args.out) if args.out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device=dev).manual_seed(0)
    batches = [torch.randn(args.batch, 3, 32, 32, device=dev, generator=g).contiguous(memory_format=torch.channels_last)
               for _ in range(32)]
    labels = [torch.randint(0, 100, (args.batch,), device=dev, generator=g) for _ in range(32)]
    results = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__, "batch": args.batch, "ms_per_step": {}}
    for name in args.variants.split(","):
        kw, bench, mode = VARIANTS[name]
        torch.backends.cudnn.benchmark = bench
        torch.manual_seed(0)
        model = create_model("resnet18", num_classes=100, **kw).to(dev, memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4, foreach=True)
        run = torch.compile(model, mode=mode) if mode else model
        step = make_step(run, opt, batches, labels, dev)
        try:
            t0 = time.perf_counter()
            for _ in range(args.warmup):
                step()
            sync()
            warm_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            for _ in range(args.steps):
                loss = step()
            sync()
            ms = (time.perf_counter() - t0) * 1e3 / args.steps
            results["ms_per_step"][name] = ms
            print(f"{name}: {ms:.2f} ms/step (warm-up {warm_s:.1f} s, loss {loss.item():.3f})", flush=True)
        except Exception as e:  # report and go on
            print(f"{name}: FAILED {type(e).__name__}: {str(e)[:400]}", flush=True)
            continue
        if name in args.profile.split(",") and out_dir:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    step()
                sync()
            ka = prof.key_averages()
            kern_us = sum(getattr(e, "self_device_time_total", 0) for e in ka if getattr(e, "device_type", None)
                          is not None and str(e.device_type).endswith("CUDA"))
            results.setdefault("gpu_kernel_ms_per_step", {})[name] = kern_us / 1e3 / 10
            (out_dir / f"prof_{name}.txt").write_text(
                ka.table(sort_by="self_device_time_total", row_limit=25) + "\n\n"
                + ka.table(sort_by="self_cpu_time_total", row_limit=25))
            print(f"  {name}: GPU kernel time {kern_us / 1e4:.2f} ms/step", flush=True)
        del model, opt, run
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    d = results["ms_per_step"].get("dense")
    print("\n| variant | ms/step | × dense | GPU kernel ms/step |\n|---|---|---|---|")
    for name, ms in results["ms_per_step"].items():
        k = results.get("gpu_kernel_ms_per_step", {}).get(name)
        print(f"| {name} | {ms:.2f} | {ms / d:.2f} | {'-' if k is None else f'{k:.2f}'} |" if d else f"| {name} | {ms:.2f} |")
    if out_dir:
        (out_dir / "profile_step.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
