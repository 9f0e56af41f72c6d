"""Channel-stacked experts: N experts of one architecture executed as one grouped network.

Expert e's images sit in channel block e of a ``cap × (N·C) × H × W`` tensor; every Conv2d becomes one grouped
convolution (``groups × N``), every BatchNorm2d one BatchNorm over N·C channels and every GroupNorm one
GroupNorm with N times the groups, so each channel still only
sees its own expert's weights and images. An expert made of Conv2d, BatchNorm2d, GroupNorm, channel-wise activations,
pooling and residual sums (e.g. the ResBlock-MoE experts) computes exactly what N separate modules compute,
but with the kernel launches of one module: that is what makes sparse MoE training cheap on a GPU, where small
per-expert kernels are launch-bound. Construction checks the equivalence numerically on a probe input.
"""
from __future__ import annotations

import copy
from typing import List, Sequence

import torch
from torch import nn

# leaves that act on each channel separately (or hold no computation)
CHANNELWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
    nn.Mish, nn.ELU, nn.Identity, nn.Dropout, nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d, nn.Upsample,
)


def _signature(e: nn.Module):
    mods = [(n, type(m), m.extra_repr()) for n, m in e.named_modules()]  # sizes, eps, momentum, dropout p, ...
    params = [(n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in e.named_parameters()]
    counts = [(n, int(m.num_batches_tracked)) for n, m in e.named_modules()
              if isinstance(m, nn.BatchNorm2d) and m.momentum is None and m.track_running_stats]
    return mods, params, counts


def _check_same_structure(experts: Sequence[nn.Module]) -> None:
    ref = _signature(experts[0])
    for i, e in enumerate(experts[1:], 1):
        if _signature(e) != ref:
            raise ValueError(f"stacked experts need one architecture (same layers, settings, dtypes, frozen "
                             f"parameters); expert {i} differs from expert 0")


STACKED_TYPES = (nn.Conv2d, nn.BatchNorm2d, nn.GroupNorm)


def _blocks(m: nn.Module) -> tuple:
    """Names of ``m``'s tensors that stack along dim 0, one block per expert (the rest is per-layer)."""
    return tuple(a for a in ("weight", "bias", "running_mean", "running_var")
                 if isinstance(getattr(m, a, None), torch.Tensor))


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


class StackedExperts(nn.Module):
    """N same-architecture experts as one channel-stacked module (see the module docstring).

    ``forward(x)`` takes ``N·cap × C × H × W`` images in expert-major order (rows e·cap … e·cap+cap-1 go to
    expert e) and returns the experts' outputs in the same order. ``self[i]`` returns a *copy* of expert i as
    an ordinary module (for inspection or per-expert use); ``len(self)`` is N.
    """

    def __init__(self, experts: Sequence[nn.Module], in_channels: int, probe_size: int = 16) -> None:
        super().__init__()
        experts = list(experts)
        n = len(experts)
        _check_same_structure(experts)
        p0 = next(experts[0].parameters(), None)
        if p0 is None:
            raise ValueError("stacked experts need parameters (a parameter-free expert gains nothing from stacking); "
                             "use stacked=False")
        like = dict(device=p0.device, dtype=p0.dtype)
        net = copy.deepcopy(experts[0])
        for name, m in experts[0].named_modules():
            if list(m.children()):
                own = list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
                if own:  # e.g. a norm layer with a fused activation submodule: not a plain container
                    raise ValueError(f"cannot stack experts containing {type(m).__name__} ('{name or 'expert'}'), "
                                     f"a module with its own weights and submodules; use stacked=False")
                continue
            mods = [e.get_submodule(name) if name else e for e in experts]
            if type(m) is nn.Conv2d:
                if m.padding_mode != "zeros":
                    raise ValueError(f"stacked experts: conv '{name}' uses padding_mode={m.padding_mode}")
                new = nn.Conv2d(n * m.in_channels, n * m.out_channels, m.kernel_size, m.stride, m.padding,
                                m.dilation, groups=n * m.groups, bias=m.bias is not None, **like)
            elif type(m) is nn.BatchNorm2d:
                if not m.track_running_stats:
                    raise ValueError(f"cannot stack BatchNorm2d '{name}' with track_running_stats=False (it would "
                                     f"use batch statistics, filler copies included, in evaluation); use stacked=False")
                new = nn.BatchNorm2d(n * m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, **like)
                with torch.no_grad():
                    new.num_batches_tracked.copy_(m.num_batches_tracked)  # equal across experts (checked)
            elif type(m) is nn.GroupNorm:  # groups are contiguous channel blocks: N·G groups stay per expert
                new = nn.GroupNorm(n * m.num_groups, n * m.num_channels, m.eps, m.affine, **like)
            elif isinstance(m, CHANNELWISE):
                continue
            else:
                raise ValueError(
                    f"cannot stack experts containing {type(m).__name__} ('{name or 'expert'}'): only Conv2d, "
                    f"BatchNorm2d, GroupNorm and channel-wise layers stack; use stacked=False")
            with torch.no_grad():
                for a in _blocks(m):
                    getattr(new, a).copy_(torch.cat([getattr(b, a) for b in mods]))
            for a, b in zip(new.parameters(), m.parameters()):
                a.requires_grad_(b.requires_grad)
            if name:
                _set(net, name, new)
            else:
                net = new
        self.net = net
        self.num_experts = n
        self.in_channels = in_channels
        self._template = [copy.deepcopy(experts[0]).cpu()]  # a list: not registered as a submodule
        self._verify(experts, probe_size)

    # --------------------------------------------------------------- layout
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.num_experts
        cap = x.shape[0] // n
        cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        xs = x.view(n, cap, *x.shape[1:]).transpose(0, 1).reshape(cap, n * x.shape[1], *x.shape[2:])
        if cl:
            xs = xs.contiguous(memory_format=torch.channels_last)
        ys = self.net(xs)
        c = ys.shape[1] // n
        y = ys.reshape(cap, n, c, *ys.shape[2:]).transpose(0, 1).reshape(n * cap, c, *ys.shape[2:])
        return y.contiguous(memory_format=torch.channels_last) if cl and y.dim() == 4 else y

    def all_on(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on every image: B×C×H×W -> N×B×C'×H'×W'."""
        y = self.forward(x.repeat(self.num_experts, *[1] * (x.dim() - 1)))
        return y.view(self.num_experts, x.shape[0], *y.shape[1:])

    # --------------------------------------------------------------- per-expert copies
    def __len__(self) -> int:
        return self.num_experts

    def __getitem__(self, i: int) -> nn.Module:
        """A copy of expert i as an ordinary module (same weights and running statistics, same mode)."""
        n = self.num_experts
        if not 0 <= i < n:
            raise IndexError(f"expert {i} out of range 0..{n - 1}")
        e = copy.deepcopy(self._template[0])
        w = next(self.net.parameters())
        e = e.to(device=w.device, dtype=w.dtype)
        stacked = dict(self.net.named_modules())
        with torch.no_grad():
            for name, m in e.named_modules():
                if type(m) not in STACKED_TYPES:
                    continue
                s = stacked.get(name) if name else self.net
                for a in _blocks(m):
                    t = getattr(m, a)
                    t.copy_(getattr(s, a)[i * len(t):(i + 1) * len(t)])
                if type(m) is nn.BatchNorm2d:
                    m.num_batches_tracked.copy_(s.num_batches_tracked)
        return e.train(self.training)

    def unstack(self) -> List[nn.Module]:
        return [self[i] for i in range(self.num_experts)]

    @torch.no_grad()
    def _verify(self, experts: List[nn.Module], size: int) -> None:
        """Eval-mode probe: the stacked net must reproduce each expert (catches channel-mixing forwards).

        Each expert gets its own random images, so a forward that mixes channel blocks is caught even when
        the experts start as identical copies."""
        w = next(self.net.parameters())
        g = torch.Generator(device=w.device).manual_seed(0)
        n = self.num_experts
        x = torch.randn(2 * n, self.in_channels, size, size, device=w.device, dtype=w.dtype, generator=g)
        modes = [e.training for e in experts] + [self.net.training]
        try:
            for e in experts:
                e.eval()
            self.net.eval()
            ref = torch.cat([e(x[2 * i: 2 * i + 2]) for i, e in enumerate(experts)])
            try:
                got = self.forward(x)
            except RuntimeError as err:
                raise ValueError(f"these experts do not stack (the stacked probe failed: {str(err).splitlines()[0]}); "
                                 f"use stacked=False") from None
        finally:
            for e, m in zip(experts, modes):
                e.train(m)
            self.net.train(modes[-1])
        tol = 1e-3 * max(1.0, float(ref.abs().max())) if ref.numel() else 0.0
        if got.shape != ref.shape or not torch.allclose(got, ref, rtol=1e-3, atol=tol):
            raise ValueError("these experts do not stack: their forward mixes channels (e.g. a Linear, a "
                             "flatten or a channel reduction); use stacked=False")
