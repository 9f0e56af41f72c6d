"""Typed run configuration (OmegaConf structured configs) and the preset system.

A run is described by one config with a section per concern: ``task`` (classification | detection), ``data`` and
``model`` (the task's own sections, :attr:`moecnn.tasks.base.Task.data_schema` / ``model_schema``), and the
sections every task shares: ``optim`` (optimiser, batch, LR schedule), ``train`` (epochs, seed, device,
precision, compile, checkpointing) and ``log``; :func:`schema` assembles it per task. :func:`load_config` merges, in order, the schema
defaults, a preset or YAML file, and ``key=value`` overrides, and turns OmegaConf's errors into one-line
``ValueError`` messages.

Presets are the YAML files in ``moecnn/configs/`` plus generated names (see :func:`preset_names`):
``paper_moe_p{1..4}_n{N}_{importance,kl,relative,mean}`` (and the same for ``fast_moe_…``) expand to
``paper_moe`` (or ``fast_moe``) with ``model.position``, ``model.num_experts`` and ``model.balance`` set.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException


CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
BALANCES = ("importance", "kl", "relative", "mean")
PRESET_PATTERN = re.compile(r"^(paper|fast)_moe_p([1-4])_n(\d+)_([a-z_]+)$")


@dataclass
class OptimConfig:
    name: str = "adam"  # adam | adamw | sgd
    lr: float = 1e-3  # peak learning rate
    batch_size: int = 128  # GLOBAL batch: split evenly across DDP ranks
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # adam/adamw
    grad_clip: Optional[float] = None  # max global grad norm; None = off
    schedule: str = "step"  # constant | step | onecycle | cosine
    milestones: List[int] = field(default_factory=lambda: [81, 120])  # step: lr *= gamma from these epochs on
    gamma: float = 0.1  # step: decay factor
    warmup_epochs: float = 0.0  # linear warm-up length (fractional epochs allowed; every schedule)
    final_lr_factor: float = 0.0  # onecycle/cosine: lr at the end = lr * this


@dataclass
class RunConfig:
    epochs: int = 150
    seed: int = 0
    deterministic: bool = False  # deterministic algorithms, no cudnn.benchmark (bit-exact resume on CPU)
    device: str = "auto"  # auto | cpu | cuda | cuda:N  (DDP: each rank uses cuda:LOCAL_RANK)
    dist_backend: str = "auto"  # torchrun: auto (nccl on CUDA, gloo on CPU) | nccl | gloo (gloo lets ranks share a GPU)
    precision: str = "bf16"  # bf16 | fp16 | fp32 — autocast on CUDA only; CPU always runs fp32
    channels_last: bool = True  # CUDA only
    compile: bool = False  # torch.compile the model
    compile_mode: str = "default"  # default | reduce-overhead (CUDA graphs) | max-autotune | max-autotune-no-cudagraphs
    threads: Optional[int] = None  # CPU intra-op threads (torch.set_num_threads); None = torch's default
    cudnn_benchmark: Optional[bool] = None  # None = on unless deterministic or an MoE layer runs changing shapes
    eval_every: int = 1  # validate every n epochs (and always after the last)
    eval_batch_size: Optional[int] = None  # None = max(per-rank batch, 256) (classification) / per-rank batch (detection)
    max_steps_per_epoch: Optional[int] = None  # cut epochs short (quick runs)
    save_best: bool = True  # also keep best.pt (best validation metric)
    probe_size: int = 512  # images whose routing is kept at every validation (probe_routing.npz); 0 = off
    stop_after_epochs: Optional[int] = None  # stop this invocation after n epochs (simulated interruption)
    collapse_patience: int = 3  # warn when < N/2 experts live for this many epochs in a row


@dataclass
class LogConfig:
    tensorboard: bool = True  # RUN_DIR/tb when tensorboard is importable
    progress: str = "auto"  # auto (bar on a terminal, lines otherwise) | bar | lines | none
    check_every: int = 50  # steps between non-finite checks / progress updates (each is one host sync)


SHARED = {"optim": OptimConfig, "train": RunConfig, "log": LogConfig}


def schema(task: str) -> type:
    """The structured config of ``task``: its data and model sections plus the shared optim/train/log."""
    from ..registry import TASKS
    from .. import tasks  # noqa: F401  (registers the tasks)

    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS.names())}, got '{task}'")
    t = TASKS.get(task)
    if task not in _SCHEMAS:
        _SCHEMAS[task] = make_dataclass(f"{t.__name__}Config", [
            ("task", str, field(default=task)),
            ("data", t.data_schema, field(default_factory=t.data_schema)),
            ("model", t.model_schema, field(default_factory=t.model_schema)),
            *[(k, v, field(default_factory=v)) for k, v in SHARED.items()],
        ])
    return _SCHEMAS[task]


_SCHEMAS: dict = {}


# ---------------------------------------------------------------------------------------------------------
# presets
# ---------------------------------------------------------------------------------------------------------


def shipped_presets() -> List[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def preset_names() -> List[str]:
    """Shipped presets plus the generated paper grid (positions 1–4 × N ∈ {4, 10} × 4 balancing methods)."""
    grid = [f"paper_moe_p{p}_n{n}_{b}" for p in range(1, 5) for n in (4, 10) for b in BALANCES]
    return shipped_presets() + grid


def expand_preset(name: str) -> Tuple[Path, List[str]]:
    """Preset name -> (YAML file, implied overrides). Raises ValueError for unknown names."""
    path = CONFIG_DIR / f"{name}.yaml"
    if path.is_file():
        return path, []
    m = PRESET_PATTERN.match(name)
    if m:
        base, pos, n, bal = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
        if bal not in BALANCES:
            raise ValueError(f"unknown balancing '{bal}' in preset '{name}' (choose {', '.join(BALANCES)})")
        if not 2 <= n <= 64:
            raise ValueError(f"preset '{name}': number of experts must be 2..64")
        return CONFIG_DIR / f"{base}_moe.yaml", [
            f"model.position={pos}", f"model.num_experts={n}", f"model.balance={bal}"]
    raise ValueError(
        f"unknown preset '{name}' (not a file either); run 'moecnn presets' to list them "
        f"(shipped: {', '.join(shipped_presets())}; grid: paper_moe_p{{1-4}}_n{{4,10}}_{{{','.join(BALANCES)}}})"
    )


def resolve_source(config: Optional[str]) -> Tuple[Optional[Path], List[str]]:
    """``--config`` value (a YAML path or a preset name; None = the ``tiny`` preset) -> (file, overrides)."""
    if config is None:
        return expand_preset("tiny")
    p = Path(config)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise FileNotFoundError(f"config file '{config}' not found; pass a YAML file or a preset name")
        return p, []
    return expand_preset(config)


def read_yaml(path: Path) -> DictConfig:
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # yaml syntax errors and the like
        raise ValueError(f"cannot parse config '{path}': {str(e).splitlines()[0]}") from None
    if not isinstance(cfg, DictConfig):
        raise ValueError(f"config '{path}' must be a YAML mapping")
    return cfg


# ---------------------------------------------------------------------------------------------------------
# loading with friendly errors
# ---------------------------------------------------------------------------------------------------------


def _valid_keys(schema: DictConfig, full_key: str) -> List[str]:
    node: Any = schema
    for part in full_key.split(".")[:-1]:
        if isinstance(node, DictConfig) and part in node:
            node = node[part]
        else:
            break
    if isinstance(node, DictConfig):
        prefix = full_key.rsplit(".", 1)[0] + "." if "." in full_key and node is not schema else ""
        return [prefix + k for k in node.keys()]
    return []


def _friendly(e: OmegaConfBaseException, schema: DictConfig) -> ValueError:
    key = getattr(e, "full_key", None) or getattr(e, "key", None)
    msg = str(getattr(e, "msg", None) or e).splitlines()[0]
    if isinstance(e, ConfigKeyError) or "not in" in msg:
        return ValueError(f"unknown config key '{key}' (valid keys: {', '.join(_valid_keys(schema, str(key)))})")
    m = re.search(r"Value '(.*)' of type '\w+' could not be converted to (\w+)", msg)
    if m and key:
        return ValueError(f"{key} expects {m.group(2).lower()}, got '{m.group(1)}'")
    if "Non optional field cannot be assigned None" in msg or "field cannot be None" in msg:
        return ValueError(f"{key} cannot be null")
    return ValueError(f"bad config value{f' for {key}' if key else ''}: {msg}")


# Keys of configs written by moecnn 0.1 (run directories, user YAML files) → today's keys.
LEGACY_MOVES = {
    "classification": {"optim.label_smoothing": "model.label_smoothing"},
    "detection": {"seed": "train.seed", "device": "train.device", "optim.optimizer": "optim.name",
                  "optim.epochs": "train.epochs", "optim.max_steps_per_epoch": "train.max_steps_per_epoch",
                  "log.eval_every": "train.eval_every", "log.eval_batch_size": "train.eval_batch_size",
                  "log.print_every": "log.check_every", "log.eval_max_images": "data.max_val_images",
                  "model.expert_noise": "model.init_noise"},
}
LEGACY_DROPPED = {"detection": ("name", "log.final_sweep")}


def migrate(raw: DictConfig) -> DictConfig:
    """A config of moecnn 0.1 rewritten in today's keys and values (``optim.bf16`` → ``train.precision``,
    ``schedule: none`` → ``constant``, a ``null`` balance → ``none``, 0 for "quiet" / "evaluate only at the end"
    → the defaults / ``train.epochs``). Detection's ``optim.warmup_iters`` has no equivalent without the epoch
    length and is dropped (its warm-up then starts at ``optim.warmup_epochs``). Unknown keys stay for the
    schema to refuse."""
    d = OmegaConf.to_container(raw, resolve=False)
    task = str(d.get("task", "classification"))

    def pop(path: str):
        node = d
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
            if node is None:
                return None, False
        return (node.pop(leaf), True) if isinstance(node, dict) and leaf in node else (None, False)

    def put(path: str, value) -> None:
        node = d
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node.setdefault(leaf, value)

    if task == "detection":
        for key, zero in (("log.print_every", None), ("log.eval_every", "epochs")):
            v, found = pop(key)
            if found and v == 0:  # 0.1: 0 meant quiet / only after the last epoch
                if zero == "epochs":
                    epochs = (d.get("optim") or {}).get("epochs") or (d.get("train") or {}).get("epochs")
                    if epochs:
                        put("train.eval_every", epochs)
            elif found:
                put(LEGACY_MOVES["detection"][key], v)
        if (d.get("model") or {}).get("balance", "") is None:
            d["model"]["balance"] = "none"
    for old, new in LEGACY_MOVES.get(task, {}).items():
        v, found = pop(old)
        if found:
            put(new, v)
    for old in LEGACY_DROPPED.get(task, ()):
        pop(old)
    if task == "detection":
        v, found = pop("optim.bf16")
        if found:
            put("train.precision", "bf16" if v else "fp32")
        pop("optim.warmup_iters")
        sched = (d.get("optim") or {}).get("schedule")
        if sched == "none":
            d["optim"]["schedule"] = "constant"
    return OmegaConf.create(d)


def peek_task(config: Optional[str] = None, overrides: Sequence[str] = (), base: Optional[DictConfig] = None) -> str:
    """The task a config is for: a ``task=...`` override, else the file's (or ``base``'s) ``task``."""
    for o in overrides:
        if o.startswith("task="):
            return o.split("=", 1)[1]
    if base is not None:
        return str(base.get("task", "classification"))
    path, _ = resolve_source(config)
    return str(read_yaml(path).get("task", "classification")) if path else "classification"


def load_config(
    config: Optional[str] = None,
    overrides: Sequence[str] = (),
    base: Optional[DictConfig] = None,
) -> DictConfig:
    """schema defaults <- preset/YAML (or ``base``) <- ``key=value`` overrides; validated.

    The schema is the task's (``task:`` in the file or ``task=`` among the overrides): its data and model
    sections and the shared optim/train/log sections. Every extra package the config needs is checked here."""
    task = peek_task(config, overrides, base)
    structured = OmegaConf.structured(schema(task))
    if base is not None:
        path, implied = None, []
    else:
        path, implied = resolve_source(config)
    dots = list(implied) + list(overrides)
    for d in dots:
        if "=" not in d:
            raise ValueError(f"override '{d}' must look like key=value (e.g. optim.lr=0.01)")
    moves = LEGACY_MOVES.get(task, {})
    dots = [moves[d.split("=", 1)[0]] + "=" + d.split("=", 1)[1] if d.split("=", 1)[0] in moves else d for d in dots]
    try:
        layers = [structured]
        if base is not None:
            layers.append(migrate(base))
        elif path is not None:
            layers.append(migrate(read_yaml(path)))
        layers.append(OmegaConf.from_dotlist(dots))
        cfg = OmegaConf.merge(*layers)
    except OmegaConfBaseException as e:
        raise _friendly(e, structured) from None
    keys = {d.split("=", 1)[0] for d in overrides}
    if "model.source" in keys and cfg.model.get("source", "moecnn") != "moecnn" and "model.moe" not in keys:
        cfg.model.moe = "none"  # the preset's placement belongs to its own (moecnn) model
        cfg.model.width = None
    validate(cfg)
    return cfg


SCHEDULES = ("constant", "step", "onecycle", "cosine")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def validate(cfg: DictConfig) -> None:
    """The shared sections' checks, then the task's own, then its optional packages (one line each)."""
    from ..registry import TASKS

    m, o, t = cfg.model, cfg.optim, cfg.train
    if o.name not in ("adam", "adamw", "sgd"):
        raise ValueError(f"optim.name must be adam, adamw or sgd, got '{o.name}'")
    if o.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule must be one of {', '.join(SCHEDULES)}, got '{o.schedule}'")
    if t.precision not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"train.precision must be bf16, fp16 or fp32, got '{t.precision}'")
    if t.compile_mode not in COMPILE_MODES:
        raise ValueError(f"train.compile_mode must be one of {', '.join(COMPILE_MODES)}, got '{t.compile_mode}'")
    has_moe = m.get("moe", "none") != "none" or bool(m.targets) or cfg.task == "detection"
    if t.compile and t.compile_mode == "reduce-overhead" and has_moe and m.capacity_factor is None:
        raise ValueError("train.compile_mode=reduce-overhead (CUDA graphs) needs static shapes: set "
                         "model.capacity_factor (e.g. 1.25) or use compile_mode=default")
    if t.dist_backend not in ("auto", "nccl", "gloo"):
        raise ValueError(f"train.dist_backend must be auto, nccl or gloo, got '{t.dist_backend}'")
    if cfg.log.progress not in ("auto", "bar", "lines", "none"):
        raise ValueError(f"log.progress must be auto, bar, lines or none, got '{cfg.log.progress}'")
    for name, v in (("train.epochs", t.epochs), ("optim.batch_size", o.batch_size), ("train.eval_every", t.eval_every),
                    ("log.check_every", cfg.log.check_every)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    for name, v in (("train.eval_batch_size", t.eval_batch_size), ("train.max_steps_per_epoch", t.max_steps_per_epoch),
                    ("train.threads", t.threads)):
        if v is not None and v < 1:
            raise ValueError(f"{name} must be >= 1 or null, got {v}")
    if t.stop_after_epochs is not None and t.stop_after_epochs < 0:
        raise ValueError(f"train.stop_after_epochs must be >= 0 or null, got {t.stop_after_epochs}")
    if t.collapse_patience < 1:
        raise ValueError(f"train.collapse_patience must be >= 1, got {t.collapse_patience}")
    if t.probe_size < 0:
        raise ValueError(f"train.probe_size must be >= 0 (0 = off), got {t.probe_size}")
    if o.lr <= 0:
        raise ValueError(f"optim.lr must be > 0, got {o.lr}")
    if o.warmup_epochs < 0 or o.weight_decay < 0:
        raise ValueError("optim.warmup_epochs and optim.weight_decay must be >= 0")
    if o.grad_clip is not None and o.grad_clip <= 0:
        raise ValueError(f"optim.grad_clip must be > 0 or null, got {o.grad_clip}")
    task = TASKS.get(cfg.task)
    task.validate(cfg)
    task.check_requirements(cfg)


TrainConfig = schema("classification")  # the classification run schema (the default task)
DetectionRunConfig = schema("detection")
