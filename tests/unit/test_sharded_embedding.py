"""Row-wise sharding rules, shard shapes and checkpoint (re)sharding, without processes.

One ``ShardedEmbeddingCollection`` per simulated rank (a communicator that only states rank and world
size); the exchanges themselves are tested against one process in ``tests/distributed``.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from gmeta.model.embedding import EmbeddingCollection
from gmeta.parallel.sharded_embedding import ShardedEmbeddingCollection, owned_rows

VOCABS = (101, 7, 1000, 3, 50)


@dataclass
class FakeComm:
    rank: int
    world_size: int
    timeout_s: float | None = None


def local_table(optimizer: str = "adagrad") -> EmbeddingCollection:
    torch.manual_seed(0)
    table = EmbeddingCollection(
        VOCABS, num_sparse=3, dim=4, optimizer=optimizer, optimizer_kwargs={"lr": 0.1}
    )
    for buf in table.optimizer.buffers():  # non-trivial optimizer state
        buf.copy_(torch.rand_like(buf.float()).to(buf.dtype) * 10)
    return table


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_each_rank_holds_about_one_wth_of_every_table(world):
    table = local_table()
    offsets = table.offsets.tolist()
    total = 0
    for rank in range(world):
        shard = ShardedEmbeddingCollection(table, FakeComm(rank, world))
        assert shard.weight.shape == (owned_rows(table.num_total_rows, world, rank), 4)
        assert shard.optimizer.sum_sq.shape == (shard.weight.shape[0],)
        total += shard.weight.shape[0]
        owned = torch.arange(rank, table.num_total_rows, world)
        for f, (start, size) in enumerate(zip(offsets, VOCABS, strict=True)):
            in_field = int(((owned >= start) & (owned < start + size)).sum())
            assert abs(in_field - size / world) <= 1, (rank, f, in_field)
        assert torch.equal(shard.weight, table.weight[owned])
    assert total == table.num_total_rows


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "adam"])
def test_full_checkpoint_loads_on_any_world_size(optimizer):
    table = local_table(optimizer)
    state = table.state_dict()
    for world in (1, 2, 4):
        for rank in range(world):
            shard = ShardedEmbeddingCollection(local_table(optimizer), FakeComm(rank, world))
            with torch.no_grad():
                shard.weight.zero_()
            shard.load_state_dict(state)
            assert torch.equal(shard.weight, table.weight[rank::world])
            for name, buf in table.optimizer.named_buffers():
                assert torch.equal(getattr(shard.optimizer, name), buf[rank::world])


def test_raw_shard_state_loads_only_on_the_same_rank_and_world():
    table = local_table()
    raw = ShardedEmbeddingCollection(table, FakeComm(1, 2)).state_dict()
    ShardedEmbeddingCollection(table, FakeComm(1, 2)).load_state_dict(raw)  # same layout: fine
    with pytest.raises(ValueError, match=r"shard of rank 1 of a world of 2.*rank 0 of 4"):
        ShardedEmbeddingCollection(table, FakeComm(0, 4)).load_state_dict(raw)
    with pytest.raises(ValueError, match=r"row shard of rank 1 of 2.*full table"):
        local_table().load_state_dict(raw)


def test_full_checkpoint_of_other_vocab_is_refused():
    other = EmbeddingCollection((5, 5), num_sparse=2, dim=4)
    shard = ShardedEmbeddingCollection(local_table(), FakeComm(0, 2))
    with pytest.raises(ValueError, match=r"checkpoint has 10 rows, the table has 1161"):
        shard.load_state_dict(other.state_dict())


# -- per-rank construction (issue 11) ------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["adagrad", "adam"])
def test_deferred_table_is_built_per_rank_with_exactly_the_whole_tables_rows(optimizer):
    kwargs = {"optimizer": optimizer, "optimizer_kwargs": {"lr": 0.1}, "init_std": 0.3, "init_seed": 7}
    whole = EmbeddingCollection(VOCABS, num_sparse=3, dim=5, **kwargs).double()
    deferred = EmbeddingCollection(VOCABS, num_sparse=3, dim=5, device="meta", **kwargs).double()
    assert deferred.weight.is_meta and all(b.is_meta for b in deferred.optimizer.buffers())
    for world in (1, 2, 3, 4):
        rows = 0
        for rank in range(world):
            shard = ShardedEmbeddingCollection(deferred, FakeComm(rank, world))
            assert shard.weight.dtype == torch.float64
            assert torch.equal(shard.weight, whole.weight[rank::world])  # bit for bit
            for name, buf in whole.optimizer.named_buffers():
                assert torch.equal(getattr(shard.optimizer, name), buf[rank::world]), name
            rows += shard.num_local_rows
        assert rows == whole.num_total_rows
    assert deferred.weight.is_meta  # the whole table was never allocated


def test_initial_rows_depend_on_seed_field_and_row_only():
    a = EmbeddingCollection((5, 7, 3), num_sparse=3, dim=4, init_seed=1)
    b = EmbeddingCollection((9, 7), num_sparse=2, dim=4, init_seed=1)  # fields 0 and 1 of other sizes
    c = EmbeddingCollection((5, 7, 3), num_sparse=3, dim=4, init_seed=2)
    torch.testing.assert_close(a.weight[:5], b.weight[:5], rtol=0, atol=0)  # field 0, rows 0-4
    torch.testing.assert_close(a.weight[5:12], b.weight[9:16], rtol=0, atol=0)  # field 1, rows 0-6
    assert not torch.equal(a.weight[12:15], a.weight[:3])  # field 2's rows are not field 0's
    assert not (a.weight == c.weight).any()  # another seed, other values


def test_a_deferred_table_materialises_whole_on_load_or_on_demand():
    kwargs = {"init_std": 0.2, "init_seed": 3}
    whole = EmbeddingCollection(VOCABS, num_sparse=3, dim=4, **kwargs)
    deferred = EmbeddingCollection(VOCABS, num_sparse=3, dim=4, device="meta", **kwargs)
    deferred.materialize()
    assert torch.equal(deferred.weight, whole.weight)
    loaded = EmbeddingCollection(VOCABS, num_sparse=3, dim=4, device="meta", init_seed=99)
    loaded.load_state_dict(whole.state_dict())
    assert torch.equal(loaded.weight, whole.weight) and not loaded.weight.is_meta
