"""Operations per RetinaNet training step, dense heads vs MoE heads per level vs packed (a benchmark, not a test).

    python benchmarks/count_detection_ops.py [--image-size 256] [--batch 8]

Counts every ATen operation (``TorchDispatchMode``) of one forward and backward on the CPU (ResNet-18-FPN,
N = 4, k = 2, per-level routing). A detection step is limited by the host launching kernels, so the count
predicts what the MoE heads add to a GPU step better than their FLOPs do.
"""
from __future__ import annotations

import argparse
import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moecnn.models import create_model


class Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    s = args.image_size
    torch.manual_seed(0)
    images = [torch.rand(3, s, s) for _ in range(args.batch)]
    targets = [{"boxes": torch.tensor([[0.1 * s, 0.1 * s, 0.4 * s, 0.4 * s]]), "labels": torch.tensor([1])}
               for _ in range(args.batch)]
    common = dict(num_classes=3, min_size=s, max_size=s, anchor_sizes=(16, 32, 64, 128, 256))
    moe = dict(num_experts=4, k=2, routing="level")
    print("| heads | operations forward | forward + backward |\n|---|---|---|")
    for name, model_name, kw in (("dense", "retinanet_resnet18_fpn", {}),
                                 ("MoE, one call per level", "retinanet_resnet18_fpn_moe", dict(moe, packed=False)),
                                 ("MoE, packed levels (default)", "retinanet_resnet18_fpn_moe", moe)):
        model = create_model(model_name, **kw, **common).train()
        sum(model(images, targets).values()).backward()  # first-call checks outside the count
        count = Count()
        with count:
            losses = model(images, targets)
            fwd = sum(count.ops.values())
            sum(losses.values()).backward()
        print(f"| {name} | {fwd} | {sum(count.ops.values())} |")


if __name__ == "__main__":
    main()
