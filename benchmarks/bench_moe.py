"""MoE layer and model step timings, measured side by side in one run (a benchmark, not a test).

    python benchmarks/bench_moe.py [--device cuda] [--batch 512] [--out results.json]

1. ResBlock-MoE at stage 4 of a CIFAR ResNet-18 (N=4, k=2), forward+backward of the stage alone:
   sparse dispatch (exact and static-capacity) vs (a) a dense reference running every expert on every
   image, (b) a per-expert masked loop (boolean indexing, one host sync per expert), (c) the dense stage it
   replaced.
2. Sweep N ∈ {4, 8, 16}, k ∈ {1, 2} of the sparse layer.
3. Whole-model train step (bf16 autocast, channels_last on CUDA): dense ResNet-18 vs ResBlock-MoE ResNet-18.
Times are medians of CUDA-event (or wall-clock on CPU) timings after warm-up.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from moecnn.models import create_model
from moecnn.models.cifar_resnet import BasicBlock, _expert
from moecnn.layers import MoE


def timeit(fn, device, warmup=3, iters=20) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def sparse_gate(m: MoE, x: torch.Tensor) -> torch.Tensor:
    """B×N top-k softmax weights of the layer's gate (float32, no noise)."""
    with torch.autocast(x.device.type, enabled=False):
        logits = m.gate(x.float()).float()
    vals, idx = logits.topk(m.k, dim=1)
    return torch.zeros_like(logits).scatter(1, idx, torch.softmax(vals, 1))


class _SameWeights(nn.Module):
    """Another execution of an existing MoE layer's gate and experts (same weights)."""

    def __init__(self, moe: MoE):
        super().__init__()
        self.moe = moe


class DenseReference(_SameWeights):
    """Runs every expert on every image and weights by the (sparse) gate: the naive dense MoE."""

    def forward(self, x):
        m = self.moe
        w = sparse_gate(m, x)
        return sum(w[:, i, None, None, None].to(x.dtype) * e(x) for i, e in enumerate(m.experts))


class MaskedLoop(_SameWeights):
    """Per-expert boolean masks: expert i on x[mask_i] (one host sync per expert)."""

    def forward(self, x):
        m = self.moe
        w = sparse_gate(m, x)
        y = None
        for i, e in enumerate(m.experts):
            mask = w[:, i] > 0
            if not bool(mask.any()):
                continue
            out = e(x[mask]) * w[mask, i, None, None, None].to(x.dtype)
            if y is None:
                y = torch.zeros((x.shape[0],) + out.shape[1:], device=x.device, dtype=out.dtype)
            y = y.index_put((mask.nonzero().squeeze(1),), out, accumulate=True)
        return y


def stage4_moe(n: int, k: int, capacity_factor=None, stacked=False) -> MoE:
    experts = [_expert(BasicBlock, 256, 512, 2, 180) for _ in range(n)]
    return MoE(experts, k=k, noisy=False, capacity_factor=capacity_factor, stacked=stacked)


def layer_step(module: nn.Module, x: torch.Tensor, device, amp: bool):
    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            y = module(x)
        y.float().square().mean().backward()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--cudnn-benchmark", choices=["on", "off"], default="on",
                    help="cuDNN autotuning (re-tunes for every new per-expert sub-batch size when on)")
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = args.cudnn_benchmark == "on"
    mf = torch.channels_last if cuda else torch.contiguous_format
    amp = cuda
    results: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "batch": args.batch, "torch": torch.__version__,
                     "cudnn_benchmark": args.cudnn_benchmark}
    b = args.batch
    x = torch.randn(b, 256, 8, 8, device=device).contiguous(memory_format=mf).requires_grad_()

    # 1. one layer, several executions
    torch.manual_seed(0)
    moe = stage4_moe(4, 2).to(device, memory_format=mf)
    dense_stage = nn.Sequential(BasicBlock(256, 512, 2), BasicBlock(512, 512)).to(device, memory_format=mf)
    cap = stage4_moe(4, 2, capacity_factor=1.25).to(device, memory_format=mf)
    cap.load_state_dict(moe.state_dict())
    torch.manual_seed(0)
    stk = stage4_moe(4, 2, capacity_factor=1.25, stacked=True).to(device, memory_format=mf)
    layer_rows = {
        "sparse MoE (exact dispatch)": moe,
        "sparse MoE (capacity 1.25, sync-free)": cap,
        "sparse MoE (stacked experts, capacity 1.25, sync-free)": stk,
        "(a) dense reference, all experts on all images": DenseReference(moe),
        "(b) per-expert masked loop": MaskedLoop(moe),
        "(c) dense stage it replaced": dense_stage,
    }
    layer_ms = {name: timeit(layer_step(mod, x, device, amp), device, args.warmup, args.iters) for name, mod in layer_rows.items()}
    results["layer_fwd_bwd_ms"] = layer_ms

    # 2. sweep N, k
    sweep = {}
    for mode, kw in (("exact", {}), ("stacked, capacity 1.25", dict(capacity_factor=1.25, stacked=True))):
        for n in (4, 8, 16):
            for k in (1, 2):
                torch.manual_seed(0)
                m = stage4_moe(n, k, **kw).to(device, memory_format=mf)
                sweep[f"{mode}: N={n},k={k}"] = timeit(layer_step(m, x, device, amp), device, args.warmup, args.iters)
    results["sweep_fwd_bwd_ms"] = sweep

    # 3. whole-model train step
    steps = {}
    xb = torch.randn(b, 3, 32, 32, device=device).contiguous(memory_format=mf)
    yb = torch.randint(0, 100, (b,), device=device)
    moe_kw = dict(moe="resblock", position=4, num_experts=4, k=2, balance={"kl": 0.5})
    for name, kw in {
        "dense ResNet-18": dict(moe="none"),
        "ResBlock-MoE ResNet-18 (p=4, N=4, k=2, kl), exact dispatch": moe_kw,
        "ResBlock-MoE ResNet-18, capacity 1.25": dict(moe_kw, capacity_factor=1.25),
        "ResBlock-MoE ResNet-18, stacked experts, capacity 1.25": dict(moe_kw, capacity_factor=1.25, stacked=True),
    }.items():
        # exact dispatch gives new per-expert batch sizes as routing moves: cuDNN autotuning would re-tune
        # every one of them inside the timed steps, so it runs with autotuning off (as the training loop does)
        if cuda:
            torch.backends.cudnn.benchmark = args.cudnn_benchmark == "on" and ("capacity" in name or "dense" in name)
        torch.manual_seed(0)
        model = create_model("resnet18", num_classes=100, **kw).to(device, memory_format=mf)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)

        def step(model=model, opt=opt):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out = model(xb)
                loss = nn.functional.cross_entropy(out, yb)
                from moecnn import aux_loss

                loss = loss + aux_loss(model)[0]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        steps[name] = timeit(step, device, max(args.warmup, 20), args.iters)
    results["train_step_ms"] = steps

    base = layer_ms["(c) dense stage it replaced"]
    print(f"\n## MoE layer forward+backward, batch {b}, {results['device']}, torch {torch.__version__}, "
          f"cudnn.benchmark {args.cudnn_benchmark}")
    print("| execution | ms | × dense stage |\n|---|---|---|")
    for name, ms in layer_ms.items():
        print(f"| {name} | {ms:.2f} | {ms / base:.2f} |")
    print("\n| execution: N, k | ms | × N=4,k=1 of the same execution |\n|---|---|---|")
    for name, ms in sweep.items():
        ref = sweep[name.split(":")[0] + ": N=4,k=1"]
        print(f"| {name} | {ms:.2f} | {ms / ref:.2f} |")
    d = steps["dense ResNet-18"]
    print("\n| train step | ms | × dense |\n|---|---|---|")
    for name, ms in steps.items():
        print(f"| {name} | {ms:.2f} | {ms / d:.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
