"""Learned inner learning rates: one per layer and inner step (Meta-SGD, MAML++'s "LSLR").

With ``meta.learn_inner_lr`` the inner loop's step size is not one hand-picked number: each layer
that can adapt (a "slot": a Linear layer of the towers, or the embedding rows) gets its own rate at
each inner step, initialised to ``meta.inner_lr`` and trained by the outer loop like any dense
parameter (its gradient flows through the adapted weights ``W - lr_{step, layer} * grad``). Every
backend reads the rates through ``InnerLoop.lr_at(step, slot)``, so the fast closed-form path, vmap
and the per-task reference compute the same numbers (tests/unit/test_learned_inner_lr.py).

An evaluation inner loop with more steps than were trained reuses the last trained step's rates; an
adaptation schedule's setting scales them by ``setting.lr / meta.inner_lr`` (``gmeta.meta.learner``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gmeta.meta.config import PARAM_GROUPS

#: the slot of the looked-up embedding rows (``meta.adapt_embeddings``)
EMBEDDING_SLOT = "embedding"


def slot_of(param_name: str) -> str:
    """The slot of a dense parameter: its module's name (``top.0.weight`` -> ``top.0``); a layer's
    weight and bias share their layer's rate."""
    return param_name.rsplit(".", 1)[0]


def lr_slots(model: nn.Module) -> tuple[str, ...]:
    """Every slot of ``model`` in parameter order (all of ``PARAM_GROUPS``, adapted or not, so the
    table's shape does not depend on which groups a schedule adapts), then ``EMBEDDING_SLOT``."""
    slots: list[str] = []
    for name, _ in model.named_parameters():
        if name.split(".", 1)[0] in PARAM_GROUPS and slot_of(name) not in slots:
            slots.append(slot_of(name))
    return (*slots, EMBEDDING_SLOT)


class InnerLearningRates(nn.Module):
    """A (steps, slots) table of inner learning rates, a trained parameter.

    Args:
        slots: the slot names (``lr_slots``).
        steps: the inner steps of training (>= 1).
        init: every rate's initial value (``meta.inner_lr``).
    """

    def __init__(self, slots: tuple[str, ...], steps: int, init: float) -> None:
        super().__init__()
        if steps < 1:
            raise ValueError(f"learned inner learning rates need inner steps >= 1, got {steps}")
        self.slots = tuple(slots)
        self._index = {s: i for i, s in enumerate(self.slots)}
        self.values = nn.Parameter(torch.full((steps, len(self.slots)), float(init)))

    @property
    def steps(self) -> int:
        return self.values.shape[0]

    def at(self, step: int, slot: str) -> Tensor:
        """The 0-dim rate of ``slot`` at inner step ``step`` (the last trained step's beyond them)."""
        if slot not in self._index:
            raise KeyError(f"no learned inner learning rate for {slot!r}; slots: {list(self.slots)}")
        return self.values[min(step, self.steps - 1), self._index[slot]]

    def table(self) -> dict[str, list[float]]:
        """``{slot: [rate per step]}``, for logs and reports."""
        v = self.values.detach().cpu()
        return {s: [round(float(x), 6) for x in v[:, i]] for i, s in enumerate(self.slots)}

    def extra_repr(self) -> str:
        return f"steps={self.steps}, slots={list(self.slots)}"
