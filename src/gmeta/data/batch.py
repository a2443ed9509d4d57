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
from dataclasses import dataclass, field, fields, replace

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


_PAD_VALUE = {"sparse": 0, "multi_hot": MULTI_HOT_PAD, "dense": 0.0, "label": 0.0}


@dataclass
class TaskChunk:
    """Many tasks stored column-wise: each set's rows of all tasks concatenated, plus offsets.

    ``arrays`` are keyed like ``TaskRecord.arrays`` but hold the rows of all tasks back to back
    (e.g. ``support.sparse`` is ``(R_support, Fs)``); task ``i``'s support rows are
    ``offsets["support"][i]:offsets["support"][i + 1]``. ``states`` holds ``STATES`` indices.
    One shard decodes into one chunk, so validation and collation run per chunk / per batch as a
    few array operations instead of per task and per field.

    ``padded`` (optional) holds the same arrays with one extra padding row at the end (``arrays``
    are then views of it); collation gathers padded slots from that row. Missing entries are
    built on first use.
    """

    task_ids: list[str]
    states: np.ndarray
    offsets: dict[str, np.ndarray]
    arrays: dict[str, np.ndarray]
    padded: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)
    _slots: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)
    _sizes: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_tasks(self) -> int:
        return len(self.task_ids)

    def sizes(self, which: str) -> np.ndarray:
        """Samples per task in set ``which`` (int64, ``(num_tasks,)``; cached)."""
        out = self._sizes.get(which)
        if out is None:
            out = self._sizes[which] = np.diff(self.offsets[which])
        return out

    def record(self, i: int) -> TaskRecord:
        """Task ``i`` as a ``TaskRecord`` (arrays are views into the chunk)."""
        arrays: dict[str, np.ndarray] = {}
        for which in ("support", "query"):
            lo, hi = int(self.offsets[which][i]), int(self.offsets[which][i + 1])
            for name in SET_ARRAYS:
                arrays[f"{which}.{name}"] = self.arrays[f"{which}.{name}"][lo:hi]
        return TaskRecord(task_id=self.task_ids[i], state=STATES[int(self.states[i])], arrays=arrays)

    def padded_array(self, which: str, name: str) -> np.ndarray:
        """``arrays[f"{which}.{name}"]`` plus a final padding row (index -1)."""
        key = f"{which}.{name}"
        out = self.padded.get(key)
        if out is None:
            a = self.arrays[key]
            out = np.concatenate([a, np.full((1, *a.shape[1:]), _PAD_VALUE[name], dtype=a.dtype)])
            self.padded[key] = out
        return out

    def slots(self, which: str) -> np.ndarray:
        """(num_tasks, W) row of each task's j-th sample in set ``which``, -1 past its end (cached)."""
        out = self._slots.get(which)
        if out is None:
            n = self.sizes(which)
            width = max(1, int(n.max())) if len(n) else 1
            j = np.arange(width)
            out = np.where(j < n[:, None], self.offsets[which][:-1, None] + j, -1)
            self._slots[which] = out
        return out


def _gather_set(
    groups: Sequence[tuple[TaskChunk, np.ndarray, np.ndarray]], t: int, which: str, min_len: int = 1
) -> SetBatch:
    """Pad set ``which`` of the tasks ``groups`` select into (T, N, ...) arrays without a task loop.

    ``groups`` holds (chunk, positions in the batch, task indices in the chunk). Each task's slot
    row indices come from ``TaskChunk.slots`` (-1 = the padding row, valid indices only, hence
    ``mode="wrap"`` is exact), so every array of every group is one ``np.take`` straight into the
    output when the group's positions are contiguous (plus one scatter when they are not).
    """
    sizes = [c.sizes(which)[ix] for c, _, ix in groups]
    n = max(min_len, *(int(k.max()) for k in sizes))
    rows = []
    for c, _, ix in groups:
        r = c.slots(which)[ix, :n]
        if r.shape[1] < n:
            r = np.concatenate([r, np.full((len(ix), n - r.shape[1]), -1, dtype=r.dtype)], axis=1)
        rows.append(r)
    first = groups[0][0]
    out = {
        name: np.empty(
            (t, n, *first.arrays[f"{which}.{name}"].shape[1:]), dtype=first.arrays[f"{which}.{name}"].dtype
        )
        for name in SET_ARRAYS
    }
    mask = np.empty((t, n), dtype=bool)
    for (c, pos, _), r in zip(groups, rows, strict=True):
        lo = int(pos[0])
        if int(pos[-1]) - lo + 1 == len(pos):  # a contiguous run of the batch: gather in place
            for name in SET_ARRAYS:
                np.take(
                    c.padded_array(which, name), r, axis=0, out=out[name][lo : lo + len(pos)], mode="wrap"
                )
            mask[lo : lo + len(pos)] = r >= 0
        else:
            for name in SET_ARRAYS:
                out[name][pos] = np.take(c.padded_array(which, name), r, axis=0)
            mask[pos] = r >= 0
    return SetBatch(
        sparse=torch.from_numpy(out["sparse"]),
        multi_hot=torch.from_numpy(out["multi_hot"]),
        dense=torch.from_numpy(out["dense"]),
        label=torch.from_numpy(out["label"]),
        mask=torch.from_numpy(mask),
    )


def _collate_groups(
    groups: Sequence[tuple[TaskChunk, np.ndarray, np.ndarray]], task_ids: list[str]
) -> TaskBatch:
    t = len(task_ids)
    state = np.empty(t, dtype=np.int64)
    for c, pos, ix in groups:
        state[pos] = c.states[ix]
    return TaskBatch(
        support=_gather_set(groups, t, "support"),
        query=_gather_set(groups, t, "query"),
        state=torch.from_numpy(state),
        task_mask=torch.ones(t, dtype=torch.bool),
        task_ids=task_ids,
    )


def collate_chunk_tasks(items: Sequence[tuple[TaskChunk, int]]) -> TaskBatch:
    """Collate tasks given as (chunk, task index) pairs, in this order, into one ``TaskBatch``.

    Equal to ``collate_tasks([c.record(i) for c, i in items])``, but copies each array of each
    chunk involved with one vectorised gather instead of a Python loop over tasks (fastest when
    the tasks of each chunk are adjacent in ``items``; see also ``collate_chunk_runs``).
    """
    if not items:
        raise ValueError("collate_chunk_tasks got an empty list of tasks")
    by_chunk: dict[int, tuple[TaskChunk, list[int], list[int]]] = {}
    for p, (c, i) in enumerate(items):
        entry = by_chunk.get(id(c))
        if entry is None:
            entry = by_chunk[id(c)] = (c, [], [])
        entry[1].append(p)
        entry[2].append(i)
    groups = [
        (c, np.asarray(pos, dtype=np.int64), np.asarray(ix, dtype=np.int64))
        for c, pos, ix in by_chunk.values()
    ]
    return _collate_groups(groups, [c.task_ids[i] for c, i in items])


def collate_chunk_runs(runs: Sequence[tuple[TaskChunk, np.ndarray]]) -> TaskBatch:
    """Collate runs of tasks, ``(chunk, task indices)`` each, into one ``TaskBatch`` in this order.

    Equal to ``collate_chunk_tasks([(c, int(i)) for c, ix in runs for i in ix])`` without any
    per-task Python work: every run is one contiguous block of the batch.
    """
    if not runs or not sum(len(ix) for _, ix in runs):
        raise ValueError("collate_chunk_runs got an empty list of tasks")
    groups, task_ids, lo = [], [], 0
    for c, ix in runs:
        ix = np.asarray(ix, dtype=np.int64)
        if len(ix):
            groups.append((c, np.arange(lo, lo + len(ix)), ix))
            task_ids += [c.task_ids[i] for i in ix.tolist()]
            lo += len(ix)
    return _collate_groups(groups, task_ids)


_WIRE_FIELDS: tuple[str, ...] = ("sparse", "multi_hot", "dense", "label", "mask")


def batch_to_arrays(batch: TaskBatch) -> tuple[dict[str, np.ndarray], list[str]]:
    """A CPU ``TaskBatch`` as plain numpy arrays (views, no copy) and its task ids.

    DataLoader workers send batches in this form: numpy arrays are pickled into the result pipe in
    one piece, while every tensor would get its own shared-memory segment (a MovieLens batch of 32
    tasks, 12 tensors: 2.9 ms per batch as tensors, 0.6 ms as numpy; docs/benchmarks.md, Meta-IO).
    """
    arrays = {"state": batch.state.numpy(), "task_mask": batch.task_mask.numpy()}
    for which in ("support", "query"):
        s = getattr(batch, which)
        for name in _WIRE_FIELDS:
            arrays[f"{which}.{name}"] = getattr(s, name).numpy()
    return arrays, list(batch.task_ids)


def batch_from_arrays(arrays: dict[str, np.ndarray], task_ids: list[str]) -> TaskBatch:
    """Inverse of ``batch_to_arrays`` (tensors share memory with the arrays)."""
    sets = {
        which: SetBatch(**{name: torch.from_numpy(arrays[f"{which}.{name}"]) for name in _WIRE_FIELDS})
        for which in ("support", "query")
    }
    return TaskBatch(
        support=sets["support"],
        query=sets["query"],
        state=torch.from_numpy(arrays["state"]),
        task_mask=torch.from_numpy(arrays["task_mask"]),
        task_ids=task_ids,
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


def truncate_support(batch: TaskBatch, k: int | None, compact: bool = False) -> TaskBatch:
    """A copy of ``batch`` whose support sets keep only the first ``k`` real samples of each task.

    Samples are stored in time order, so "first k" is what a new user with k interactions has:
    their earliest ones. Only ``support.mask`` changes (a new tensor); tasks with fewer than ``k``
    real samples keep all of theirs, the query set and all other tensors are shared, unchanged, and
    the input is not mutated. ``k=None`` returns ``batch`` itself (the whole support set).

    ``compact``: also cut the support tensors after the last column any task keeps (the inner loop
    then runs over k columns instead of the longest task's: evaluating small k becomes cheap). An
    embedding lookup of ``batch`` indexes its columns, so look the compact batch up again.
    """
    if k is None:
        return batch
    if k < 0:
        raise ValueError(f"k must be >= 0 or None, got {k}")
    mask = batch.support.mask
    keep = mask & (torch.cumsum(mask.long(), dim=1) <= k)
    support = replace(batch.support, mask=keep)
    if compact:
        kept_columns = keep.any(0).nonzero()
        width = int(kept_columns.max()) + 1 if len(kept_columns) else 1
        support = SetBatch(**{f.name: getattr(support, f.name)[:, :width] for f in fields(support)})
    return replace(batch, support=support)
