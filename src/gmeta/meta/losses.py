"""Masked losses over padded task batches: padding and dummy tasks contribute exactly zero."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def masked_bce(logits: Tensor, label: Tensor, mask: Tensor) -> Tensor:
    """Masked-mean BCE over the last dim: (..., N) -> (...); all-masked rows give exactly 0."""
    per = F.binary_cross_entropy_with_logits(logits, label, reduction="none")
    # where, not multiply: a padded sample's loss can never leak in, even as inf * 0 = nan.
    per = torch.where(mask, per, torch.zeros_like(per))
    return per.sum(-1) / mask.sum(-1).clamp(min=1).to(per.dtype)


def masked_task_mean(values: Tensor, task_mask: Tensor) -> Tensor:
    """Mean of (T,) per-task values over real tasks; 0 if there are none."""
    values = torch.where(task_mask, values, torch.zeros_like(values))
    return values.sum() / task_mask.sum().clamp(min=1).to(values.dtype)


def masked_sample_mean_bce(sets: list[tuple[Tensor, Tensor, Tensor]], task_mask: Tensor) -> Tensor:
    """BCE averaged over every real sample of real tasks in several (logits, label, mask) sets."""
    total = count = None
    for logits, label, mask in sets:
        keep = mask & task_mask[:, None]
        bce = F.binary_cross_entropy_with_logits(logits, label, reduction="none")
        s, c = torch.where(keep, bce, 0.0).sum(), keep.sum()
        total = s if total is None else total + s
        count = c if count is None else count + c
    assert total is not None and count is not None
    return total / count.clamp(min=1).to(total.dtype)
