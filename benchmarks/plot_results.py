"""Summary figures for RESULTS.md from finished run directories (after `moecnn eval` and `moecnn analyze`).

    python benchmarks/plot_results.py RUNS_DIR --out docs/figures

RUNS_DIR holds runs named ``moe_<balance>_s<seed>`` (balance in kl, imp, relative, mean; stage 4) and
``moe_kl_p<position>_s0``. Writes ``cifar100_balance_k_sweep.png`` (test top-1 against test-time k, every
seed) and ``cifar100_position.png`` (specialisation and balance against the MoE's stage), and prints the
numbers it plotted as markdown tables.

``--curves LABEL=RUN_DIR ...`` also writes ``cifar100_recipes.png``: validation top-1 against epoch and against
cumulative training seconds (the sum of ``metrics.jsonl``'s epoch times, so only meaningful for runs that had
the GPU alone), and a table of final test top-1, training seconds and median epoch.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

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
    ap.add_argument("--curves", nargs="*", default=[], metavar="LABEL=RUN_DIR",
                    help="runs to compare by validation curve and training time")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.curves:
        curves([c.split("=", 1) for c in args.curves], args.out)

    balance_runs = [(i, label, run) for i, (key, label) in enumerate(BALANCES.items())
                    for run in sorted(args.runs.glob(f"moe_{key}_s[0-9]"))
                    if (run / "analysis" / "summary.json").exists()]
    if balance_runs:
        balance_figure(balance_runs, args.out)
    positions(args.runs, args.out)


def balance_figure(balance_runs, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    print("| balance | seed | k=1 | k=2 | k=3 | k=4 | k2−k1 | CV_imp | CV_act | living | NMI superclass |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for i, label, run in balance_runs:
        first = run.name.endswith("_s0")
        acc, h = load(run)
        k = sorted(acc)
        ax.plot(k, [acc[j] for j in k], marker="o", color=f"C{i}", alpha=0.9,
                label=label if first else None, linestyle="-" if first else "--")
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
    fig.savefig(out / "cifar100_balance_k_sweep.png", dpi=120)


def positions(runs: Path, out: Path) -> None:
    pos = {}
    for p in (1, 2, 3, 4):
        run = runs / (f"moe_kl_p{p}_s0" if p < 4 else "moe_kl_s0")
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
        fig.savefig(out / "cifar100_position.png", dpi=120)
        print("\n| stage | k=1 | k=2 | CV_imp | CV_act | NMI superclass |\n|---|---|---|---|---|---|")
        for p in ps:
            acc, h = pos[p]
            print(f"| {p} | {acc[1]:.2f} | {acc[2]:.2f} | {h['cv_imp']:.3f} | {h['cv_act']:.3f} | {h['nmi_superclass']:.3f} |")


def curves(pairs, out: Path) -> None:
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    print("| run | epochs | test top-1 (last epoch) | training s (sum of epochs) | median epoch s |\n|---|---|---|---|---|")
    for i, (label, run) in enumerate(pairs):
        run = Path(run)
        ms = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        ep = [m["epoch"] + 1 for m in ms]
        val = [m["val"]["top1"] for m in ms]
        secs = list(itertools.accumulate(m["time_s"] for m in ms))
        a1.plot(ep, val, color=f"C{i}", label=label)
        a2.plot(secs, val, color=f"C{i}", label=label)
        final = json.loads((run / "final.json").read_text())
        print(f"| {label} | {len(ms)} | {final['test']['top1']:.2f} | {secs[-1]:.1f} | "
              f"{statistics.median(m['time_s'] for m in ms):.3f} |")
    a1.set_xlabel("epoch")
    a2.set_xlabel("training seconds (one H200, run alone)")
    a1.set_ylabel("CIFAR-100 val top-1 (%)")
    for a in (a1, a2):
        a.grid(alpha=0.3)
    a2.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "cifar100_recipes.png", dpi=120)


if __name__ == "__main__":
    main()
