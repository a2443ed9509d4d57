"""What every meta backend computes, and the types they share.

A backend (``fast``, ``vmap``, ``reference``; chosen once by ``MetaLearner``) turns dense params,
looked-up rows and a task batch into logits: at the shared weights, or at each task's weights after
the inner loop. The losses, statistics and the choice of what to compute live in ``MetaLearner``, so
the backends differ only in how they compute the same numbers.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from gmeta.data.batch import SetBatch, TaskBatch
from gmeta.meta.config import MetaConfig
from gmeta.meta.inner_lr import InnerLearningRates
from gmeta.model.dlrm import DLRM
from gmeta.model.embedding import EmbeddingLookup, LocalIndex


class Pass(enum.Enum):
    """What the adapted logits must be differentiable for."""

    SECOND_ORDER = "second_order"  # training: the graph runs through the inner gradients (MAML)
    FIRST_ORDER = "first_order"  # training: inner gradients are constants, d(fast)/d(params) = I
    EVALUATE = "evaluate"  # no graph at all

    @property
    def training(self) -> bool:
        return self is not Pass.EVALUATE

    @property
    def second_order(self) -> bool:
        return self is Pass.SECOND_ORDER

    @classmethod
    def for_training(cls, cfg: MetaConfig) -> Pass:
        return cls.FIRST_ORDER if cfg.first_order else cls.SECOND_ORDER


@dataclass(frozen=True)
class InnerLoop:
    """The inner loop's settings as the backends need them.

    Attributes:
        steps: SGD steps on each task's support set.
        lr: the inner learning rate.
        groups: dense parameter groups adapted per task.
        adapt_embeddings: whether each task also adapts its looked-up rows.
        embedding_fields: with ``adapt_embeddings``, the id fields (indices into the model's F fields:
            sparse, then multi-hot) whose rows adapt; None: all.
        learned: learned rates per layer and step (``meta.learn_inner_lr``), used instead of ``lr``.
        lr_scale: a factor on the learned rates (an adaptation schedule's ``lr / meta.inner_lr``).
    """

    steps: int
    lr: float
    groups: tuple[str, ...]
    adapt_embeddings: bool
    learned: InnerLearningRates | None = None
    lr_scale: float = 1.0
    embedding_fields: tuple[int, ...] | None = None

    @classmethod
    def of(
        cls,
        cfg: MetaConfig,
        learned: InnerLearningRates | None = None,
        embedding_fields: tuple[int, ...] | None = None,
    ) -> InnerLoop:
        return cls(
            cfg.inner_steps,
            cfg.inner_lr,
            cfg.groups,
            cfg.adapt_embeddings,
            learned=learned,
            embedding_fields=embedding_fields,
        )

    def field_mask(self, num_fields: int, like: Tensor) -> Tensor | None:
        """(F, 1) 1/0 weights of the id fields whose rows adapt (``like``'s dtype/device); None: all."""
        if self.embedding_fields is None:
            return None
        mask = torch.zeros(num_fields, 1, dtype=like.dtype, device=like.device)
        mask[list(self.embedding_fields)] = 1
        return mask

    def row_mask(self, idx: LocalIndex, num_rows: int) -> Tensor | None:
        """(U, 1) bool, True for the looked-up rows that adapt: those ``idx`` reads in the adapted
        fields (each field has its own table, so a row belongs to one field); None: all."""
        if self.embedding_fields is None:
            return None
        fs = idx.sparse.shape[-1]
        hit = torch.zeros(num_rows + 1, dtype=torch.bool, device=idx.sparse.device)  # + the pad row
        for f in self.embedding_fields:
            if f < fs:
                hit[idx.sparse[..., f].reshape(-1)] = True
            else:
                ids = idx.multi_hot[..., f - fs, :]
                hit[ids[idx.multi_hot_mask[..., f - fs, :]]] = True
        return hit[:num_rows].unsqueeze(-1)

    def lr_at(self, step: int, slot: str, attached: bool = True) -> float | Tensor:
        """The rate of ``slot`` (``gmeta.meta.inner_lr.slot_of``) at inner step ``step``: ``lr``, or
        the learned one (a 0-dim tensor, attached to the trained table when ``attached``)."""
        if self.learned is None:
            return self.lr
        rate = self.learned.at(step, slot)
        if not attached:
            rate = rate.detach()
        return rate if self.lr_scale == 1.0 else rate * self.lr_scale


@dataclass
class AdaptedLogits:
    """The result of the inner loop.

    Attributes:
        query: (T, Q) query logits at each task's adapted weights.
        support: (T, S) support logits at the shared weights (the inner loop's step-0 forward): attached
            when asked for (``support_grad``), else detached or None when no support forward ran.
    """

    query: Tensor
    support: Tensor | None


class MetaBackend(ABC):
    """How logits are computed; ``params`` maps dense parameter names to (attached) tensors.

    Args:
        model: the towers, with a functional ``forward_with(params, emb, dense)``.
        inner: the inner loop's settings.
    """

    def __init__(self, model: DLRM, inner: InnerLoop) -> None:
        self.model = model
        self.inner = inner

    @abstractmethod
    def shared_logits(
        self, params: Mapping[str, Tensor], rows: Tensor, idx: LocalIndex, s: SetBatch
    ) -> Tensor:
        """(T, N) logits of one set at the shared weights."""

    def plain_logits(
        self, params: Mapping[str, Tensor], rows: Tensor, lookup: EmbeddingLookup, batch: TaskBatch
    ) -> tuple[Tensor, Tensor]:
        """(T, S) support and (T, Q) query logits at the shared weights (plain training)."""
        return (
            self.shared_logits(params, rows, lookup.support, batch.support),
            self.shared_logits(params, rows, lookup.query, batch.query),
        )

    @abstractmethod
    def adapted_logits(
        self,
        params: Mapping[str, Tensor],
        rows: Tensor,
        lookup: EmbeddingLookup,
        batch: TaskBatch,
        mode: Pass,
        support_grad: bool = False,
    ) -> AdaptedLogits:
        """The inner loop on each task's support set, then its query logits at the adapted weights."""
