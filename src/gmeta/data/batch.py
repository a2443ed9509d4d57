"""Typed containers for tasks: one task as numpy arrays, a batch of tasks as padded tensors.

Shapes (T = tasks in the batch, N = padded samples per set, Fs / Fm / Fd = number of sparse /
multi-hot / dense fields, L = longest multi-hot list):

    SetBatch.sparse     int64   (T, N, Fs)     ids, 0 = OOV row
    SetBatch.multi_hot  int64   (T, N, Fm, L)  ids, -1 = padding inside a list
    SetBatch.dense      float32 (T, N, Fd)
    SetBatch.label      float32 (T, N)
    SetBatch.mask       bool    (T, N)         True for real samples, False for padding
    TaskBatch.state     int64   (T,)           index into ``schema.STATES``
    TaskBatch.task_mask bool    (T,)           False for dummy tasks that pad a batch
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from gmeta.data.schema import MULTI_HOT_PAD, STATES

SET_ARRAYS: tuple[str, ...] = ("sparse", "multi_hot", "dense", "label")


@dataclass
class TaskRecord:
    """One task as stored in a shard: support and query arrays plus identity.

    Arrays are keyed ``"{set}.{name}"`` with set in (support, query) and name in SET_ARRAYS;
    shapes are the per-task versions of ``SetBatch`` (no leading T).
    """

    task_id: str
    state: str
    arrays: dict[str, np.ndarray]

    def num(self, which: str) -> int:
        return int(self.arrays[f"{which}.label"].shape[0])


@dataclass
class SetBatch:
    """Support or query samples of T tasks, padded to the longest task (see module docstring)."""

    sparse: torch.Tensor
    multi_hot: torch.Tensor
    dense: torch.Tensor
    label: torch.Tensor
    mask: torch.Tensor

    @property
    def num_tasks(self) -> int:
        return int(self.label.shape[0])

    def to(self, device: torch.device | str) -> SetBatch:
        return SetBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


@dataclass
class TaskBatch:
    """A meta-batch: support and query sets of T tasks."""

    support: SetBatch
    query: SetBatch
    state: torch.Tensor
    task_mask: torch.Tensor
    task_ids: list[str]

    @property
    def num_tasks(self) -> int:
        return self.support.num_tasks

    def to(self, device: torch.device | str) -> TaskBatch:
        return TaskBatch(
            support=self.support.to(device),
            query=self.query.to(device),
            state=self.state.to(device),
            task_mask=self.task_mask.to(device),
            task_ids=list(self.task_ids),
        )


def _pad_set(records: Sequence[TaskRecord], which: str, min_len: int = 1) -> SetBatch:
    sizes = [r.num(which) for r in records]
    n = max([min_len, *sizes])
    t = len(records)
    first = records[0].arrays
    fs = first[f"{which}.sparse"].shape[1]
    fm, length = first[f"{which}.multi_hot"].shape[1:]
    fd = first[f"{which}.dense"].shape[1]
    sparse = np.zeros((t, n, fs), dtype=np.int64)
    multi_hot = np.full((t, n, fm, length), MULTI_HOT_PAD, dtype=np.int64)
    dense = np.zeros((t, n, fd), dtype=np.float32)
    label = np.zeros((t, n), dtype=np.float32)
    mask = np.zeros((t, n), dtype=bool)
    for i, (r, k) in enumerate(zip(records, sizes, strict=True)):
        a = r.arrays
        sparse[i, :k] = a[f"{which}.sparse"]
        multi_hot[i, :k] = a[f"{which}.multi_hot"]
        dense[i, :k] = a[f"{which}.dense"]
        label[i, :k] = a[f"{which}.label"]
        mask[i, :k] = True
    return SetBatch(
        sparse=torch.from_numpy(sparse),
        multi_hot=torch.from_numpy(multi_hot),
        dense=torch.from_numpy(dense),
        label=torch.from_numpy(label),
        mask=torch.from_numpy(mask),
    )


def collate_tasks(records: Sequence[TaskRecord]) -> TaskBatch:
    """Pad variable-size tasks into one ``TaskBatch`` (all tasks real: ``task_mask`` all True)."""
    if not records:
        raise ValueError("collate_tasks got an empty list of tasks")
    return TaskBatch(
        support=_pad_set(records, "support"),
        query=_pad_set(records, "query"),
        state=torch.tensor([STATES.index(r.state) for r in records], dtype=torch.long),
        task_mask=torch.ones(len(records), dtype=torch.bool),
        task_ids=[r.task_id for r in records],
    )


def pad_tasks(batch: TaskBatch, num_tasks: int) -> TaskBatch:
    """Append masked dummy tasks so that the batch holds ``num_tasks`` tasks.

    Dummy tasks have one masked-out sample per set (all-zero ids), so they run through every
    computation (equal work per rank) but contribute nothing to losses or metrics.
    """
    extra = num_tasks - batch.num_tasks
    if extra < 0:
        raise ValueError(f"cannot pad a batch of {batch.num_tasks} tasks down to {num_tasks}")
    if extra == 0:
        return batch

    def grow(x: torch.Tensor, fill: float | int | bool) -> torch.Tensor:
        pad = torch.full((extra, *x.shape[1:]), fill, dtype=x.dtype, device=x.device)
        return torch.cat([x, pad])

    def grow_set(s: SetBatch) -> SetBatch:
        return SetBatch(
            sparse=grow(s.sparse, 0),
            multi_hot=grow(s.multi_hot, MULTI_HOT_PAD),
            dense=grow(s.dense, 0.0),
            label=grow(s.label, 0.0),
            mask=grow(s.mask, False),
        )

    return TaskBatch(
        support=grow_set(batch.support),
        query=grow_set(batch.query),
        state=grow(batch.state, 0),
        task_mask=grow(batch.task_mask, False),
        task_ids=batch.task_ids + [""] * extra,
    )


def truncate_support(batch: TaskBatch, k: int | None) -> TaskBatch:
    """A copy of ``batch`` whose support sets keep only the first ``k`` real samples of each task.

    Samples are stored in time order, so "first k" is what a new user with k interactions has:
    their earliest ones. Only ``support.mask`` changes (a new tensor); tasks with fewer than ``k``
    real samples keep all of theirs, the query set and all other tensors are shared, unchanged, and
    the input is not mutated. ``k=None`` returns ``batch`` itself (the whole support set).
    """
    if k is None:
        return batch
    if k < 0:
        raise ValueError(f"k must be >= 0 or None, got {k}")
    mask = batch.support.mask
    keep = mask & (torch.cumsum(mask.long(), dim=1) <= k)
    return replace(batch, support=replace(batch.support, mask=keep))
