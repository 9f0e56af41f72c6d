"""MoE in any CNN: train-step time of four moeified ImageNet models under every execution, as multiples of the
dense model (a benchmark, not a test).

    python benchmarks/bench_any_cnn.py --out results/bench_any_cnn.json        # GPU: 224 px, batch 128 (~6 min, H200)
    python benchmarks/bench_any_cnn.py --smoke --out /tmp/any.json             # CPU, tiny sizes: checks the script

Models (random init, never downloaded weights): torchvision resnet50, timm efficientnet_b0, timm convnext_atto,
torchvision convnext_tiny, each with two blocks moeified (``moeify(..., num_experts=4, k=2)``). Train step: bf16
autocast, channels_last, SGD (foreach), cross-entropy + the MoE auxiliary loss, distinct random batches per step.
Executions: dense; default (``MoE(...)``: bucketed buffers, stacked=None measured per shape); exact per expert
(variable sub-batch sizes, cudnn.benchmark off as the training loop sets it for them); bucketed per expert
(stacked=False); bucketed stacked (stacked=True); capacity 1.25 per expert and stacked (sync-free, drops).
Step time: the median of the timed steps, each synchronised and timed on its own (a step that meets a new
buffer shape autotunes cuDNN once, 0.5–2 s at these sizes, which a mean over a few steps would count as the
execution's cost; the JSON keeps every step and the mean). Prints one table (median ms/step, × dense, GPU
kernel ms) and writes JSON with ``--out``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics

import torch
import torch.nn.functional as F

import moecnn
from _timing import device_setup, kernel_ms, random_batches, step_times, write_results

MODELS = {  # name: (library, constructor name, two blocks to moeify)
    "resnet50": ("torchvision", "resnet50", ["layer3.1", "layer4.1"]),
    "efficientnet_b0": ("timm", "efficientnet_b0", ["blocks.4.1", "blocks.5.1"]),
    "convnext_atto": ("timm", "convnext_atto", ["stages.2.blocks.1", "stages.3.blocks.1"]),
    "convnext_tiny": ("torchvision", "convnext_tiny", ["features.5.1", "features.7.1"]),
}
EXECUTIONS = {  # name: (MoE kwargs or None for dense, cudnn.benchmark)
    "dense": (None, True),
    "default": ({}, True),
    "exact_per_expert": (dict(stacked=False, bucketed=False), False),
    "bucketed_per_expert": (dict(stacked=False), True),
    "bucketed_stacked": (dict(stacked=True), True),
    "capacity1.25_per_expert": (dict(stacked=False, capacity_factor=1.25), True),
    "capacity1.25_stacked": (dict(stacked=True, capacity_factor=1.25), True),
}


def build(name: str, moe_kw):
    lib, ctor, blocks = MODELS[name]
    torch.manual_seed(0)
    if lib == "timm":
        import timm

        model = timm.create_model(ctor, pretrained=False)
    else:
        import torchvision

        model = getattr(torchvision.models, ctor)()
    if moe_kw is not None:
        moecnn.moeify(model, blocks, num_experts=4, k=2, balance={"kl": 0.5}, seed=0, **moe_kw)
    return model


def train_step(model, opt, batches, labels, dev):
    """One training step per call (bf16 autocast on CUDA, cross-entropy + the MoE auxiliary loss, SGD), cycling
    through ``batches``."""
    layers = moecnn.moe_layers(model)
    i = [0]

    def step():
        x, y = batches[i[0] % len(batches)], labels[i[0] % len(labels)]
        i[0] += 1
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss = F.cross_entropy(model(x).float(), y) + moecnn.aux_loss(layers)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write the results as JSON to this file")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--executions", default=",".join(EXECUTIONS))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="CPU, batch 4, 64 px, 2 steps: checks that it runs")
    args = ap.parse_args()
    if args.smoke:
        args.device, args.batch, args.size, args.steps, args.warmup = "cpu", 4, 64, 2, 1
    dev, cuda, sync, mf = device_setup(args.device)
    batches, labels = random_batches(4, args.batch, args.size, 1000, dev, mf)
    results = {"device": torch.cuda.get_device_name(dev) if cuda else "cpu", "torch": torch.__version__,
               "date": datetime.date.today().isoformat(), "batch": args.batch, "size": args.size,
               "precision": "bf16 autocast" if cuda else "fp32", "runs": {}}
    print(f"# {results['device']}, torch {torch.__version__}, batch {args.batch}, {args.size} px", flush=True)
    for mname in args.models.split(","):
        for ename in args.executions.split(","):
            moe_kw, bench = EXECUTIONS[ename]
            torch.backends.cudnn.benchmark = bench
            row = {}
            try:
                model = build(mname, moe_kw).to(dev, memory_format=mf).train()
                layers = moecnn.moe_layers(model)
                opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=True)
                step = train_step(model, opt, batches, labels, dev)
                row["warmup_s"], row["step_ms"] = step_times(step, sync, args.warmup, args.steps)
                row["ms"] = statistics.median(row["step_ms"])
                row["ms_mean"] = statistics.fmean(row["step_ms"])
                row["kernel_ms"] = kernel_ms(step, sync, min(5, args.steps)) if cuda else None
                row["executions"] = {n: m.executions for n, m in layers.items()}
                row["static_shapes"] = all(m.static_shapes for m in layers.values())
                row["dropped"] = {n: float(m.record.dropped) for n, m in layers.items()
                                  if m.record is not None and m.record.dropped is not None}
            except Exception as e:  # report and go on
                if os.environ.get("BENCH_RAISE"):
                    raise
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            results["runs"].setdefault(mname, {})[ename] = row
            print(f"{mname} / {ename}: " + (row.get("error") or f"{row['ms']:.1f} ms/step"), flush=True)
            model = opt = None
            if cuda:
                torch.cuda.empty_cache()
    names = args.executions.split(",")
    table = ["| model | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for mname, runs in results["runs"].items():
        dense = runs.get("dense", {}).get("ms")
        cells = []
        for e in names:
            r = runs.get(e, {})
            if "ms" not in r:
                cells.append("failed")
            elif dense and e != "dense":
                kern = f", {r['kernel_ms']:.0f} ms GPU" if r.get("kernel_ms") is not None else ""
                cells.append(f"{r['ms'] / dense:.2f}× ({r['ms']:.0f} ms{kern})")
            else:
                cells.append(f"{r['ms']:.0f} ms" + (f" ({r['kernel_ms']:.0f} ms GPU)" if r.get("kernel_ms") else ""))
        table.append(f"| {mname} | " + " | ".join(cells) + " |")
    write_results(results, table, args.out)


if __name__ == "__main__":
    main()
