"""Planted-structure data for the analysis tests (shared by test_analysis*.py and test_report*.py)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

CLASS_NAMES = ["rose", "tulip", "truck", "bus"]
SUPER_NAMES = ["flowers", "vehicles"]
CLASS_TO_SUPER = [0, 0, 1, 1]


def planted_images(n_per_class: int = 60, size: int = 16, seed: int = 0):
    """uint8 M×3×H×W images: classes 0/1 (group 0) are reddish, classes 2/3 (group 1) bluish."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(4), n_per_class)
    rng.shuffle(labels)
    group = np.asarray(CLASS_TO_SUPER)[labels]
    img = rng.integers(0, 90, size=(labels.size, 3, size, size)).astype(np.int64)
    img[group == 0, 0] += 150  # red channel
    img[group == 1, 2] += 150  # blue channel
    # classes within a group differ by a bright top half / left half
    img[labels % 2 == 0, :, : size // 2] += 15
    return np.clip(img, 0, 255).astype(np.uint8), labels.astype(np.int64)


def planted_routing(labels: np.ndarray, n_experts: int = 2, seed: int = 0, random: bool = False):
    """Routing arrays (collect_routing layout) whose top-1 expert is the superclass (or random)."""
    rng = np.random.default_rng(seed)
    m = labels.size
    logits = rng.normal(0, 0.3, size=(m, n_experts)).astype(np.float32)
    if random:
        chosen = rng.integers(0, n_experts, m)
    else:
        chosen = np.asarray(CLASS_TO_SUPER)[labels] % n_experts
    logits[np.arange(m), chosen] += 3.0
    e = np.exp(logits - logits.max(1, keepdims=True))
    top2 = np.argsort(-logits, axis=1)[:, :2]
    w = np.zeros_like(logits)
    sel = np.take_along_axis(e, top2, 1)
    np.put_along_axis(w, top2, sel / sel.sum(1, keepdims=True), 1)
    return {"labels": labels, "layers": np.array(["layer4.moe"]), "layer4.moe/logits": logits,
            "layer4.moe/weights": w.astype(np.float32), "layer4.moe/top1": w.argmax(1)}


class ColourGate(nn.Module):
    """A fixed gate that routes by the colour group of the *input image* (read by a model pre-hook)."""

    def __init__(self, n_experts: int = 2, sharp: float = 8.0) -> None:
        super().__init__()
        self.n = n_experts
        self.sharp = sharp
        self.score = None  # set per batch: red - blue mean of the raw input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.score.to(x.device).view(-1, 1) * self.sharp
        out = torch.zeros(x.shape[0], self.n, device=x.device)
        out[:, 0] = s[:, 0]
        out[:, 1] = -s[:, 0]
        return out


def planted_model(n_classes: int = 4, random_gate: bool = False):
    """resnet10_tiny with a 2-expert ResBlock-MoE whose gate routes by the planted colour group."""
    import moecnn

    torch.manual_seed(0)
    model = moecnn.create_model("resnet10_tiny", num_classes=n_classes, moe="resblock", position=4,
                                num_experts=2, k=1)
    (name, layer), = moecnn.moe_layers(model).items()
    gate = ColourGate()
    layer.gate = gate
    gen = torch.Generator().manual_seed(1)

    def hook(_m, args):
        x = args[0]
        if random_gate:
            gate.score = torch.randn(x.shape[0], generator=gen)
        else:
            gate.score = x[:, 0].mean((1, 2)) - x[:, 2].mean((1, 2))

    model.register_forward_pre_hook(hook)
    return model.eval(), name
