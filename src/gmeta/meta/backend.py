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

from torch import Tensor

from gmeta.data.batch import SetBatch, TaskBatch
from gmeta.meta.config import MetaConfig
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
    """

    steps: int
    lr: float
    groups: tuple[str, ...]
    adapt_embeddings: bool

    @classmethod
    def of(cls, cfg: MetaConfig) -> InnerLoop:
        return cls(cfg.inner_steps, cfg.inner_lr, cfg.groups, cfg.adapt_embeddings)


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
