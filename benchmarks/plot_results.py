"""Summary figures for RESULTS.md from finished run directories (after `moecnn eval` and `moecnn analyze`).

    python benchmarks/plot_results.py RUNS_DIR --out docs/figures

RUNS_DIR holds runs named ``moe_<balance>_s<seed>`` (balance in kl, imp, relative, mean; stage 4) and
``moe_kl_p<position>_s0``. Writes ``cifar100_balance_k_sweep.png`` (test top-1 against test-time k, every
seed) and ``cifar100_position.png`` (specialisation and balance against the MoE's stage), and prints the
numbers it plotted as markdown tables.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BALANCES = {"kl": "KL (soft)", "imp": "importance (soft)", "relative": "relative (hard)", "mean": "mean (hard)"}


def load(run: Path):
    ks = json.loads((run / "eval" / "k_sweep.json").read_text())["results"]
    head = json.loads((run / "analysis" / "summary.json").read_text())["headline"]
    layer = next(v for k, v in head.items() if not k.startswith("_"))
    return {int(k): v["top1"] for k, v in ks.items()}, layer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path)
    ap.add_argument("--out", type=Path, default=Path("docs/figures"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    print("| balance | seed | k=1 | k=2 | k=3 | k=4 | k2−k1 | CV_imp | CV_act | living | NMI superclass |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for i, (key, label) in enumerate(BALANCES.items()):
        for s, run in enumerate(sorted(args.runs.glob(f"moe_{key}_s[0-9]"))):
            if not (run / "analysis" / "summary.json").exists():
                continue
            acc, h = load(run)
            k = sorted(acc)
            ax.plot(k, [acc[j] for j in k], marker="o", color=f"C{i}", alpha=0.9,
                    label=label if s == 0 else None, linestyle="-" if s == 0 else "--")
            print(f"| {label} | {run.name[-1]} | " + " | ".join(f"{acc[j]:.2f}" for j in k)
                  + f" | {acc[2] - acc[1]:.2f} | {h['cv_imp']:.3f} | {h['cv_act']:.3f} | {h['n_living']} | "
                  f"{h['nmi_superclass']:.3f} |")
    ax.set_xlabel("test-time k (trained with k = 2)")
    ax.set_ylabel("CIFAR-100 test top-1 (%)")
    ax.set_xticks([1, 2, 3, 4])
    ax.set_title("ResBlock-MoE p=4, N=4: solid seed 0, dashed seed 1", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out / "cifar100_balance_k_sweep.png", dpi=120)

    pos = {}
    for p in (1, 2, 3, 4):
        run = args.runs / (f"moe_kl_p{p}_s0" if p < 4 else "moe_kl_s0")
        if (run / "analysis" / "summary.json").exists():
            acc, h = load(run)
            pos[p] = (acc, h)
    if pos:
        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        ps = sorted(pos)
        ax.plot(ps, [pos[p][1]["nmi_superclass"] for p in ps], marker="o", label="NMI(top-1 expert, superclass)")
        ax.plot(ps, [pos[p][1]["cv_imp"] for p in ps], marker="s", label="CV of expert importance")
        ax.set_xlabel("stage of the ResBlock-MoE (KL, seed 0)")
        ax.set_xticks(ps)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.out / "cifar100_position.png", dpi=120)
        print("\n| stage | k=1 | k=2 | CV_imp | CV_act | NMI superclass |\n|---|---|---|---|---|---|")
        for p in ps:
            acc, h = pos[p]
            print(f"| {p} | {acc[1]:.2f} | {acc[2]:.2f} | {h['cv_imp']:.3f} | {h['cv_act']:.3f} | {h['nmi_superclass']:.3f} |")


if __name__ == "__main__":
    main()
