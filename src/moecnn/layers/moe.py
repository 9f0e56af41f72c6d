"""The sparsely-gated mixture-of-experts layer for convolutional feature maps (SPEC §1).

``MoE(experts, gate, k)`` routes each image of a B×C×H×W batch to its top-k experts; expert i computes exactly
what it computes on the images routed to it alone (its own batch statistics), however the layer executes it.
The layer returns a tensor (drop-in for any ``nn.Module``) and keeps a structured :class:`RoutingRecord` of its
last forward in ``layer.record`` (read them all with
:func:`moecnn.layers.control.routing` / :func:`moecnn.layers.control.aux_loss`).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from ..registry import CONSTRAINTS, LOSSES
from .balance import HardConstraint, RoutingStats, build_constraint
from .gates import build_gate
from .grouped import ExpertContext, channels_last
from .rows import gather_rows
from .stacked import StackedExperts, _close, _random_leaf


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


@dataclass
class _Routing:
    """One forward's routing: dense weights (B×N or B×N×H×W, with gradient), the top-k per unit (T×k indices
    and softmax weights), the record's index layout, the weighted/raw balancing terms, the hard-constraint mask."""

    logits: torch.Tensor
    weights: torch.Tensor
    idx: torch.Tensor
    w: torch.Tensor
    idx_out: torch.Tensor
    aux: Dict[str, torch.Tensor]
    aux_raw: Dict[str, torch.Tensor]
    hard_mask: Optional[torch.Tensor]

    @property
    def spatial(self) -> bool:
        """Per-pixel routing (a spatial gate's B×N×H×W logits)."""
        return self.logits.dim() == 4


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


def bucket_size(count: int, limit: int) -> int:
    """The smallest of a few static buffer sizes holding ``count`` rows, at most ``limit``.

    1, 2, 4, 8, then four sizes per octave (10, 12, 14, 16, 20, 24, 28, 32, 40, ...): above 8 rows at most 25 % padding,
    and a handful of distinct shapes over a training run (so cuDNN plans and autotuning are reused).
    """
    if count <= 8:
        b = 1 << max(0, (count - 1).bit_length())
    else:
        step = 1 << ((count - 1).bit_length() - 3)
        b = -(-count // step) * step
    return max(1, min(b, limit))


def _routing_dtype(module: nn.Module, x: torch.Tensor) -> torch.dtype:
    """float32, or float64 for a float64 layer: routing never runs in half precision."""
    p = next(module.parameters(), None)
    return torch.float64 if (p is not None and p.dtype == torch.float64) or x.dtype == torch.float64 else torch.float32


def _call_in(module: nn.Module, dtype: torch.dtype, *args: torch.Tensor) -> torch.Tensor:
    """``module(*args)`` with its floating-point parameters and buffers in ``dtype`` (cast copies, with gradient,
    when the module itself is stored in another dtype, e.g. after ``.to(torch.bfloat16)``)."""
    state = {n: t for n, t in list(module.named_parameters()) + list(module.named_buffers())
             if t.is_floating_point() and t.dtype != dtype}
    if not state:
        return module(*args)
    return functional_call(module, {n: t.to(dtype) for n, t in state.items()}, args)


class MoE(nn.Module):
    """Sparsely-gated mixture of experts over conv feature maps.

    Semantics (SPEC §1): y = Σ_{i: g_i>0} g_i·E_i(x), where expert i runs only on the images routed to it, so
    a BatchNorm inside an expert normalises with the statistics of exactly its sub-batch, and an expert that
    receives no image is not run at all (its running statistics and ``num_batches_tracked`` do not move).
    Every execution below computes this same function — outputs, gradients and buffers, to float rounding —
    as long as nothing is dropped (only ``capacity_factor`` can drop).

    Execution (chosen per call; none of it changes the state dict):

    - **Default** (``bucketed=True``): expert i's images are gathered into a buffer whose size is rounded up to
      one of a few bucket sizes (:func:`bucket_size`: above 8 rows at most 25 % padding), so experts see a
      handful of static shapes and cuDNN does not re-plan every step (``static_shapes`` is True). Padding rows
      are excluded from every batch statistic (masked BatchNorm, see :mod:`moecnn.layers.grouped`) and from
      the output. One N-element copy of the expert counts to the host per forward; inside ``torch.compile``
      only the bucket size crosses that graph break. Experts whose padded execution is not exact (checked on
      the first forward: a batch-dependent layer other than BatchNorm) run unpadded instead.
    - ``bucketed=False``: expert i runs on exactly its sub-batch (sizes change every step; for comparison).
    - ``capacity_factor=c``: in training, every expert gets a fixed buffer of ceil(c·B·k/N) rows: fully
      sync-free and static-shaped (CUDA graphs, ``torch.compile(fullgraph=True)``); slots beyond the capacity
      are dropped (``record.dropped``) and appear in no statistic. Evaluation always dispatches exactly.
    - Grouped (``stacked``) vs per-expert: same-architecture experts can run as one channel-stacked network
      (:class:`StackedExperts`: the kernel launches of one expert, proven equivalent at construction) or one
      after the other. ``stacked=None`` (default) picks per input shape: on CUDA the faster of the two,
      measured once (a few forward+backward passes of this layer, buffers and RNG restored); on the CPU, and
      while tracing the sync-free capacity mode, per expert. ``True``/``False`` force it. Per-expert execution
      does not run an idle expert (``skips_idle_experts``: DDP then needs ``find_unused_parameters``).

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
        capacity_factor: None, or the training capacity factor (see above).
        gate_kwargs: extra arguments for the gate constructor.
        stacked: None (auto), True (always channel-stacked; refused with one line if the experts do not
            stack) or False (always per expert).
        bucketed: pad per-expert buffers to bucket sizes (default) or run exact sub-batch sizes.

    Routing (gate, noise, top-k, losses) runs in float32 whatever autocast says, and in float64 for a float64
    layer; a layer converted to bfloat16/float16 routes in float32 with its gate weights cast up.
    ``layer.experts`` is an ``nn.ModuleList`` (a :class:`StackedExperts` when the experts can stack):
    ``layer.experts[i]`` is the live expert i, and the state dict holds ``experts.{i}.<path>`` whatever runs.
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
        stacked: bool | None = None,
        bucketed: bool = True,
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
        if stacked not in (None, True, False):
            raise ValueError(f"stacked must be None (auto), True or False, got {stacked!r}")
        self.num_experts = n
        self.k = k
        if in_channels is None:
            in_channels = _first_in_channels(experts[0])
            if in_channels is None:
                raise ValueError("cannot infer the gate's input channels from the experts; pass in_channels=")
        self.in_channels = in_channels
        if stacked is False:
            self.experts = nn.ModuleList(experts)
        elif stacked:
            self.experts = StackedExperts(experts, in_channels)
        else:
            try:
                self.experts = StackedExperts(experts, in_channels)
            except Exception:  # noqa: BLE001 - whatever fails to stack runs per expert
                self.experts = nn.ModuleList(experts)
        self.stacked = stacked
        self.bucketed = bool(bucketed)
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
        self._padding: Optional[bool] = None  # padded execution proven exact on the first forward
        self._engines: Dict[tuple, str] = {}  # auto: input key -> "stacked" | "experts"
        # set by a caller that routes with route() and runs every expert itself (the packed detection heads)
        self.runs_every_expert = False

    # ------------------------------------------------------------------ properties
    @property
    def can_stack(self) -> bool:
        """The experts can run channel-stacked (``layer.experts`` is a :class:`StackedExperts`)."""
        return isinstance(self.experts, StackedExperts)

    @property
    def static_shapes(self) -> bool:
        """True when every forward runs the experts on buffers of a few fixed sizes (bucketed, or the training
        capacity), so a training engine may keep ``torch.backends.cudnn.benchmark = True``."""
        return self.bucketed and self._padding is not False

    @property
    def skips_idle_experts(self) -> bool:
        """True when a training step may leave an expert without gradient (per-expert execution does not run
        an expert that got no image): data-parallel training then needs ``find_unused_parameters=True``."""
        if self.runs_every_expert and not self.disabled and self.forced_expert is None:
            return False
        return not (self.stacked is True or self.capacity_factor is not None)

    @property
    def executions(self) -> Dict[str, str]:
        """What ``stacked=None`` chose so far: ``{"C=<channels> B~2^<b> HW~2^<s> <dtype> train|eval": choice}``
        (one choice per channel count and power-of-two class of batch size and map area)."""
        return {f"C={k[0]} B~2^{k[1][0]} HW~2^{k[1][1]} {k[2]} {'train' if k[4] else 'eval'}": v
                for k, v in self._engines.items()}

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
        if not self._shape_checked and x.shape[0] > 0:
            self._first_call(x)
        r = self._route(x)
        if r.spatial:
            y, dropped = self._mix_dense(x, r.weights.movedim(1, -1)), None
        else:
            y, dropped = self._dispatch(x, r.idx, r.w)
        self.record = self._make_record(r, dropped)
        return (y, self.record) if return_record else y

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """Route ``x`` without running the experts, for callers that execute them themselves (the detection
        heads run every expert once on all FPN levels packed into one map).

        Returns the gate weights, dense over the experts: B×N (per-image gates) or B×N×H×W (spatial gates),
        zero where an expert is not chosen, each unit's weights summing to 1; ``self.record`` is set as
        :meth:`forward` sets it (auxiliary losses and hard-constraint updates included; ``dropped`` is None, as
        nothing is dispatched). The caller must give
        each chosen expert's output on the unit that weight, and nothing else, for this to be the layer's
        function."""
        r = self._route(x)
        self.record = self._make_record(r, None)
        return r.weights

    def _make_record(self, r: "_Routing", dropped) -> RoutingRecord:
        return RoutingRecord(logits=r.logits.detach(), weights=r.weights.detach(), indices=r.idx_out.detach(),
                             aux_losses=r.aux, aux_raw=r.aux_raw,
                             masked=r.hard_mask.detach() if r.hard_mask is not None else None, dropped=dropped)

    def _route(self, x: torch.Tensor) -> "_Routing":
        """Gate, noise, masks, top-k, balancing terms and hard-constraint state of one forward."""
        n = self.num_experts
        # routing in float32 (float64 for a float64 layer) whatever the surrounding autocast says
        rd = _routing_dtype(self.gate, x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf = x.to(rd)
            logits = _call_in(self.gate, rd, xf).to(rd)
        spatial = logits.dim() == 4
        if logits.shape[1] != n or logits.shape[0] != x.shape[0]:
            raise ValueError(f"gate returned shape {tuple(logits.shape)}, expected (B={x.shape[0]}, N={n}, ...)")
        controls = self.forced_expert is not None or self.dense
        noise_std = None
        noisy_logits = logits
        if self.training and self.noisy and self.noise is not None and not controls:
            with torch.autocast(device_type=x.device.type, enabled=False):
                noise_std = F.softplus(_call_in(self.noise, rd, xf.mean(dim=(2, 3))) + 0.01)
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
            weights_out = weights_tok.view(x.shape[0], *logits.shape[2:], n).movedim(-1, 1)
            idx_out = idx.view(x.shape[0], *logits.shape[2:], idx.shape[1])
        else:
            weights_out, idx_out = weights_tok, idx
        return _Routing(logits, weights_out, idx, w, idx_out, aux, aux_raw, hard_mask)

    # ------------------------------------------------------------------ execution
    def _dispatch(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, engine: Optional[str] = None):
        """Sort the B·k (image, expert) slots by expert, gather each expert's images into its buffer, run the
        experts (per expert or channel-stacked), gather the outputs back and mix them with the gate weights."""
        b, kk = idx.shape
        n = self.num_experts
        t = b * kk
        dev = x.device
        flat_e = idx.reshape(-1)
        order = torch.argsort(flat_e, stable=True)
        sorted_e = flat_e.index_select(0, order)
        # static-size count (bincount's output size is data-dependent, which breaks fullgraph compiles)
        counts = torch.zeros(n, dtype=torch.long, device=dev).scatter_add_(0, flat_e, torch.ones_like(flat_e))
        starts = torch.cumsum(counts, 0) - counts
        pos = torch.arange(t, device=dev) - starts.index_select(0, sorted_e)
        static = self.capacity_factor is not None and self.training
        # inside torch.compile the host sync is a graph break; only the buffer size (a bucket) crosses it, so
        # graphs specialise on a handful of sizes, not on every expert's count
        compiling = torch.compiler.is_compiling() and not static
        sizes = None if static or compiling else counts.tolist()  # the single device→host copy of this layer
        if engine is None:
            engine = self._engine(x, idx, w, static)
        padded = self.bucketed and self._padding is not False
        if static:
            caps = [max(1, math.ceil(self.capacity_factor * t / n))] * n
        elif compiling:
            caps = [self._host_cap(counts, b, padded)] * n
        elif engine == "stacked":
            m = max(sizes)
            caps = [bucket_size(m, b) if padded else m] * n
        else:
            caps = [bucket_size(s, b) if s and padded else s for s in sizes]
        uniform = static or compiling or engine == "stacked"
        if uniform:
            base = torch.arange(n, device=dev) * caps[0]
            total = n * caps[0]
        else:
            offs = [0]
            for c in caps:
                offs.append(offs[-1] + c)
            total = offs[-1]
            base = torch.tensor(offs[:-1], device=dev)
        # every slot's buffer row in image-major order (slot i·k + j: image i's j-th choice) and, for every
        # buffer row, the slot it holds: both directions of the two gathers below, so that their backward
        # passes are gathers too (no scatter-add)
        inv = torch.empty_like(order)
        inv[order] = torch.arange(t, device=dev)
        row = (base.index_select(0, sorted_e) + (pos.clamp_max(caps[0] - 1) if static else pos)).index_select(0, inv)
        if static:
            kept = (pos < caps[0]).index_select(0, inv)
            at = torch.where(kept, row, total)  # dropped slots land on the extra last row
        else:
            kept = torch.ones(t, dtype=torch.bool, device=dev)
            at = row
        slot = torch.zeros(total + 1, dtype=torch.long, device=dev).scatter_(0, at, torch.arange(t, device=dev))
        real = torch.zeros(total + 1, dtype=torch.bool, device=dev).scatter_(0, at, True)
        slot, real = slot[:total], real[:total]
        src = torch.div(slot, kk, rounding_mode="floor")  # image of every row; padding rows: image 0
        cl = channels_last(x)
        xb = gather_rows(x, src, row.view(b, kk), kept.view(b, kk))  # padding rows get no gradient
        if cl:
            xb = xb.contiguous(memory_format=torch.channels_last)
        if engine == "stacked":
            cap = caps[0]
            valid = None
            if sizes is None or cap > min(sizes):
                valid = torch.arange(cap, device=dev)[:, None] < counts[None, :]
            ob = self.experts(xb, valid)
        else:
            ob = self._run_each(xb, caps, counts, sizes)
        ys = gather_rows(ob, row, slot.view(-1, 1), real.view(-1, 1))  # b·k rows, image-major
        dropped = None
        ws = w.reshape(-1).to(ys.dtype)
        if static:
            ws = ws * kept.to(ys.dtype)
            dropped = 1.0 - kept.float().mean()
        y = (ys * ws.view(-1, *[1] * (ys.dim() - 1))).view(b, kk, *ys.shape[1:]).sum(1)
        if cl and y.dim() == 4:
            y = y.contiguous(memory_format=torch.channels_last)
        return y, dropped

    def _run_each(self, xb, caps, counts, sizes):
        """Per-expert execution on consecutive buffers (expert e: ``caps[e]`` rows, the real ones first).
        ``sizes`` (host counts) or None: then every expert runs (the sync-free modes) with device masks."""
        outs = []
        off = 0
        for e, c in enumerate(caps):
            if c == 0:
                continue
            chunk = xb[off: off + c]
            off += c
            if sizes is None:
                valid = torch.arange(c, device=xb.device)[:, None] < counts[e]
            else:
                valid = sizes[e] if c > sizes[e] else None
            expert = self.experts[e]
            if valid is None:
                outs.append(expert(chunk))
            else:
                with ExpertContext(1, valid, c):
                    outs.append(expert(chunk))
        if sizes is None and self.training:  # every expert ran; BatchNorm counted a batch even for idle experts
            for e in range(self.num_experts):
                idle = (counts[e] == 0).to(torch.long)
                for m in self.experts[e].modules():
                    if isinstance(m, _BatchNorm) and m.training and m.num_batches_tracked is not None:
                        m.num_batches_tracked.sub_(idle)
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    @torch.compiler.disable
    def _host_cap(self, counts: torch.Tensor, b: int, padded: bool) -> int:
        m = int(counts.max())
        return bucket_size(m, b) if padded else m

    def _engine(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, static: bool) -> str:
        if not self.can_stack or self.stacked is False:
            return "experts"
        if self.stacked:
            return "stacked"
        # one choice per channel count and power-of-two class of batch and map size: detection feature maps
        # change size with every image and FPN level, and each measurement costs a few passes
        size = tuple(int(v).bit_length() for v in (x.shape[0], math.prod(x.shape[2:]) if x.dim() > 2 else 1))
        key = (x.shape[1], size, x.dtype, x.device.type, self.training, torch.is_grad_enabled(), static,
               channels_last(x), torch.is_autocast_enabled(x.device.type))
        eng = self._engines.get(key)
        if eng is None:
            if len(self._engines) >= 32:  # enough measured: the most frequent choice so far
                eng = max(("experts", "stacked"), key=list(self._engines.values()).count)
            else:
                eng = self._measure(x, idx, w) if self._should_measure(x, static) else "experts"
            self._engines[key] = eng
        return eng

    def _should_measure(self, x: torch.Tensor, static: bool) -> bool:
        # CUDA only (on the CPU per-expert execution is the rule); not while tracing the sync-free capacity
        # mode, where a measurement would break the graph
        return x.device.type == "cuda" and not (static and torch.compiler.is_compiling())

    @torch.compiler.disable
    def _measure(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, reps: int = 3) -> str:
        """Time this call's dispatch per expert and channel-stacked (forward, and backward when training with
        gradients), after one warm-up each (cuDNN plans, autotuning); buffers and the RNG are restored."""
        bufs = list(self.experts.buffers())
        saved = [b.clone() for b in bufs]
        grad = torch.is_grad_enabled() and self.training
        xd = x.detach().requires_grad_(grad)
        params = [p for p in self.experts.parameters() if p.requires_grad] if grad else []
        cuda = x.device.type == "cuda"
        times = {}
        with torch.random.fork_rng(devices=[x.device] if cuda else []):
            for eng in ("experts", "stacked"):
                def once():
                    y, _ = self._dispatch(xd, idx, w.detach(), engine=eng)
                    if grad:
                        torch.autograd.grad(y, [xd] + params, torch.ones_like(y), allow_unused=True)

                once()
                if cuda:
                    torch.cuda.synchronize(x.device)
                t0 = time.perf_counter()
                for _ in range(reps):
                    once()
                if cuda:
                    torch.cuda.synchronize(x.device)
                times[eng] = time.perf_counter() - t0
        with torch.no_grad():
            for b, s in zip(bufs, saved):
                b.copy_(s)
        return min(times, key=times.get)

    def _mix_dense(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Per-pixel routing: every enabled expert runs on all images; outputs mixed with B×H×W×N weights."""
        y = None
        every = self.experts.all_on(x) if self.stacked and self.can_stack else None
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

    # ------------------------------------------------------------------ first call
    @torch.compiler.disable
    def _first_call(self, x: torch.Tensor) -> None:
        x = x.detach()
        if not self.can_stack:
            self._check_experts(x)
        if self.bucketed or self.capacity_factor is not None:
            self._padding = self._probe_padding(x)
            if not self._padding and self.capacity_factor is not None:
                raise ValueError("these experts are not exact on padded buffers (a batch-dependent layer other "
                                 "than BatchNorm?), which capacity_factor needs; use capacity_factor=None")
        self._shape_checked = True

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

    @torch.no_grad()
    def _probe_padding(self, x: torch.Tensor) -> bool:
        """Once: is expert 0, in training, on 3 real rows + 2 padding rows (masked statistics) the same as on
        the 3 rows alone — outputs and buffers? Randomness (dropout, drop path) is switched off for the probe."""
        e = self.experts[0]
        p = next(iter(list(e.parameters()) + list(e.buffers())), None)
        dtype = p.dtype if p is not None and p.is_floating_point() else x.dtype
        real = x[torch.arange(3, device=x.device) % x.shape[0]].to(dtype)
        g = torch.Generator(device=x.device).manual_seed(0)  # the global RNG stays untouched (bit-exact resume)
        buf = torch.cat([real, torch.randn(real[:2].shape, generator=g, device=x.device, dtype=dtype)])
        mods = list(e.modules())
        modes = [m.training for m in mods]
        bufs = list(e.buffers())
        saved = [b.clone() for b in bufs]

        def restore():
            for b, s in zip(bufs, saved):
                b.copy_(s)

        try:
            with torch.autocast(device_type=x.device.type, enabled=False):
                e.train()
                for m in mods:
                    if _random_leaf(m):
                        m.eval()
                ref = e(real)
                ref_bufs = [b.clone() for b in bufs]
                for valid in (3, torch.arange(5, device=x.device)[:, None] < 3):
                    restore()
                    with ExpertContext(1, valid, 5):
                        got = e(buf)[:3]
                    if not _close(got, ref) or not all(_close(a, r) for a, r in zip(bufs, ref_bufs)):
                        return False
            return True
        except (RuntimeError, ValueError):
            return False
        finally:
            restore()
            for m, t in zip(mods, modes):
                m.training = t

    def extra_repr(self) -> str:
        bal = ", ".join(f"{k}={v}" for k, v in self.soft_losses.items())
        return (f"num_experts={self.num_experts}, k={self.k}, noisy={self.noisy}, balance=[{bal}], "
                f"stacked={self.stacked}, bucketed={self.bucketed}, capacity_factor={self.capacity_factor}")
