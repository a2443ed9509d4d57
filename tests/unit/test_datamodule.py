"""DataModule: every task exactly once per epoch across ranks x workers, shuffling, batching."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from gmeta.data.batch import TaskBatch
from gmeta.data.datamodule import Position, TaskDataLoader, TaskDataModule, TaskStreamDataset
from gmeta.data.shards import read_manifest
from gmeta.data.tasks import SPLITS
from gmeta.errors import ConfigError


def _module(shard_dir, rank=0, world=1, workers=0, **kw) -> TaskDataModule:
    dm = TaskDataModule(
        shard_dir,
        batch_tasks=6,  # global meta-batch: divisible by the 1, 2, 3 simulated ranks
        eval_batch_tasks=6,
        num_workers=workers,
        shuffle_buffer=8,
        seed=0,
        rank=rank,
        world_size=world,
        **kw,
    )
    dm.setup()
    return dm


def _unpad(batch: TaskBatch):
    """(task_id, {member: array}) of the real tasks in a batch."""
    for i, tid in enumerate(batch.task_ids):
        if not batch.task_mask[i]:
            continue
        out = {}
        for which in ("support", "query"):
            s = getattr(batch, which)
            n = int(s.mask[i].sum())
            assert s.mask[i, :n].all() and not s.mask[i, n:].any()
            for name in ("sparse", "multi_hot", "dense", "label"):
                out[f"{which}.{name}"] = getattr(s, name)[i, :n].numpy()
        yield tid, out


@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_each_task_read_exactly_once_across_ranks_and_workers(shard_dir, small_splits, world, workers):
    for split in SPLITS:
        original = {r.task_id: r for r in small_splits.split(split)}
        seen: Counter[str] = Counter()
        batches_per_rank = []
        for rank in range(world):
            dm = _module(shard_dir, rank, world, workers)
            loader = getattr(dm, f"{split}_dataloader")()
            n_batches = 0
            for batch in loader:
                assert isinstance(batch, TaskBatch)
                assert batch.num_tasks <= 6 // world  # the global meta-batch split over ranks
                n_batches += 1
                for tid, arrays in _unpad(batch):
                    seen[tid] += 1
                    for k, a in arrays.items():
                        assert a.tobytes() == original[tid].arrays[k].tobytes(), (tid, k)
            batches_per_rank.append(n_batches)
            assert n_batches == loader.dataset.num_batches(workers)
        assert set(seen) == set(original) and set(seen.values()) == {1}, split
        assert len(set(batches_per_rank)) == 1  # equal batch counts: collectives never deadlock


def test_both_assignment_modes_are_exercised(shard_dir):
    ds = _module(shard_dir).dataset("train")
    assert len(ds.shards) == 5
    assert ds.slot_plan(0, 4, 0)[1] is None  # 2 ranks x 2 workers: whole shards per slot
    assert ds.slot_plan(0, 6, 0)[1] == 6  # 3 ranks x 2 workers: stride over tasks


def _train_order(dm: TaskDataModule, epoch: int) -> list[str]:
    loader = dm.train_dataloader()
    loader._iterations = epoch
    return [t for b in loader for t, m in zip(b.task_ids, b.task_mask, strict=True) if m]


def test_train_shuffle_differs_per_epoch_but_is_deterministic(shard_dir):
    dm = _module(shard_dir)
    e0, e0_again, e1 = _train_order(dm, 0), _train_order(dm, 0), _train_order(dm, 1)
    assert e0 == e0_again and e0 != e1 and sorted(e0) == sorted(e1)
    loader = dm.train_dataloader()
    first, second = [[t for b in loader for t in b.task_ids] for _ in range(2)]
    assert first == e0 and second == e1  # the loader advances the epoch on every iteration


def test_eval_order_is_manifest_order(shard_dir, small_splits):
    dm = _module(shard_dir)
    ids = [t for b in dm.val_dataloader() for t in b.task_ids]
    assert ids == [r.task_id for r in small_splits.val]


def test_uneven_ranks_get_masked_dummy_batches(shard_dir):
    m = read_manifest(shard_dir)
    ds = [
        TaskStreamDataset(
            m.shard_paths("train"),
            [s["tasks"] for s in m.shards("train")],
            m.schema,
            batch_tasks=8,
            rank=r,
            world_size=2,
        )
        for r in range(2)
    ]
    real = [ds[r].rank_batches(r, 0, 0) for r in range(2)]
    assert real[0] != real[1]  # 5 shards over 2 ranks: 3 shards vs 2 shards
    batches = [list(d) for d in ds]
    assert len(batches[0]) == len(batches[1]) == max(real)
    short = int(np.argmin(real))
    pads = batches[short][real[short] :]
    assert pads and all(not b.task_mask.any() and b.task_ids == [""] for b in pads)
    assert all(b.support.mask.sum() == 0 for b in pads)


def test_prepare_data_without_manifest_or_source_explains(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"manifest.json not found and no source given.*prepare_shards"
    ):
        TaskDataModule(tmp_path / "nothing").prepare_data()


def test_prepare_data_builds_from_source(tmp_path, ml_synthetic_source, small_task_config):
    dm = TaskDataModule(
        tmp_path / "built",
        source=ml_synthetic_source,
        task_config=small_task_config,
        tasks_per_shard=50,
        batch_tasks=100,
    )
    dm.prepare_data()
    dm.setup()
    assert dm.schema is not None and dm.schema.field("genre").vocab_size > 1
    batch = next(iter(dm.train_dataloader()))
    assert batch.num_tasks == dm.manifest.num_tasks("train") == 82
    assert batch.support.sparse.dtype == torch.int64 and batch.support.multi_hot.shape[2:] == (1, 6)


def test_batch_tasks_is_the_global_meta_batch(shard_dir):
    per_rank = [_module(shard_dir, rank, 2).dataset("train").batch_tasks for rank in range(2)]
    assert per_rank == [3, 3]  # 6 tasks per meta-step over both ranks
    with pytest.raises(ValueError, match=r"batch_tasks=6 is the meta-batch over all ranks .* world size 4"):
        _module(shard_dir, 0, 4).dataset("train")


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world", [2, 3])
def test_rank_split_batches_gives_each_rank_its_block_of_the_one_process_batches(shard_dir, world, workers):
    for split in SPLITS:
        one = list(getattr(_module(shard_dir, 0, 1, workers), f"{split}_dataloader")())
        ranks = [
            list(
                getattr(_module(shard_dir, r, world, workers, rank_split="batches"), f"{split}_dataloader")()
            )
            for r in range(world)
        ]
        assert all(len(r) == len(one) for r in ranks), split  # equal counts: no padding batches needed
        for i, batch in enumerate(one):
            blocks = [ranks[r][i] for r in range(world)]
            real = [t for b in blocks for t, m in zip(b.task_ids, b.task_mask.tolist(), strict=True) if m]
            assert real == batch.task_ids, (split, i)  # the same tasks, in the same order
            for b in blocks:
                assert b.num_tasks <= 6 // world
            for tid, arrays in (item for b in blocks for item in _unpad(b)):
                want = dict(_unpad(batch))[tid]
                assert all(a.tobytes() == want[k].tobytes() for k, a in arrays.items()), (split, tid)


def test_rank_split_is_validated(shard_dir):
    with pytest.raises(ValueError, match=r"rank_split must be one of \('shards', 'batches'\)"):
        _module(shard_dir, rank_split="tasks")


def test_persistent_workers_follow_the_epoch(shard_dir):
    """Persistent workers read the epoch from shared memory: same batches as fresh workers, per epoch."""
    m = read_manifest(shard_dir)

    def dataset() -> TaskStreamDataset:
        shards = m.shard_paths("train")
        return TaskStreamDataset(shards, [s["tasks"] for s in m.shards("train")], m.schema, 4, shuffle=True)

    orders = {}
    for persistent in (True, False):
        loader = TaskDataLoader(dataset(), num_workers=2, persistent_workers=persistent)
        orders[persistent] = [
            [t for b in loader for t, k in zip(b.task_ids, b.task_mask, strict=True) if k] for _ in range(3)
        ]
    assert orders[True] == orders[False]
    assert all(sorted(o) == sorted(orders[True][0]) and len(set(o)) == len(o) == 82 for o in orders[True])
    assert len({tuple(o) for o in orders[True]}) == 3  # a new shuffle each epoch


def test_other_ranks_wait_for_rank_zeros_shards(tmp_path, shard_dir):
    import shutil
    import threading

    target = tmp_path / "shards"
    waiter = TaskDataModule(target, batch_tasks=6)
    done: list[BaseException | None] = []

    def wait() -> None:
        try:
            waiter.wait_for_shards(timeout_s=20, poll_s=0.05)
            done.append(None)
        except BaseException as exc:  # noqa: BLE001 - reported below
            done.append(exc)

    thread = threading.Thread(target=wait)
    thread.start()
    thread.join(0.3)
    assert thread.is_alive() and not done  # nothing there yet: still waiting
    shutil.copytree(shard_dir, target)  # "rank 0" finishes its build
    thread.join(10)
    assert done == [None]
    with pytest.raises(TimeoutError, match=r"did not build .*manifest.json within 0 s"):
        TaskDataModule(tmp_path / "never", batch_tasks=6).wait_for_shards(timeout_s=0.2, poll_s=0.05)


def test_resuming_on_shards_with_another_vocabulary_is_refused(shard_dir):
    dm = _module(shard_dir)
    dm.setup()
    state = dm.state_dict()
    assert state["vocab_sha256"] and "vocab" in state
    dm.load_state_dict(state)  # same shards: fine
    with pytest.raises(ValueError, match=r"trained with the vocabulary of .* holds another one"):
        dm.load_state_dict({**state, "vocab_sha256": "0" * 64})


def _fingerprints(loader) -> list[tuple[str, ...]]:
    """Each batch as its task ids ("" for masked dummies): identifies its content and order."""
    return [tuple(b.task_ids) for b in loader]


@pytest.mark.parametrize(
    ("workers", "world", "rank_split"),
    [(0, 1, "shards"), (2, 1, "shards"), (3, 1, "shards"), (2, 2, "shards"), (2, 3, "batches")],
)
def test_a_resumed_epoch_continues_exactly_where_the_position_says(shard_dir, workers, world, rank_split):
    """After ``n`` delivered batches of epoch 1, the resumed loader yields exactly the rest of an
    uninterrupted epoch 1, in order (worker round-robin and rank padding included), for every n."""
    for rank in range(world):
        dm = _module(shard_dir, rank, world, workers, rank_split=rank_split, persistent_workers=False)
        full = dm.train_dataloader()
        full._iterations = 1
        want = _fingerprints(full)
        assert len(want) == full.dataset.num_batches(workers, 1)
        assert full.dataset.slot_batches(workers, 1)[0] >= 1 and sum(
            full.dataset.slot_batches(workers, 1)
        ) == len(want)
        for n in range(len(want) + 1):
            loader = dm.train_dataloader()
            loader.resume_from(Position(epoch=1, batches=n, epoch_done=False))
            assert _fingerprints(loader) == want[n:], (rank, n)
            # the iteration after a resumed one is the next epoch, from its start
            assert loader._iterations == 2


def test_a_position_at_the_end_of_an_epoch_continues_with_the_next_epoch(shard_dir):
    dm = _module(shard_dir)
    loader = dm.train_dataloader()
    loader._iterations = 3
    want = _fingerprints(loader)
    loader = dm.train_dataloader()
    loader.resume_from(Position(epoch=2, batches=len(want), epoch_done=True))
    assert _fingerprints(loader) == want


def test_the_datamodule_hands_a_checkpointed_position_to_the_next_train_loader_only(shard_dir):
    dm = _module(shard_dir)
    state = dm.state_dict()
    assert "train_position" not in state  # no trainer: nothing is being fitted
    dm.load_state_dict({**state, "train_position": {"epoch": 0, "batches": 4, "epoch_done": False}})
    resumed = _fingerprints(dm.train_dataloader())
    fresh = _fingerprints(dm.train_dataloader())
    assert resumed == fresh[4:]


def test_resuming_mid_epoch_with_another_data_layout_is_refused(shard_dir):
    """Another worker count, meta-batch, seed or shard split would put other tasks in the skipped
    batches: an error, not silently lost and repeated tasks. An epoch-end position is always fine."""

    def dm(**kw) -> TaskDataModule:
        args = {
            "batch_tasks": 6,
            "eval_batch_tasks": 6,
            "shuffle_buffer": 8,
            "seed": 0,
            "rank": 0,
            "world_size": 1,
        }
        module = TaskDataModule(shard_dir, **{**args, **kw})
        module.setup()
        return module

    mid = {"epoch": 1, "batches": 3, "epoch_done": False, "layout": dm().stream_layout()}
    same = dm()
    same.load_state_dict({"train_position": mid})
    same.train_dataloader()
    for changed in ({"num_workers": 2}, {"batch_tasks": 12}, {"seed": 1}, {"world_size": 2}):
        other = dm(**changed)
        other.load_state_dict({"train_position": mid})
        with pytest.raises(ConfigError, match=r"cannot resume in the middle of epoch 1 \(after 3 batches\)"):
            other.train_dataloader()
        other.load_state_dict({"train_position": {**mid, "epoch_done": True}})
        other.train_dataloader()  # the next epoch starts from its beginning: any layout works
    # rank_split=batches: every rank reads the one-process stream, so another world size is fine
    two = dm(world_size=2, rank_split="batches")
    two.load_state_dict({"train_position": mid})
    two.train_dataloader()
