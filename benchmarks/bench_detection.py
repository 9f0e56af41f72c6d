"""Training throughput of RetinaNet with dense vs MoE heads, measured side by side in one run
(a benchmark, not a test), against the FLOP bound of k full-head experts.

    python benchmarks/bench_detection.py [--device cuda] [--arch resnet18] [--steps 30] [--batch 8]
        [--image-size 512] [--routing level anchor] [--executions default per_level per_level_stacked ...]
        [--bf16] [--channels-last] [--freeze-backbone] [--out results.json]

Generates a small shapes set (moecnn.data.shapes) in a temporary folder, then for each model trains
``--steps`` optimizer steps (after ``--warmup`` steps) on the same batches and prints images/s of each and
the ratio MoE / dense. Data loading is excluded (batches are preloaded onto the device).

The FLOP bound: with k experts per routed unit, each MoE head does k times the work of a dense head, so a
compute-bound MoE step can at best run at F_dense / (F_dense + (k − 1) · F_heads) of the dense speed, where
F are the forward + backward FLOPs of one training step (``torch.utils.flop_counter``) and F_heads those of
the dense classification and regression heads. Per-anchor routing mixes the experts per feature-map position,
and a 3×3 tower's receptive fields overlap, so every expert runs on every position: its bound uses N instead
of k. "of bound" = measured ratio / FLOP-bound ratio.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from moecnn.data.coco import CocoDetection
from moecnn.data.shapes import generate_shapes
from moecnn.models import create_model


def bench(model, batches, device, steps, warmup, bf16) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-4)
    model.train()

    def step(i):
        images, targets = batches[i % len(batches)]
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            losses = model(images, targets)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    for i in range(warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    n = 0
    for i in range(steps):
        step(i)
        n += len(batches[i % len(batches)][0])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n / (time.perf_counter() - t0)


def step_flops(model, batch) -> tuple:
    """(total, heads) forward + backward FLOPs of one training step."""
    from torch.utils.flop_counter import FlopCounterMode

    images, targets = batch
    model.train()
    with FlopCounterMode(display=False) as fc:
        losses = model(images, targets)
        sum(losses.values()).backward()
    model.zero_grad(set_to_none=True)
    by_module = fc.get_flop_counts()
    heads = sum(sum(v.values()) for k, v in by_module.items() if k.endswith(".head") or k == "head"
                or k.rsplit(".", 1)[-1] == "head")
    return fc.get_total_flops(), heads


# default: every expert runs once on all FPN levels packed into one map (heads without normalisation);
# per_level*: one MoE call per level with the layer's own execution (measured choice, forced grouped, forced
# per expert, training capacity 1.25)
EXECUTIONS = {"default": {}, "per_level": {"packed": False},
              "per_level_stacked": {"packed": False, "stacked": True},
              "per_level_per_expert": {"packed": False, "stacked": False},
              "per_level_capacity": {"packed": False, "capacity_factor": 1.25}}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--arch", default="resnet18", choices=["resnet18", "resnet50"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--num-experts", type=int, default=4)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--routing", nargs="+", default=["level"], choices=["level", "anchor"])
    p.add_argument("--executions", nargs="+", default=["default"], choices=list(EXECUTIONS))
    p.add_argument("--moe-heads", default="both", choices=["both", "cls", "reg"])
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--channels-last", action="store_true",
                   help="models in channels_last (NHWC) memory format, as train.channels_last=true does")
    p.add_argument("--freeze-backbone", action="store_true")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        n_img = max(args.batch * 4, 8)
        paths = generate_shapes(tmp, num_train=n_img, num_val=1, image_size=args.image_size, seed=0)
        ds = CocoDetection(paths["train_json"], paths["train_images"])
        batches = []
        for s in range(0, len(ds) - args.batch + 1, args.batch):
            items = [ds[i] for i in range(s, s + args.batch)]
            batches.append((
                [im.to(device) for im, _ in items],
                [{k: v.to(device) for k, v in t.items()} for _, t in items],
            ))

    common = dict(num_classes=ds.num_classes, min_size=args.image_size, max_size=args.image_size,
                  freeze_backbone=args.freeze_backbone, anchor_sizes=(16, 32, 64, 128, 256))
    results = {"device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
               "arch": args.arch, "batch": args.batch, "image_size": args.image_size, "steps": args.steps,
               "bf16": args.bf16, "channels_last": args.channels_last, "num_experts": args.num_experts, "k": args.k, "rows": []}
    mf = torch.channels_last if args.channels_last else torch.contiguous_format
    dense = create_model(f"retinanet_{args.arch}_fpn", **common).to(device, memory_format=mf)
    f_total, f_heads = step_flops(dense, batches[0])
    bounds = {r: f_total / (f_total + ((args.k if r == "level" else args.num_experts) - 1) * f_heads)
              for r in ("level", "anchor")}
    bound = bounds["level"]
    results.update(dense_images_per_s=bench(dense, batches, device, args.steps, args.warmup, args.bf16),
                   step_gflops=f_total / 1e9, head_share=f_heads / f_total, flop_bound_ratio=bounds)
    del dense
    for routing in args.routing:
        for ex in args.executions:
            torch.manual_seed(0)
            moe = create_model(f"retinanet_{args.arch}_fpn_moe", num_experts=args.num_experts, k=args.k,
                               routing=routing, moe_heads=args.moe_heads, **EXECUTIONS[ex], **common).to(device, memory_format=mf)
            ips = bench(moe, batches, device, args.steps, args.warmup, args.bf16)
            ratio = ips / results["dense_images_per_s"]
            results["rows"].append({"routing": routing, "execution": ex, "images_per_s": ips, "ratio": ratio,
                                    "bound": bounds[routing], "of_bound": ratio / bounds[routing]})
            del moe
    print(f"RetinaNet {args.arch}-FPN, {args.image_size} px, batch {args.batch}, bf16={args.bf16}, channels_last={args.channels_last}, "
          f"{results['device']}: dense {results['dense_images_per_s']:.1f} images/s; heads are "
          f"{100 * results['head_share']:.0f}% of the step's {results['step_gflops']:.0f} GFLOP, so k={args.k} "
          f"full-head experts bound the MoE at {bound:.3f}x dense (per-anchor routing, all {args.num_experts} "
          f"experts: {bounds['anchor']:.3f}x)")
    print("| routing | execution | images/s | MoE / dense | FLOP bound | of bound |\n|---|---|---|---|---|---|")
    for r in results["rows"]:
        print(f"| {r['routing']} | {r['execution']} | {r['images_per_s']:.1f} | {r['ratio']:.3f} | {r['bound']:.3f} | "
              f"{100 * r['of_bound']:.0f}% |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
