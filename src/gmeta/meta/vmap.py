"""The ``vmap`` backend: ``torch.func.vmap`` over tasks of ``torch.func.grad`` inner SGD steps.

The simple vectorized form of the inner loop, for any model with a functional ``forward_with``: each
task's fast weights are a real copy, and second-order MAML needs nothing special (``torch.func.grad``
inside ``vmap`` is differentiable by the ordinary outer autograd whenever its inputs require grad, so
one plain ``loss.backward()`` gives the meta-gradient; no ``create_graph`` backward, DDP-friendly).
It is the fallback for models the ``fast`` backend does not know, and its cross-check.

Shapes: T tasks, S / Q padded support / query samples, U looked-up rows, d embedding dim.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, vmap

from gmeta.data.batch import SetBatch, TaskBatch
from gmeta.meta.backend import AdaptedLogits, MetaBackend, Pass
from gmeta.meta.config import adapted_names
from gmeta.meta.inner_lr import EMBEDDING_SLOT, slot_of
from gmeta.meta.losses import masked_bce
from gmeta.model.embedding import EmbeddingLookup, LocalIndex
from gmeta.model.gather import SetIndex, gather, set_index


class VmapBackend(MetaBackend):
    """``MetaBackend`` with ``torch.func``; ``model.forward_with(params, emb, dense)`` is the model."""

    def shared_logits(
        self, params: Mapping[str, Tensor], rows: Tensor, idx: LocalIndex, s: SetBatch
    ) -> Tensor:
        # no task dim in the weights: one batched forward, no vmap needed
        emb = gather(rows, set_index(idx, rows.dtype))  # (T, N, F, d)
        return self.model.forward_with(params, emb, s.dense.to(rows.dtype))

    def adapted_logits(
        self,
        params: Mapping[str, Tensor],
        rows: Tensor,
        lookup: EmbeddingLookup,
        batch: TaskBatch,
        mode: Pass,
        support_grad: bool = False,
    ) -> AdaptedLogits:
        inner = self.inner
        names = adapted_names(list(params), inner.groups)
        if inner.steps == 0 or not (names or inner.adapt_embeddings):
            with torch.enable_grad() if mode.training else torch.no_grad():
                query = self.shared_logits(params, rows, lookup.query, batch.query)
                support = (
                    self.shared_logits(params, rows, lookup.support, batch.support) if support_grad else None
                )
            return AdaptedLogits(query, support)
        # First order and evaluation run the loop on detached inputs: no graph through it at all.
        p = dict(params) if mode.second_order else {k: v.detach() for k, v in params.items()}
        r = rows if mode.second_order else rows.detach()
        # Evaluation usually runs under no_grad; the inner loop needs gradients.
        with torch.enable_grad():
            fast, fast_rows, support = self._adapt(p, r, names, lookup.support, batch.support, mode)
        if mode is Pass.FIRST_ORDER:
            # Straight-through: value of the adapted weights, gradient of the identity to params/rows.
            fast = {k: params[k] + (v - params[k].detach()) for k, v in fast.items()}
            if fast_rows is not None:
                fast_rows = rows + (fast_rows - rows.detach())
        outer_params = params if mode.training else p
        outer_rows = rows if mode.training else r
        with torch.enable_grad() if mode.training else torch.no_grad():
            shared = {k: v for k, v in outer_params.items() if k not in names}
            query = self._query_logits(
                shared, fast, fast_rows if fast_rows is not None else outer_rows, lookup, batch
            )
            if support_grad:  # the support loss term needs attached logits at the shared weights
                support = self.shared_logits(params, rows, lookup.support, batch.support)
        return AdaptedLogits(query, support)

    def _adapt(
        self, p: dict[str, Tensor], r: Tensor, names: list[str], idx: LocalIndex, s: SetBatch, mode: Pass
    ) -> tuple[dict[str, Tensor], Tensor | None, Tensor]:
        """Every task's inner loop at once: (T, *shape) fast weights, (T, U, d) fast rows (or None),
        and the (T, S) support logits at the shared weights (detached)."""
        inner = self.inner
        model, steps, adapt_rows = self.model, inner.steps, inner.adapt_embeddings
        # the rates per step and slot (learned ones attached in training, also in first order)
        lrs = [
            {k: inner.lr_at(step, slot_of(k), attached=mode.training) for k in names}
            | {EMBEDDING_SLOT: inner.lr_at(step, EMBEDDING_SLOT, attached=mode.training)}
            for step in range(steps)
        ]
        adapted_rows = inner.row_mask(idx, r.shape[0])  # None: every looked-up row adapts
        # first order: the inner gradients are constants (learned rates still get d fast / d lr = -g)
        constant_grads = mode is Pass.FIRST_ORDER
        shared = {k: v for k, v in p.items() if k not in names}
        init = {k: p[k] for k in names}

        def task_loss(
            fast: dict[str, Tensor], fast_rows: Tensor, data: tuple[Tensor, ...]
        ) -> tuple[Tensor, Tensor]:
            sparse, multi_hot, weight, dense, label, mask = data
            emb = gather(fast_rows, SetIndex(sparse, multi_hot, weight))  # (S, F, d)
            logits = model.forward_with({**shared, **fast}, emb, dense)
            return masked_bce(logits, label, mask), logits.detach()

        def task_adapt(fast: dict[str, Tensor], fast_rows: Tensor, *data: Tensor) -> tuple[Any, ...]:
            # One task (vmapped): fast (*shape) per name, fast_rows (U, d), data without the T dim.
            logits0 = None
            for step in range(steps):
                if adapt_rows:
                    (g, g_rows), logits = grad(task_loss, argnums=(0, 1), has_aux=True)(fast, fast_rows, data)
                    if constant_grads:
                        g_rows = g_rows.detach()
                    if adapted_rows is not None:
                        g_rows = g_rows * adapted_rows
                    fast_rows = fast_rows - lrs[step][EMBEDDING_SLOT] * g_rows
                else:
                    g, logits = grad(task_loss, has_aux=True)(fast, fast_rows, data)
                if constant_grads:
                    g = {k: v.detach() for k, v in g.items()}
                fast = {k: fast[k] - lrs[step][k] * g[k] for k in fast}
                if step == 0:
                    logits0 = logits
            return (fast, logits0, fast_rows) if adapt_rows else (fast, logits0)

        ix = set_index(idx, r.dtype)
        data = (ix.sparse, ix.multi_hot, ix.weight, s.dense.to(r.dtype), s.label.to(r.dtype), s.mask)
        out = vmap(task_adapt, in_dims=(None, None, *([0] * len(data))))(init, r, *data)
        return out[0], (out[2] if adapt_rows else None), out[1]

    def _query_logits(
        self,
        shared: dict[str, Tensor],
        fast: dict[str, Tensor],
        rows: Tensor,
        lookup: EmbeddingLookup,
        batch: TaskBatch,
    ) -> Tensor:
        """(T, Q) logits of each task's query samples at its fast weights (vectorized over tasks)."""
        model = self.model

        def task_logits(adapted: dict[str, Tensor], rows_t: Tensor, *ix_dense: Tensor) -> Tensor:
            sparse, multi_hot, weight, dense = ix_dense
            emb = gather(rows_t, SetIndex(sparse, multi_hot, weight))  # (Q, F, d)
            return model.forward_with({**shared, **adapted}, emb, dense)

        ix = set_index(lookup.query, rows.dtype)
        rows_dim = 0 if rows.dim() == 3 else None  # per-task adapted rows carry a task dim
        return vmap(task_logits, in_dims=(0, rows_dim, 0, 0, 0, 0))(
            fast, rows, ix.sparse, ix.multi_hot, ix.weight, batch.query.dense.to(rows.dtype)
        )
