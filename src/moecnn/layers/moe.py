"""The sparsely-gated mixture-of-experts layer for convolutional feature maps (SPEC §1).

``MoE(experts, gate, k)`` routes each image of a B×C×H×W batch to its top-k experts; expert i runs only on
the images routed to it. The layer returns a tensor (drop-in for any ``nn.Module``) and keeps a structured
:class:`RoutingRecord` of its last forward in ``layer.record`` (read them all with
:func:`moecnn.layers.control.routing` / :func:`moecnn.layers.control.aux_loss`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import CONSTRAINTS, LOSSES
from .balance import HardConstraint, RoutingStats, build_constraint
from .gates import build_gate
from .stacked import StackedExperts


@dataclass
class RoutingRecord:
    """Routing of one forward pass of one MoE layer.

    Per-image gates: ``logits``/``weights`` are B×N, ``indices`` B×k. Spatial gates: B×N×H×W and B×H×W×k.
    ``logits`` are the raw gate outputs (before noise, masks and top-k); ``weights`` the sparse gate
    weights actually used (each image's row sums to 1). Both are detached. ``aux_losses`` holds each
    balancing term already multiplied by its weight (with gradient); ``aux_raw`` the unweighted values.
    """

    logits: torch.Tensor
    weights: torch.Tensor
    indices: torch.Tensor
    aux_losses: Dict[str, torch.Tensor] = field(default_factory=dict)
    aux_raw: Dict[str, torch.Tensor] = field(default_factory=dict)
    masked: Optional[torch.Tensor] = None  # bool N, experts masked by a hard constraint in this batch
    dropped: Optional[torch.Tensor] = None  # share of routed slots dropped (capacity mode only)

    def _per_unit(self, t: torch.Tensor) -> torch.Tensor:
        return t.movedim(1, -1).reshape(-1, t.shape[1]) if t.dim() == 4 else t

    @property
    def importance(self) -> torch.Tensor:
        """Imp_i = Σ_b g_bi (N)."""
        return self._per_unit(self.weights).sum(0)

    @property
    def counts(self) -> torch.Tensor:
        """Number of images (units) routed to each expert (N)."""
        return (self._per_unit(self.weights) > 0).sum(0)

    @property
    def aux_total(self) -> torch.Tensor:
        if not self.aux_losses:
            return self.weights.new_zeros(())
        return torch.stack(list(self.aux_losses.values())).sum()


def _first_in_channels(module: nn.Module) -> Optional[int]:
    for m in module.modules():
        for attr in ("in_channels", "in_features", "num_features"):
            if isinstance(getattr(m, attr, None), int):
                return int(getattr(m, attr))
    return None


def _normalise_balance(balance, balance_weight: float) -> tuple[Dict[str, float], Optional[str]]:
    """-> (soft losses {name: weight}, hard constraint name or None)."""
    if balance is None or balance == "none":
        return {}, None
    if isinstance(balance, str):
        balance = [balance]
    if isinstance(balance, Mapping):
        items = dict(balance)
    else:
        items = {name: balance_weight for name in balance}
    soft: Dict[str, float] = {}
    hard = None
    for name, w in items.items():
        if name in CONSTRAINTS:
            if hard is not None:
                raise ValueError(f"at most one hard constraint per layer, got '{hard}' and '{name}'")
            hard = name
        else:
            LOSSES.get(name)  # raises a clear error for unknown names
            soft[name] = float(w)
    return soft, hard


class MoE(nn.Module):
    """Sparsely-gated mixture of experts over conv feature maps.

    Args:
        experts: modules mapping the same B×C×H×W input to outputs of one shape (B, ...).
        gate: registered gate name (``gap_fc``, ``conv_gap``, ``gap_mlp``, ``relu_gap_fc``, ``spatial``) or a
            module returning B×N (per image) or B×N×H×W (per pixel) logits.
        k: experts per image (1 ≤ k ≤ N).
        balance: None; a soft loss or hard constraint name; a list of names (each weighted
            ``balance_weight``); or a dict {name: weight}. Soft: importance, kl, load, switch, z_loss,
            entropy, column_entropy. Hard: relative, mean.
        balance_weight: w_aux for soft losses named without a weight (the paper: 0.5 on CIFAR-100).
        threshold: τ of a hard constraint (default 0.5 relative, 0.3 mean).
        decay: hard-constraint state decay (None = the reference's never-decaying state).
        noisy: noisy top-k in training (default: on for soft/no balancing, off for hard constraints).
        in_channels: gate input channels (inferred from the first expert when omitted).
        capacity_factor: None = exact dispatch (one N-element count copy to the host per forward);
            a float = in training, a fixed per-expert capacity ceil(cf·B·k/N), fully sync-free and
            static-shaped (overflowing slots are dropped; free slots are filled with copies of routed
            images). Evaluation always dispatches exactly (no drops).
        gate_kwargs: extra arguments for the gate constructor.
        stacked: run the N experts (one architecture of Conv2d/BatchNorm2d/channel-wise layers) as one
            channel-stacked grouped network (:class:`StackedExperts`): the kernel launches of one expert.
            Every expert then gets a buffer of one size (the capacity; without ``capacity_factor``, the
            largest expert count, one host sync); free slots hold copies of routed images, which BatchNorm
            sees in training. ``layer.experts[i]`` is then a copy of expert i.
    """

    def __init__(
        self,
        experts: Sequence[nn.Module],
        gate: str | nn.Module = "gap_fc",
        k: int = 2,
        balance=None,
        balance_weight: float = 0.5,
        threshold: float | None = None,
        decay: float | None = None,
        noisy: bool | None = None,
        in_channels: int | None = None,
        capacity_factor: float | None = None,
        gate_kwargs: Optional[dict] = None,
        stacked: bool = False,
    ) -> None:
        super().__init__()
        experts = list(experts)
        n = len(experts)
        if n < 1:
            raise ValueError("MoE needs at least one expert")
        if not isinstance(k, int) or not 1 <= k <= n:
            raise ValueError(f"k must be an integer with 1 <= k <= num_experts={n}, got k={k}")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0 or None, got {capacity_factor}")
        self.num_experts = n
        self.k = k
        if in_channels is None:
            in_channels = _first_in_channels(experts[0])
            if in_channels is None:
                raise ValueError("cannot infer the gate's input channels from the experts; pass in_channels=")
        self.in_channels = in_channels
        self.experts = StackedExperts(experts, in_channels) if stacked else nn.ModuleList(experts)
        self.stacked = bool(stacked)
        self.gate = build_gate(gate, in_channels, n, **(gate_kwargs or {}))
        self.soft_losses, hard = _normalise_balance(balance, balance_weight)
        self.constraint: Optional[HardConstraint] = (
            build_constraint(hard, n, threshold, decay) if hard is not None else None
        )
        self.noisy = (hard is None) if noisy is None else bool(noisy)
        self.noise = nn.Linear(in_channels, n, bias=False) if self.noisy else None
        self.capacity_factor = capacity_factor
        # inference controls (host-side settings, not part of the saved state)
        self.k_override: Optional[int] = None
        self.forced_expert: Optional[int] = None
        self.dense: bool = False
        self.disabled: tuple[int, ...] = ()
        self.register_buffer("_disabled_mask", torch.zeros(n, dtype=torch.bool), persistent=False)
        self.record: Optional[RoutingRecord] = None
        self._shape_checked = False

    # ------------------------------------------------------------------ controls
    @property
    def active_k(self) -> int:
        return self.k_override if self.k_override is not None else self.k

    def set_controls(
        self,
        k: int | None = None,
        force: int | None = None,
        dense: bool = False,
        disabled: Sequence[int] = (),
    ) -> None:
        """Inference controls: test-time k, one forced expert, equal weights over all, disabled experts."""
        n = self.num_experts
        disabled = tuple(sorted({int(i) for i in disabled}))
        for i in disabled:
            if not 0 <= i < n:
                raise ValueError(f"cannot disable expert {i}: the layer has experts 0..{n - 1}")
        if len(disabled) >= n:
            raise ValueError(f"cannot disable all {n} experts")
        if force is not None and not 0 <= force < n:
            raise ValueError(f"cannot force expert {force}: the layer has experts 0..{n - 1}")
        if force is not None and force in disabled:
            raise ValueError(f"expert {force} is both forced and disabled")
        eff_k = self.k if k is None else k
        if not isinstance(eff_k, int) or not 1 <= eff_k <= n - len(disabled):
            raise ValueError(
                f"k must satisfy 1 <= k <= enabled experts ({n - len(disabled)} of {n}), got k={eff_k}"
            )
        self.k_override = k
        self.forced_expert = force
        self.dense = bool(dense)
        self.disabled = disabled
        self._disabled_mask.zero_()
        if disabled:
            self._disabled_mask[list(disabled)] = True

    def reset_controls(self) -> None:
        self.set_controls()

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, return_record: bool = False):
        n = self.num_experts
        if not self._shape_checked and x.shape[0] > 0 and not self.stacked:
            self._check_experts(x)
        # routing in float32 whatever the surrounding autocast says (tiny cost, stable top-k and losses)
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf = x.float()
            logits = self.gate(xf).float()
        spatial = logits.dim() == 4
        if logits.shape[1] != n or logits.shape[0] != x.shape[0]:
            raise ValueError(f"gate returned shape {tuple(logits.shape)}, expected (B={x.shape[0]}, N={n}, ...)")
        controls = self.forced_expert is not None or self.dense
        noise_std = None
        noisy_logits = logits
        if self.training and self.noisy and self.noise is not None and not controls:
            with torch.autocast(device_type=x.device.type, enabled=False):
                noise_std = F.softplus(self.noise(xf.mean(dim=(2, 3))) + 0.01)
            if spatial:
                noise_std = noise_std[:, :, None, None].expand_as(logits)
            noisy_logits = logits + torch.randn_like(logits) * noise_std

        # per-unit views: T×N (T = B images, or B·H·W pixels)
        def units(t: torch.Tensor) -> torch.Tensor:
            return t.movedim(1, -1).reshape(-1, n) if spatial else t

        tok = units(noisy_logits)
        blocked = self._disabled_mask if self.disabled else None
        hard_mask = None
        k = self.active_k
        if self.constraint is not None and self.training and not controls:
            hard_mask = self.constraint.mask(k, blocked, len(self.disabled))
            blocked = hard_mask if blocked is None else (blocked | hard_mask)
        masked_tok = tok.masked_fill(blocked, float("-inf")) if blocked is not None else tok

        t_units = tok.shape[0]
        if self.forced_expert is not None:
            idx = torch.full((t_units, 1), self.forced_expert, device=tok.device, dtype=torch.long)
            w = torch.ones(t_units, 1, device=tok.device, dtype=tok.dtype)
        elif self.dense:
            enabled = [i for i in range(n) if i not in self.disabled]
            idx = torch.tensor(enabled, device=tok.device, dtype=torch.long).expand(t_units, -1)
            w = torch.full((t_units, len(enabled)), 1.0 / len(enabled), device=tok.device, dtype=tok.dtype)
        else:
            vals, idx = masked_tok.topk(k, dim=1)
            w = torch.softmax(vals, dim=1)
        weights_tok = torch.zeros_like(tok).scatter(1, idx, w)

        # auxiliary losses and hard-constraint state
        aux, aux_raw = {}, {}
        if self.soft_losses:
            stats = RoutingStats(
                logits=units(logits),
                noisy_logits=tok,
                noise_std=units(noise_std) if noise_std is not None else None,
                probs=torch.softmax(masked_tok, dim=1),
                weights=weights_tok,
                chosen=weights_tok > 0,
                k=idx.shape[1],
            )
            for name, wt in self.soft_losses.items():
                val = LOSSES.get(name)(stats)
                aux_raw[name] = val.detach()
                aux[name] = val * wt
        if hard_mask is not None:
            self.constraint.update(weights_tok.detach().sum(0), t_units)

        if spatial:
            y, dropped = self._mix_dense(x, weights_tok.view(x.shape[0], *logits.shape[2:], n)), None
            weights_out = weights_tok.view(x.shape[0], *logits.shape[2:], n).movedim(-1, 1)
            idx_out = idx.view(x.shape[0], *logits.shape[2:], idx.shape[1])
        else:
            y, dropped = self._dispatch(x, idx, w)
            weights_out, idx_out = weights_tok, idx
        self.record = RoutingRecord(
            logits=logits.detach(),
            weights=weights_out.detach(),
            indices=idx_out.detach(),
            aux_losses=aux,
            aux_raw=aux_raw,
            masked=hard_mask.detach() if hard_mask is not None else None,
            dropped=dropped,
        )
        return (y, self.record) if return_record else y

    # ------------------------------------------------------------------ execution
    def _dispatch(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor):
        """Sparse execution: sort the B·k (image, expert) slots by expert, run each expert on its slice."""
        b, kk = idx.shape
        n = self.num_experts
        flat_e = idx.reshape(-1)
        order = torch.argsort(flat_e, stable=True)
        img = torch.div(order, kk, rounding_mode="floor")
        # static-size count (bincount's output size is data-dependent, which breaks fullgraph compiles)
        counts = torch.zeros(n, dtype=torch.long, device=idx.device).scatter_add_(0, flat_e, torch.ones_like(flat_e))
        channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        dropped = None
        static = self.capacity_factor is not None and self.training
        if not (static or self.stacked):
            xs = x.index_select(0, img)
            if channels_last:
                xs = xs.contiguous(memory_format=torch.channels_last)
            sizes = counts.tolist()  # the single device→host copy of this layer
            outs = [self.experts[e](chunk) for e, chunk in enumerate(xs.split(sizes)) if sizes[e] > 0]
            ys = torch.cat(outs) if len(outs) > 1 else outs[0]
        else:
            if static:
                cap = max(1, math.ceil(self.capacity_factor * b * kk / n))
            else:  # every routed slot fits: exact (one host sync)
                cap = max(1, int(counts.max()))
                if not self.training:  # few distinct shapes for cuDNN autotuning; copies are harmless in eval
                    cap = min(-(-cap // 32) * 32, b * kk)
            starts = torch.cumsum(counts, 0) - counts
            pos = torch.arange(b * kk, device=x.device) - starts[flat_e[order]]
            keep = pos < cap
            # buffer slot (e, p) holds sorted slot starts[e] + p mod count[e] (copies fill free slots)
            p = torch.arange(cap, device=x.device)
            src = starts[:, None] + p[None, :] % counts.clamp_min(1)[:, None]
            src = src.clamp_max(b * kk - 1).reshape(-1)
            xb = x.index_select(0, img.index_select(0, src))
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            if self.stacked:
                ob = self.experts(xb)
            else:
                ob = torch.cat([self.experts[e](chunk) for e, chunk in enumerate(xb.split(cap))])
            sorted_e = flat_e[order]
            slot = sorted_e * cap + pos.clamp_max(cap - 1)
            ys = ob.index_select(0, slot) * keep.view(-1, *[1] * (ob.dim() - 1)).to(ob.dtype)
            dropped = 1.0 - keep.float().mean() if static else None
        ws = w.reshape(-1).index_select(0, order).to(ys.dtype)
        ys = ys * ws.view(-1, *[1] * (ys.dim() - 1))
        inv = torch.empty_like(order)
        inv[order] = torch.arange(order.numel(), device=order.device)
        y = ys.index_select(0, inv).view(b, kk, *ys.shape[1:]).sum(1)
        if channels_last and y.dim() == 4:
            y = y.contiguous(memory_format=torch.channels_last)
        return y, dropped

    def _mix_dense(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Per-pixel routing: every enabled expert runs on all images; outputs mixed with B×H×W×N weights."""
        y = None
        every = self.experts.all_on(x) if self.stacked else None
        for e in range(self.num_experts):
            if e in self.disabled:
                continue
            out = every[e] if every is not None else self.experts[e](x)
            if out.shape[-2:] != w.shape[1:3]:
                raise ValueError(
                    f"spatial gates need experts that keep the spatial size; expert {e} gave {tuple(out.shape)}"
                )
            term = out * w[..., e].unsqueeze(1).to(out.dtype)
            y = term if y is None else y + term
        return y

    @torch.no_grad()
    def _check_experts(self, x: torch.Tensor) -> None:
        """Once: run every expert (eval mode) on one image and insist on one output shape."""
        shapes = []
        for e in self.experts:
            was = e.training
            e.eval()
            try:
                shapes.append(tuple(e(x[:1]).shape[1:]))
            finally:
                e.train(was)
        if len(set(shapes)) > 1:
            raise ValueError(f"experts must return outputs of one shape; got {', '.join(map(str, shapes))}")
        self._shape_checked = True

    def extra_repr(self) -> str:
        bal = ", ".join(f"{k}={v}" for k, v in self.soft_losses.items())
        return f"num_experts={self.num_experts}, k={self.k}, noisy={self.noisy}, balance=[{bal}]"
