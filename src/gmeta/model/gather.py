"""The one embedding gather: a set's ids -> (T, M, F, d) embeddings from looked-up rows.

Every meta backend (``gmeta.meta``: fast, vmap, reference) and every consumer reads embeddings
through ``gather``: sparse fields are single rows, multi-hot fields are the mean of their real ids'
rows (an all-padding list pools to zeros). The ids arrive as ``LocalIndex`` (from ``lookup``) and
are turned once into a ``SetIndex``: padding clamped to a valid row with pooling weight 0, so the
gather is a plain ``index_select`` (no padded copy of the table) and a weighted sum.

``gather`` is twice differentiable w.r.t. the rows and works inside ``torch.func.vmap`` (the vmap
backend gathers from per-task rows), so the same function serves the closed-form inner loop, the
``vmap`` inner loop and the per-task reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gmeta.model.embedding import LocalIndex


@dataclass
class SetIndex:
    """One set's ids as weighted row indices (multi-hot mean pooling as weights, padding weight 0).

    sparse: (..., M, Fs) int64; multi_hot: (..., M, Fm, L) int64 (padding clamped to a valid row);
    weight: (..., M, Fm, L) float, mask / count.
    """

    sparse: Tensor
    multi_hot: Tensor
    weight: Tensor

    @property
    def has_multi_hot(self) -> bool:
        return self.multi_hot.shape[-2] > 0 and self.multi_hot.shape[-1] > 0

    def task(self, t: int | Tensor) -> SetIndex:
        """The index of one task (or of the tasks selected by ``t``)."""
        return SetIndex(self.sparse[t], self.multi_hot[t], self.weight[t])


def set_index(idx: LocalIndex, dtype: torch.dtype, pad_row: int = 0) -> SetIndex:
    """``idx`` as a ``SetIndex`` whose pooling weights have ``dtype``."""
    mask = idx.multi_hot_mask
    count = mask.sum(-1, keepdim=True).clamp(min=1).to(dtype)
    weight = mask.to(dtype) / count
    mh = torch.where(mask, idx.multi_hot, pad_row)
    return SetIndex(idx.sparse, mh, weight)


class _Gather(torch.autograd.Function):
    """Rows of a (R, d) table at several flat index tensors (one output each).

    The backward is one ``index_add`` per output into one zero (R, d) gradient: autograd's own
    ``index_select`` backward builds an expanded (N, d) index for a ``scatter_add``, and slicing one
    gathered tensor into parts would allocate a full-size zero gradient per part.
    """

    generate_vmap_rule = True  # forward and backward are plain torch ops: vmap can batch them

    @staticmethod
    def forward(table: Tensor, *idx: Tensor) -> tuple[Tensor, ...]:
        return tuple(table.index_select(0, i) for i in idx)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        table, *idx = inputs
        ctx.save_for_backward(*idx)
        ctx.table_shape = table.shape
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        idx = ctx.saved_tensors
        out = None
        for i, g in zip(idx, grads, strict=True):
            if g is None:
                continue
            if out is None:
                out = g.new_zeros(ctx.table_shape)
            # out of place when a graph of the backward is asked for (double backward)
            out = out.index_add(0, i, g) if torch.is_grad_enabled() else out.index_add_(0, i, g)
        return (out, *([None] * len(idx)))


def _pool(mh: Tensor, ix: SetIndex) -> Tensor:
    d = mh.shape[-1]
    return (mh.view(*ix.multi_hot.shape, d) * ix.weight.unsqueeze(-1)).sum(-2)


def gather(table: Tensor, ix: SetIndex) -> Tensor:
    """(..., M, F, d) embeddings from a (R, d) table: sparse rows, then the multi-hot fields pooled."""
    return gather_sets(table, ix)[0]


def gather_sets(table: Tensor, *sets: SetIndex) -> tuple[Tensor, ...]:
    """``gather`` of several sets with one ``_Gather`` (one zero gradient table in the backward)."""
    d = table.shape[-1]
    idx = []
    for ix in sets:
        idx.append(ix.sparse.reshape(-1))
        if ix.has_multi_hot:
            idx.append(ix.multi_hot.reshape(-1))
    got = iter(_Gather.apply(table, *idx))
    out = []
    for ix in sets:
        sp = next(got).view(*ix.sparse.shape, d)
        out.append(torch.cat([sp, _pool(next(got), ix)], dim=-2) if ix.has_multi_hot else sp)
    return tuple(out)
