"""Run directories: resolved config, metadata, atomic checkpoints, the run lock and :func:`load_run`.

Layout of RUN_DIR (every task)::

    config.yaml         resolved config (every key)
    meta.json           seed, moecnn version + source hash (+ git commit of moecnn's own repository), torch
                        version, device, world size, command line, start time(s)
    metrics.jsonl       one JSON object per epoch
    checkpoint.pt       last epoch: model, optimizer, scheduler, scaler, epoch, RNG states, best val
                        (tensors and plain containers only: loads with ``weights_only=True``)
    best.pt             the epoch with the best validation metric (model + epoch), when train.save_best
    final.json          the LAST epoch's metrics (test, when the task has a test split, and val); nothing is
                        selected on the test set
    probe_routing.npz   routing of a fixed probe set at every validation (train.probe_size)
    tb/                 TensorBoard events (when tensorboard is installed)
    eval/               written by ``moecnn eval``; every file names the checkpoint it came from
    .lock               held by the training process (a second ``moecnn train`` on the same RUN_DIR is refused)
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

CHECKPOINTS = {"last": "checkpoint.pt", "best": "best.pt"}


# --------------------------------------------------------------------------------------------- atomic files
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
    """Atomic ``torch.save``; a failed write says which file and keeps the previous one."""
    try:
        atomic_write_bytes(path, lambda p: torch.save(obj, p))
    except (OSError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OSError(f"could not write '{path}' ({first}); the previous file, if any, is kept — free disk space or "
                      f"check permissions, then continue with --resume") from None


def read_json(path: Path, what: str = "file") -> Any:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} '{path}' is corrupt (line {e.lineno}: {e.msg}); restore or delete it") from None


def read_metrics(run_dir: Path) -> List[Dict]:
    """metrics.jsonl's records. A torn last line (a kill during the append) is ignored; a bad line elsewhere is
    an error naming the file and line."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                continue  # the half-written line of an interrupted append
            raise ValueError(f"'{path}' line {i + 1} is not JSON; repair or delete that line") from None
    return out


def write_metrics(run_dir: Path, records: List[Dict]) -> None:
    atomic_write_bytes(Path(run_dir) / "metrics.jsonl",
                       lambda p: Path(p).write_text("".join(json.dumps(r) + "\n" for r in records)))


# --------------------------------------------------------------------------------------------- the lock
@contextlib.contextmanager
def run_lock(run_dir: Path, enabled: bool = True) -> Iterator[None]:
    """Hold RUN_DIR/.lock (an OS file lock, released when the process ends, even by a kill) while training."""
    if not enabled:
        yield
        return
    import fcntl

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / ".lock", "a+")
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            who = f.read().strip() or "another process"
            raise RuntimeError(f"run directory '{run_dir}' is in use by {who}; wait for it to finish or use "
                               f"another --out") from None
        f.seek(0)
        f.truncate()
        f.write(f"moecnn pid {os.getpid()}")
        f.flush()
        yield
    finally:
        f.close()


# --------------------------------------------------------------------------------------------- provenance
def source_hash() -> str:
    """sha256 (first 16 hex digits) of moecnn's own source files, in path order."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.suffix in (".py", ".yaml") and p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def git_commit() -> Optional[str]:
    """The commit of moecnn's own repository (``-dirty`` with uncommitted changes), or None when the package
    does not run from a checkout of moecnn (an enclosing, unrelated repository does not count)."""
    try:
        here = Path(__file__).resolve().parent
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=here, capture_output=True, text=True,
                             timeout=5)
        if top.returncode != 0:
            return None
        pyproject = Path(top.stdout.strip()) / "pyproject.toml"
        if not pyproject.is_file() or 'name = "moecnn"' not in pyproject.read_text():
            return None
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", str(here / "runs.py")], cwd=here,
                                 capture_output=True, text=True, timeout=5)
        if tracked.returncode != 0:
            return None
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else None
    except Exception:
        return None


def provenance() -> Dict[str, Any]:
    from .. import __version__

    return {"moecnn": __version__, "source_sha256": source_hash(), "git_commit": git_commit(),
            "torch": torch.__version__, "python": sys.version.split()[0]}


COMMAND: Optional[List[str]] = None  # set by the command line (``moecnn ...`` as typed); else sys.argv


def write_meta(run_dir: Path, cfg: DictConfig, device: torch.device, world_size: int, resumed: bool) -> None:
    path = Path(run_dir) / "meta.json"
    entry = {"start_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": COMMAND or sys.argv,
             "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
             "world_size": world_size, **({"moecnn": provenance()["moecnn"]} if resumed else {})}
    if resumed and path.exists():
        meta = read_json(path, "run metadata")
        meta.setdefault("resumes", []).append(entry)
    else:
        meta = {"task": cfg.task, "seed": int(cfg.train.seed), **provenance(), **entry}
    save_json(path, meta)


def save_config(run_dir: Path, cfg: DictConfig) -> None:
    atomic_write_bytes(Path(run_dir) / "config.yaml", lambda p: OmegaConf.save(cfg, p))


# --------------------------------------------------------------------------------------------- RNG
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


# --------------------------------------------------------------------------------------------- checkpoints
def read_checkpoint(path: Path, map_location="cpu") -> Dict[str, Any]:
    """Load a checkpoint (tensors and plain containers only) with one-line errors for missing, truncated,
    foreign or crafted files."""
    from ..safeio import torch_load

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' not found; train first (moecnn train --out {path.parent})")
    ck = torch_load(path, map_location=map_location)
    if not isinstance(ck, dict) or "model" not in ck:
        raise RuntimeError(f"'{path}' is not a moecnn checkpoint (no 'model' entry)")
    return ck


_FINGERPRINTS: Dict[Tuple[str, int, int], str] = {}


def fingerprint(path: Path) -> str:
    """sha256 (first 16 hex digits) of a checkpoint file: ties derived files (eval/, analysis/) to it."""
    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FINGERPRINTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _FINGERPRINTS[key] = h.hexdigest()[:16]
    return _FINGERPRINTS[key]


def is_current(run_dir: Path, derived: Optional[Dict]) -> bool:
    """Whether a derived file's record (``checkpoint`` + ``checkpoint_sha256``, as ``moecnn eval`` writes them)
    belongs to the run's checkpoint as it is now. Records without a fingerprint (moecnn 0.1), and runs whose
    checkpoint is not there (copied without it), count as current."""
    if not derived or not derived.get("checkpoint_sha256"):
        return True
    path = checkpoint_path(Path(run_dir), str(derived.get("checkpoint", "last")))
    if not path.is_file():  # a run folder copied without its checkpoints: nothing to compare against
        return True
    return fingerprint(path) == derived["checkpoint_sha256"]


def load_model_state(model: torch.nn.Module, state: Dict[str, torch.Tensor], path: Path) -> None:
    """Strict load (through the modules' own load hooks, so older layouts convert); a mismatch becomes one line
    naming a few offending keys."""
    own = model.state_dict()
    shape = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    missing: List[str] = []
    extra: List[str] = []
    if not shape:
        try:
            res = model.load_state_dict(state, strict=False)
            missing, extra = list(res.missing_keys), list(res.unexpected_keys)
        except RuntimeError as e:  # a size mismatch found after a load hook converted the keys
            shape = [ln.split('"')[1] for ln in str(e).splitlines() if "size mismatch for" in ln and '"' in ln] or ["?"]
    if missing or extra or shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", extra), ("shape mismatch", shape)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        raise RuntimeError(
            f"checkpoint '{path}' does not match the model in the config ({'; '.join(parts)}); "
            f"it was made for another architecture — check model.* settings or the run directory"
        )


def load_config_file(run_dir: Path) -> DictConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"'{run_dir}' is not a run directory (no config.yaml); run 'moecnn train --out DIR' first")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:
        raise ValueError(f"'{path}' is not valid YAML ({str(e).splitlines()[0]}); restore it") from None
    if not isinstance(cfg, DictConfig) or not cfg:
        raise ValueError(f"'{path}' is empty or not a mapping; restore it from a copy of the run, or retrain")
    return cfg


def checkpoint_path(run_dir: Path, which: str = "last") -> Path:
    """``last`` → checkpoint.pt, ``best`` → best.pt, else ``which`` is a file path; exported folders (no
    checkpoint) give their model.safetensors."""
    run_dir = Path(run_dir)
    if which in CHECKPOINTS:
        p = run_dir / CHECKPOINTS[which]
        if not p.is_file() and which == "last" and (run_dir / "model.safetensors").is_file():
            return run_dir / "model.safetensors"
        return p
    return Path(which)


def load_run(run_dir, which: str = "last", device="cpu", data: bool = True):
    """(model in eval mode on ``device``, resolved config, task) of a run directory or an exported folder.

    ``which``: "last" (checkpoint.pt), "best" (best.pt) or a checkpoint path. With ``data`` the task's data is
    built (``task.bundle`` for classification); without, the model is rebuilt from the checkpoint's metadata."""
    from ..registry import TASKS
    from ..safeio import read_state_dict
    from .config import load_config

    run_dir = Path(run_dir)
    cfg = load_config(base=load_config_file(run_dir))
    path = checkpoint_path(run_dir, which)
    task = TASKS.get(cfg.task)(cfg, run_dir, torch.device(device))
    if path.suffix == ".safetensors":
        state, info = read_state_dict(path), read_json(run_dir / "moecnn.json", "model info").get("data", {})
    else:
        ck = read_checkpoint(path)
        state, info = ck["model"], ck.get("data", {})
    if data:
        task.setup(train=False)
    else:
        task.info = dict(info)
    model = task.build_model(for_loading=True)
    load_model_state(model, state, path)
    task.bind(model)
    return model.to(device).eval(), cfg, task
