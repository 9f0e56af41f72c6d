"""Load balancing: soft constraints (auxiliary losses) and hard constraints (masking over-used experts).

Soft losses are functions ``loss(stats) -> scalar`` registered in :data:`moecnn.registry.LOSSES`.
Hard constraints are modules with buffers registered in :data:`moecnn.registry.CONSTRAINTS`.
Formulas follow SPEC §1 (Pavlitska et al., arXiv 2204.10598) and the cited follow-ups.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ..registry import CONSTRAINTS, LOSSES

EPS = 1e-10


@dataclass
class RoutingStats:
    """What a balancing loss sees; T routed units (images, or pixels for spatial gates), N experts."""

    logits: torch.Tensor  # T×N clean gate logits
    noisy_logits: torch.Tensor  # T×N logits after noise (== logits without noise)
    noise_std: Optional[torch.Tensor]  # T×N noise scale, None without noise
    probs: torch.Tensor  # T×N full softmax of the (masked) noisy logits
    weights: torch.Tensor  # T×N sparse gate weights, rows sum to 1
    chosen: torch.Tensor  # T×N bool, expert selected for the unit
    k: int

    @property
    def importance(self) -> torch.Tensor:
        return self.weights.sum(0)

    @property
    def counts(self) -> torch.Tensor:
        return self.chosen.float().sum(0)


def cv_squared(v: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation with the unbiased variance; 0 for a single expert."""
    v = v.float()
    if v.numel() < 2:
        return v.sum() * 0.0
    return v.var(unbiased=True) / (v.mean() ** 2 + EPS)


@LOSSES.register("importance")
def importance_loss(s: RoutingStats) -> torch.Tensor:
    """CV² of expert importance Imp_i = Σ_b g_bi (uniform → 0, all on one expert → N)."""
    return cv_squared(s.importance)


@LOSSES.register("kl")
def kl_uniform_loss(s: RoutingStats) -> torch.Tensor:
    """KL(p || uniform) with p_i = (Imp_i + 1e-10)/T (uniform → 0, all on one expert → log N)."""
    n = s.weights.shape[1]
    p = (s.importance + EPS) / s.weights.shape[0]
    return (p * torch.log(p * n)).sum()


def _normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


@LOSSES.register("load")
def load_loss(s: RoutingStats) -> torch.Tensor:
    """Shazeer et al. (2017) load loss: CV² of a smooth estimate of how many units each expert receives.

    P(unit t goes to expert i) = Φ((h_ti − θ_ti) / σ_ti) where θ_ti is the k-th largest noisy logit of the
    other experts. Without noise (eval, or noise off) the hard counts are used (no gradient).
    """
    n = s.weights.shape[1]
    if s.noise_std is None or s.k >= n:
        return cv_squared(s.counts)
    top = s.noisy_logits.topk(s.k + 1, dim=1).values
    kth_incl = top[:, s.k : s.k + 1]  # threshold for experts inside the top-k
    kth_excl = top[:, s.k - 1 : s.k]  # threshold for experts outside it
    thresh = torch.where(s.chosen, kth_incl, kth_excl)
    prob = _normal_cdf((s.logits - thresh) / s.noise_std)
    return cv_squared(prob.sum(0))


@LOSSES.register("switch")
def switch_loss(s: RoutingStats) -> torch.Tensor:
    """Switch Transformer loss N·Σ f_i P_i (f: share of routed slots, P: mean router probability).

    Uniform routing → 1 (its minimum), all units on one expert → N.
    """
    n = s.weights.shape[1]
    f = s.counts / s.counts.sum().clamp_min(1.0)
    p = s.probs.mean(0)
    return n * (f * p).sum()


@LOSSES.register("z_loss")
def z_loss(s: RoutingStats) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean over units of logsumexp(logits)²; keeps gate logits small."""
    return torch.logsumexp(s.logits.float(), dim=1).pow(2).mean()


def _entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(EPS))).sum(dim)


@LOSSES.register("entropy")
def entropy_loss(s: RoutingStats) -> torch.Tensor:
    """Follow-up's entropy loss: mean per-unit routing entropy − entropy of the batch-mean routing.

    Confident per-image routing that is balanced over the batch → −log N (minimum); every image on the
    same expert, or every image uniform → 0 (maximum).
    """
    return _entropy(s.probs).mean() - _entropy(s.probs.mean(0))


@LOSSES.register("column_entropy")
def column_entropy_loss(s: RoutingStats) -> torch.Tensor:
    """log N − H(mean routing probability): uniform usage → 0, all on one expert → log N."""
    n = s.probs.shape[1]
    return math.log(n) - _entropy(s.probs.mean(0))


# ---------------------------------------------------------------------------------------------------------
# Hard constraints
# ---------------------------------------------------------------------------------------------------------


def _reduce_across_workers(importance: torch.Tensor, units: int, sync: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum importance and unit counts over data-parallel workers so every worker keeps the same state."""
    buf = torch.cat([importance.detach().float(), importance.new_tensor([float(units)], dtype=torch.float32)])
    if sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(buf)
    return buf[:-1], buf[-1]


class HardConstraint(nn.Module):
    """Masks over-used experts (logit → −inf) for whole training batches; state lives in buffers.

    ``score()`` returns a per-expert usage score; experts with score > threshold are masked, but never so
    many that fewer than ``k`` unmasked (and not disabled) experts remain.
    """

    default_threshold = 0.5

    def __init__(self, num_experts: int, threshold: float | None = None, decay: float | None = None) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.threshold = self.default_threshold if threshold is None else float(threshold)
        if decay is not None and not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self.decay = decay
        self.sync = True  # all-reduce importance across data-parallel workers before updating

    def score(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def update(self, importance: torch.Tensor, units: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def mask(self, k: int, disabled: torch.Tensor | None = None, n_disabled: int = 0) -> torch.Tensor:
        """Bool N: experts to mask this batch (score > threshold), leaving at least k usable experts."""
        score = self.score().float()
        over = score > self.threshold
        if disabled is not None:
            score = score.masked_fill(disabled, float("-inf"))
            over = over & ~disabled
        limit = self.num_experts - k - n_disabled  # at most this many may be masked
        rank = torch.empty(self.num_experts, dtype=torch.long, device=score.device)
        rank[torch.argsort(score, descending=True)] = torch.arange(self.num_experts, device=score.device)
        return over & (rank < limit)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}, decay={self.decay}"


@CONSTRAINTS.register("relative")
class RelativeConstraint(HardConstraint):
    """r_i ← d·r_i + (Imp_i − T/N)/(T/N) after each training batch; mask r_i > τ (reference: d = 1)."""

    default_threshold = 0.5

    def __init__(self, num_experts: int, threshold: float | None = None, decay: float | None = None) -> None:
        super().__init__(num_experts, threshold, decay)
        self.register_buffer("r", torch.zeros(num_experts))

    def score(self) -> torch.Tensor:
        return self.r

    @torch.no_grad()
    def update(self, importance: torch.Tensor, units: int) -> None:
        imp, total = _reduce_across_workers(importance, units, self.sync)
        fair = total / self.num_experts
        step = (imp - fair) / fair
        d = 1.0 if self.decay is None else self.decay
        self.r.mul_(d).add_(step.to(self.r))


@CONSTRAINTS.register("mean")
class MeanConstraint(HardConstraint):
    """m_i: running mean of expert i's share Imp_i/T; mask m_i − 1/N > τ (decay: EMA instead of mean)."""

    default_threshold = 0.3

    def __init__(self, num_experts: int, threshold: float | None = None, decay: float | None = None) -> None:
        super().__init__(num_experts, threshold, decay)
        self.register_buffer("m", torch.full((num_experts,), 1.0 / num_experts))
        self.register_buffer("t", torch.zeros((), dtype=torch.long))

    def score(self) -> torch.Tensor:
        return self.m - 1.0 / self.num_experts

    @torch.no_grad()
    def update(self, importance: torch.Tensor, units: int) -> None:
        imp, total = _reduce_across_workers(importance, units, self.sync)
        share = (imp / total).to(self.m)
        if self.decay is None:
            t = self.t.to(self.m.dtype)
            self.m.copy_((t * self.m + share) / (t + 1))
        else:
            self.m.mul_(self.decay).add_((1 - self.decay) * share)
        self.t.add_(1)


def build_constraint(name: str, num_experts: int, threshold: float | None, decay: float | None) -> HardConstraint:
    return CONSTRAINTS.get(name)(num_experts, threshold=threshold, decay=decay)
