"""Epoch time of the GPU-resident fast path vs a standard torch DataLoader pipeline, same model, one run.

    python benchmarks/bench_loader.py [--data cifar100 --root /tmp/c100] [--batch 512] [--steps 60]

For the dense ResNet-18 and the ResBlock-MoE ResNet-18 (p=4, N=4, k=2, KL), trains ``--steps`` steps with
each loader (crop + flip augmentation, bf16 autocast and channels_last on CUDA) and prints images/s and
the ratio fast/DataLoader, measured side by side in one process (a benchmark, not a test).
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import moecnn
from moecnn.data import AugmentConfig, DataConfig, build_data, make_loader
from moecnn.models import create_model


def images_per_s(model, loader, steps: int, device: torch.device) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, foreach=True)
    amp = device.type == "cuda"
    done, t0, counted = 0, None, 0
    loader.set_epoch(0)
    while done < steps + 5:
        for x, y in loader:
            if done == 5:  # warm-up steps excluded
                if amp:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = nn.functional.cross_entropy(model(x), y) + moecnn.aux_loss(model)[0]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            counted += x.shape[0] if done > 5 else 0
            if done >= steps + 5:
                break
    if amp:
        torch.cuda.synchronize()
    return counted / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="synthetic")
    ap.add_argument("--root", default=None)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--model", default="resnet18")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    bundle = build_data(DataConfig(name=args.data, root=args.root, val_size=0))
    aug = AugmentConfig(crop_padding=4, flip=True)
    cl = device.type == "cuda"
    rows = []
    for name, kw in {"dense": dict(moe="none"),
                     "ResBlock-MoE p=4 N=4 k=2 (stacked, capacity 1.25)": dict(
                         moe="resblock", position=4, num_experts=4, k=2, balance={"kl": 0.5}, capacity_factor=1.25,
                         stacked=True)}.items():
        res = {}
        for path, gpu_resident in (("fast path", True), ("DataLoader", False)):
            torch.manual_seed(0)
            model = create_model(args.model, num_classes=bundle.num_classes, in_channels=bundle.in_channels, **kw)
            model = model.to(device, memory_format=torch.channels_last if cl else torch.contiguous_format)
            loader = make_loader(bundle.train, args.batch, train=True, device=device, mean=bundle.mean, std=bundle.std,
                                 augment=aug, channels_last=cl, num_workers=args.workers, gpu_resident=gpu_resident)
            res[path] = images_per_s(model, loader, args.steps, device)
        rows.append((name, res["fast path"], res["DataLoader"]))
    print(f"\n## {args.model} on {args.data}, batch {args.batch}, {args.steps} steps, "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")
    print("| model | fast path img/s | DataLoader img/s | fast / DataLoader |\n|---|---|---|---|")
    for name, fast, dl in rows:
        print(f"| {name} | {fast:.0f} | {dl:.0f} | {fast / dl:.2f} |")


if __name__ == "__main__":
    main()
