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
