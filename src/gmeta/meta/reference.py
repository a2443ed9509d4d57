"""The ``reference`` backend: the obvious per-task loop, the yardstick for the vectorized backends.

A Python loop over real tasks on unpadded samples, with ``torch.autograd.grad(create_graph=...)``
per inner step. Slow (one small forward and backward per task and step); tests compare the ``fast``
and ``vmap`` backends against it. Logits of padded samples and of dummy tasks are 0.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from gmeta.data.batch import SetBatch, TaskBatch
from gmeta.meta.backend import AdaptedLogits, MetaBackend, Pass
from gmeta.meta.config import adapted_names
from gmeta.meta.inner_lr import EMBEDDING_SLOT, slot_of
from gmeta.model.embedding import EmbeddingLookup, LocalIndex
from gmeta.model.gather import SetIndex, gather, set_index

#: one task's unpadded set: its index into the rows, dense features, labels
_TaskSet = tuple[SetIndex, Tensor, Tensor]


class ReferenceBackend(MetaBackend):
    """``MetaBackend`` looping over tasks; any model with ``forward_with(params, emb, dense)``."""

    @staticmethod
    def _task_set(idx: LocalIndex, s: SetBatch, t: int, dtype: torch.dtype) -> _TaskSet:
        keep = s.mask[t]  # drop padded samples instead of masking them
        ix = set_index(idx, dtype).task(t)
        kept = SetIndex(ix.sparse[keep], ix.multi_hot[keep], ix.weight[keep])
        return kept, s.dense[t][keep].to(dtype), s.label[t][keep].to(dtype)

    def _logits(self, params: Mapping[str, Tensor], rows: Tensor, ts: _TaskSet) -> Tensor:
        return self.model.forward_with(params, gather(rows, ts[0]), ts[1])

    @staticmethod
    def _padded(per_task: dict[int, Tensor], s: SetBatch, like: Tensor) -> Tensor:
        """(T, N) logits with each real task's values at its real samples, 0 elsewhere."""
        out = [
            torch.zeros(s.mask.shape[1], dtype=like.dtype, device=like.device).masked_scatter(
                s.mask[t], per_task[t]
            )
            if t in per_task
            else torch.zeros(s.mask.shape[1], dtype=like.dtype, device=like.device)
            for t in range(s.mask.shape[0])
        ]
        return torch.stack(out)

    def _real_tasks(self, batch: TaskBatch) -> list[int]:
        return [t for t in range(batch.num_tasks) if bool(batch.task_mask[t])]

    def shared_logits(
        self, params: Mapping[str, Tensor], rows: Tensor, idx: LocalIndex, s: SetBatch
    ) -> Tensor:
        tasks = range(s.mask.shape[0])
        per = {t: self._logits(params, rows, self._task_set(idx, s, t, rows.dtype)) for t in tasks}
        return self._padded(per, s, rows)

    def adapted_logits(
        self,
        params: Mapping[str, Tensor],
        rows: Tensor,
        lookup: EmbeddingLookup,
        batch: TaskBatch,
        mode: Pass,
        support_grad: bool = False,
    ) -> AdaptedLogits:
        inner, dtype = self.inner, rows.dtype
        names = adapted_names(list(params), inner.groups)
        with torch.enable_grad():
            if not mode.training:  # evaluation: first order on detached weights
                params = {k: v.detach().requires_grad_(k in names) for k, v in params.items()}
                rows = rows.detach().requires_grad_(inner.adapt_embeddings)
            query, support = {}, {}
            adapted_rows = inner.row_mask(lookup.support, rows.shape[0])  # None: all
            for t in self._real_tasks(batch):
                s_set = self._task_set(lookup.support, batch.support, t, dtype)
                q_set = self._task_set(lookup.query, batch.query, t, dtype)
                fast = {k: params[k] for k in names}
                fast_rows = rows
                # an empty support set (a 0-shot evaluation) has no loss to descend: no step
                adapts = (names or inner.adapt_embeddings) and s_set[2].numel() > 0
                for step in range(inner.steps if adapts else 0):
                    logits = self._logits({**params, **fast}, fast_rows, s_set)
                    if step == 0:
                        support[t] = logits
                    inputs = list(fast.values()) + ([fast_rows] if inner.adapt_embeddings else [])
                    grads = torch.autograd.grad(
                        F.binary_cross_entropy_with_logits(logits, s_set[2]),
                        inputs,
                        create_graph=mode.second_order,
                        retain_graph=True,
                    )
                    fast = {
                        k: v - inner.lr_at(step, slot_of(k), attached=mode.training) * g
                        for (k, v), g in zip(fast.items(), grads, strict=False)
                    }
                    if inner.adapt_embeddings:
                        lr_rows = inner.lr_at(step, EMBEDDING_SLOT, attached=mode.training)
                        g_rows = grads[-1] if adapted_rows is None else grads[-1] * adapted_rows
                        fast_rows = fast_rows - lr_rows * g_rows
                if support_grad or t not in support:
                    support[t] = self._logits(params, rows, s_set)
                query[t] = self._logits({**params, **fast}, fast_rows, q_set)
            q = self._padded(query, batch.query, rows)
            s = self._padded(support, batch.support, rows)
        if not support_grad:
            s = s.detach()
        return AdaptedLogits(q if mode.training else q.detach(), s)
