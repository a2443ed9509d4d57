"""Stream task shards into ``TaskBatch``es: explicit rank/worker splitting, task shuffling, batching.

Every task is read exactly once per epoch across all (rank, worker) slots:

* slots are ``rank * num_workers + worker`` (``num_workers`` counts 1 for in-process loading);
* with at least as many shards as slots, shards (in an order shuffled per epoch for training) go
  round-robin to slots; otherwise every slot reads every shard and keeps every ``slots``-th task.

Each slot's shards come from a webdataset pipeline (``gmeta.data.stream.shard_pipeline``): shard
URLs (local paths, ``file://``, ``http(s)://``, ``pipe:``, fsspec URLs) -> per-epoch shard shuffle
-> slot split -> gopen -> whole-shard decode. Rank and world size are passed in explicitly
(``torch.distributed`` is not initialised inside DataLoader workers and WebDataset's default node
splitter raises in multi-process runs).

With ``equal_batches`` (the default) each rank yields the same number of batches per epoch:
ranks with fewer real batches append batches of one masked dummy task (``task_mask`` False), so
collective embedding lookups never deadlock on uneven data. Real tasks are never dropped or duplicated.

Exact resume: a checkpoint written during ``fit`` stores the training stream's position (epoch,
batches already trained on, whether the epoch was complete; ``TaskDataModule.state_dict``). The
first train loader of a resumed fit continues from there: the same epoch's shuffle, without the
delivered batches (built from the same shards, never collated), in the order an uninterrupted
iteration would have yielded the rest, DataLoader workers included (``resume_plan``). The epoch
comes from the checkpoint, not from ``trainer.current_epoch``: Lightning creates the first iterator
of a resumed fit before it advances its epoch counter, which made a resumed run replay the
previous epoch's shuffle.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from gmeta.data.batch import (
    TaskBatch,
    TaskChunk,
    TaskRecord,
    batch_from_arrays,
    batch_to_arrays,
    collate_chunk_runs,
    collate_tasks,
)
from gmeta.data.encoder import encoder_settings
from gmeta.data.schema import MULTI_HOT_PAD, Schema
from gmeta.data.shards import MANIFEST, VOCAB, Manifest, prepare_shards
from gmeta.data.sources.base import Source
from gmeta.data.stream import (
    VERIFY_MODES,
    Location,
    as_location,
    check_manifest,
    check_sizes,
    is_url,
    join,
    load_manifest,
    plan,
    read_url,
    shard_pipeline,
    verify_full,
)
from gmeta.data.tasks import TaskConfig
from gmeta.data.vocab import read_vocab
from gmeta.errors import ConfigError

log = logging.getLogger(__name__)

#: how data-parallel ranks share a split (see ``TaskStreamDataset``)
RANK_SPLITS = ("shards", "batches")
#: vocabularies up to this size (bytes of the vocabulary file) are stored in checkpoints
MAX_VOCAB_IN_CHECKPOINT = 32 * 1024 * 1024

#: tasks as handles: (ids of their decoded shards, indices in those shards), two int64 arrays
Handles = tuple[np.ndarray, np.ndarray]


def dummy_record(schema: Schema) -> TaskRecord:
    """A task with one all-zero sample per set, used for masked padding batches."""
    fm = len(schema.multi_hot)
    arrays: dict[str, np.ndarray] = {}
    for which in ("support", "query"):
        arrays[f"{which}.sparse"] = np.zeros((1, len(schema.sparse)), np.int64)
        arrays[f"{which}.multi_hot"] = np.full(
            (1, fm, schema.max_multi_hot_len if fm else 0), MULTI_HOT_PAD, np.int64
        )
        arrays[f"{which}.dense"] = np.zeros((1, len(schema.dense)), np.float32)
        arrays[f"{which}.label"] = np.zeros((1,), np.float32)
    return TaskRecord(task_id="", state="warm", arrays=arrays)


def dummy_batch(schema: Schema) -> TaskBatch:
    """A one-task batch whose task and samples are all masked out, like ``pad_tasks``'s dummies."""
    batch = collate_tasks([dummy_record(schema)])
    batch.task_mask[:] = False
    batch.support.mask[:] = False
    batch.query.mask[:] = False
    batch.task_ids = [""]
    return batch


class TaskStreamDataset(IterableDataset):
    """Iterable over ``TaskBatch``es of one split, for one rank (see the module docstring).

    Args:
        shards: shard locations of the split: paths or URLs (``http(s)://``, ``pipe:``, ``file://``,
            fsspec URLs; see ``gmeta.data.stream``).
        shard_tasks: tasks per shard (from the manifest; a shard yielding a different count is an error).
        shard_bytes: bytes per shard (from the manifest; a shard of another size is an error), or None.
        schema: encoded schema (records are validated against it).
        batch_tasks: tasks per batch (the last batch of a slot may be smaller).
        shuffle: shuffle shard order per epoch and tasks through a buffer (training).
        shuffle_buffer: tasks held in the shuffle buffer (1 disables task-level shuffling).
        seed: base seed; epoch ``e`` uses ``(seed, e)`` so reshuffles differ per epoch but are repeatable.
        rank / world_size: this process's place among the data-parallel ranks.
        equal_batches: pad every rank to the same number of batches with masked dummy batches.
        drop_last: drop each slot's last incomplete batch.
        rank_split: how ranks share the data. ``shards``: each rank streams its own shards (reading
            scales with the ranks; the meta-batches differ from a 1-process run's). ``batches``: every
            rank streams ALL shards exactly as one process would, forms the same global meta-batches
            of ``batch_tasks * world_size`` tasks and keeps its block of ``batch_tasks`` of each, so
            a W-process run trains on exactly the batches of a 1-process run (W-fold reading and
            decoding; collation only of its own block).
    """

    def __init__(
        self,
        shards: list[Location],
        shard_tasks: list[int],
        schema: Schema,
        batch_tasks: int,
        shuffle: bool = False,
        shuffle_buffer: int = 256,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        equal_batches: bool = True,
        drop_last: bool = False,
        rank_split: str = "shards",
        shard_bytes: list[int] | None = None,
    ) -> None:
        super().__init__()
        if rank_split not in RANK_SPLITS:
            raise ValueError(f"rank_split must be one of {RANK_SPLITS}, got {rank_split!r}")
        if len(shards) != len(shard_tasks) or (shard_bytes is not None and len(shard_bytes) != len(shards)):
            raise ValueError("shards, shard_tasks (and shard_bytes) must have the same length")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if batch_tasks < 1:
            raise ValueError("batch_tasks must be >= 1")
        self.shards: list[Location] = [s if is_url(s) else Path(s) for s in shards]
        self.shard_tasks = [int(n) for n in shard_tasks]
        self.shard_bytes = None if shard_bytes is None else [int(n) for n in shard_bytes]
        self.schema = schema
        self.batch_tasks = batch_tasks
        self.shuffle = shuffle
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.equal_batches = equal_batches
        self.drop_last = drop_last
        self.rank_split = rank_split
        # in shared memory: persistent DataLoader workers see the position set in the main process
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._skip = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        """The epoch whose shuffle order the next iteration uses."""
        return int(self._epoch)

    @property
    def skip(self) -> int:
        """Batches of the epoch the next iteration leaves out (already trained on before a resume)."""
        return int(self._skip)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch whose shuffle order the next iteration uses, and how many of its first
        batches (in the loader's output order) it leaves out; seen by persistent workers."""
        if skip < 0:
            raise ValueError(f"skip must be >= 0, got {skip}")
        self._epoch.fill_(int(epoch))
        self._skip.fill_(int(skip))

    # -- planning (pure functions of epoch, slots and the manifest counts) -------------------
    # (the shard pipeline's own shuffle and split stages, run on the manifest counts alone)
    def shard_order(self, epoch: int) -> list[int]:
        return [s["index"] for s in plan(self.shard_tasks, 0, 1, self.shuffle, self.seed, epoch)]

    def slot_plan(self, slot: int, num_slots: int, epoch: int) -> tuple[list[int], int | None]:
        """(shards this slot reads, task stride or None): the stride is used when shards < slots."""
        picked = plan(self.shard_tasks, slot, num_slots, self.shuffle, self.seed, epoch)
        return [s["index"] for s in picked], (None if len(self.shards) >= num_slots else num_slots)

    def rank_shards(self, num_workers: int, epoch: int) -> list[int]:
        """Shards this rank reads in ``epoch`` over all its loader workers (sorted)."""
        w = max(1, num_workers)
        if self._split_batches:  # every rank reads like one process
            slots = [(k, w) for k in range(w)]
        else:
            slots = [(self.rank * w + k, self.world_size * w) for k in range(w)]
        return sorted({i for slot, n in slots for i in self.slot_plan(slot, n, epoch)[0]})

    def slot_tasks(self, slot: int, num_slots: int, epoch: int) -> int:
        shards, stride = self.slot_plan(slot, num_slots, epoch)
        total = sum(self.shard_tasks[i] for i in shards)
        return total if stride is None else len(range(slot, total, stride))

    def _num_batches(self, tasks: int) -> int:
        return tasks // self.batch_tasks if self.drop_last else math.ceil(tasks / self.batch_tasks)

    @property
    def _split_batches(self) -> bool:
        return self.rank_split == "batches" and self.world_size > 1

    def rank_batches(self, rank: int, num_workers: int, epoch: int) -> int:
        """Real batches rank ``rank`` yields in ``epoch`` with ``num_workers`` loader workers."""
        w = max(1, num_workers)
        if self._split_batches:  # the 1-process plan, in global batches: the same on every rank
            per_global = self.batch_tasks * self.world_size
            tasks = [self.slot_tasks(k, w, epoch) for k in range(w)]
            return sum(n // per_global if self.drop_last else math.ceil(n / per_global) for n in tasks)
        return sum(
            self._num_batches(self.slot_tasks(rank * w + k, self.world_size * w, epoch)) for k in range(w)
        )

    def num_batches(self, num_workers: int = 0, epoch: int | None = None) -> int:
        """Batches this rank yields per epoch, padding included."""
        epoch = self.epoch if epoch is None else epoch
        if self.equal_batches:
            return max(self.rank_batches(r, num_workers, epoch) for r in range(self.world_size))
        return self.rank_batches(self.rank, num_workers, epoch)

    def slot_batches(self, num_workers: int, epoch: int) -> list[int]:
        """Batches each of this rank's loader slots (worker order) yields in ``epoch``, padding included
        (the masked dummies come from the first slot)."""
        w = max(1, num_workers)
        if self._split_batches:
            per_global = self.batch_tasks * self.world_size
            tasks = [self.slot_tasks(k, w, epoch) for k in range(w)]
            counts = [n // per_global if self.drop_last else math.ceil(n / per_global) for n in tasks]
        else:
            counts = [
                self._num_batches(self.slot_tasks(self.rank * w + k, self.world_size * w, epoch))
                for k in range(w)
            ]
        if self.equal_batches:
            counts[0] += self.num_batches(num_workers, epoch) - sum(counts)
        return counts

    def resume_plan(self, num_workers: int, epoch: int, skip: int) -> tuple[list[int], int]:
        """(batches each slot leaves out, slot that worker 0 takes) to continue after ``skip`` batches.

        A DataLoader with W workers hands out their batches round-robin (worker 0, 1, ..., W-1, 0, ...),
        a worker that runs out dropping from the cycle. Replaying that cycle on the known per-slot
        counts gives how many batches each slot already delivered and which slot was next; a resumed
        iteration rotates the slots so that worker 0 takes that one, and the rest of the epoch comes
        out in exactly the order of an uninterrupted iteration.
        """
        counts = self.slot_batches(num_workers, epoch)
        w = len(counts)
        skips, nxt, left = [0] * w, 0, min(skip, sum(counts))
        while left:
            if skips[nxt] < counts[nxt]:
                skips[nxt] += 1
                left -= 1
            nxt = (nxt + 1) % w
        for _ in range(w):  # the next slot with batches left (any slot when the epoch is done)
            if skips[nxt] < counts[nxt]:
                break
            nxt = (nxt + 1) % w
        return skips, nxt

    # -- iteration ---------------------------------------------------------------------------
    def _blocks(self, slot: int, num_slots: int, epoch: int) -> Iterator[tuple[TaskChunk, np.ndarray]]:
        """This slot's tasks shard by shard: (decoded shard, indices of the tasks this slot keeps)."""
        pipeline = shard_pipeline(
            self.shards,
            self.shard_tasks,
            self.schema,
            slot,
            num_slots,
            shuffle=self.shuffle,
            seed=self.seed,
            epoch=epoch,
            shard_bytes=self.shard_bytes,
        )
        for sample in pipeline:
            chunk = sample["chunk"]
            yield chunk, np.arange(sample["first"], chunk.num_tasks, sample["step"], dtype=np.int64)

    def _shuffled(self, blocks: Iterator[Handles], rng: np.random.Generator) -> Iterator[Handles]:
        """Pool shuffle over (shard id, task index) handles, one shard at a time.

        Each incoming shard's tasks join a pool; whatever exceeds ``shuffle_buffer`` leaves it as a
        uniformly random subset in random order, and the rest of the pool is emitted permuted at the
        end. Like a per-task buffer shuffle, a task can leave soon or stay long, but the work is a
        few array operations per shard instead of a Python step per task.
        """
        pool_c = pool_i = np.empty(0, dtype=np.int64)
        for c, i in blocks:
            pool_c, pool_i = np.concatenate([pool_c, c]), np.concatenate([pool_i, i])
            excess = len(pool_c) - self.shuffle_buffer
            if excess > 0:
                perm = rng.permutation(len(pool_c))
                out, keep = perm[:excess], perm[excess:]
                yield pool_c[out], pool_i[out]
                pool_c, pool_i = pool_c[keep], pool_i[keep]
        perm = rng.permutation(len(pool_c))
        yield pool_c[perm], pool_i[perm]

    def __iter__(self) -> Iterator[TaskBatch]:
        """This rank/worker's batches of the current epoch.

        Inside a DataLoader worker, batches are yielded as ``WireBatch`` (numpy arrays, cheap to
        send to the main process); ``TaskDataLoader`` turns them back into ``TaskBatch``es.
        """
        info = get_worker_info()
        if info is None:
            yield from self._batches(None)
        else:
            for batch in self._batches(info):
                yield WireBatch(*batch_to_arrays(batch))  # type: ignore[misc]

    def _batches(self, info: Any) -> Iterator[TaskBatch]:
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        split = self._split_batches
        epoch = self.epoch
        # resuming mid-epoch: leave out what was delivered, and rotate the slots so that the
        # DataLoader's round-robin continues with the slot that was next (see ``resume_plan``)
        skips, first = self.resume_plan(num_workers if info is not None else 0, epoch, self.skip)
        local = (worker + first) % num_workers
        to_skip = skips[local]
        # rank_split="batches": read like one process (slots = workers), then keep this rank's block
        num_slots = num_workers if split else self.world_size * num_workers
        slot = local if split else self.rank * num_workers + local
        # decoded shards still holding tasks that have not been batched, by shard id
        live: dict[int, TaskChunk] = {}
        left: dict[int, int] = {}

        def handles() -> Iterator[Handles]:
            for cid, (chunk, idx) in enumerate(self._blocks(slot, num_slots, epoch)):
                live[cid], left[cid] = chunk, len(idx)
                yield np.full(len(idx), cid, dtype=np.int64), idx

        def release(cids: np.ndarray) -> None:
            # other ranks' tasks of a global batch: drop decoded shards nobody here needs any more
            for cid, n in zip(*np.unique(cids, return_counts=True), strict=True):
                left[int(cid)] -= int(n)
                if not left[int(cid)]:
                    del live[int(cid)], left[int(cid)]

        def collate(cids: np.ndarray, idx: np.ndarray) -> TaskBatch:
            if split:  # this rank's block of the global batch; an empty block is a dummy batch
                order = np.argsort(cids, kind="stable")  # the 1-process batch's task order (below)
                cids, idx = cids[order], idx[order]
                k = self.batch_tasks
                lo = min(self.rank * k, len(cids))
                hi = min(lo + k, len(cids))
                release(np.concatenate([cids[:lo], cids[hi:]]))
                if hi == lo:
                    return dummy_batch(self.schema)
                cids, idx = cids[lo:hi], idx[lo:hi]
            # each shard's tasks adjacent (stable): one gather per array per shard; same content
            order = np.argsort(cids, kind="stable")
            cids, idx = cids[order], idx[order]
            cuts = np.flatnonzero(cids[1:] != cids[:-1]) + 1
            runs = []
            for cid, part in zip(cids[np.r_[0, cuts]].tolist(), np.split(idx, cuts), strict=True):
                runs.append((live[cid], part))
                left[cid] -= len(part)
                if not left[cid]:
                    del live[cid], left[cid]  # release the decoded shard
            return collate_chunk_runs(runs)

        def batch(cids: np.ndarray, idx: np.ndarray) -> TaskBatch | None:
            nonlocal to_skip
            if to_skip:  # delivered before the resume: release its shards, build nothing
                to_skip -= 1
                release(cids)
                return None
            return collate(cids, idx)

        stream = handles()
        if self.shuffle and self.shuffle_buffer > 1:
            stream = self._shuffled(stream, np.random.default_rng([self.seed, epoch, slot, 1]))
        b = self.batch_tasks * self.world_size if split else self.batch_tasks
        pend_c = pend_i = np.empty(0, dtype=np.int64)
        for c, i in stream:
            pend_c, pend_i = np.concatenate([pend_c, c]), np.concatenate([pend_i, i])
            start = 0
            while len(pend_c) - start >= b:
                out = batch(pend_c[start : start + b], pend_i[start : start + b])
                if out is not None:
                    yield out
                start += b
            pend_c, pend_i = pend_c[start:], pend_i[start:]
        if len(pend_c) and not self.drop_last:
            out = batch(pend_c, pend_i)
            if out is not None:
                yield out
        if self.equal_batches and local == 0:
            workers = num_workers if info is not None else 0
            missing = self.num_batches(workers, epoch) - self.rank_batches(self.rank, workers, epoch)
            for _ in range(max(0, missing - to_skip)):
                yield dummy_batch(self.schema)


@dataclass
class WireBatch:
    """A ``TaskBatch`` in transit from a DataLoader worker (see ``batch_to_arrays``)."""

    arrays: dict[str, np.ndarray]
    task_ids: list[str]


def _identity(batch: TaskBatch) -> TaskBatch:
    return batch


class _FromWire:
    """Iterator over a DataLoader iterator that rebuilds ``TaskBatch``es from ``WireBatch``es."""

    def __init__(self, it: Iterator[Any]) -> None:
        self._it = it

    def __iter__(self) -> _FromWire:
        return self

    def __next__(self) -> TaskBatch:
        item = next(self._it)
        return batch_from_arrays(item.arrays, item.task_ids) if isinstance(item, WireBatch) else item


@dataclass(frozen=True)
class Position:
    """Where a training stream stands: ``batches`` of ``epoch`` delivered to training steps that
    finished, and whether that was the whole epoch (then the next iteration starts ``epoch + 1``)."""

    epoch: int
    batches: int
    epoch_done: bool
    #: what the order of an epoch's batches depends on (``TaskDataModule.stream_layout``)
    layout: dict[str, Any] | None = None

    def next_iteration(self) -> tuple[int, int]:
        """(epoch, batches to leave out) of the iteration that continues from here."""
        return (self.epoch + 1, 0) if self.epoch_done else (self.epoch, self.batches)


class TaskDataLoader(DataLoader):
    """A DataLoader of ``TaskBatch``es that sets the dataset's epoch each time it is iterated.

    ``epoch_fn`` (e.g. the trainer's current epoch) picks the epoch; without it the loader counts
    its own iterations. Workers may be persistent (``persistent_workers=True``: no start-up per
    epoch): the dataset keeps its epoch in shared memory, set before the workers resume. The loader
    has no ``len``: padded batch counts can change per epoch, and a stale length would make
    Lightning stop early and skip tasks (``dataset.num_batches()`` gives the exact count).

    ``resume_from(position)`` makes the NEXT iteration continue a checkpointed run: the position's
    epoch (not ``epoch_fn``'s: Lightning creates the first iterator of a resumed fit before it
    advances its epoch counter), without the batches already trained on, in the same order.
    """

    def __init__(
        self, dataset: TaskStreamDataset, epoch_fn: Callable[[], int] | None = None, **kwargs: Any
    ) -> None:
        # torch types collate_fn for batched loading (a list of items); batch_size=None passes one item
        super().__init__(dataset, batch_size=None, collate_fn=_identity, **kwargs)  # type: ignore[arg-type]
        self._epoch_fn = epoch_fn
        self._iterations = 0
        self._resume: Position | None = None

    def resume_from(self, position: Position | None) -> None:
        self._resume = position

    def __iter__(self) -> Iterator[TaskBatch]:  # type: ignore[override]
        if self._resume is not None:
            epoch, skip = self._resume.next_iteration()
            self._resume = None
        else:
            epoch = self._epoch_fn() if self._epoch_fn is not None else self._iterations
            skip = 0
        self._iterations = epoch + 1
        self.dataset.set_epoch(epoch, skip)  # type: ignore[attr-defined]
        it = super().__iter__()
        return _FromWire(it) if self.num_workers > 0 else it


class TaskDataModule(L.LightningDataModule):
    """LightningDataModule over task shards (see the module docstring).

    Args:
        data_dir: folder holding ``manifest.json`` and the shards: a path, or a URL (``http(s)://``,
            ``file://``, an fsspec URL such as ``s3://``) read through webdataset's gopen / fsspec;
            shard URLs are ``data_dir`` + ``/`` + the manifest's relative paths. Remote shards are
            never built or rebuilt here: build them with ``scripts/prepare_data.py`` and upload.
        batch_tasks / eval_batch_tasks: tasks per training / evaluation meta-batch, over ALL ranks
            (each of W ranks takes ``batch_tasks / W``; must divide), so an experiment keeps its
            meta-batch, and so its learning dynamics, on 1 or W processes.
        num_workers: DataLoader worker processes per rank.
        persistent_workers: keep the workers alive between epochs (with ``num_workers`` > 0): no
            worker start-up per epoch (docs/benchmarks.md, Meta-IO).
        shuffle_buffer: tasks in the training shuffle buffer.
        seed: shuffle seed of the training stream.
        build_seed: seed of the shard build (splits, random queries) when shards are prepared here;
            separate from ``seed`` so that training with another seed reuses the same shards.
        verify: what is checked before training. ``sizes`` (default): in ``setup`` the manifest
            (entries complete, task counts adding up), when a loader is built the existence and
            byte size of the shards THIS rank reads in its first epoch (local shards: one ``stat``
            each), and every shard's size and task count as it is read, before any of its tasks is
            used. ``full``: additionally every shard of every split read in full in ``setup`` (size,
            sha256, task count), on every rank: slow on large data.
        verify_checksums: deprecated boolean form of ``verify`` (True -> ``full``, False -> ``sizes``).
        build_wait_s: how long ranks other than 0 wait for rank 0 to build missing shards
            (``wait_for_shards``) before failing with a hint to prebuild them.
        source / task_config / tasks_per_shard: if given, ``prepare_data`` builds missing shards.
        rank / world_size: override the trainer's global rank / world size (tests, custom launchers).
        equal_batches: pad ranks to equal batch counts with masked dummy batches.
        rank_split: ``shards`` (each rank its own shards) or ``batches`` (every rank the 1-process
            batches, its block of each): see ``TaskStreamDataset``.
        force: rebuild shards even if a manifest exists.
        engine: shard builder, ``duckdb`` (out of core, the default) or ``pandas`` (the in-memory
            reference); both build the same tasks (``gmeta.data.build``).
        build: options of the out-of-core build (``gmeta.data.build.BuildOptions`` fields:
            memory_limit, threads, workers, rows_per_partition, temp_dir).
    """

    def __init__(
        self,
        data_dir: str | Path,
        batch_tasks: int = 32,
        eval_batch_tasks: int = 64,
        num_workers: int = 0,
        shuffle_buffer: int = 256,
        seed: int = 0,
        verify: str | None = None,
        verify_checksums: bool | None = None,
        build_wait_s: float = 3600.0,
        source: Source | None = None,
        task_config: TaskConfig | None = None,
        tasks_per_shard: int = 256,
        rank: int | None = None,
        world_size: int | None = None,
        equal_batches: bool = True,
        force: bool = False,
        build_seed: int = 0,
        rank_split: str = "shards",
        persistent_workers: bool = True,
        engine: str = "duckdb",
        build: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.engine, self.build = engine, dict(build or {})
        self.data_dir: Location = as_location(data_dir)
        self.persistent_workers = persistent_workers
        self.batch_tasks, self.eval_batch_tasks = batch_tasks, eval_batch_tasks
        self.num_workers, self.shuffle_buffer, self.seed = num_workers, shuffle_buffer, seed
        self.verify = _verify_mode(verify, verify_checksums)
        self.build_wait_s = float(build_wait_s)
        self.source, self.task_config, self.tasks_per_shard = source, task_config, tasks_per_shard
        self._rank, self._world_size = rank, world_size
        self.equal_batches, self.force, self.build_seed = equal_batches, force, build_seed
        if rank_split not in RANK_SPLITS:
            raise ValueError(f"data.rank_split must be one of {RANK_SPLITS}, got {rank_split!r}")
        self.rank_split = rank_split
        self.manifest: Manifest | None = None
        self.schema: Schema | None = None
        self._checked: set[tuple[str, int, int]] = set()  # (split, rank, world) whose sizes were checked
        self._vocab: dict[str, Any] | None = None
        self._resume: Position | None = None  # from a checkpoint: where the training stream continues

    @property
    def remote(self) -> bool:
        """Whether the shards live at a URL (never built here)."""
        return not isinstance(self.data_dir, Path)

    def _check_remote(self) -> None:
        """A URL data_dir: nothing to build; make sure its manifest can be read."""
        if self.source is not None or self.force:
            log.warning(
                "data_dir %s is a URL: shards there are neither built nor compared with data.source "
                "(build them with scripts/prepare_data.py and upload the folder)",
                self.data_dir,
            )
        load_manifest(self.data_dir)

    def prepare_data(self) -> None:
        if self.remote:
            self._check_remote()
            return
        assert isinstance(self.data_dir, Path)
        if (self.data_dir / MANIFEST).is_file() and not self.force and self.source is None:
            return
        if self.source is None:
            raise FileNotFoundError(
                f"{self.data_dir / MANIFEST} not found and no source given: build the shards with "
                "gmeta.data.shards.prepare_shards(source, task_config, data_dir), or pass source= and "
                "task_config= to TaskDataModule (data=movielens1m / data=synthetic in the Hydra config)"
            )
        self._prepare_shards(force=self.force)

    def _prepare_shards(self, force: bool) -> None:
        """Build the shards from ``source``, or (present) check that they were built from it."""
        assert self.source is not None and isinstance(self.data_dir, Path)
        prepare_shards(
            self.source,
            self.task_config or TaskConfig(),
            self.data_dir,
            tasks_per_shard=self.tasks_per_shard,
            seed=self.build_seed,
            force=force,
            engine=self.engine,
            build_options=self.build,
        )

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the data (Lightning stores it under the class name).

        The feature encoder travels with the weights, so ``gmeta adapt --ckpt`` can encode a new
        user's raw rows without the shard folder: ``encoder`` (``FeatureEncoder.to_dict``: schema,
        label threshold, item key) and ``vocab``, its vocabularies; vocabularies over
        ``MAX_VOCAB_IN_CHECKPOINT`` bytes are referenced by ``data_dir`` and ``vocab_sha256`` instead.
        """
        if self.manifest is None:
            return {}
        info = self.manifest.data.get("vocab", {})
        state: dict[str, Any] = {
            "data_dir": str(self.data_dir),
            "vocab_sha256": info.get("sha256"),
            "task_config": self.manifest.data.get("task_config"),
            "encoder": encoder_settings(self.manifest.data, str(self.manifest.root)),
        }
        vocab = self._vocab_for_checkpoint(info)
        if vocab is not None:
            state["vocab"] = vocab
        position = self._train_position()
        if position is not None:
            state["train_position"] = asdict(position)
        return state

    def _train_position(self) -> Position | None:
        """The training stream's position when a checkpoint is written during ``fit``.

        Checkpoints are written at step boundaries (after a training step, after validation, at
        the epoch's end), so "batches delivered" is the number of training steps of this epoch that
        finished: Lightning's ``batch_progress.current.processed``. The epoch is done once its last
        batch was processed (the stream ran out, or ``limit_train_batches`` was reached).
        """
        trainer = self.trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return None
        epoch_loop = trainer.fit_loop.epoch_loop
        progress = epoch_loop.batch_progress
        done = bool(progress.is_last_batch) or epoch_loop._num_ready_batches_reached()
        return Position(
            epoch=int(trainer.current_epoch),
            # ``current`` is typed as the base tracker; Lightning's batch progress uses _ProcessedTracker
            batches=int(progress.current.processed),  # type: ignore[attr-defined]
            epoch_done=done,
            layout=self.stream_layout(),
        )

    def stream_layout(self) -> dict[str, Any]:
        """The settings that decide which tasks the first ``n`` batches of an epoch hold."""
        rank, world = self.rank_world()
        # ranks that each stream their own shards see another order per world size; one process and
        # rank_split=batches (every rank reads the 1-process stream) see the same on any world size
        return {
            "streams": world if self.rank_split == "shards" and world > 1 else 1,
            "num_workers": self.num_workers,
            "batch_tasks": self.batch_tasks,
            "shuffle_buffer": self.shuffle_buffer,
            "seed": self.seed,
        }

    def _check_resumable(self, position: Position) -> None:
        """Continuing mid-epoch needs the epoch's batches in the checkpointed order: with another
        layout, skipping the delivered batches would skip other tasks (and repeat some)."""
        if position.epoch_done or not position.batches or position.layout is None:
            return
        now = self.stream_layout()
        changed = {k: (v, now.get(k)) for k, v in position.layout.items() if now.get(k) != v}
        if changed:
            what = ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in changed.items())
            raise ConfigError(
                f"cannot resume in the middle of epoch {position.epoch} (after {position.batches} batches) "
                f"with another data layout ({what}): the rest of the epoch would hold other tasks. "
                "Resume with the checkpoint's settings (data.num_workers, data.batch_tasks, "
                "data.shuffle_buffer, data.seed, data.rank_split, trainer.devices / num_nodes), or from "
                "a checkpoint written at an epoch's end"
            )

    def _vocab_for_checkpoint(self, info: dict[str, Any]) -> dict[str, Any] | None:
        """The vocabulary if its file is small enough to travel in a checkpoint (fetched once for URLs)."""
        assert self.manifest is not None
        if not info:
            return None
        root = self.manifest.root
        if isinstance(root, Path):
            path = root / info.get("path", VOCAB)
            if path.is_file() and path.stat().st_size <= MAX_VOCAB_IN_CHECKPOINT:
                return read_vocab(path)
            return None
        if self._vocab is None:
            url = join(root, info.get("path", VOCAB))
            raw = read_url(url, what="vocabulary")
            self._vocab = read_vocab(raw, name=url) if len(raw) <= MAX_VOCAB_IN_CHECKPOINT else {}
        return self._vocab or None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resuming on other shards than the checkpoint's is an error, not a silent mismatch.

        The training position is kept for the next ``train_dataloader()``: its first iteration
        continues exactly where the checkpointed run stood (``TaskDataLoader.resume_from``).
        """
        position = state.get("train_position")
        self._resume = Position(**position) if position else None
        want = state.get("vocab_sha256")
        have = (self.manifest.data.get("vocab", {}) if self.manifest is not None else {}).get("sha256")
        if want and have and want != have:
            raise ConfigError(
                f"the checkpoint was trained with the vocabulary of {state.get('data_dir')} (sha256 "
                f"{want[:12]}...), but {self.data_dir} holds another one ({have[:12]}...): ids would map "
                "to other rows. Use the same shards, or start a new run instead of resuming"
            )

    def wait_for_shards(self, timeout_s: float | None = None, poll_s: float = 1.0) -> None:
        """On ranks other than 0: wait until rank 0's ``prepare_data`` has put the shards in place.

        All ranks of a torchrun/srun launch start together, before any process group exists, and
        only one may build (the build moves a finished folder into place, so a manifest never
        appears half-written). Then the same input check as rank 0's runs: shards built from other
        inputs are an error here too. With ``force`` it waits for a manifest newer than this call.
        ``timeout_s`` defaults to ``build_wait_s``. A URL ``data_dir`` has nothing to wait for.
        """
        if self.remote:
            self._check_remote()
            return
        assert isinstance(self.data_dir, Path)
        timeout_s = self.build_wait_s if timeout_s is None else timeout_s
        manifest = self.data_dir / MANIFEST
        start = time.time()
        while not (manifest.is_file() and (not self.force or manifest.stat().st_mtime >= start)):
            if time.time() - start > timeout_s:
                raise TimeoutError(
                    f"rank 0 did not build {manifest} within {timeout_s:.0f} s (is {self.data_dir} on a "
                    "file system every node shares? did rank 0 fail?). For large data, prebuild the "
                    "shards once before launching: python scripts/prepare_data.py <the same data "
                    f"overrides as this run> (e.g. data.data_dir={self.data_dir}); or raise "
                    "data.build_wait_s"
                )
            time.sleep(poll_s)
        if self.source is not None:
            self._prepare_shards(force=False)  # present: only compares the manifest's inputs with ours

    def setup(self, stage: str | None = None) -> None:
        if self.manifest is not None:
            return
        manifest = load_manifest(self.data_dir)
        check_manifest(manifest)
        if self.verify == "full":
            verify_full(manifest)
        self.manifest, self.schema = manifest, manifest.schema
        log.info(
            "task shards in %s: %s",
            self.data_dir,
            {s: manifest.num_tasks(s) for s in ("train", "val", "test")},
        )

    def rank_world(self) -> tuple[int, int]:
        """(global rank, world size): constructor overrides, else the attached trainer, else (0, 1)."""
        trainer = self.trainer
        rank = self._rank if self._rank is not None else (trainer.global_rank if trainer is not None else 0)
        world = (
            self._world_size
            if self._world_size is not None
            else (trainer.world_size if trainer is not None else 1)
        )
        return rank, world

    def dataset(self, split: str) -> TaskStreamDataset:
        if self.manifest is None or self.schema is None:
            raise RuntimeError("TaskDataModule.setup() must run before the dataloaders are built")
        rank, world = self.rank_world()
        train = split == "train"
        global_batch = self.batch_tasks if train else self.eval_batch_tasks
        if global_batch % world:
            name = "batch_tasks" if train else "eval_batch_tasks"
            raise ConfigError(
                f"data.{name}={global_batch} is the meta-batch over all ranks and must be divisible by the "
                f"world size {world}"
            )
        shards = self.manifest.shards(split)
        dataset = TaskStreamDataset(
            shards=list(self.manifest.shard_paths(split)),
            shard_tasks=[s["tasks"] for s in shards],
            shard_bytes=[s["bytes"] for s in shards],
            schema=self.schema,
            batch_tasks=global_batch // world,
            shuffle=train,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            rank=rank,
            world_size=world,
            equal_batches=self.equal_batches,
            rank_split=self.rank_split,
        )
        if (split, rank, world) not in self._checked:
            # fail before the first step, not mid-epoch: this rank's first-epoch shards exist with
            # their sizes (every shard read is checked again as it is read)
            check_sizes(self.manifest, split, dataset.rank_shards(self.num_workers, self._epoch()))
            self._checked.add((split, rank, world))
        return dataset

    def _epoch(self) -> int:
        trainer = self.trainer
        return int(trainer.current_epoch) if trainer is not None else 0

    def _loader(self, split: str) -> TaskDataLoader:
        epoch_fn = self._epoch if self.trainer is not None else None
        return TaskDataLoader(
            self.dataset(split),
            epoch_fn=epoch_fn,
            num_workers=self.num_workers,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
        )

    def train_dataloader(self) -> TaskDataLoader:
        if self._resume is not None:
            self._check_resumable(self._resume)
        loader = self._loader("train")
        loader.resume_from(self._resume)
        self._resume = None  # only the first loader of a resumed fit continues mid-stream
        return loader

    def val_dataloader(self) -> TaskDataLoader:
        return self._loader("val")

    def test_dataloader(self) -> TaskDataLoader:
        return self._loader("test")


def _verify_mode(verify: str | None, verify_checksums: bool | None) -> str:
    """``verify``, or the mode the deprecated ``verify_checksums`` flag stands for."""
    if verify_checksums is not None:
        legacy = "full" if verify_checksums else "sizes"
        if verify is not None and verify != legacy:
            raise ValueError(
                f"data.verify={verify!r} contradicts data.verify_checksums={verify_checksums} "
                f"(which means verify={legacy!r}): set only data.verify"
            )
        warnings.warn(
            f"data.verify_checksums is deprecated: use data.verify={legacy!r} "
            "(sizes: this rank's shards, checked as read; full: sha256 of every shard at setup)",
            DeprecationWarning,
            stacklevel=3,
        )
        verify = legacy
    verify = "sizes" if verify is None else verify
    if verify not in VERIFY_MODES:
        raise ValueError(f"data.verify must be one of {VERIFY_MODES}, got {verify!r}")
    return verify
