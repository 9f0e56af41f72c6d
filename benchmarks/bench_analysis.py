"""Benchmark: `analyze` on 10,000 test images (t-SNE included) must finish in < 2 minutes on 2 CPU cores.

Builds a run directory shaped like `moecnn eval` output (eval/routing_test.npz with 100 classes in 20
superclasses, N=4 experts, k=2, plus 32×32 uint8 images) and times `analyze` + `report` end to end.

    /work/venv/bin/python benchmarks/bench_analysis.py [--images 10000] [--max-tsne 2000] [--n-perm 200]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def load_cifar100_test(root: Path, m: int):
    """Real CIFAR-100 test images/labels/names from the shared data folder (README there)."""
    import lzma

    x = np.load(lzma.open(root / "test_x.npy.xz"))[:m].transpose(0, 3, 1, 2)
    fine = np.load(root / "test_y_fine.npy")[:m].astype(np.int64)
    coarse = np.load(root / "test_y_coarse.npy")[:m].astype(np.int64)
    names = json.loads((root / "label_names.json").read_text())
    c2s = np.zeros(100, dtype=np.int64)
    c2s[fine] = coarse
    return x, fine, c2s, names["fine_label_names"], names["coarse_label_names"]


def make_run(root: Path, m: int, n_exp: int = 4, k: int = 2, seed: int = 0, cifar: Path | None = None) -> dict:
    rng = np.random.default_rng(seed)
    n_classes, n_super = 100, 20
    class_names = [f"class{i}" for i in range(n_classes)]
    super_names = [f"super{i}" for i in range(n_super)]
    if cifar is not None:
        images, labels, class_to_super, class_names, super_names = load_cifar100_test(cifar, m)
        m = len(labels)
    else:
        class_to_super = np.arange(n_classes) % n_super
        labels = rng.integers(0, n_classes, m)
    sup = class_to_super[labels]
    # superclass-dependent gate logits (planted structure, like a trained ResBlock-MoE)
    centres = rng.normal(0, 1.0, (n_super, n_exp))
    logits = (centres[sup] + rng.normal(0, 1.0, (m, n_exp))).astype(np.float32)
    top = np.argsort(-logits, 1)[:, :k]
    w = np.zeros_like(logits)
    v = np.exp(np.take_along_axis(logits, top, 1))
    np.put_along_axis(w, top, v / v.sum(1, keepdims=True), 1)
    if cifar is None:
        colours = rng.integers(0, 256, (n_super, 3, 1, 1))
        images = np.clip(colours[sup] + rng.normal(0, 40, (m, 3, 32, 32)), 0, 255).astype(np.uint8)
    ev = root / "eval"
    ev.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(ev / "routing_test.npz", labels=labels, layers=np.array(["layer4.moe"]),
                        **{"layer4.moe/logits": logits, "layer4.moe/weights": w, "layer4.moe/top1": w.argmax(1)},
                        superlabels=sup, class_names=np.array(class_names),
                        superclass_names=np.array(super_names), preds=labels)
    return {"images": images}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--max-tsne", type=int, default=2000)
    ap.add_argument("--n-perm", type=int, default=200)
    ap.add_argument("--limit-s", type=float, default=120.0)
    ap.add_argument("--cifar100", type=Path, help="use the real CIFAR-100 test images from this folder "
                    "(e.g. /work/shared/data/cifar100); routing is still planted by superclass")
    ap.add_argument("--keep", type=Path, help="copy the run directory (analysis + report.html) here")
    args = ap.parse_args(argv)
    from moecnn.analysis import analyze, report

    with tempfile.TemporaryDirectory() as d:
        run = Path(d) / "run"
        extra = make_run(run, args.images, cifar=args.cifar100)
        t0 = time.perf_counter()
        s = analyze(run, max_tsne=args.max_tsne, n_perm=args.n_perm, images=extra["images"])
        t_an = time.perf_counter() - t0
        t1 = time.perf_counter()
        path = report(run)
        t_rep = time.perf_counter() - t1
        total = t_an + t_rep
        spec = s["per_layer"]["layer4.moe"]["specialisation"]["superclass"]
        out = {"images": args.images, "max_tsne": args.max_tsne, "n_perm": args.n_perm, "analyze_s": round(t_an, 1),
               "report_s": round(t_rep, 1), "total_s": round(total, 1), "steps_s": s["timing_s"],
               "nmi_superclass": round(spec["nmi"], 3), "nmi_null_max": round(spec["nmi_null_max"], 4),
               "report_MB": round(path.stat().st_size / 1e6, 2), "limit_s": args.limit_s,
               "ok": total < args.limit_s}
        print(json.dumps(out, indent=1))
        if args.keep is not None:
            import shutil

            shutil.copytree(run, args.keep, dirs_exist_ok=True)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
