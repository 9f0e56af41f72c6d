"""Any classifier with MoE layers, from one :class:`~moecnn.models.config.ModelConfig`.

:func:`build_classifier` composes five steps, each small and separately usable:

1. a dense model from a registered **source** (``moecnn``: the paper's CIFAR ResNets; ``torchvision``; ``timm``);
2. optionally a **small-input stem** (:func:`adapt_small_input`): the first downsampling layers run at stride 1,
   so a network designed for 224-pixel images keeps spatial resolution on 32-pixel ones;
3. optionally **dense weights** (``init_from``: a run directory, a checkpoint or a state dict file), loaded
   before any MoE exists — the start of sparse upcycling (Komatsuzaki et al. 2022, arXiv 2212.05055);
4. a registered **placement** (``moe=resblock|block|conv``, moecnn CIFAR ResNets);
5. **targets**: module paths or glob patterns, each replaced by an MoE of ``num_experts`` copies of itself
   (``init=copy`` keeps the dense function at step 0: every expert equals the module and the gate weights
   sum to one).
"""
from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any, Dict, List, Sequence

import torch
from torch import nn

from ..layers import moeify
from ..registry import MODELS, SOURCES
from .cifar_resnet import place
from .config import ModelConfig, moe_kwargs

SMALL_INPUT_FACTOR = 4  # downsampling removed by small_input: 224-px designs at 32 px end at 4×4, like CIFAR ResNets

EXTRAS = {"timm": "timm"}  # source -> the moecnn extra that installs it


# --------------------------------------------------------------------------------------------- sources
@SOURCES.register("moecnn")
def moecnn_source(name: str, num_classes: int, in_channels: int, cfg: Any) -> nn.Module:
    kw: Dict[str, Any] = dict(num_classes=num_classes, in_channels=in_channels)
    if getattr(cfg, "width", None) is not None:
        kw["width"] = cfg.width
    return MODELS.get(name)(**kw)


@SOURCES.register("torchvision")
def torchvision_source(name: str, num_classes: int, in_channels: int, cfg: Any) -> nn.Module:
    import torchvision

    try:
        torchvision.models.get_model_builder(name)
    except ValueError:
        known = ", ".join(n for n in torchvision.models.list_models(module=torchvision.models))
        raise ValueError(f"torchvision has no classification model '{name}' (e.g. {known[:200]}...)") from None
    if getattr(cfg, "pretrained", False):  # the published weights (downloaded), then a new classifier
        model = torchvision.models.get_model(name, weights="DEFAULT")
        if num_classes != 1000:
            _replace_last_linear(model, num_classes)
    else:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if in_channels != 3:
        _replace_first_conv(model, in_channels)
    return model


@SOURCES.register("timm")
def timm_source(name: str, num_classes: int, in_channels: int, cfg: Any) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise ValueError(f"timm has no model '{name}' (see timm.list_models('{name[:4]}*'))")
    return timm.create_model(name, pretrained=bool(getattr(cfg, "pretrained", False)), num_classes=num_classes,
                             in_chans=in_channels)


def _replace_last_linear(model: nn.Module, num_classes: int) -> None:
    name, lin = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    _set(model, name, nn.Linear(lin.in_features, num_classes, bias=lin.bias is not None))


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    name, c = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    _set(model, name, nn.Conv2d(in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation,
                                c.groups, c.bias is not None, c.padding_mode))


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


# --------------------------------------------------------------------------------------------- small inputs
def adapt_small_input(model: nn.Module, factor: int = SMALL_INPUT_FACTOR, in_channels: int = 3,
                      probe: int = 32) -> List[str]:
    """Run the first downsampling layers (in module order) at stride 1 until ``factor`` is removed.

    Strided convolutions keep their kernel (a patchify stem, kernel = stride, pads "same"); strided pooling
    becomes the identity. A forward on a ``probe``-pixel image checks the result (a residual block whose
    branches would disagree is refused with one line). Returns the names of the changed layers."""
    removed, changed = 1, []
    for name, m in list(model.named_modules()):
        if removed >= factor:
            break
        if isinstance(m, nn.Conv2d) and max(m.stride) > 1:
            s = max(m.stride)
            if isinstance(m.padding, tuple) and m.kernel_size == m.stride and m.padding == (0, 0):
                m.padding = "same"
            m.stride = (1, 1)
            removed *= s
            changed.append(name)
        elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)) and _stride(m) > 1:
            removed *= _stride(m)
            _set(model, name, nn.Identity())
            changed.append(name)
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(2, in_channels, probe, probe))
    except RuntimeError as e:
        raise ValueError(f"model.small_input could not adapt this model (changed {', '.join(changed)}; the "
                         f"probe forward failed: {str(e).splitlines()[0][:120]}); set model.small_input=false "
                         f"and feed larger images") from None
    finally:
        model.train(was)
    return changed


def _stride(m: nn.Module) -> int:
    s = m.stride
    return max(s) if isinstance(s, (tuple, list)) else int(s or 1)


# --------------------------------------------------------------------------------------------- dense weights
def load_init_weights(model: nn.Module, source: str, ignore: Sequence[str] = ()) -> Dict[str, List[str]]:
    """Load dense weights into ``model`` before any MoE is made: a moecnn run directory (its checkpoint.pt),
    a moecnn checkpoint, or a state dict file (torch or safetensors). Keys matching an ``ignore`` glob keep
    the model's own values; anything else that does not fit is one error line."""
    from ..safeio import read_state_dict

    path = Path(source).expanduser()
    if path.is_dir():
        path = path / "checkpoint.pt"
    sd = read_state_dict(path, what="model.init_from")
    own = model.state_dict()

    def ignored(k: str) -> bool:
        return any(fnmatch.fnmatchcase(k, p) for p in ignore)

    sd = {k: v for k, v in sd.items() if not ignored(k)}
    missing = [k for k in own if k not in sd and not ignored(k)]
    extra = [k for k in sd if k not in own]
    shape = [k for k in sd if k in own and tuple(own[k].shape) != tuple(sd[k].shape)]
    if missing or extra or shape:
        parts = [f"{len(v)} {label} (e.g. {', '.join(v[:3])})" for label, v in
                 (("missing", missing), ("unexpected", extra), ("of another shape", shape)) if v]
        hint = ", ".join(sorted({k.split(".")[0] + ".*" for k in (shape or missing or extra)}))[:80]
        raise ValueError(f"model.init_from '{source}' does not fit the dense model ({'; '.join(parts)}); load a "
                         f"dense checkpoint of the same architecture, or skip keys with "
                         f"model.init_from_ignore=[{hint}]")
    model.load_state_dict({**own, **sd})
    return {"loaded": list(sd), "kept": [k for k in own if k not in sd]}


# --------------------------------------------------------------------------------------------- targets
def resolve_targets(model: nn.Module, patterns: Sequence[str]) -> List[str]:
    """Module names matched by dotted paths or glob patterns (``blocks.5.*``), outermost matches only."""
    names = [n for n, _ in model.named_modules() if n]
    found: List[str] = []
    for pat in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            stem = pat.split("*")[0].rstrip(".")
            near = [n for n in names if n.startswith(stem.rsplit(".", 1)[0])][:8] or names[:8]
            raise ValueError(f"model.targets: '{pat}' matches no submodule; near it: {', '.join(near)}")
        found += [h for h in hits if h not in found]
    return [n for n in found if not any(n.startswith(o + ".") for o in found if o != n)]


# --------------------------------------------------------------------------------------------- the pipeline
def build_classifier(cfg: ModelConfig, num_classes: int, in_channels: int = 3) -> nn.Module:
    """Dense model → small-input stem → dense weights → placement → targets (see the module docstring)."""
    if cfg.source not in SOURCES:
        raise ValueError(f"model.source must be one of {', '.join(SOURCES.names())}, got '{cfg.source}'")
    model = SOURCES.get(cfg.source)(cfg.name, num_classes, in_channels, cfg)
    if cfg.small_input and cfg.source != "moecnn":
        adapt_small_input(model, in_channels=in_channels)
    if cfg.init_from:
        load_init_weights(model, cfg.init_from, list(cfg.init_from_ignore))
    kw = moe_kwargs(cfg)
    if cfg.moe != "none":
        place(model, cfg.moe, cfg.position, num_experts=cfg.num_experts, k=cfg.k, expert_width=cfg.expert_width, **kw)
    if cfg.targets:
        moeify(model, resolve_targets(model, list(cfg.targets)), cfg.num_experts, k=cfg.k, init=cfg.init,
               noise=cfg.init_noise, **kw)
    return model
