"""Per-task adapted embedding rows (``adapt_embeddings``), kept per (task, row) pair of the support sets.

A (U, d) copy of the looked-up rows per task would cost T * U * d; the support sets touch few rows
each, so a task's query id reads ``rows[id]`` plus the task's delta for that id (or no delta).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gmeta.model.gather import SetIndex


@dataclass
class TaskRows:
    """Per-task adapted rows: the (task, row) pairs of the support sets, C of them.

    support / query: the sets' indices into the (C + 1, d) delta table (C = a zero row for query ids
    that the task's support never used, and for padding).
    """

    num: int
    support: SetIndex
    query: SetIndex


def task_rows(sup: SetIndex, qry: SetIndex, num_rows: int) -> TaskRows:
    T = sup.sparse.shape[0]
    stride = num_rows + 1
    base = torch.arange(T, device=sup.sparse.device) * stride

    def keys(ix: SetIndex) -> tuple[Tensor, Tensor]:
        return (
            ix.sparse + base.view(T, *([1] * (ix.sparse.dim() - 1))),
            ix.multi_hot + base.view(T, *([1] * (ix.multi_hot.dim() - 1))),
        )

    s_sp, s_mh = keys(sup)
    uniq, inv = torch.unique(torch.cat([s_sp.reshape(-1), s_mh.reshape(-1)]), return_inverse=True)
    c = int(uniq.numel())
    n_sp = s_sp.numel()
    s_ix = SetIndex(inv[:n_sp].view_as(s_sp), inv[n_sp:].view_as(s_mh), sup.weight)

    def lookup(k: Tensor) -> Tensor:
        if c == 0:
            return torch.zeros_like(k)
        pos = torch.searchsorted(uniq, k.reshape(-1)).clamp_(max=c - 1)
        return torch.where(uniq[pos] == k.reshape(-1), pos, c).view_as(k)

    q_sp, q_mh = keys(qry)
    q_ix = SetIndex(lookup(q_sp), lookup(q_mh), qry.weight)
    return TaskRows(c, s_ix, q_ix)


def emb_position_grads(g_emb: Tensor, ix: SetIndex, fs: int) -> tuple[Tensor, Tensor]:
    """(T, S, F, d) embedding gradients -> flat (index, gradient) pairs of the table rows they hit."""
    d = g_emb.shape[-1]
    idx = [ix.sparse.reshape(-1)]
    vals = [g_emb[:, :, :fs].reshape(-1, d)]
    if ix.has_multi_hot:
        idx.append(ix.multi_hot.reshape(-1))
        vals.append((g_emb[:, :, fs:].unsqueeze(-2) * ix.weight.unsqueeze(-1)).reshape(-1, d))
    return torch.cat(idx), torch.cat(vals)


def cat_sets(a: SetIndex, b: SetIndex) -> SetIndex:
    """Two sets' indices as one (T, Ma + Mb, ...) set (multi-hot lists padded to one length)."""
    la, lb = a.multi_hot.shape[-1], b.multi_hot.shape[-1]
    if la != lb:
        L = max(la, lb)

        def pad(ix: SetIndex) -> SetIndex:
            k = L - ix.multi_hot.shape[-1]
            return SetIndex(
                ix.sparse,
                torch.nn.functional.pad(ix.multi_hot, (0, k)),
                torch.nn.functional.pad(ix.weight, (0, k)),
            )

        a, b = pad(a), pad(b)
    return SetIndex(
        torch.cat([a.sparse, b.sparse], dim=1),
        torch.cat([a.multi_hot, b.multi_hot], dim=1),
        torch.cat([a.weight, b.weight], dim=1),
    )
