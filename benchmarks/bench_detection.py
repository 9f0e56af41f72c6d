"""Training throughput of RetinaNet with dense vs MoE heads, measured side by side in one run
(a benchmark, not a test).

    python benchmarks/bench_detection.py [--device cuda] [--arch resnet50] [--steps 30] [--batch 8]
        [--image-size 512] [--routing level] [--bf16] [--freeze-backbone] [--out results.json]

Generates a small shapes set (moecnn.data.shapes) in a temporary folder, then for each model trains
``--steps`` optimizer steps (after ``--warmup`` steps) on the same batches and prints images/s of each and
the ratio MoE / dense. Data loading is excluded (batches are preloaded onto the device).
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
    p.add_argument("--routing", default="level", choices=["level", "anchor"])
    p.add_argument("--moe-heads", default="both", choices=["both", "cls", "reg"])
    p.add_argument("--bf16", action="store_true")
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
    results = {"device": str(device), "arch": args.arch, "batch": args.batch, "image_size": args.image_size,
               "steps": args.steps, "bf16": args.bf16, "routing": args.routing}
    dense = create_model(f"retinanet_{args.arch}_fpn", **common).to(device)
    results["dense_images_per_s"] = bench(dense, batches, device, args.steps, args.warmup, args.bf16)
    del dense
    moe = create_model(f"retinanet_{args.arch}_fpn_moe", num_experts=args.num_experts, k=args.k,
                       routing=args.routing, moe_heads=args.moe_heads, **common).to(device)
    results["moe_images_per_s"] = bench(moe, batches, device, args.steps, args.warmup, args.bf16)
    results["ratio_moe_over_dense"] = results["moe_images_per_s"] / results["dense_images_per_s"]
    del moe
    stk = create_model(f"retinanet_{args.arch}_fpn_moe", num_experts=args.num_experts, k=args.k,
                       routing=args.routing, moe_heads=args.moe_heads, stacked=True, **common).to(device)
    results["moe_stacked_images_per_s"] = bench(stk, batches, device, args.steps, args.warmup, args.bf16)
    results["ratio_moe_stacked_over_dense"] = results["moe_stacked_images_per_s"] / results["dense_images_per_s"]
    print(f"dense RetinaNet {args.arch}-FPN: {results['dense_images_per_s']:.2f} images/s")
    print(f"MoE   RetinaNet {args.arch}-FPN (N={args.num_experts}, k={args.k}, {args.routing}, "
          f"{args.moe_heads}): {results['moe_images_per_s']:.2f} images/s")
    print(f"ratio MoE / dense: {results['ratio_moe_over_dense']:.3f}")
    print(f"MoE, stacked experts: {results['moe_stacked_images_per_s']:.2f} images/s, "
          f"ratio / dense: {results['ratio_moe_stacked_over_dense']:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
