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


# ------------------------------------------------------------------ hand-built tiny MoE model (explain tests)
class FixedStem(nn.Module):
    """RGB in [0, 1] -> 4 fixed feature channels at half resolution (2×2 average pooling):
    relu(R − B) ("red"), relu(B − R) ("blue"), relu(G − (R + B) / 2) ("green") and luma."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r, g, b = x[:, 0], x[:, 1], x[:, 2]
        f = torch.stack([torch.relu(r - b), torch.relu(b - r), torch.relu(g - 0.5 * (r + b)),
                         0.299 * r + 0.587 * g + 0.114 * b], 1)
        return nn.functional.avg_pool2d(f, 2)


class RedBlueGate(nn.Module):
    """Gate logits [d, −d] (2 experts) with d = sharp · mean(red − blue feature) over ``region`` (feature-map
    rows/cols, default: the whole map): routes by colour, optionally read from one region only."""

    def __init__(self, region=None, sharp: float = 20.0) -> None:
        super().__init__()
        self.region = region
        self.sharp = sharp

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        if self.region is not None:
            (r0, r1), (c0, c1) = self.region
            f = f[..., r0:r1, c0:c1]
        d = (f[:, 0] - f[:, 1]).mean((1, 2)) * self.sharp
        return torch.stack([d, -d], 1)


class BrightGate(nn.Module):
    """Gate logits [d, −d] with d = sharp · (mean of channel 3 (luma) − threshold): routes by brightness."""

    def __init__(self, sharp: float = 40.0, threshold: float = 0.45) -> None:
        super().__init__()
        self.sharp = sharp
        self.threshold = threshold

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        d = (f[:, 3].mean((1, 2)) - self.threshold) * self.sharp
        return torch.stack([d, -d], 1)


class TinyMoENet(nn.Module):
    """FixedStem -> MoE(2 near-identity 1×1-conv experts, ``gate``, k) [-> second MoE with ``gate2``] -> GAP ->
    Linear. Experts are near-identity and keep channel 3 (luma) exactly, so a second gate can read brightness;
    ``identical=True`` copies expert 0 into the
    others (then forcing any expert changes nothing)."""

    def __init__(self, gate: nn.Module, n_classes: int = 4, k: int = 1, gate2: nn.Module = None,
                 identical: bool = False, seed: int = 0) -> None:
        super().__init__()
        from moecnn import MoE

        torch.manual_seed(seed)

        def experts():
            ex = []
            for _ in range(2):
                conv = nn.Conv2d(4, 4, 1)
                with torch.no_grad():
                    conv.weight.copy_(torch.eye(4).view(4, 4, 1, 1) + 0.3 * torch.randn(4, 4, 1, 1))
                    conv.bias.normal_(0, 0.1)
                    conv.weight[3] = torch.eye(4)[3].view(4, 1, 1)
                    conv.bias[3] = 0.0
                ex.append(conv)
            if identical:
                ex[1].load_state_dict(ex[0].state_dict())
            return ex

        self.stem = FixedStem()
        self.moe1 = MoE(experts(), gate=gate, k=k, in_channels=4, noisy=False)
        self.moe2 = MoE(experts(), gate=gate2, k=k, in_channels=4, noisy=False) if gate2 is not None else None
        self.head = nn.Linear(4, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.moe1(self.stem(x))
        if self.moe2 is not None:
            f = self.moe2(f)
        return self.head(f.mean((2, 3)))


# feature-map region (rows, cols) of the region gate and the matching image region (32×32 images)
FEAT_REGION = ((0, 8), (8, 16))
IMAGE_REGION = ((0, 16), (16, 32))


def region_images(n: int = 24, size: int = 32, seed: int = 0):
    """uint8 images: grey luminance noise (R = G = B), green distractor squares anywhere outside
    ``IMAGE_REGION``, and a red or blue patch filling ``IMAGE_REGION`` (the only coloured thing the region gate
    sees). Returns (images, colour 0 = red / 1 = blue)."""
    rng = np.random.default_rng(seed)
    colour = np.arange(n) % 2
    grey = rng.integers(40, 200, size=(n, 1, size, size))
    img = np.repeat(grey, 3, axis=1).astype(np.int64)
    (r0, r1), (c0, c1) = IMAGE_REGION
    for i in range(n):
        for _ in range(2):  # green distractors, left half / bottom half only
            y, x = rng.integers(0, size - 8), rng.integers(0, c0 - 8)
            img[i, :, y:y + 8, x:x + 8] = [[[60]], [[200]], [[60]]]
        base = [200, 60, 60] if colour[i] == 0 else [60, 60, 200]
        noise = rng.integers(-30, 30, size=(r1 - r0, c1 - c0))
        img[i, :, r0:r1, c0:c1] = np.asarray(base)[:, None, None] + noise[None]
    return np.clip(img, 0, 255).astype(np.uint8), colour


def colour_texture_images(n: int = 160, size: int = 32, seed: int = 0, structured: bool = True):
    """uint8 images = a base colour + a luminance texture added equally to R, G and B (so edges, contrast and
    high-frequency energy do not depend on the colour). ``structured``: half reddish, half bluish base colours
    (returned as ``group``); else uniformly random colours. Texture: random stripes of random period, angle,
    amplitude, plus noise — independent of the colour."""
    rng = np.random.default_rng(seed)
    group = np.arange(n) % 2
    rng.shuffle(group)
    if structured:
        # about equally bright: luma 117 and 116
        base = np.where(group[:, None] == 0, [[165, 95, 105]], [[95, 118, 165]]) + rng.integers(-15, 16, (n, 3))
    else:
        base = rng.integers(80, 176, (n, 3))
    yy, xx = np.mgrid[0:size, 0:size]
    period = rng.uniform(2.5, 16, n)[:, None, None]
    ang = rng.uniform(0, np.pi, n)[:, None, None]
    amp = rng.uniform(5, 45, n)[:, None, None]
    tex = amp * np.sign(np.sin(2 * np.pi * (np.cos(ang) * xx + np.sin(ang) * yy) / period))
    tex = tex + rng.normal(0, 4, (n, size, size))
    img = base[:, :, None, None] + tex[:, None]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), group


def probe_routing_arrays(n_epochs: int = 8, n_probe: int = 240, n_experts: int = 2, specialise_at: int = 3,
                         layers=("moe1", "moe2"), seed: int = 0, stable: bool = True):
    """``probe_routing.npz`` arrays as the training loop writes them. Layer 0: random top-1 experts (redrawn at
    every evaluation) before epoch ``specialise_at``, from then on the expert = superclass (``stable``) or a
    fresh random routing per epoch (``stable=False``); other layers: random throughout. Epochs are 0, 2, 4, …"""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n_probe)
    sup = np.asarray(CLASS_TO_SUPER)[labels]
    epochs = np.arange(n_epochs, dtype=np.int64) * 2
    out = {"epochs": epochs, "labels": labels.astype(np.int64), "superlabels": sup.astype(np.int64),
           "layers": np.array(list(layers))}
    for li, name in enumerate(layers):
        top1 = rng.integers(0, n_experts, (n_epochs, n_probe))
        if li == 0:
            for e in range(n_epochs):
                if epochs[e] >= specialise_at and stable:
                    top1[e] = sup % n_experts
        w = rng.dirichlet(np.ones(n_experts), size=(n_epochs, n_probe))
        w[np.arange(n_epochs)[:, None], np.arange(n_probe)[None], top1] += 1.0
        out[f"{name}/top1"] = top1.astype(np.int16)
        out[f"{name}/weights"] = (w / w.sum(-1, keepdims=True)).astype(np.float16)
    return out
