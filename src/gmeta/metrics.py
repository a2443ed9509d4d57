"""Cold-start metrics: AUC, logloss and per-task (group) AUC for each cold-start state.

A task never spans two batches, so per-task AUCs are computed at ``update`` time and only their
values are kept; global AUC / logloss need the per-sample predictions, kept as ``cat`` states so that
``compute()`` gathers them across ranks (it is a collective: call it on every rank).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.functional.classification import binary_auroc

from gmeta.data.schema import STATES

METRIC_NAMES: tuple[str, ...] = ("auc", "logloss", "gauc", "tasks", "samples")


def per_task_auc(scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """AUC of each task from its masked samples; NaN where a task's query has a single class.

    Args:
        scores: (T, Q) logits or probabilities. labels: (T, Q) 0/1. mask: (T, Q) bool.
    Returns:
        (T,) AUC per task (ties count one half), NaN for tasks without both classes.
    """
    pos = (labels > 0.5) & mask
    neg = (labels <= 0.5) & mask
    diff = scores.unsqueeze(2) - scores.unsqueeze(1)  # (T, Q_pos, Q_neg): s_i - s_j
    wins = (diff > 0).to(scores.dtype) + 0.5 * (diff == 0).to(scores.dtype)
    pair = pos.unsqueeze(2) & neg.unsqueeze(1)
    num_pairs = pair.sum(dim=(1, 2))
    auc = (wins * pair).sum(dim=(1, 2)) / num_pairs.clamp(min=1)
    return torch.where(num_pairs > 0, auc, torch.full_like(auc, math.nan))


class ColdStartMetrics(Metric):
    """Accumulates query predictions of evaluated tasks and reports metrics per cold-start state."""

    full_state_update = False
    # "cat" list states (as torchmetrics declares them); only while synced in ``compute`` does
    # torchmetrics replace each list by one concatenated tensor, hence the ``cat`` helper there
    scores: list[torch.Tensor]
    labels: list[torch.Tensor]
    sample_state: list[torch.Tensor]
    task_auc: list[torch.Tensor]
    task_state: list[torch.Tensor]

    def __init__(self) -> None:
        super().__init__()
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")
        self.add_state("sample_state", default=[], dist_reduce_fx="cat")
        self.add_state("task_auc", default=[], dist_reduce_fx="cat")
        self.add_state("task_state", default=[], dist_reduce_fx="cat")

    def update(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        mask: torch.Tensor,
        state: torch.Tensor,
        task_mask: torch.Tensor,
    ) -> None:
        """Add one batch: logits/labels/mask (T, Q), state (T,), task_mask (T,) (dummy tasks dropped)."""
        logits, labels = logits.detach().float(), labels.float()
        mask = mask & task_mask.unsqueeze(1)
        self.scores.append(logits[mask])
        self.labels.append(labels[mask])
        self.sample_state.append(state.unsqueeze(1).expand_as(mask)[mask])
        real = task_mask
        self.task_auc.append(per_task_auc(logits, labels, mask)[real])
        self.task_state.append(state[real])

    def compute(self) -> dict[str, dict[str, float]]:
        """{state: {auc, logloss, gauc, tasks, samples, gauc_tasks}} for states that have tasks."""
        if isinstance(self.task_state, list) and not self.task_state:
            return {}
        cat = lambda x: torch.cat(x) if isinstance(x, list) else x  # noqa: E731 (list before sync)
        scores, labels, sample_state = cat(self.scores), cat(self.labels), cat(self.sample_state)
        task_auc, task_state = cat(self.task_auc), cat(self.task_state)
        out: dict[str, dict[str, float]] = {}
        for code, name in enumerate(STATES):
            in_state = sample_state == code
            tasks_in_state = task_state == code
            if not bool(tasks_in_state.any()):
                continue
            # float64 sigmoid keeps large logits apart (float32 saturates to 1.0 and would tie them)
            s, y = scores[in_state], labels[in_state]
            valid_auc = task_auc[tasks_in_state]
            valid_auc = valid_auc[~torch.isnan(valid_auc)]
            has_both = bool((y > 0.5).any() and (y <= 0.5).any())
            out[name] = {
                "auc": float(binary_auroc(torch.sigmoid(s.double()), y.long())) if has_both else math.nan,
                "logloss": float(F.binary_cross_entropy_with_logits(s, y)) if len(y) else math.nan,
                "gauc": float(valid_auc.mean()) if len(valid_auc) else math.nan,
                "tasks": int(tasks_in_state.sum()),
                "samples": int(in_state.sum()),
                "gauc_tasks": int(len(valid_auc)),
            }
        return out
