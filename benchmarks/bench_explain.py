"""Benchmark for issue 15 ("explain the experts"), 2 CPU cores. Two budgets, each < 2 minutes:

A. attribution + attribute tests for 1,000 images of a CIFAR-size model: ResNet-18 with a ResBlock-MoE at
   position 4 (N=4, k=2, random weights), 32×32 inputs — gate attribution (Grad-CAM of every expert's logit and
   weight on all images, IG on 4 examples per expert), expert contribution (own routing + every expert forced,
   IG of the difference on 2+2 examples per expert), figures, the six pixel-attribute tests (200 permutations)
   and Benjamini-Hochberg.
B. the full `analyze` (+ `report`) of 10,000 CIFAR-100-shaped test images WITHOUT attribution, from an
   `eval/routing_test.npz` (as `bench_analysis.py`) plus a `probe_routing.npz` (50 evaluations × 1,000 probe
   images) and a concepts CSV (2,000 labelled images): the new attribute, concept and dynamics sections included.

Real CIFAR-100 test images are used when /work/shared/data/cifar100 (or --cifar100) exists, else random images.

    PYTHONPATH=src python benchmarks/bench_explain.py [--images 1000] [--analyze-images 10000] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_analysis import load_cifar100_test, make_run  # noqa: E402

DEFAULT_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar100"


def part_a(n_images: int, cifar: Path | None, n_perm: int, ig_steps: int, examples: int) -> dict:
    import torch

    import moecnn
    from moecnn.analysis import explain
    from moecnn.analysis.rundir import _finite

    torch.manual_seed(0)
    mean, std = (0.507, 0.487, 0.441), (0.267, 0.256, 0.276)
    model = moecnn.create_model("resnet18", num_classes=100, moe="resblock", position=4, num_experts=4, k=2).eval()
    if cifar is not None:
        images, labels, _c2s, class_names, _ = load_cifar100_test(cifar, n_images)
    else:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (n_images, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 100, n_images)
        class_names = [f"class{i}" for i in range(100)]
    name, layer = next(iter(moecnn.moe_layers(model).items()))
    with torch.no_grad():  # a random gate sends nearly everything to one expert; spread it like a trained one
        from moecnn.analysis.attribution import gate_input
        from moecnn.analysis.compute import _norm_input

        feat = gate_input(model, layer, _norm_input(images[:200], mean, std)).mean((2, 3))
        w = 2 * torch.randn_like(layer.gate.fc.weight) / (feat.std(0).clamp_min(1e-6) * feat.shape[1] ** 0.5)
        layer.gate.fc.weight.copy_(w)
        layer.gate.fc.bias.copy_(-(feat.mean(0) @ w.T))
    with tempfile.TemporaryDirectory() as d:
        out = Path(d)
        (out / "figures").mkdir()
        timing: dict = {}
        per_layer = {name: {"num_experts": 4, "specialisation": {}}}
        t0 = time.perf_counter()
        explain.run_attribution(per_layer, model, [name], images, labels, class_names, mean, std,
                                n_images=n_images, n_examples=examples, ig_steps=ig_steps, seed=0, device="cpu",
                                fig_dir=out / "figures", out_dir=out, notes=[], timing=timing)
        t_attr = time.perf_counter() - t0
        t1 = time.perf_counter()
        top1 = np.load(out / f"attribution_{name.replace('.', '_')}.npz")["top1"]
        chosen = {name: top1}
        attrs = explain.run_attribute_tests(per_layer, chosen, images, n_perm, 0)
        summary = {"per_layer": per_layer}
        explain.apply_bh(summary)
        explain.attribute_figures(per_layer, chosen, attrs, out / "figures")
        t_tests = time.perf_counter() - t1
        json.dumps(_finite(summary))
    return {"images": n_images, "attribution_s": round(t_attr, 1), "attribute_tests_s": round(t_tests, 1),
            "total_s": round(t_attr + t_tests, 1), "steps_s": {k: round(v, 1) for k, v in timing.items()},
            "top1_share": (np.bincount(top1, minlength=4) / len(top1)).round(3).tolist(),
            "hue_effect": round(per_layer[name]["attribute_tests"]["hue"]["effect"], 4),
            "contribution_single_pass": per_layer[name]["contribution"]["single_pass"],
            "ig_relative_delta": {"gate": per_layer[name]["gate_attribution"]["ig_relative_delta"],
                                  "contribution": per_layer[name]["contribution"]["ig_relative_delta"]}}


def part_b(n_images: int, cifar: Path | None, n_perm: int) -> dict:
    from moecnn.analysis import analyze, report

    with tempfile.TemporaryDirectory() as d:
        run = Path(d) / "run"
        extra = make_run(run, n_images, cifar=cifar)
        rng = np.random.default_rng(1)
        e, p, n = 50, 1000, 4
        labels = rng.integers(0, 100, p)
        top1 = rng.integers(0, n, (e, p)).astype(np.int16)
        w = rng.dirichlet(np.ones(n), size=(e, p)).astype(np.float16)
        np.savez_compressed(run / "probe_routing.npz", epochs=np.arange(e), labels=labels, superlabels=labels % 20,
                            layers=np.array(["layer4.moe"]), **{"layer4.moe/top1": top1, "layer4.moe/weights": w})
        concepts = run / "concepts.csv"
        ids = rng.choice(n_images, 2000, replace=False)
        concepts.write_text("image_id,concept\n" + "\n".join(f"{i},c{rng.integers(0, 5)}" for i in ids) + "\n")
        t0 = time.perf_counter()
        s = analyze(run, n_perm=n_perm, images=extra["images"], concepts=concepts, progress=False)
        t_an = time.perf_counter() - t0
        t1 = time.perf_counter()
        report(run)
        t_rep = time.perf_counter() - t1
    steps = {k: v for k, v in s["timing_s"].items() if k != "total"}
    return {"images": n_images, "analyze_s": round(t_an, 1), "report_s": round(t_rep, 1),
            "total_s": round(t_an + t_rep, 1), "steps_s": steps, "n_tests": s["tests"]["n_tests"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000, help="part A: attribution images")
    ap.add_argument("--analyze-images", type=int, default=10_000, help="part B: analysed test images")
    ap.add_argument("--n-perm", type=int, default=200)
    ap.add_argument("--ig-steps", type=int, default=16)
    ap.add_argument("--examples", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit-s", type=float, default=120.0)
    ap.add_argument("--cifar100", type=Path, default=DEFAULT_CIFAR if DEFAULT_CIFAR.is_dir() else None)
    ap.add_argument("--only", choices=["a", "b"], help="run one part only")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    res = {"threads": args.threads, "cifar100": str(args.cifar100) if args.cifar100 else None}
    import os

    if args.only in (None, "a"):
        c0 = time.process_time()
        res["A_attribution_and_tests"] = part_a(args.images, args.cifar100, args.n_perm, args.ig_steps, args.examples)
        res["A_attribution_and_tests"]["process_cpu_s"] = round(time.process_time() - c0, 1)
    if args.only in (None, "b"):
        c0 = time.process_time()
        res["B_analyze_without_attribution"] = part_b(args.analyze_images, args.cifar100, args.n_perm)
        res["B_analyze_without_attribution"]["process_cpu_s"] = round(time.process_time() - c0, 1)
    res["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    ok = all(v["total_s"] < args.limit_s for k, v in res.items() if isinstance(v, dict))
    res["limit_s"], res["ok"] = args.limit_s, ok
    print(json.dumps(res, indent=1))
    print("\n| part | images | wall s | process CPU s | limit s |\n|---|---|---|---|---|")
    for k, v in res.items():
        if isinstance(v, dict):
            print(f"| {k} | {v['images']} | {v['total_s']} | {v['process_cpu_s']} | {args.limit_s:.0f} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
