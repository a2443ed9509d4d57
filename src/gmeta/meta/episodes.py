"""Training-time changes to a meta-batch that make training episodes look like cold-start evaluation.

* ``truncate_episodes``: k-shot episodes. Evaluation adapts new users on 1, 2, 3 ... interactions,
  but every training task has its whole support set (10-90 on MovieLens): a share of the tasks keeps
  only its first k support samples, k drawn from the sizes met at evaluation.
* ``drop_task_keys``: a share of the tasks gets the OOV task key (the user id): cold users arrive
  with it, and without this the OOV row is never trained.
* ``drop_ids``: id dropout. A new item (or user) arrives with the OOV row 0; replacing a random share
  of a field's ids by 0 trains that row and teaches the towers to score from the side features.

Every draw is a hash of (seed, step, task id or id value), not the process RNG: the same tasks and
ids are changed whichever rank holds them, so N processes train exactly like one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor

from gmeta.data.batch import TaskBatch


def _uniform(key: str) -> float:
    """A deterministic draw in [0, 1) from a string key (blake2b: CRC32 is affine in its input, so
    keys differing in one character give correlated draws)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2**64


def truncate_episodes(batch: TaskBatch, sizes: Sequence[int], rate: float, seed: str, step: int) -> TaskBatch:
    """A copy of ``batch`` in which a ``rate`` share of the tasks keeps its first k support samples,
    k drawn uniformly from ``sizes`` per task (query sets and the other tasks unchanged)."""
    if rate == 0.0 or not sizes:
        return batch
    limits = []
    for t in batch.task_ids:
        if _uniform(f"{seed}/{step}/{t}/episode") < rate:
            limits.append(int(sizes[int(_uniform(f"{seed}/{step}/{t}/k") * len(sizes))]))
        else:
            limits.append(batch.support.mask.shape[1])
    mask = batch.support.mask
    k = torch.tensor(limits, device=mask.device)
    keep = mask & (torch.cumsum(mask.long(), dim=1) <= k[:, None])
    return replace(batch, support=replace(batch.support, mask=keep))


def drop_task_keys(batch: TaskBatch, column: int, rate: float, seed: str, step: int) -> None:
    """Replace the task-key id (sparse column ``column``) of a ``rate`` share of the tasks by the OOV
    row 0 in support and query, in place."""
    if rate == 0.0:
        return
    draws = [_uniform(f"{seed}/{step}/{t}/task_key") for t in batch.task_ids]
    drop = torch.tensor(draws, device=batch.task_mask.device) < rate
    for s in (batch.support, batch.query):
        s.sparse[:, :, column].masked_fill_(drop[:, None], 0)


def _id_draws(ids: Tensor, seed: str, step: int) -> Tensor:
    """A uniform [0, 1) draw per id VALUE for this (seed, step): every occurrence of an id agrees."""
    salt = int(_uniform(f"{seed}/{step}/ids") * 2**32)
    # a multiplicative hash (Knuth) of id ^ salt, in int64 arithmetic kept below 2**32
    h = ((ids ^ salt) * 2654435761) % 2**32
    h = ((h ^ (h >> 16)) * 2246822519) % 2**32
    return (h ^ (h >> 13)).double() / 2**32


def drop_ids(batch: TaskBatch, column: int, rate: float, seed: str, step: int) -> None:
    """Replace a ``rate`` share of the ids of sparse column ``column`` by the OOV row 0, in place (the
    same ids in support and query: a dropped item is new everywhere in this step)."""
    if rate == 0.0:
        return
    for s in (batch.support, batch.query):
        ids = s.sparse[:, :, column]
        ids.masked_fill_(_id_draws(ids, seed, step) < rate, 0)
