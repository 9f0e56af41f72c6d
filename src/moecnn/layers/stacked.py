"""N same-architecture experts that can also run as one channel-stacked network.

:class:`StackedExperts` *is* an ``nn.ModuleList`` of the N experts: the state dict is ``{i}.<path>`` exactly
as a list of the experts gives, and ``self[i]`` is the live expert i. On top of that it can execute all N
experts as one network: expert e's images sit in channel block e of a ``cap × (N·C) × H × W`` tensor, every
parameter and buffer is the concatenation of the N experts' tensors along its channel dimension (built in
each forward; running statistics are written back), and the forward of expert 0's architecture runs under
:class:`~moecnn.layers.grouped.ExpertContext` with ``groups=N``: convolutions get N times the groups,
``F.linear`` over channels becomes block-diagonal, layer norms normalise each block, group norms use N times
the groups, batch norms use each expert's real rows only; torchvision's ``StochasticDepth`` and timm's
``DropPath`` draw per image *and* expert. So residual blocks, bottlenecks, MobileNet/EfficientNet blocks
(depthwise convs, squeeze-excitation, timm ``BatchNormAct2d``), ConvNeXt blocks (NHWC ``LayerNorm`` +
``Linear``, ``LayerNorm2d``, layer scale) stack — with the kernel launches of one expert.

Construction proves the equivalence on probe inputs (evaluation, and training with padding rows and an idle
expert): a forward that mixes channel blocks, or whose batch statistics escape the masking, is refused with
one line.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm

from .grouped import ExpertContext, GroupedDropPath, channels_last, drop_path_spec

# leaves whose tensors are per output channel along dim 0 (conv weights also when out_channels == 1)
_CHANNEL_FIRST = (_ConvNd, nn.Linear, _BatchNorm, nn.GroupNorm, nn.LayerNorm, _InstanceNorm)


def _signature(e: nn.Module):
    mods = [(n, type(m), m.extra_repr()) for n, m in e.named_modules()]  # sizes, eps, momentum, dropout p, ...
    params = [(n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in e.named_parameters()]
    bufs = [(n, tuple(b.shape), b.dtype) for n, b in e.named_buffers()]
    return mods, params, bufs


def _check_same_structure(experts: Sequence[nn.Module]) -> None:
    ref = _signature(experts[0])
    for i, e in enumerate(experts[1:], 1):
        if _signature(e) != ref:
            raise ValueError(f"stacked experts need one architecture (same layers, settings, dtypes, frozen "
                             f"parameters); expert {i} differs from expert 0")


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def _random_leaf(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.dropout._DropoutNd) or drop_path_spec(m) is not None


class _Slot:
    """One parameter or buffer of the architecture: where it lives in each expert and how it stacks."""

    __slots__ = ("name", "path", "attr", "param", "dim")

    def __init__(self, name: str, param: bool, dim: Optional[int]) -> None:
        self.name = name
        self.path, _, self.attr = name.rpartition(".")
        self.param = param
        self.dim = dim  # concatenation dim; None: stacked along a new dim 0 (0-d tensors, e.g. BN's counters)


class StackedExperts(nn.ModuleList):
    """N same-architecture experts (an ``nn.ModuleList``) with a channel-stacked execution.

    ``forward(x, valid=None)`` takes ``N·cap × C × ...`` images in expert-major order (rows e·cap … e·cap+cap-1
    go to expert e) and returns the experts' outputs in the same order; ``valid`` (bool cap × N) marks the real
    rows (the rest is padding, left out of every batch statistic). ``self[i]`` is the live expert i.
    """

    def __init__(self, experts: Sequence[nn.Module], in_channels: int, probe_size: int = 16) -> None:
        experts = list(experts)
        super().__init__(experts)
        n = len(experts)
        _check_same_structure(experts)
        if next(experts[0].parameters(), None) is None:
            raise ValueError("stacked experts need parameters (a parameter-free expert gains nothing from stacking); "
                             "use stacked=False")
        self.num_experts = n
        self.in_channels = in_channels
        template = copy.deepcopy(experts[0])
        for name, m in list(template.named_modules()):
            spec = drop_path_spec(m)
            if spec is not None:
                _set(template, name, GroupedDropPath(*spec, groups=n))
            if isinstance(m, _BatchNorm) and m.track_running_stats and m.momentum is None:
                raise ValueError(f"cannot stack BatchNorm '{name}' with momentum=None (a cumulative average per "
                                 f"expert); give it a momentum or use stacked=False")
        owners = dict(template.named_modules())
        slots: List[_Slot] = []
        for param, items in ((True, template.named_parameters()), (False, template.named_buffers())):
            for name, t in items:
                owner = owners[name.rpartition(".")[0]]
                if t.dim() == 0:
                    dim = None
                elif isinstance(owner, _CHANNEL_FIRST):
                    dim = 0
                else:  # e.g. layer scale (C,), (C, 1, 1) or (1, C, 1, 1) owned by a block
                    dim = next((d for d, s in enumerate(t.shape) if s > 1), 0)
                slots.append(_Slot(name, param, dim))
        self._slots = slots
        self._mods = [[e.get_submodule(s.path) if s.path else e for s in slots] for e in experts]
        self._nbt = [i for i, s in enumerate(slots) if s.attr == "num_batches_tracked" and s.dim is None]
        # a list: not a registered submodule (no state, not moved by .to()); its own tensors are never used
        # (every parameter and buffer is passed in each call), so they live on the meta device
        self._template = [template.to("meta")]
        tm = dict(template.named_modules())
        self._pairs = [(tm[name], m) for name, m in experts[0].named_modules()]  # template follows expert 0's modes
        self.register_load_state_dict_pre_hook(_legacy_stacked_keys)
        self._verify(probe_size)

    # --------------------------------------------------------------- stacked tensors
    def _tensor(self, e: int, i: int) -> torch.Tensor:
        m, s = self._mods[e][i], self._slots[i]
        return (m._parameters if s.param else m._buffers)[s.attr]

    def _stacked_state(self) -> Dict[str, torch.Tensor]:
        out = {}
        n = self.num_experts
        for i, s in enumerate(self._slots):
            ts = [self._tensor(e, i) for e in range(n)]
            out[s.name] = torch.stack(ts) if s.dim is None else torch.cat(ts, s.dim)
        return out

    def _write_back(self, state: Dict[str, torch.Tensor]) -> None:
        dst, src = [], []
        n = self.num_experts
        for i, s in enumerate(self._slots):
            if s.param:
                continue
            t = state[s.name]
            parts = t.unbind(0) if s.dim is None else t.chunk(n, s.dim)
            for e in range(n):
                dst.append(self._tensor(e, i))
                src.append(parts[e])
        if dst:
            with torch.no_grad():
                torch._foreach_copy_(dst, src)

    # --------------------------------------------------------------- execution
    def forward(self, x: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        n = self.num_experts
        cap = x.shape[0] // n
        cl = channels_last(x)
        xs = x.view(n, cap, *x.shape[1:]).transpose(0, 1).reshape(cap, n * x.shape[1], *x.shape[2:])
        if cl:
            xs = xs.contiguous(memory_format=torch.channels_last)
        ys = self.run_grouped(xs, valid)
        c = ys.shape[1] // n
        y = ys.reshape(cap, n, c, *ys.shape[2:]).transpose(0, 1).reshape(n * cap, c, *ys.shape[2:])
        return y.contiguous(memory_format=torch.channels_last) if cl and y.dim() == 4 else y

    def run_grouped(self, xs: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The channel-stacked network on ``cap × (N·C) × ...`` (expert e in channel block e)."""
        template = self._template[0]
        for t, m in self._pairs:
            t.training = m.training
        state = self._stacked_state()
        with ExpertContext(self.num_experts, valid, xs.shape[0]):
            ys = functional_call(template, state, (xs,), tie_weights=False)
        if self.training:
            if valid is not None and self._nbt:  # BatchNorm counted a batch for every expert; undo for idle ones
                idle = (~valid.any(0)).to(torch.long)
                nbt = [state[self._slots[i].name] for i in self._nbt]
                torch._foreach_sub_(nbt, [idle] * len(nbt))
            self._write_back(state)
        return ys

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return nn.ModuleList(list(self._modules.values())[idx])
        return super().__getitem__(idx)

    def all_on(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on every image: B×C×H×W -> N×B×C'×H'×W'."""
        y = self.forward(x.repeat(self.num_experts, *[1] * (x.dim() - 1)))
        return y.view(self.num_experts, x.shape[0], *y.shape[1:])

    def unstack(self) -> List[nn.Module]:
        return list(self)

    # --------------------------------------------------------------- proof
    @torch.no_grad()
    def _verify(self, size: int) -> None:
        """Probe inputs: evaluation (channel mixing), then training with padding rows and an idle expert
        (batch statistics, running statistics); buffers and modes are restored afterwards."""
        experts = list(self)
        p0 = next(experts[0].parameters())
        n = self.num_experts
        g = torch.Generator(device=p0.device).manual_seed(0)
        x = torch.randn(2 * n, self.in_channels, size, size, device=p0.device, dtype=p0.dtype, generator=g)
        modes = [m.training for m in self.modules()]
        saved = [b.clone() for b in self.buffers()]
        params = [p for p in self.parameters() if p.is_floating_point()]
        saved_p = [p.clone() for p in params]
        try:
            # different, non-degenerate weights per expert: zero-initialised parameters (a layer scale, a
            # response-normalisation gain) would hide a forward that mixes channel blocks
            for p in params:
                noise = torch.randn(p.shape, device=p.device, dtype=p.dtype, generator=g)
                p.add_(noise * max(float(p.abs().mean()), 0.1))
            self.eval()
            try:
                ref = torch.cat([e(x[2 * i: 2 * i + 2]) for i, e in enumerate(experts)])
            except (RuntimeError, ValueError) as err:
                raise ValueError(f"cannot probe these experts on {size}×{size} inputs ({str(err).splitlines()[0]}); "
                                 f"use stacked=False") from None
            try:
                got = self.forward(x)
            except (RuntimeError, ValueError) as err:
                raise ValueError(f"these experts do not stack (the stacked probe failed: {str(err).splitlines()[0]}); "
                                 f"use stacked=False") from None
            if not _close(got, ref):
                raise ValueError("these experts do not stack: their forward mixes channels (e.g. a Linear on "
                                 "flattened features, a channel reduction); use stacked=False")
            # training: expert e gets counts[e] real rows (one expert idle) in buffers of cap rows
            counts = [(2 + e % 2) if e != 1 or n == 1 else 0 for e in range(n)]
            cap = max(counts) + 1
            xb = torch.randn(n * cap, *x.shape[1:], device=x.device, dtype=x.dtype, generator=g)
            self.train()
            for m in self.modules():
                if _random_leaf(m):
                    m.eval()
            try:
                refs = [experts[e](xb[e * cap: e * cap + c]) for e, c in enumerate(counts) if c]
            except (RuntimeError, ValueError) as err:
                raise ValueError(f"cannot probe these experts in training ({str(err).splitlines()[0]}); "
                                 f"use stacked=False") from None
            ref_bufs = [b.clone() for b in self.buffers()]
            for b, s in zip(self.buffers(), saved):
                b.copy_(s)
            valid = torch.arange(cap, device=x.device)[:, None] < torch.tensor(counts, device=x.device)[None, :]
            try:
                out = self.forward(xb, valid)
            except (RuntimeError, ValueError) as err:
                raise ValueError(f"these experts do not stack in training (the probe failed: "
                                 f"{str(err).splitlines()[0]}); use stacked=False") from None
            got = torch.cat([out[e * cap: e * cap + c] for e, c in enumerate(counts) if c])
            if not _close(got, torch.cat(refs)) or not all(_close(a, b) for a, b in zip(self.buffers(), ref_bufs)):
                raise ValueError("these experts do not stack in training: their batch statistics are not "
                                 "per expert (a batch-dependent layer other than BatchNorm?); use stacked=False")
        finally:
            for b, s in zip(self.buffers(), saved):
                b.copy_(s)
            for p, s in zip(params, saved_p):
                p.copy_(s)
            for m, t in zip(self.modules(), modes):
                m.training = t


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    if not torch.isfinite(b).all():
        return False
    tol = 1e-3 * max(1.0, float(b.abs().max())) if b.numel() else 0.0
    return bool(torch.allclose(a.float(), b.float(), rtol=1e-3, atol=tol))


def _legacy_stacked_keys(module: StackedExperts, state_dict, prefix, local_metadata, strict, missing, unexpected,
                         errors) -> None:
    """Checkpoints of the former layout (``net.<path>``: the experts' tensors concatenated along dim 0, one
    shared ``num_batches_tracked``) load as per-expert keys ``{i}.<path>``."""
    old = [k for k in state_dict if k.startswith(prefix + "net.")]
    if not old:
        return
    n = module.num_experts
    for k in old:
        t = state_dict.pop(k)
        rest = k[len(prefix) + 4:]
        for e in range(n):
            state_dict[f"{prefix}{e}.{rest}"] = t.clone() if t.dim() == 0 else t.chunk(n, 0)[e].clone()

