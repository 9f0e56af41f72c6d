"""Expert execution on padded buffers and as channel-stacked groups: masked batch statistics, grouped ops.

Inside :class:`ExpertContext` (a ``TorchFunctionMode``, so it works for any module and under ``torch.compile``):

- **Masked batch statistics.** Expert buffers hold real (routed) rows and padding rows. Every batch-statistics
  normalisation (``F.batch_norm`` in training, or without running statistics — ``nn.BatchNorm*``, timm's
  ``BatchNormAct2d``, anything that calls ``F.batch_norm``) computes its mean and variance over the real rows
  of each expert only (count × spatial positions), normalises every row with them and updates the running
  statistics with the unbiased variance of that count — and not at all for an expert with no real row.
  Padding rows never influence a real row, so the real rows get exactly what exact dispatch gives them.
- **Channel groups** (``groups = N``, channel-stacked experts): the input holds expert e's channels in block e
  and every parameter is the concatenation of the N experts' tensors along its channel dimension. Functions
  that would mix blocks are rewritten per block: convolutions get N times the groups (an ungrouped 2-D 1×1
  convolution without padding becomes one batched matrix product), ``F.linear`` over the
  last dimension becomes block-diagonal (one matrix per expert), ``F.layer_norm`` normalises each block,
  ``F.group_norm`` uses N times the groups. Channel-wise functions need nothing.

Padding rows never receive gradient (the caller gathers real rows only), so gradients are exact too.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

Valid = Union[int, torch.Tensor, None]


def _bn_args(input, running_mean=None, running_var=None, weight=None, bias=None, training=False, momentum=0.1,
             eps=1e-5):
    return input, running_mean, running_var, weight, bias, training, momentum, eps


def _torch_bn_args(input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn_enabled=True):
    return input, running_mean, running_var, weight, bias, training, momentum, eps


def _conv_args(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return input, weight, bias, stride, padding, dilation, groups


def _convt_args(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    return input, weight, bias, stride, padding, output_padding, groups, dilation


def _linear_args(input, weight, bias=None):
    return input, weight, bias


def _ln_args(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    return input, normalized_shape, weight, bias, eps


def _gn_args(input, num_groups, weight=None, bias=None, eps=1e-5):
    return input, num_groups, weight, bias, eps


def _in_args(input, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True, momentum=0.1,
             eps=1e-5):
    return input, running_mean, running_var, use_input_stats


class _MaskedBatchNorm(torch.autograd.Function):
    """y = (x - mean)·invstd·w + b with per-channel statistics over the real rows only (``m``: float R × G).

    Forward: one pass over x for per-row statistics, combined over the real rows with Chan et al.'s pairwise
    formula (stable), then the normalisation as an inference-mode ``F.batch_norm`` (one kernel). Backward
    (the statistics depend on the real rows only; the sums run over all rows, whose gradient is zero on
    padding rows anyway): dx = w·invstd·(dy − m·(Σdy + x̂·Σdy·x̂)/n), dw = Σdy·x̂, db = Σdy.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, m, eps):
        r, ct = x.shape[:2]
        g = m.shape[1]
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        sp = tuple(range(2, x.dim()))
        if sp:
            var_r, mu_r = torch.var_mean(xf, dim=sp, correction=0)
        else:
            var_r, mu_r = torch.zeros_like(xf), xf
        cnt = m.sum(0)  # real rows per group
        wr = (m / cnt.clamp_min(1)).unsqueeze(2)  # R × G × 1
        mu_r, var_r = mu_r.view(r, g, -1), var_r.view(r, g, -1)
        mean = (wr * mu_r).sum(0)  # G × C
        var = (wr * (var_r + (mu_r - mean).square())).sum(0)
        var = torch.where((cnt > 0).unsqueeze(1), var, 1.0).reshape(ct)  # idle group: padding only, kept finite
        mean = mean.reshape(ct)
        st = weight.dtype if weight is not None else x.dtype
        y = F.batch_norm(x, mean.to(st), var.to(st), weight, bias, False, 0.0, eps)  # normalise: one kernel
        ctx.save_for_backward(x, weight, m, mean, var, cnt)
        ctx.eps = eps
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(mean, var, cnt)
        return y, mean, var, cnt

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar, _dcnt):
        x, weight, m, mean, var, cnt = ctx.saved_tensors
        r, ct = x.shape[:2]
        g = m.shape[1]
        c = ct // g
        nsp = x.dim() - 2
        f = mean.dtype
        invstd = torch.rsqrt(var + ctx.eps)
        gc = (1, g, c) + (1,) * nsp  # broadcast over the R × G × C × ... view
        xhat = torch.addcmul((-mean * invstd).view(gc), x.unflatten(1, (g, c)).to(f), invstd.view(gc))
        dyf = dy.unflatten(1, (g, c)).to(f)
        red = (0,) + tuple(range(3, 3 + nsp))
        sum_dy = dyf.sum(red)  # G × C
        sum_dyx = (dyf * xhat).sum(red)
        n = (cnt.clamp_min(1) * math.prod(x.shape[2:])).unsqueeze(1)
        corr = torch.addcmul((sum_dy / n).view(gc), xhat, (sum_dyx / n).view(gc)) * m.view(r, g, 1, *(1,) * nsp)
        k = invstd if weight is None else invstd * weight.to(f)
        dx = ((dyf - corr) * k.view(gc)).flatten(1, 2).to(x.dtype)
        dw = sum_dyx.reshape(ct).to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        db = sum_dy.reshape(ct).to(x.dtype if weight is None else weight.dtype) \
            if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None


def masked_batch_norm(x: torch.Tensor, running_mean, running_var, weight, bias, training: bool, momentum: float,
                      eps: float, valid: torch.Tensor) -> torch.Tensor:
    """Batch norm whose statistics cover the rows marked in ``valid`` only.

    ``x``: R × (G·C) × ... ; ``valid``: bool R × G (row r is real for channel block g). Statistics per channel
    over the real rows and all positions; a block with no real row normalises with mean 0, variance 1 (its
    rows are padding, kept finite) and leaves its running statistics untouched. Running variance: unbiased.
    """
    m = valid.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    y, mean, var, cnt = _MaskedBatchNorm.apply(x, weight, bias, m, eps)
    if training and running_mean is not None:
        g = valid.shape[1]
        with torch.no_grad():  # idle groups: weight 0, the running statistics stay bit-identical
            n = (cnt * math.prod(x.shape[2:])).unsqueeze(1)
            step = (n > 0).to(running_mean.dtype) * momentum
            unbiased = var.view(g, -1) * (n / (n - 1).clamp_min(1))
            running_mean.view(g, -1).lerp_(mean.view(g, -1).to(running_mean.dtype), step)
            running_var.view(g, -1).lerp_(unbiased.to(running_var.dtype), step)
    return y


def _prefix_batch_norm(x, rm, rv, w, b, training, momentum, eps, n: int) -> torch.Tensor:
    """Rows [0, n) real, the rest padding: the native kernel on the real rows, padding rows passed through."""
    if n >= x.shape[0]:
        return F.batch_norm(x, rm, rv, w, b, training, momentum, eps)
    y = F.batch_norm(x[:n], rm, rv, w, b, training, momentum, eps)
    return torch.cat([y, x[n:]])


def _grouped_linear(x, w, b, g: int):
    c_in = w.shape[1]
    out = w.shape[0] // g
    y = torch.einsum("...gi,goi->...go", x.unflatten(-1, (g, c_in)), w.view(g, out, c_in)).flatten(-2)
    return y + b if b is not None else y


def _grouped_layer_norm(x, c: int, w, b, eps, g: int):
    y = F.layer_norm(x.unflatten(-1, (g, c)), (c,), None, None, eps)
    if w is not None:
        y = y * w.view(g, c)
    if b is not None:
        y = y + b.view(g, c)
    return y.flatten(-2)


def channels_last(x: torch.Tensor) -> bool:
    """A 4-D tensor laid out channels_last (and not also contiguous, as 1×1 maps or one channel are)."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _pair(v) -> tuple:
    v = (v,) if isinstance(v, int) else tuple(v)
    return v * 2 if len(v) == 1 else v


def _pointwise(x, w, stride, padding) -> bool:
    """A batched 2-D 1×1 convolution without padding (anything else, malformed arguments included, goes to
    ``F.conv2d``)."""
    if x.dim() != 4 or w.shape[-2:] != (1, 1):
        return False
    if isinstance(padding, str):
        return padding == "valid" or (padding == "same" and _pair(stride) == (1, 1))
    return _pair(padding) == (0, 0)


def _grouped_pointwise(x, w, b, stride, g: int):
    """A 1×1 convolution with ``g`` groups as one batched matrix product (cuDNN runs grouped convolutions
    group by group, with a slicing and a layout transform around each)."""
    cl = channels_last(x)
    sh, sw = _pair(stride)
    if (sh, sw) != (1, 1):
        x = x[:, :, ::sh, ::sw]
    co, ci = w.shape[0] // g, w.shape[1]
    y = torch.einsum("bgchw,goc->bgohw", x.unflatten(1, (g, ci)), w.view(g, co, ci)).flatten(1, 2)
    if b is not None:
        y = y + b.to(y.dtype).view(1, -1, 1, 1)
    return y.contiguous(memory_format=torch.channels_last) if cl else y


_CONV = {F.conv1d, F.conv2d, F.conv3d}
_CONVT = {F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}


class ExpertContext(TorchFunctionMode):
    """Run an expert (or N channel-stacked experts) on a padded buffer of ``rows`` rows.

    Args:
        groups: 1 for one expert, N for N channel-stacked experts (see the module docstring).
        valid: which rows are real: ``None`` (all), an int n (rows [0, n), one expert) or a bool tensor
            rows × groups.
        rows: the buffer's row count; only batch norms over inputs with this many rows are masked.
    """

    def __init__(self, groups: int = 1, valid: Valid = None, rows: int = 0) -> None:
        super().__init__()
        self.groups = groups
        self.valid = valid
        self.rows = rows

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        g = self.groups
        if func is F.batch_norm or func is torch.batch_norm:
            a = (_bn_args if func is F.batch_norm else _torch_bn_args)(*args, **kwargs)
            x, rm, rv, w, b, training, momentum, eps = a
            batch_stats = training or rm is None
            if batch_stats and self.valid is not None and x.shape[0] == self.rows:
                if isinstance(self.valid, int):
                    return _prefix_batch_norm(x, rm, rv, w, b, training, momentum, eps, self.valid)
                return masked_batch_norm(x, rm, rv, w, b, training, momentum, eps, self.valid)
            return F.batch_norm(x, rm, rv, w, b, training, momentum, eps)
        if g > 1:
            if func in _CONV:
                x, w, b, stride, padding, dilation, groups = _conv_args(*args, **kwargs)
                if func is F.conv2d and groups == 1 and _pointwise(x, w, stride, padding):
                    return _grouped_pointwise(x, w, b, stride, g)
                return func(x, w, b, stride, padding, dilation, groups * g)
            if func in _CONVT:
                x, w, b, stride, padding, out_pad, groups, dilation = _convt_args(*args, **kwargs)
                return func(x, w, b, stride, padding, out_pad, groups * g, dilation)
            if func is F.linear:
                x, w, b = _linear_args(*args, **kwargs)
                if x.shape[-1] == g * w.shape[1]:
                    return _grouped_linear(x, w, b, g)
            elif func is F.layer_norm:
                x, shape, w, b, eps = _ln_args(*args, **kwargs)
                if len(shape) == 1 and x.shape[-1] == g * shape[0]:
                    return _grouped_layer_norm(x, shape[0], w, b, eps, g)
            elif func is F.group_norm:
                x, ng, w, b, eps = _gn_args(*args, **kwargs)
                return F.group_norm(x, ng * g, w, b, eps)
        if func is F.instance_norm and self.valid is not None:
            x, rm, _, use_input_stats = _in_args(*args, **kwargs)
            if use_input_stats and rm is not None and x.shape[0] == self.rows:
                raise ValueError("InstanceNorm with track_running_stats inside padded experts would average "
                                 "padding into its running statistics; use MoE(..., bucketed=False, stacked=False)")
        return func(*args, **kwargs)


class GroupedDropPath(nn.Module):
    """Stochastic depth for a buffer of channel-stacked experts: one draw per row *and* expert.

    Replaces torchvision's ``StochasticDepth`` and timm's ``DropPath`` inside channel-stacked experts, where a
    per-row draw would be shared by the N experts of the row. Channels at dim 1 (N blocks).
    """

    def __init__(self, p: float, mode: str, scale: bool, groups: int) -> None:
        super().__init__()
        self.p, self.mode, self.scale, self.groups = float(p), mode, bool(scale), groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        g = self.groups
        if x.dim() < 2 or x.shape[1] % g:
            raise ValueError(f"stacked stochastic depth expects the {g} expert blocks on dim 1, got {tuple(x.shape)}")
        rows = x.shape[0] if self.mode == "row" else 1
        noise = torch.empty(rows, g, 1, *[1] * (x.dim() - 2), dtype=x.dtype, device=x.device).bernoulli_(keep)
        if keep > 0.0 and self.scale:
            noise.div_(keep)
        return (x.unflatten(1, (g, x.shape[1] // g)) * noise).flatten(1, 2)

    def extra_repr(self) -> str:
        return f"p={self.p}, mode={self.mode}, groups={self.groups}"


def drop_path_spec(m: nn.Module) -> Optional[tuple]:
    """(p, mode, scale_by_keep) for torchvision's StochasticDepth and timm's DropPath, else None."""
    name = type(m).__name__
    if name == "StochasticDepth" and hasattr(m, "p") and hasattr(m, "mode"):
        return float(m.p), str(m.mode), True
    if name == "DropPath" and hasattr(m, "drop_prob"):
        return float(m.drop_prob), "row", bool(getattr(m, "scale_by_keep", True))
    return None
