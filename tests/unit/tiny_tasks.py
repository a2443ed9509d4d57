"""Tiny random TaskBatches for model / meta-learning unit tests (independent of the data pipeline).

Padded positions hold *garbage* (valid random ids, random dense values and labels) rather than
zeros, so a test passes only if padding masks really keep them out.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gmeta.data.batch import SetBatch, TaskBatch
from gmeta.data.schema import MULTI_HOT_PAD


def random_set(
    gen: torch.Generator,
    sizes: Sequence[int],
    vocab_sizes: Sequence[int],
    num_sparse: int,
    num_dense: int,
    max_len: int,
    pad_to: int | None = None,
) -> SetBatch:
    """(T, N, ...) set with ``sizes[t]`` real samples in task t, N = max(sizes) or ``pad_to``."""
    t, n = len(sizes), max([*sizes, pad_to or 1])
    sp_vocab = torch.tensor(vocab_sizes[:num_sparse])
    mh_vocab = torch.tensor(vocab_sizes[num_sparse:])
    fm = len(vocab_sizes) - num_sparse
    sparse = (torch.rand(t, n, num_sparse, generator=gen) * sp_vocab).long()
    multi_hot = (torch.rand(t, n, fm, max_len, generator=gen) * mh_vocab[:, None]).long()
    # Random list lengths 0..max_len (0: an all-padding list), real ids first.
    lengths = torch.randint(0, max_len + 1, (t, n, fm), generator=gen)
    multi_hot[torch.arange(max_len) >= lengths[..., None]] = MULTI_HOT_PAD
    dense = torch.randn(t, n, num_dense, generator=gen)
    label = torch.randint(0, 2, (t, n), generator=gen).float()
    mask = torch.arange(n)[None, :] < torch.tensor(sizes)[:, None]
    return SetBatch(sparse=sparse, multi_hot=multi_hot, dense=dense, label=label, mask=mask)


def random_batch(
    seed: int,
    support_sizes: Sequence[int],
    query_sizes: Sequence[int],
    vocab_sizes: Sequence[int] = (7, 5, 9, 6),
    num_sparse: int = 2,
    num_dense: int = 3,
    max_len: int = 3,
) -> TaskBatch:
    """A TaskBatch of ``len(support_sizes)`` real tasks with garbage in padded positions."""
    gen = torch.Generator().manual_seed(seed)
    args = (vocab_sizes, num_sparse, num_dense, max_len)
    support = random_set(gen, support_sizes, *args)
    query = random_set(gen, query_sizes, *args)
    t = len(support_sizes)
    return TaskBatch(
        support=support,
        query=query,
        state=torch.zeros(t, dtype=torch.long),
        task_mask=torch.ones(t, dtype=torch.bool),
        task_ids=[f"task{i}" for i in range(t)],
    )


def task_alone(batch: TaskBatch, t: int) -> TaskBatch:
    """Task ``t`` as a one-task batch holding only its real samples (no padding at all)."""

    def one(s: SetBatch) -> SetBatch:
        keep = s.mask[t]
        return SetBatch(
            sparse=s.sparse[t][keep][None],
            multi_hot=s.multi_hot[t][keep][None],
            dense=s.dense[t][keep][None],
            label=s.label[t][keep][None],
            mask=s.mask[t][keep][None],
        )

    return TaskBatch(
        support=one(batch.support),
        query=one(batch.query),
        state=batch.state[t : t + 1],
        task_mask=batch.task_mask[t : t + 1],
        task_ids=[batch.task_ids[t]],
    )
