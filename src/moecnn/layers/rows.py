"""Row gathers whose backward is a gather too.

Dispatching images to expert buffers and collecting the experts' outputs are row gathers. Autograd's backward
of ``index_select`` is a scatter-add (``index_add``), which on a GPU runs as atomic additions — slow for bf16
rows and not deterministic. Here both directions of each gather are known when the routing is built, so the
backward is a gather as well: input row i receives the sum of the output rows listed for it.
"""
from __future__ import annotations

import torch


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(x, index, back_index, back_mask):
        return x.index_select(0, index)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, index, back_index, back_mask = inputs
        ctx.save_for_backward(back_index, back_mask)
        ctx.save_for_forward(index)

    @staticmethod
    def backward(ctx, dy):
        back_index, back_mask = ctx.saved_tensors
        n, width = back_index.shape
        feat = (1,) * (dy.dim() - 1)
        g = dy.index_select(0, back_index.reshape(-1)).view(n, width, *dy.shape[1:])
        g = torch.where(back_mask.view(n, width, *feat), g, 0)
        if width > 1:
            acc = torch.float32 if dy.dtype in (torch.float16, torch.bfloat16) else dy.dtype
            g = g.sum(1, dtype=acc).to(dy.dtype)
        else:
            g = g.squeeze(1)
        return g, None, None, None


class _GatherRowsJvp(_GatherRows):
    """With forward-mode AD (``torch.func.jvp``), which torch.compile cannot trace in a custom Function."""

    @staticmethod
    def jvp(ctx, x_t, *_):  # the tangent is gathered like the input
        (index,) = ctx.saved_tensors
        return x_t.index_select(0, index)


def gather_rows(x: torch.Tensor, index: torch.Tensor, back_index: torch.Tensor,
                back_mask: torch.Tensor) -> torch.Tensor:
    """``x.index_select(0, index)`` with a gather for its backward.

    ``back_index`` (long, ``len(x) × width``) lists for every row i of ``x`` the output rows that read it,
    ``back_mask`` (bool, same shape) which of those entries count. The gradient of row i is the sum of the
    listed output rows' gradients. The caller guarantees that the listed (unmasked) entries are exactly the
    output rows ``j`` with ``index[j] == i`` whose gradient can be non-zero (e.g. padding rows that read
    image 0 but are never used may be left out).
    """
    fn = _GatherRows if torch.compiler.is_compiling() else _GatherRowsJvp
    return fn.apply(x, index, back_index, back_mask)
