"""Sharing trained models: ``moecnn export RUN --out DIR``, :func:`from_pretrained` and the Hugging Face Hub.

An exported folder holds only files that cannot run code:

- ``model.safetensors``  the model's tensors
- ``config.yaml``        the resolved run config (dense warm-start and download settings cleared: the weights
  are all in ``model.safetensors``); ``config.json`` holds the same for the Hub's tools
- ``moecnn.json``        what rebuilding the model needs without its data (classes, channels, normalisation),
  the checkpoint it came from (name and sha256), provenance and the run's headline numbers
- ``README.md``          a model card generated from the run's files: task, data, architecture and MoE layers,
  accuracy and k sweep, NMI against its permutation null, each expert's top superclasses, the training command

:func:`from_pretrained` accepts such a folder or a Hub repository id (downloaded with ``huggingface_hub``);
``moecnn eval``, ``analyze`` and ``report`` accept an exported folder like a run directory (they need the data
the config names). :class:`Pretrained` is a ``huggingface_hub.ModelHubMixin``: ``save_pretrained``,
``push_to_hub`` and ``from_pretrained`` work as for any Hub model.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from huggingface_hub import ModelHubMixin
from omegaconf import DictConfig, OmegaConf

FORMAT = 1
FILES = ("model.safetensors", "config.yaml", "config.json", "moecnn.json", "README.md")


def _json(path: Path) -> Optional[Dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _shareable(cfg: DictConfig) -> DictConfig:
    """The config with settings that point at files or downloads cleared (the weights are exported)."""
    c = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    m = c.model
    for key, empty in (("init_from", None), ("init_from_ignore", []), ("pretrained", False), ("weights", None),
                       ("weights_backbone", None)):
        if key in m:
            m[key] = empty
    return c


def export_run(run_dir, out, which: str = "last") -> Path:
    """Write an exported folder for the run's ``which`` checkpoint (see the module docstring); returns ``out``."""
    from .train.runs import checkpoint_path, fingerprint, load_run, provenance

    run_dir, out = Path(run_dir), Path(out)
    if out.resolve() == run_dir.resolve():
        raise ValueError("--out must be a new folder, not the run directory itself")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"'{out}' exists and is not empty; choose a new --out folder")
    model, cfg, task = load_run(run_dir, which=which, data=False)
    ck = checkpoint_path(run_dir, which)
    info = {"format": FORMAT, "task": cfg.task, "source_run": str(run_dir), "checkpoint": ck.name,
            "checkpoint_sha256": fingerprint(ck), "exported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "data": task.info, "provenance": provenance(), "results": _results(run_dir)}
    return save_folder(out, model, _shareable(cfg), info, model_card(run_dir, cfg, model, info))


def save_folder(out: Path, model: torch.nn.Module, cfg: DictConfig, info: Dict, card: str) -> Path:
    from safetensors.torch import save_file

    from .train.runs import atomic_write_bytes, save_json

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write_bytes(out / "model.safetensors", lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    atomic_write_bytes(out / "config.yaml", lambda p: OmegaConf.save(cfg, p))
    save_json(out / "config.json", OmegaConf.to_container(cfg, resolve=True))
    save_json(out / "moecnn.json", info)
    atomic_write_bytes(out / "README.md", lambda p: Path(p).write_text(card))
    return out


def _results(run_dir: Path) -> Dict[str, Any]:
    """The run's headline numbers from its files (eval summary, final.json, analysis headline)."""
    res: Dict[str, Any] = {}
    final = _json(run_dir / "final.json")
    if final:
        res["final"] = {k: final.get(k) for k in ("epoch", "metric", "test", "val")}
        for split in ("test", "val"):
            if isinstance(res["final"].get(split), dict):  # drop per-class lists from the card's numbers
                res["final"][split] = {k: v for k, v in res["final"][split].items() if not isinstance(v, (list, dict))}
    for name in ("summary.json", "val_summary.json"):
        ev = _json(run_dir / "eval" / name)
        if ev:
            res["eval_" + name.replace(".json", "")] = {k: ev[k] for k in ("split", "checkpoint_sha256", "default",
                                                                          "k_sweep", "tta_flip") if k in ev}
    an = _json(run_dir / "analysis" / "summary.json")
    if an and an.get("headline"):
        res["analysis_headline"] = an["headline"]
    return res


def _pct(v) -> str:
    return "–" if v is None else f"{v:.2f}"


def model_card(run_dir: Path, cfg: DictConfig, model: torch.nn.Module, info: Dict) -> str:
    """A model card (markdown) from the run's files; numbers appear only where a file holds them."""
    from .layers import moe_layers

    meta = _json(run_dir / "meta.json") or {}
    res = info["results"]
    m = cfg.model
    layers = moe_layers(model)
    nparams = sum(p.numel() for p in model.parameters())
    data = info["data"]
    lines: List[str] = ["---", "library_name: moecnn", "tags: [mixture-of-experts, interpretability, "
                        f"{cfg.task}]", "---", "", f"# {m.name} with sparse mixture-of-experts layers ({cfg.task})", "",
                        "Trained with [moecnn](https://arxiv.org/abs/2204.10598) (sparsely-gated mixture-of-experts "
                        "layers for CNN interpretability, after Pavlitska et al., IJCNN 2023).", ""]
    lines += ["## Model", "", f"- task: {cfg.task}; source: {m.get('source', 'moecnn')}; model: {m.name}; "
              f"{nparams / 1e6:.2f} M parameters"]
    for name, layer in layers.items():
        bal = ", ".join(f"{k} {v:g}" for k, v in layer.soft_losses.items()) or "none"
        hard = type(layer.constraint).__name__ if layer.constraint is not None else "none"
        lines.append(f"- MoE layer `{name}`: {layer.num_experts} experts, top-{layer.k}, gate "
                     f"`{type(layer.gate).__name__}`, soft balancing {bal}, hard constraint {hard}")
    lines += ["", "## Data", "", f"- dataset: {data.get('dataset')}; classes: {data.get('num_classes')}"]
    if data.get("superclass_names"):
        lines.append(f"- superclasses: {len(data['superclass_names'])}")
    lines += ["", "## Results (from the run's files)", ""]
    final = res.get("final") or {}
    metric = final.get("metric") or ("top1" if cfg.task == "classification" else "AP")
    for split in ("test", "val"):
        if isinstance(final.get(split), dict) and final[split].get(metric) is not None:
            lines.append(f"- {split} {metric} at the last epoch ({int(final['epoch']) + 1} epochs): "
                         f"{_pct(final[split][metric])}")
    ev = res.get("eval_summary") or res.get("eval_val_summary")
    if ev:
        if ev.get("checkpoint_sha256") not in (None, info["checkpoint_sha256"]):
            lines.append("- (the run's eval/ results belong to another checkpoint and are not shown)")
        else:
            if ev.get("k_sweep"):
                ks = " / ".join(f"k={k}: {_pct(v.get(metric))}" for k, v in ev["k_sweep"].items())
                lines.append(f"- {ev.get('split')} {metric} by test-time k: {ks}")
            if ev.get("tta_flip"):
                lines.append(f"- with flip test-time augmentation (beside, not instead of): "
                             f"{_pct(ev['tta_flip'].get(metric))}")
    for name, h in (res.get("analysis_headline") or {}).items():
        if name.startswith("_") or not isinstance(h, dict):
            continue
        if h.get("nmi_superclass") is not None:
            lines.append(f"- `{name}`: NMI(top-1 expert, superclass) {h['nmi_superclass']:.3f} against a permutation "
                         f"null max of {h.get('nmi_superclass_null_max')} (p = {h.get('nmi_superclass_p')})")
        for t in h.get("top", []):
            lines.append(f"  - {t}")
    cmd = meta.get("command") or []
    if cmd and (Path(cmd[0]).name in ("moecnn", "cli.py")):
        cmd = ["moecnn", *cmd[1:]]
    lines += ["", "## Training", "", f"- command: `{' '.join(map(str, cmd))}`",
              f"- device: {meta.get('device')}; started {meta.get('start_time')}",
              f"- moecnn {info['provenance']['moecnn']} (source sha256 {info['provenance']['source_sha256']}"
              + (f", commit {meta.get('git_commit')}" if meta.get("git_commit") else "") + f"), torch {meta.get('torch')}",
              "", "## Use", "", "```python", "import moecnn", "", "model = moecnn.from_pretrained(\"PATH_OR_REPO_ID\")",
              "with moecnn.routing_override(model, k=1):  # or force=i, dense=True, disabled=[...]",
              "    ...", "```", ""]
    return "\n".join(lines)


class Pretrained(ModelHubMixin, library_name="moecnn", tags=["mixture-of-experts", "interpretability"]):
    """An exported moecnn model: ``model`` (eval mode), ``config`` and ``info`` (moecnn.json).

    ``Pretrained.from_pretrained(folder_or_repo_id)``, ``.save_pretrained(folder)`` and ``.push_to_hub(repo_id)``
    come from ``huggingface_hub.ModelHubMixin``."""

    def __init__(self, model: torch.nn.Module, config: DictConfig, info: Dict[str, Any], card: str = "") -> None:
        self.model, self.config, self.info, self.card = model, config, info, card

    def _save_pretrained(self, save_directory: Path) -> None:
        save_folder(Path(save_directory), self.model, self.config, self.info, self.card or "# moecnn model\n")

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: Optional[str] = None, cache_dir=None,
                         force_download: bool = False, local_files_only: bool = False, token=None,
                         device: str = "cpu", **kwargs) -> "Pretrained":
        path = Path(model_id)
        if not path.is_dir():
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(repo_id=model_id, revision=revision, cache_dir=cache_dir,
                                          force_download=force_download, local_files_only=local_files_only,
                                          token=token, allow_patterns=list(FILES)))
        return load_folder(path, device)


def load_folder(path: Path, device: str = "cpu") -> Pretrained:
    from .train.runs import load_run, read_json

    missing = [f for f in ("model.safetensors", "config.yaml", "moecnn.json") if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"'{path}' is not an exported moecnn model (missing {', '.join(missing)}); make one "
                                f"with 'moecnn export RUN --out DIR'")
    info = read_json(path / "moecnn.json", "model info")
    if int(info.get("format", 0)) > FORMAT:
        raise ValueError(f"'{path}' was exported by a newer moecnn (format {info.get('format')}); upgrade moecnn")
    model, cfg, _ = load_run(path, which="last", device=device, data=False)
    card = (path / "README.md").read_text() if (path / "README.md").is_file() else ""
    return Pretrained(model, cfg, info, card)


def from_pretrained(source, device: str = "cpu") -> torch.nn.Module:
    """The model (eval mode, ready for ``routing_override``, ``set_k`` …) of an exported folder or a Hub repo id."""
    return Pretrained.from_pretrained(source, device=device).model
