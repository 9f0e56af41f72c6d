"""Wall time of every training step of a moeified ImageNet model, one synchronised step at a time (a benchmark,
not a test): shows the steps in which cuDNN autotunes a new buffer shape apart from the steady state.

    python benchmarks/step_trace.py [--model resnet50] [--steps 24] [--executions default,per_expert]
    python benchmarks/step_trace.py --smoke                                  # CPU, tiny sizes: checks the script

The model, blocks and step of ``bench_any_cnn.py`` (batch 128, 224 px, bf16 autocast, channels_last, SGD,
``cudnn.benchmark`` on); prints each step's ms and, per MoE layer, whether padded buffers are used and the
stacked/per-expert choices of the default execution.
"""
from __future__ import annotations

import argparse

import torch

import moecnn
from _timing import device_setup, random_batches, step_times
from bench_any_cnn import MODELS, build, train_step

EXECUTIONS = {"default": {}, "per_expert": dict(stacked=False), "stacked": dict(stacked=True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50", choices=list(MODELS))
    ap.add_argument("--executions", default="default,per_expert")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--smoke", action="store_true", help="CPU, batch 4, 64 px, 3 steps")
    args = ap.parse_args()
    device, batch, size, steps = ("cpu", 4, 64, 3) if args.smoke else ("cuda", 128, 224, args.steps)
    dev, cuda, sync, mf = device_setup(device)
    xs, ys = random_batches(4, batch, size, 1000, dev, mf)
    for name in args.executions.split(","):
        torch.backends.cudnn.benchmark = True
        model = build(args.model, EXECUTIONS[name]).to(dev, memory_format=mf).train()
        layers = moecnn.moe_layers(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=True)
        _, times = step_times(train_step(model, opt, xs, ys, dev), sync, 0, steps)
        print(f"{args.model} / {name}: " + " ".join(f"{t:.0f}" for t in times) + " ms")
        print("  padded buffers:", {n: m._padding for n, m in layers.items()},
              "choices:", {n: m.executions for n, m in layers.items()})
        model = opt = layers = None
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
