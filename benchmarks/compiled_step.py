"""The training step of the `fast_moe_compiled` layer setup under torch.compile with CUDA graphs, for whichever
moecnn is importable — run it once per version (``PYTHONPATH=OTHER/src``) to compare versions on one machine
(a benchmark, not a test).

    python benchmarks/compiled_step.py [--dense] [--top 30]

ResNet-18 (CIFAR), ResBlock-MoE at stage 4 (N = 4, k = 2, KL 0.5), stacked experts, training capacity 1.25,
channels_last, bf16 autocast, SGD Nesterov (foreach), batch 512 of 16 distinct random batches — the step of
``profile_step.py`` (its ``make_step``); 20 warm-up steps (compilation), then two timings of 80 steps, then the GPU
kernels of 10 steps by time (torch.profiler).
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import moecnn
from _timing import device_setup, random_batches, time_steps
from moecnn.models import create_model
from profile_step import MOE, make_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", action="store_true", help="the dense ResNet-18 instead")
    ap.add_argument("--top", type=int, default=30, help="kernels to list")
    args = ap.parse_args()
    print("moecnn from", moecnn.__file__)
    dev, _, sync, mf = device_setup("cuda")
    torch.backends.cudnn.benchmark = True
    batches, labels = random_batches(16, 512, 32, 100, dev, mf)
    kw = dict(moe="none") if args.dense else {**MOE, "stacked": True, "capacity_factor": 1.25}
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=100, **kw).to(dev, memory_format=mf)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4, foreach=True)
    step = make_step(torch.compile(model, mode="reduce-overhead"), opt, batches, labels, dev)
    warm_s, ms, _ = time_steps(step, sync, 20, 80)
    print(f"warm-up {warm_s:.1f} s")
    print(f"ms/step {ms:.3f}")
    print(f"ms/step {time_steps(step, sync, 0, 80)[1]:.3f}")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step()
        sync()
    ker = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and "#" not in e.key
           and "Profiler" not in e.key]
    print(f"kernels: {sum(e.count for e in ker) // 10} per step")
    for e in sorted(ker, key=lambda e: -e.self_device_time_total)[:args.top]:
        print(f"  {e.self_device_time_total / 1e4:7.3f} ms x{e.count // 10:4d} {e.key[:100]}")


if __name__ == "__main__":
    main()
