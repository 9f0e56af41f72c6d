"""The one engine: configs, the training loop, evaluation and run directories for every task
(``moecnn train`` / ``moecnn eval``)."""
from .config import LogConfig, OptimConfig, RunConfig, TrainConfig, load_config, preset_names, schema
from .evaluate import collect_routing, evaluate, run_eval
from .loop import train
from .runs import load_run

__all__ = [
    "TrainConfig", "OptimConfig", "RunConfig", "LogConfig", "load_config", "preset_names", "schema", "train",
    "evaluate", "collect_routing", "run_eval", "load_run",
]
