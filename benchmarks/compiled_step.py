"""The training step of the `fast_moe_compiled` layer setup under torch.compile with CUDA graphs, for whichever
moecnn is importable — run it once per version (``PYTHONPATH=OTHER/src``) to compare versions on one machine
(a benchmark, not a test).

    python benchmarks/compiled_step.py [--dense] [--top 30]

ResNet-18 (CIFAR), ResBlock-MoE at stage 4 (N = 4, k = 2, KL 0.5), stacked experts, training capacity 1.25,
channels_last, bf16 autocast, SGD Nesterov (foreach), batch 512 of 16 distinct random batches; 20 warm-up steps
(compilation), then two timings of 80 steps, then the GPU kernels of 10 steps by time (torch.profiler).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import moecnn
from moecnn import aux_loss, moe_layers
from moecnn.models import create_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", action="store_true", help="the dense ResNet-18 instead")
    ap.add_argument("--top", type=int, default=30, help="kernels to list")
    args = ap.parse_args()
    print("moecnn from", moecnn.__file__)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    dev, mf = torch.device("cuda"), torch.channels_last
    g = torch.Generator(device=dev).manual_seed(0)
    xs = [torch.randn(512, 3, 32, 32, device=dev, generator=g).contiguous(memory_format=mf) for _ in range(16)]
    ys = [torch.randint(0, 100, (512,), device=dev, generator=g) for _ in range(16)]
    kw = dict(moe="none") if args.dense else dict(moe="resblock", position=4, num_experts=4, k=2,
                                                  balance={"kl": 0.5}, stacked=True, capacity_factor=1.25)
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=100, **kw).to(dev, memory_format=mf)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4, foreach=True)
    layers = moe_layers(model)
    run = torch.compile(model, mode="reduce-overhead")
    i = [0]

    def step():
        x, y = xs[i[0] % 16], ys[i[0] % 16]
        i[0] += 1
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = run(x)
            loss = F.cross_entropy(out.float(), y, label_smoothing=0.1) + (aux_loss(layers)[0] if layers else 0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t0 = time.perf_counter()
    for _ in range(20):
        step()
    torch.cuda.synchronize()
    print(f"warm-up {time.perf_counter() - t0:.1f} s")
    for _ in range(2):
        t0 = time.perf_counter()
        for _ in range(80):
            step()
        torch.cuda.synchronize()
        print(f"ms/step {(time.perf_counter() - t0) / 80 * 1e3:.3f}")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    ker = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and "#" not in e.key
           and "Profiler" not in e.key]
    print(f"kernels: {sum(e.count for e in ker) // 10} per step")
    for e in sorted(ker, key=lambda e: -e.self_device_time_total)[:args.top]:
        print(f"  {e.self_device_time_total / 1e4:7.3f} ms x{e.count // 10:4d} {e.key[:100]}")


if __name__ == "__main__":
    main()
