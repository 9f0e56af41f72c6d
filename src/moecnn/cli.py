"""The ``moecnn`` command line: train, eval, presets, analyze, report, compare, data, table, info.

Library errors (ValueError / OSError incl. FileNotFoundError / RuntimeError / KeyError) are printed as one ``error: ...`` line on
stderr with exit code 2; ``MOECNN_DEBUG=1`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

EPILOG_TRAIN = """\
examples:
  moecnn train                                   # tiny CPU demo on synthetic data (< 2 min)
  moecnn train --config fast_moe --out runs/fast data.root=/data/cifar100
  moecnn train --config paper_moe_p4_n10_relative --out runs/p4n10rel
  moecnn train --config my.yaml optim.lr=0.01 train.epochs=30 --seeds 0,1,2 --out runs/rep
  moecnn train --resume runs/fast                # continue an interrupted run
  torchrun --nproc_per_node=4 -m moecnn.cli train --config fast_moe --out runs/ddp

Config keys (override with key=value): task, data.*, model.*, optim.*, train.*, log.* — see
'moecnn presets --show NAME' for a resolved config with every key. optim.batch_size is the GLOBAL batch
(split evenly across DDP ranks). Preset grid: paper_moe_p{1-4}_n{N}_{importance,kl,relative,mean}
(likewise fast_moe_p..._n..._...) = paper_moe/fast_moe with model.position/num_experts/balance set.

RUN_DIR holds: config.yaml (resolved), meta.json (seed, moecnn version and source hash, git commit, versions,
device, command, start time), metrics.jsonl (one JSON per epoch: losses by term, accuracies, lr, images/s,
per-layer expert importance/routed shares, warnings), checkpoint.pt (last epoch, for --resume), best.pt (best
validation metric: top-1 or AP), final.json (the LAST epoch's metrics: test and val for classification, val
for detection; nothing is selected on the test set), probe_routing.npz, tb/. The directory is locked while a
run trains. train.stop_after_epochs=N stops after N epochs (resume later); train.deterministic=true for
bit-exact resume on CPU; train.threads=N sets CPU threads. Errors print one 'error: ...' line (exit code 2).
"""


def _split_ints(s: str) -> List[int]:
    try:
        return [int(v) for v in s.split(",") if v.strip() != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{s}'") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moecnn",
        description="Sparsely-gated mixture-of-experts layers for interpretable CNNs (arXiv 2204.10598).",
    )
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")

    t = sub.add_parser("train", help="train a model (classification or detection) into a run directory",
                       description="Train a model. Without --config the tiny synthetic CPU demo runs.",
                       epilog=EPILOG_TRAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--config", "-c", help="YAML file or preset name (default: tiny); see 'moecnn presets'")
    t.add_argument("--out", "-o", help="run directory (default: runs/<preset>-<time>)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its checkpoint.pt")
    t.add_argument("--seeds", type=_split_ints, help="comma-separated seeds: one run per seed in OUT/seedS "
                   "plus OUT/summary.json with mean ± std")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=0.01")

    e = sub.add_parser("eval", help="evaluate a run: accuracy, k sweep, forced/disabled experts, routing dump",
                       description="Evaluate RUN_DIR on the test split. Without routing flags: the full suite "
                       "(eval/test.json per class/superclass, k_sweep, forced, disabled, dense, test_tta_flip "
                       "when trained with flips, summary.json, routing_test.npz). With flags: only that setting "
                       "(eval/custom_<tag>.json). --split val writes eval/val.json, val_k_sweep.json, … beside them.")
    e.add_argument("run_dir")
    e.add_argument("--k", type=int, help="test-time number of active experts")
    e.add_argument("--force-expert", type=int, metavar="I", help="route every image to expert I alone")
    e.add_argument("--disable-experts", type=_split_ints, default=[], metavar="I,J", help="mask these experts")
    e.add_argument("--dense", action="store_true", help="equal weights 1/N over all (enabled) experts")
    e.add_argument("--tta", default="none", choices=["none", "flip"],
                   help="test-time augmentation: flip = mean logits of each image and its mirror")
    e.add_argument("--layer", help="apply the routing controls to this MoE layer only (default: every layer)")
    e.add_argument("--which", default="last", help="checkpoint: last (default), best or a file path")
    e.add_argument("--split", choices=["test", "val"], help="default: test (classification), val (detection)")
    e.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    e.add_argument("--batch-size", type=int, help="evaluation batch (default: train.eval_batch_size, else 512 / 8)")

    pr = sub.add_parser("presets", help="list the shipped and generated config presets",
                        description="List presets usable with 'moecnn train --config NAME'.")
    pr.add_argument("--show", metavar="NAME", help="print the fully resolved config of one preset")

    try:  # the analysis package registers its own verbs (analyze, report)
        from .analysis import add_cli as add_analysis_cli

        add_analysis_cli(sub)
    except ImportError as err:
        for verb in ("analyze", "report", "compare"):
            v = sub.add_parser(verb, help=f"(unavailable: {err})")
            v.add_argument("run_dir")
            v.set_defaults(unavailable=f"'moecnn {verb}' is not available in this install ({err})")

    d = sub.add_parser("data", help="dataset tools")
    dsub = d.add_subparsers(dest="data_cmd", metavar="TOOL")
    try:
        from .data.shapes import add_shapes_cli

        add_shapes_cli(dsub)
    except ImportError as err:
        s = dsub.add_parser("shapes", help="(unavailable) synthetic shapes detection dataset")
        s.set_defaults(unavailable=f"'moecnn data shapes' is not available in this install ({err})")

    tb = sub.add_parser("table", help="finished runs side by side: accuracy, k sweep, flip-TTA, NMI, time",
                        description="One row per run directory (or per folder of runs, e.g. a --seeds output), "
                        "read from its files: test top-1 (eval/test.json, else final.json), k sweep, flip-TTA, "
                        "NMI superclass and null max (moecnn analyze), training seconds (sum of epoch times), "
                        "median epoch, images/s, first epoch. --group merges runs that differ only in train.seed "
                        "into mean ± std.")
    tb.add_argument("runs", nargs="+", metavar="RUN_DIR")
    tb.add_argument("--group", action="store_true", help="one row per config, mean ± std over seeds")
    tb.add_argument("--format", default="md", choices=["md", "csv", "json"])
    tb.add_argument("--out", help="also write the table to this file")

    x = sub.add_parser("export", help="share a trained model: model.safetensors + config + model card (README.md)",
                       description="Write OUT/model.safetensors, config.yaml, moecnn.json and a model card README.md "
                       "generated from the run's files. Load it with moecnn.from_pretrained(OUT); 'moecnn eval/analyze/"
                       "report OUT' work on it like on a run directory.")
    x.add_argument("run_dir")
    x.add_argument("--out", "-o", required=True, help="a new folder")
    x.add_argument("--which", default="last", help="checkpoint: last (default), best or a file path")
    x.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload the folder to this Hugging Face Hub repository")

    sub.add_parser("info", help="versions, devices and registered models/gates/losses/constraints")
    return p


def cmd_train(args) -> int:
    from .train.config import load_config

    if args.resume:
        return _resume(args)
    cfg = load_config(args.config, args.overrides)
    out = Path(args.out or _default_out(args.config))
    if not args.seeds:
        from .train import train

        train(cfg, out)
        return 0
    return _train_seeds(cfg, out, args.seeds)


def _default_out(config: Optional[str]) -> str:
    import time

    name = Path(config).stem if config else "tiny"
    return os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")


def _resume(args) -> int:
    from .train import train
    from .train.config import load_config
    from .train.runs import load_config_file

    if args.config or args.seeds:
        raise ValueError("--resume takes its config from RUN_DIR/config.yaml; drop --config/--seeds")
    base = load_config_file(Path(args.resume))
    if "train" in base and "stop_after_epochs" in base.train:
        base.train.stop_after_epochs = None  # resume means: run to the end unless told otherwise
    cfg = load_config(base=base, overrides=args.overrides)
    train(cfg, Path(args.resume), resume=True)
    return 0


def _train_seeds(cfg, out: Path, seeds: List[int]) -> int:
    from .train import train
    from .train.runs import save_json
    from .train.table import mean_std

    results = {}
    for s in seeds:
        c = cfg.copy()
        c.train.seed = s
        res = train(c, out / f"seed{s}")
        if res and ("test" in res or "val" in res):
            results[s] = res
    if not results:
        return 0
    metric = next(iter(results.values())).get("metric", "top1")

    def stat(split: str, key: str):
        vals = [r[split][key] for r in results.values() if r.get(split) and r[split].get(key) is not None]
        return {**mean_std(vals), "values": vals} if vals else None

    summary = {"seeds": list(results), "metric": metric}
    for split in ("test", "val"):
        for key in [metric] + (["top5"] if metric == "top1" else []):
            summary[f"{split}_{key}"] = stat(split, key)
    save_json(out / "summary.json", summary)
    head = summary[f"test_{metric}"] or summary[f"val_{metric}"]
    if head:
        print(f"{len(results)} seeds: {metric} {head['mean']:.4g} ± {head['std']:.2g} -> {out / 'summary.json'}")
    return 0


def cmd_eval(args) -> int:
    from .layers import RoutingControls
    from .train.evaluate import run_eval

    controls = RoutingControls(k=args.k, force=args.force_expert, dense=args.dense,
                               disabled=tuple(args.disable_experts), layer=args.layer)
    res = run_eval(args.run_dir, controls, which=args.which, split=args.split, device=args.device,
                   batch_size=args.batch_size, tta=args.tta)
    print(json.dumps(res, indent=2, default=str))
    print(f"results written to {Path(args.run_dir) / 'eval'}", file=sys.stderr)
    return 0


def cmd_presets(args) -> int:
    from omegaconf import OmegaConf

    from .train.config import load_config, preset_names, shipped_presets

    if args.show:
        print(OmegaConf.to_yaml(load_config(args.show)), end="")
        return 0
    shipped = shipped_presets()
    for name in preset_names():
        print(name if name in shipped else f"{name}  (= {name.split('_p')[0]} + overrides)")
    print("also: fast_moe_p{1-4}_n{N}_{importance,kl,relative,mean}; any YAML file path works too",
          file=sys.stderr)
    return 0


def cmd_delegated(args) -> int:
    """Verbs whose parsers (and handlers, as ``args.func``) come from other subpackages."""
    if getattr(args, "unavailable", None):
        raise RuntimeError(args.unavailable)
    if getattr(args, "func", None) is None:
        raise ValueError(f"'moecnn {args.cmd}' needs a sub-command; see 'moecnn {args.cmd} --help'")
    rv = args.func(args)
    return rv if isinstance(rv, int) else 0


def cmd_info(args) -> int:
    import torch

    from . import __version__
    from .registry import CONSTRAINTS, GATES, LOSSES, MODELS
    from .train.config import preset_names

    import moecnn.models  # noqa: F401  (registers models)

    cuda = torch.cuda.is_available()
    print(f"moecnn {__version__}, torch {torch.__version__}, python {sys.version.split()[0]}")
    print(f"devices: cpu ({os.cpu_count()} cores)" + (
        "".join(f", cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count()))
        if cuda else ", no CUDA"))
    for reg in (MODELS, GATES, LOSSES, CONSTRAINTS):
        print(f"{reg.kind}s: {', '.join(reg.names())}")
    print(f"presets: {len(preset_names())} (moecnn presets)")
    return 0


def cmd_export(args) -> int:
    from .export import export_run, load_folder

    out = export_run(args.run_dir, args.out, which=args.which)
    print(f"exported {args.run_dir} ({args.which}) to {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    if args.push_to_hub:
        url = load_folder(out).push_to_hub(args.push_to_hub)
        print(f"pushed to {url}")
    return 0


def cmd_table(args) -> int:
    from .train.table import table

    text = table([Path(p) for p in args.runs], group=args.group, fmt=args.format)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "presets": cmd_presets, "analyze": cmd_delegated,
            "report": cmd_delegated, "compare": cmd_delegated, "data": cmd_delegated, "table": cmd_table,
            "export": cmd_export, "info": cmd_info}


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also follow options (`train --config X --out D a=1 --seeds 0 b=2`)
    if extra and getattr(args, "overrides", None) is not None and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.cmd is None:
        parser.print_help()
        return 0
    from .train import runs

    runs.COMMAND = ["moecnn", *(sys.argv[1:] if argv is None else argv)]
    try:
        return COMMANDS[args.cmd](args) or 0
    except (ValueError, OSError, RuntimeError, KeyError, ArithmeticError) as e:
        if os.environ.get("MOECNN_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, KeyError):
            msg = f"missing key {msg}"
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = {"train": "; continue the run with 'moecnn train --resume RUN_DIR'"}.get(args.cmd, "; nothing was lost, "
                                                                                          "run the command again")
        print(f"error: interrupted{hint}", file=sys.stderr)
        return 130
    finally:
        from .train import distributed

        distributed.cleanup()


if __name__ == "__main__":
    sys.exit(main())
