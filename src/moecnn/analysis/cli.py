"""The analysis verbs of the ``moecnn`` command line: analyze, report and compare."""
from __future__ import annotations

import json
from pathlib import Path

from .analyze import analyze, brief, report
from .compare import agreement_figure, compare_runs, format_comparison


def add_cli(subparsers) -> None:
    """Register the ``analyze`` and ``report`` verbs on an argparse subparsers object."""
    import argparse

    a = subparsers.add_parser(
        "analyze", help="routing analyses of a run -> RUN_DIR/analysis/ (summary.json + figures)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Utilisation (importance, CV_imp, CV_act, living experts, co-activation, per epoch), class and "
        "superclass x expert allocation, NMI/purity specialisation tests with a permutation null, t-SNE of gate "
        "logits with thumbnails, most/least weighted images, accuracy vs k / forced / removed experts; tests of "
        "routing against pixel attributes (hue, saturation, brightness, contrast, high-frequency energy, edge "
        "density) and --concepts labels, layer-to-layer flow, routing dynamics over training (probe_routing.npz), "
        "Benjamini-Hochberg over all tests; with --attribution N: Grad-CAM and Integrated Gradients of every "
        "expert's gate (why this expert?) and forced-expert contributions (what does it add?).",
        epilog="reads: eval/routing_<split>.npz and eval/*.json from 'moecnn eval' when present (else runs the\n"
        "model from checkpoint.pt), metrics.jsonl, probe_routing.npz, config.yaml. Schema: docs/analysis_schema.md\n"
        "example:\n  moecnn eval runs/p4 && moecnn analyze runs/p4 --attribution 1000 && moecnn report runs/p4")
    a.add_argument("run_dir")
    a.add_argument("--split", default="test", choices=["test", "val"], help="split to analyse (default test)")
    a.add_argument("--layer", help="MoE layer name (default: every MoE layer, one section each)")
    a.add_argument("--max-tsne", type=int, default=2000, help="t-SNE subsample size (default 2000)")
    a.add_argument("--n-perm", type=int, default=200, help="label permutations for p-values (default 200)")
    a.add_argument("--device", default="cpu", help="device for running the model when needed (default cpu)")
    a.add_argument("--attribution", type=int, default=0, metavar="N",
                   help="gate attribution (Grad-CAM, Integrated Gradients) and expert contribution on N images "
                   "(stratified subsample; needs checkpoint.pt; about a minute per 1,000 CIFAR images of a ResNet-18 "
                   "on 2 CPU cores). Default 0: off")
    a.add_argument("--attribution-examples", type=int, default=4, metavar="K",
                   help="example images per expert with attribution maps (default 4)")
    a.add_argument("--ig-steps", type=int, default=16,
                   help="Integrated-Gradients steps (Gauss-Legendre; default 16; summary.json reports the "
                   "completeness error, raise it when that is large)")
    a.add_argument("--concepts", metavar="FILE.csv",
                   help="CSV of image_id,concept rows (image_id = row in the split's routing file): tests whether "
                   "routing depends on these concepts")
    a.add_argument("--alpha", type=float, default=0.05,
                   help="false-discovery rate for Benjamini-Hochberg over all tests of the run (default 0.05)")
    a.set_defaults(func=_cmd_analyze)
    r = subparsers.add_parser(
        "report", help="self-contained HTML report -> RUN_DIR/report.html",
        description="Write RUN_DIR/report.html: one file, figures embedded, opens offline. Runs 'analyze' first "
        "when RUN_DIR/analysis/summary.json is missing; detection runs get the detection sections.")
    r.add_argument("run_dir")
    r.set_defaults(func=_cmd_report)
    _add_compare(subparsers)


def _cmd_analyze(args) -> int:
    s = analyze(args.run_dir, split=args.split, layer=args.layer, max_tsne=args.max_tsne, n_perm=args.n_perm,
                device=args.device, attribution=args.attribution, attribution_examples=args.attribution_examples,
                ig_steps=args.ig_steps, concepts=args.concepts, alpha=args.alpha)
    print(brief(s))
    return 0


def _cmd_report(args) -> int:
    print(f"report written to {report(args.run_dir)}")
    return 0


def _add_compare(subparsers) -> None:
    c = subparsers.add_parser(
        "compare", help="do several runs carve the data into the same experts? (NMI, ARI, matched experts)",
        description="Compare the top-1 expert partitions of runs evaluated on the same images (their "
        "eval/routing_<split>.npz from 'moecnn eval'): NMI with a permutation null, adjusted Rand index, and the "
        "one-to-one expert matching with the share of images on which the matched experts agree.")
    c.add_argument("runs", nargs="+", metavar="RUN_DIR")
    c.add_argument("--split", default="test", choices=["test", "val"])
    c.add_argument("--layer", help="MoE layer name (default: the first)")
    c.add_argument("--n-perm", type=int, default=200, help="permutations for the NMI null (default 200)")
    c.add_argument("--out", help="also write the full result (JSON) to this file")
    c.add_argument("--figure", help="also draw the runs x runs agreement matrix to this PNG file")
    c.add_argument("--labels", help="comma-separated run labels for the figure (default: folder names)")
    c.set_defaults(func=_cmd_compare)


def _cmd_compare(args) -> int:
    res = compare_runs(args.runs, split=args.split, layer=args.layer, n_perm=args.n_perm)
    print(format_comparison(res))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    if args.figure:
        labels = [x.strip() for x in args.labels.split(",")] if args.labels else None
        if labels is not None and len(labels) != len(res["runs"]):
            raise ValueError(f"--labels gives {len(labels)} names for {len(res['runs'])} runs")
        Path(args.figure).write_bytes(agreement_figure(res, labels))
    return 0
