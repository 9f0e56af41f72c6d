"""Run directories: resolved config, metadata, atomic checkpoints and :func:`load_run`.

Layout of RUN_DIR::

    config.yaml     resolved TrainConfig (every key)
    meta.json       seed, git commit, torch version, device, world size, command line, start time(s)
    metrics.jsonl   one JSON object per epoch
    checkpoint.pt   last epoch: model, optimizer, scheduler, scaler, epoch, RNG states, best val
    best.pt         the epoch with the highest val top-1 (model only + epoch), when train.save_best
    final.json      test metrics of the LAST epoch (+ its val metrics); the test set never selects anything
    tb/             TensorBoard events (when tensorboard is installed)
    eval/           written by ``moecnn eval``
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf


def atomic_write_bytes(path: Path, write) -> None:
    """``write(tmp_path)`` then ``os.replace`` so a crash never leaves a half-written file behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, lambda p: Path(p).write_text(json.dumps(obj, indent=2, default=_jsonable) + "\n"))


def _jsonable(o):
    if isinstance(o, (np.generic,)):
        return o.item()
    if isinstance(o, (np.ndarray, torch.Tensor)):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def save_torch(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, lambda p: torch.save(obj, p))


def git_commit() -> Optional[str]:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except Exception:
        return None


def write_meta(run_dir: Path, cfg: DictConfig, device: torch.device, world_size: int, resumed: bool) -> None:
    path = Path(run_dir) / "meta.json"
    entry = {"start_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": sys.argv,
             "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
             "world_size": world_size}
    if resumed and path.exists():
        meta = json.loads(path.read_text())
        meta.setdefault("resumes", []).append(entry)
    else:
        meta = {"seed": int(cfg.train.seed), "git_commit": git_commit(), "torch": torch.__version__,
                "python": sys.version.split()[0], **entry}
    save_json(path, meta)


def save_config(run_dir: Path, cfg: DictConfig) -> None:
    atomic_write_bytes(Path(run_dir) / "config.yaml", lambda p: OmegaConf.save(cfg, p))


def rng_state() -> Dict[str, Any]:
    """RNG states as tensors and plain containers (loadable with ``weights_only=True``)."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    st = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss],
          "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: Dict[str, Any]) -> None:
    random.setstate(tuple(st["python"]))
    kind, key, pos, has_gauss, gauss = st["numpy"]
    key = key.numpy() if isinstance(key, torch.Tensor) else np.asarray(key)
    np.random.set_state((kind, key.astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available() and len(st["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(st["cuda"])


def read_checkpoint(path: Path, map_location="cpu") -> Dict[str, Any]:
    """Load a checkpoint with one-line errors for missing, truncated or foreign files."""
    from ..safeio import torch_load

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' not found; train first (moecnn train --out {path.parent})")
    ck = torch_load(path, map_location=map_location)
    if not isinstance(ck, dict) or "model" not in ck:
        raise RuntimeError(f"'{path}' is not a moecnn checkpoint (no 'model' entry)")
    return ck


def load_model_state(model: torch.nn.Module, state: Dict[str, torch.Tensor], path: Path) -> None:
    """Strict load; an architecture mismatch becomes one line naming a few offending keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    shape = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or extra or shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", extra), ("shape mismatch", shape)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        raise RuntimeError(
            f"checkpoint '{path}' does not match the model in the config ({'; '.join(parts)}); "
            f"it was made for another architecture — check model.* settings or the run directory"
        )
    model.load_state_dict(state)


def load_config_file(run_dir: Path) -> DictConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"'{run_dir}' is not a run directory (no config.yaml); run 'moecnn train --out DIR' first")
    return OmegaConf.load(path)


def load_run(run_dir, which: str = "last", device="cpu", data: bool = True) -> Tuple[torch.nn.Module, DictConfig, Any]:
    """(model in eval mode on ``device``, resolved config, DataBundle or None) of a classification run.

    ``which``: "last" (checkpoint.pt), "best" (best.pt) or a path to a checkpoint file.
    """
    from ..data import build_data
    from ..models import build_model
    from .config import TrainConfig, load_config

    run_dir = Path(run_dir)
    cfg = load_config(schema=TrainConfig, base=load_config_file(run_dir))
    path = {"last": run_dir / "checkpoint.pt", "best": run_dir / "best.pt"}.get(which, Path(which))
    bundle = build_data(cfg.data) if data else None
    ck = read_checkpoint(path)
    meta = ck.get("data", {})
    num_classes = bundle.num_classes if bundle is not None else meta["num_classes"]
    in_channels = bundle.in_channels if bundle is not None else meta["in_channels"]
    model = build_model(cfg.model, num_classes, in_channels)
    load_model_state(model, ck["model"], path)
    return model.to(device).eval(), cfg, bundle
