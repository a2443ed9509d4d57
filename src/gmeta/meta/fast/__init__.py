"""The ``fast`` backend: the inner loop of MAML / FOMAML / ANIL in closed form on the DLRM towers.

No per-task copy of any weight is built. For a linear layer ``z = W x + b`` one inner SGD step on
task t's support loss gives ``W_t = W - lr * D_t^T X_t`` and ``b_t = b - lr * 1^T D_t`` (``X_t`` the
layer's support inputs, ``D_t`` the support loss gradients w.r.t. its outputs). After k steps the
layer at the adapted weights is

    z = W x + b - lr * (x X_t^T + 1) D_t        with X_t, D_t the (T, k*S, .) factors of all steps,

a shared matrix product for all tasks plus two small per-task products. The inner gradients are
written out by hand as ordinary tensor ops, so second-order MAML is one plain ``loss.backward()``
through them (no ``create_graph``, no ``vmap``); first order runs them without a graph at all.

Modules: ``towers`` (the DLRM as linear layers), ``ops`` (custom autograd Functions, each for
speed), ``adapted`` (forward at adapted weights, the inner backward by hand), ``rows`` (per-task
adapted embedding rows), ``step`` (the driver). Why each piece is shaped as it is, with
measurements: docs/benchmarks.md, "How the fast path gets its speed".

Supported: ``DLRM`` towers built by ``gmeta.model.dlrm.mlp`` (Linear/ReLU stacks), ``dot`` or
``concat`` interaction, with or without a bottom tower, with or without the per-id biases
(``DLRM.id_bias``: added to the logit, adapted with their rows), with or without a generator
(``DLRM.generator``: applied to the gathered embeddings, outside the inner loop, so not with
``adapt_embeddings``, whose adapted rows would change its input), any ``adapt_groups``,
``inner_steps >= 0``, first or second order, ``adapt_embeddings``. ``supports`` says whether a
model and inner loop qualify; the learner uses the ``vmap`` backend for any other.

Shapes: T tasks, S / Q / M padded samples per set, U looked-up rows, F id fields, d embedding dim.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from gmeta.data.batch import SetBatch, TaskBatch
from gmeta.meta.backend import AdaptedLogits, InnerLoop, MetaBackend, Pass
from gmeta.meta.fast.step import plain_logits, run_meta, shared_logits
from gmeta.meta.fast.towers import Towers, towers_of
from gmeta.model.dlrm import DLRM
from gmeta.model.embedding import EmbeddingLookup, LocalIndex

__all__ = ["FastBackend", "supports"]


def supports(model: nn.Module, adapt_embeddings: bool = False) -> bool:
    """Whether the fast backend knows the model's structure (and, with a generator, whether the
    inner loop leaves the rows alone)."""
    towers = towers_of(model, {}, ())
    return towers is not None and not (towers.generator_spec is not None and adapt_embeddings)


class FastBackend(MetaBackend):
    """``MetaBackend`` computing with ``gmeta.meta.fast``; build it for a model ``supports`` accepts."""

    def __init__(self, model: DLRM, inner: InnerLoop) -> None:
        if not supports(model, inner.adapt_embeddings):
            raise ValueError(
                f"the fast backend does not support {type(model).__name__}; use the vmap backend"
            )
        super().__init__(model, inner)

    def _towers(self, params: Mapping[str, Tensor]) -> Towers:
        towers = towers_of(self.model, params, self.inner.groups)
        assert towers is not None  # checked in __init__
        return towers

    def shared_logits(
        self, params: Mapping[str, Tensor], rows: Tensor, idx: LocalIndex, s: SetBatch
    ) -> Tensor:
        return shared_logits(self._towers(params), rows, idx, s)

    def plain_logits(
        self, params: Mapping[str, Tensor], rows: Tensor, lookup: EmbeddingLookup, batch: TaskBatch
    ) -> tuple[Tensor, Tensor]:
        return plain_logits(self._towers(params), rows, lookup, batch)

    def adapted_logits(
        self,
        params: Mapping[str, Tensor],
        rows: Tensor,
        lookup: EmbeddingLookup,
        batch: TaskBatch,
        mode: Pass,
        support_grad: bool = False,
    ) -> AdaptedLogits:
        towers = self._towers(params)
        if not mode.training:
            towers, rows = towers.detached(), rows.detach()
        with torch.enable_grad() if mode.training else torch.no_grad():
            return run_meta(towers, rows, lookup, batch, self.inner, mode, support_grad)
