"""MoE layer and model step timings, measured side by side in one run (a benchmark, not a test).

    python benchmarks/bench_moe.py [--device cuda] [--batch 512] [--out results.json]
    python benchmarks/bench_moe.py --smoke                     # CPU, tiny sizes: checks the script

1. ResBlock-MoE at stage 4 of a CIFAR ResNet-18 (N=4, k=2), forward+backward of the stage alone, every
   execution (default, exact variable sizes, bucketed per expert / stacked, capacity) vs (a) a dense reference
   running every expert on every image, (b) a per-expert masked loop (boolean indexing, one host sync per
   expert), (c) the dense stage it replaced.
2. Sweep N ∈ {4, 8, 16}, k ∈ {1, 2} of the sparse layer.
3. Whole-model train step (bf16 autocast, channels_last on CUDA): dense ResNet-18 vs ResBlock-MoE ResNet-18.
4. Grouped execution of N experts on padded buffers (masked BatchNorm): channel stacking (what the layer uses)
   vs ``torch.func`` vmap over the experts' stacked state, per block family: time and agreement.
Times are medians of CUDA-event (or wall-clock on CPU) timings after warm-up.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from moecnn.layers import MoE, StackedExperts
from moecnn.layers.grouped import ExpertContext, _bn_args
from moecnn.models import create_model
from moecnn.models.cifar_resnet import BasicBlock, _expert


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


def stage4_moe(n: int, k: int, **kw) -> MoE:
    experts = [_expert(BasicBlock, 256, 512, 2, 180) for _ in range(n)]
    return MoE(experts, k=k, noisy=False, **kw)


# ---------------------------------------------------------------- the evaluated alternative: vmap
class _VmapMasked(ExpertContext):
    """Per-expert masked BatchNorm written with plain ops (functorch cannot vmap our autograd.Function)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.batch_norm:
            x, rm, rv, w, b, training, momentum, eps = _bn_args(*args, **(kwargs or {}))
            if training or rm is None:
                m = self.valid.to(x.dtype).view(-1, *[1] * (x.dim() - 1))
                red = [0] + list(range(2, x.dim()))
                sh = (1, -1) + (1,) * (x.dim() - 2)
                n = self.valid.sum() * math.prod(x.shape[2:])
                mean = (x * m).sum(red) / n.clamp_min(1)
                d = (x - mean.view(sh)) * m
                var = torch.where(n > 0, (d * d).sum(red) / n.clamp_min(1), 1.0)
                y = (x - mean.view(sh)) * torch.rsqrt(var + eps).view(sh)
                y = y * w.view(sh) + b.view(sh) if w is not None else y
                if training and rm is not None:
                    with torch.no_grad():
                        step = (n > 0).to(rm.dtype) * momentum
                        rm.copy_(rm + step * (mean - rm))
                        rv.copy_(rv + step * (var * n / (n - 1).clamp_min(1) - rv))
                return y
        return func(*args, **(kwargs or {}))


def vmap_grouped(stk: StackedExperts, xb: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """N experts on ``N·cap`` expert-major rows with ``torch.func.vmap`` over their stacked parameters and buffers
    (the ``stack_module_state`` layout), buffers written back; the alternative to channel stacking."""
    experts = list(stk)
    n, cap = len(experts), xb.shape[0] // len(experts)
    if not hasattr(stk, "_vmap_template"):
        object.__setattr__(stk, "_vmap_template", copy.deepcopy(experts[0]))
    tmpl = stk._vmap_template
    tmpl.train(stk.training)
    names = [k for k, _ in tmpl.named_parameters()] + [k for k, _ in tmpl.named_buffers()]
    state = {k: torch.stack([e.get_parameter(k) if k in dict(e.named_parameters()) else e.get_buffer(k)
                             for e in experts]) for k in names}

    def one(st, x, v):
        with _VmapMasked(1, v, cap):
            return functional_call(tmpl, st, (x,))

    y = vmap(one, randomness="different")(state, xb.view(n, cap, *xb.shape[1:]), valid.T.contiguous())
    if stk.training:
        with torch.no_grad():
            idle = ~valid.any(0)
            for k, _ in tmpl.named_buffers():
                t = state[k]
                if k.endswith("num_batches_tracked"):
                    t = t - idle.to(t.dtype)
                for e, v in zip(experts, t.unbind(0)):
                    e.get_buffer(k).copy_(v)
    return y.reshape(n * cap, *y.shape[2:])


def grouped_families(device, dtype, mf, smoke: bool):
    """(name, experts, input shape) of the block families compared in section 4."""
    import timm

    c = 32 if smoke else 256
    b = 8 if smoke else 256
    return [
        ("ResBlock-MoE expert (BasicBlock ×2, BN)", [_expert(BasicBlock, c, c, 1, c // 2) for _ in range(4)],
         (b, c, 8, 8)),
        ("timm ConvNeXt block (NHWC LayerNorm, Linear, layer scale)",
         [timm.models.convnext.ConvNeXtBlock(c, ls_init_value=0.5) for _ in range(4)], (b, c, 14, 14)),
        ("timm EfficientNet block (BatchNormAct2d, depthwise, SE)",
         [timm.models._efficientnet_blocks.InvertedResidual(c // 2, c // 2, exp_ratio=4.0, se_layer=partial_se())
          for _ in range(4)], (b, c // 2, 14, 14)),
    ]


def partial_se():
    from functools import partial

    from timm.models._efficientnet_blocks import SqueezeExcite

    return partial(SqueezeExcite, rd_ratio=0.25)


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
    ap.add_argument("--smoke", action="store_true", help="CPU, batch 8, 2 iterations: checks that it runs")
    args = ap.parse_args()
    if args.smoke:
        args.device, args.batch, args.iters, args.warmup = "cpu", 8, 2, 1
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

    # 1. one layer, several executions (same weights)
    torch.manual_seed(0)
    moe = stage4_moe(4, 2).to(device, memory_format=mf)
    dense_stage = nn.Sequential(BasicBlock(256, 512, 2), BasicBlock(512, 512)).to(device, memory_format=mf)
    executions = {
        "sparse MoE, default (bucketed, stacked=None)": {},
        "sparse MoE, exact variable sub-batch sizes": dict(stacked=False, bucketed=False),
        "sparse MoE, bucketed per expert": dict(stacked=False),
        "sparse MoE, bucketed stacked": dict(stacked=True),
        "sparse MoE, capacity 1.25 per expert (sync-free)": dict(stacked=False, capacity_factor=1.25),
        "sparse MoE, capacity 1.25 stacked (sync-free)": dict(stacked=True, capacity_factor=1.25),
    }
    layer_rows = {}
    for name, kw in executions.items():
        m = stage4_moe(4, 2, **kw).to(device, memory_format=mf)
        m.load_state_dict(moe.state_dict())
        layer_rows[name] = m
    layer_rows.update({
        "(a) dense reference, all experts on all images": DenseReference(moe),
        "(b) per-expert masked loop": MaskedLoop(moe),
        "(c) dense stage it replaced": dense_stage,
    })
    layer_ms = {name: timeit(layer_step(mod, x, device, amp), device, args.warmup, args.iters) for name, mod in layer_rows.items()}
    results["layer_fwd_bwd_ms"] = layer_ms

    # 2. sweep N, k
    sweep = {}
    for mode, kw in (("default", {}), ("stacked, capacity 1.25", dict(capacity_factor=1.25, stacked=True))):
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
        "ResBlock-MoE ResNet-18 (p=4, N=4, k=2, kl), default": moe_kw,
        "ResBlock-MoE ResNet-18, exact variable sizes": dict(moe_kw, stacked=False, bucketed=False),
        "ResBlock-MoE ResNet-18, capacity 1.25": dict(moe_kw, capacity_factor=1.25, stacked=False),
        "ResBlock-MoE ResNet-18, stacked experts, capacity 1.25": dict(moe_kw, capacity_factor=1.25, stacked=True),
    }.items():
        # variable per-expert batch sizes: cuDNN autotuning would re-tune every one of them inside the timed
        # steps, so that execution runs with autotuning off (as the training loop does)
        if cuda:
            torch.backends.cudnn.benchmark = args.cudnn_benchmark == "on" and "variable" not in name
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

    # 4. channel stacking vs vmap, per block family (masked BatchNorm, one idle expert)
    grouped = {}
    for fam, experts, shape in grouped_families(device, None, mf, args.smoke):
        stk = StackedExperts(experts, shape[1]).to(device, memory_format=mf).train()
        n, cap = 4, shape[0] * 2 // 4
        xb = torch.randn(n * cap, *shape[1:], device=device).contiguous(memory_format=mf).requires_grad_()
        counts = torch.tensor([cap, cap - 3, 0, cap // 2], device=device)
        valid = torch.arange(cap, device=device)[:, None] < counts[None, :]
        real = valid.T.reshape(-1)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            a, b = stk(xb, valid), vmap_grouped(stk, xb, valid)
        row = {"max |channel − vmap| on real rows": float((a[real].float() - b[real].float()).abs().max())}
        for eng, fn in (("channel stacking", lambda: stk(xb, valid)), ("vmap", lambda: vmap_grouped(stk, xb, valid))):
            def run(fn=fn):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    y = fn()
                y.float().square().mean().backward()

            row[eng + " ms"] = timeit(run, device, args.warmup, args.iters)
        grouped[fam] = row
    results["grouped_fwd_bwd"] = grouped

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
    print("\n| grouped execution of 4 experts (fwd+bwd) | channel stacking ms | vmap ms | max difference |\n|---|---|---|---|")
    for fam, row in grouped.items():
        print(f"| {fam} | {row['channel stacking ms']:.2f} | {row['vmap ms']:.2f} | "
              f"{row['max |channel − vmap| on real rows']:.2e} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
