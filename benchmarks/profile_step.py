"""Whole-model train step of dense ResNet-18 and ResBlock-MoE ResNet-18 (p4, N=4, k=2) under several executions,
side by side, with each variant's GPU kernel time and FLOPs (a benchmark, not a test).

    python benchmarks/profile_step.py --out results/profile_step.json          # GPU, batch 512 (~10 min on an H200)
    python benchmarks/profile_step.py --smoke --out /tmp/p.json                # CPU, tiny sizes: checks the script

Groups (one table, ratios to the dense variant of the same group):
  compiled  : torch.compile (default mode) dense vs MoE at default settings, and the sync-free capacity recipe
              (stacked, capacity 1.25; also reduce-overhead = CUDA graphs)
  eager     : dense vs MoE default (stacked=None: measured choice), forced stacked, forced per expert, capacity,
              and the former exact dispatch (variable shapes, cudnn.benchmark off)
  N sweep   : N=4 k=1 vs N=16 k=1 (cost should follow k, not N), eager and compiled
Columns: wall ms/step (CIFAR-100-shaped batch, bf16 autocast, channels_last, SGD foreach, the loop's aux loss,
distinct random batches per step so routing moves as in training), GPU kernel ms/step (torch.profiler, sum of
CUDA kernel self time), GFLOP per step as executed (FlopCounterMode on one step: padding rows included) and the
useful GFLOP (exact dispatch: every routed image once). The FLOP reference for the MoE model is useful GFLOP
MoE / dense: k=2 experts of width P=180 plus the skip cost about the dense stage; wall time above kernel time is
host overhead (launches, syncs), kernel time above the FLOP ratio is kernel efficiency (small or grouped GEMMs).
"""
from __future__ import annotations

import argparse
import datetime
import os

import torch
import torch.nn.functional as F

from _timing import device_setup, kernel_ms, random_batches, time_steps, write_results
from moecnn import aux_loss, moe_layers
from moecnn.models import create_model

MOE = dict(moe="resblock", position=4, num_experts=4, k=2, balance={"kl": 0.5})
K1 = dict(MOE, k=1)
# name: (group, model kwargs, cudnn.benchmark, compile mode or None)
VARIANTS = {
    "dense_compile": ("compiled", dict(moe="none"), True, "default"),
    "moe_compile": ("compiled", MOE, True, "default"),
    "moe_stacked_cap1.25_compile": ("compiled", {**MOE, "stacked": True, "capacity_factor": 1.25}, True, "default"),
    "dense_compile_ro": ("compiled", dict(moe="none"), True, "reduce-overhead"),
    "moe_stacked_cap1.25_compile_ro": ("compiled", {**MOE, "stacked": True, "capacity_factor": 1.25}, True,
                                       "reduce-overhead"),
    "moe_experts_cap1.25_compile_ro": ("compiled", {**MOE, "stacked": False, "capacity_factor": 1.25}, True,
                                       "reduce-overhead"),
    "dense": ("eager", dict(moe="none"), True, None),
    "moe_default": ("eager", MOE, True, None),
    "moe_stacked": ("eager", {**MOE, "stacked": True}, True, None),
    "moe_experts": ("eager", {**MOE, "stacked": False}, True, None),
    "moe_stacked_cap1.25": ("eager", {**MOE, "stacked": True, "capacity_factor": 1.25}, True, None),
    "moe_experts_cap1.25": ("eager", {**MOE, "stacked": False, "capacity_factor": 1.25}, True, None),
    "moe_exact_variable_shapes": ("eager", {**MOE, "stacked": False, "bucketed": False}, False, None),
    "n4k1": ("N sweep", K1, True, None),
    "n16k1": ("N sweep", dict(K1, num_experts=16), True, None),
    "n4k1_compile": ("N sweep", K1, True, "default"),
    "n16k1_compile": ("N sweep", dict(K1, num_experts=16), True, "default"),
}
BASE = {"compiled": "dense_compile", "eager": "dense", "N sweep": "n4k1"}


def raw_of(model):
    return getattr(model, "_orig_mod", model)


def make_step(model, opt, batches, labels, dev):
    i = [0]
    layers = moe_layers(raw_of(model))

    def step():
        x = batches[i[0] % len(batches)]
        y = labels[i[0] % len(labels)]
        i[0] += 1
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            out = model(x)
            loss = F.cross_entropy(out.float(), y, label_smoothing=0.1) + aux_loss(layers)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step


def step_flops(kw, width, batch, dev, useful: bool) -> float:
    """GFLOP of one forward+backward as executed (or, ``useful``, with exact dispatch: no padding rows)."""
    from torch.utils.flop_counter import FlopCounterMode

    if useful and kw.get("moe", "none") != "none":
        kw = {**kw, "stacked": False, "bucketed": False, "capacity_factor": None}
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=100, width=width, **kw).to(dev)
    x = torch.randn(batch, 3, 32, 32, device=dev)
    model(x).float().square().mean().backward()  # first-call checks and the execution choice happen here
    with FlopCounterMode(display=False) as fc:
        model(x).float().square().mean().backward()
    return fc.get_total_flops() / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write the results as JSON to this file")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=15)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--width", type=int, default=64, help="ResNet base width (64 = ResNet-18)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="CPU, batch 8, width 8, 2 steps: checks that it runs")
    args = ap.parse_args()
    if args.smoke:
        args.device, args.batch, args.width, args.steps, args.warmup = "cpu", 8, 8, 2, 1
    dev, cuda, sync, mf = device_setup(args.device)
    batches, labels = random_batches(16, args.batch, 32, 100, dev, mf)
    results = {"device": torch.cuda.get_device_name(dev) if cuda else "cpu", "torch": torch.__version__,
               "date": datetime.date.today().isoformat(), "batch": args.batch, "width": args.width,
               "steps": args.steps, "variants": {}}
    print(f"# {results['device']}, torch {torch.__version__}, batch {args.batch}, width {args.width}", flush=True)
    for name in args.variants.split(","):
        group, kw, bench, mode = VARIANTS[name]
        torch.backends.cudnn.benchmark = bench
        torch.manual_seed(0)
        model = create_model("resnet18", num_classes=100, width=args.width, **kw).to(dev, memory_format=mf)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4,
                              foreach=True)
        run = torch.compile(model, mode=mode) if mode else model
        step = make_step(run, opt, batches, labels, dev)
        row = {"group": group, "compile": mode, "cudnn_benchmark": bench}
        try:
            row["warmup_s"], row["ms"], loss = time_steps(step, sync, args.warmup, args.steps)
            row["loss"] = float(loss)
            row["kernel_ms"] = kernel_ms(step, sync, min(10, args.steps)) if cuda else None
            layers = moe_layers(model)
            row["executions"] = {n: m.executions for n, m in layers.items()}
            row["static_shapes"] = all(m.static_shapes for m in layers.values())
            row["gflop"] = step_flops(kw, args.width, args.batch, dev, useful=False)
            row["gflop_useful"] = step_flops(kw, args.width, args.batch, dev, useful=True)
        except Exception as e:  # report and go on
            if os.environ.get("PROFILE_STEP_RAISE"):
                raise
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        results["variants"][name] = row
        msg = row.get("error") or (f"{row['ms']:.2f} ms/step, kernels {row['kernel_ms'] or 0:.2f} ms, "
                                   f"{row['gflop']:.1f} GFLOP (useful {row['gflop_useful']:.1f}), "
                                   f"warm-up {row['warmup_s']:.1f} s")
        print(f"{name}: {msg}", flush=True)
        del model, opt, run
        if cuda:
            torch.cuda.empty_cache()
    table = ["| group | variant | ms/step | × base | GPU kernel ms | × base | GFLOP executed | GFLOP useful | "
             "× base (useful) |", "|---|---|---|---|---|---|---|---|---|"]
    v = results["variants"]
    for name, row in v.items():
        base = v.get(BASE[row["group"]], {})
        if "error" in row:
            table.append(f"| {row['group']} | {name} | failed: {row['error'][:80]} | | | | | | |")
            continue

        def ratio(key, row=row, base=base):
            return f"{row[key] / base[key]:.2f}" if base.get(key) and row.get(key) is not None else "-"

        kern = f"{row['kernel_ms']:.2f}" if row["kernel_ms"] is not None else "-"
        table.append(f"| {row['group']} | {name} | {row['ms']:.2f} | {ratio('ms')} | {kern} | {ratio('kernel_ms')} | "
                     f"{row['gflop']:.1f} | {row['gflop_useful']:.1f} | {ratio('gflop_useful')} |")
    write_results(results, table, args.out)


if __name__ == "__main__":
    main()
