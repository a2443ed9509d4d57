"""Row-wise sharding rules, shard shapes, checkpoint (re)sharding and the row exchanges, without processes.

One ``ShardedEmbeddingCollection`` per simulated rank: a communicator that only states rank and world
size (construction, loading), or ranks as threads of this process exchanging through shared memory
(lookups and gradient steps against the table held whole). Real processes: ``tests/distributed``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
import torch
from tiny_tasks import random_batch
from torch import Tensor

from gmeta.model.embedding import EmbeddingCollection, EmbeddingLookup, EmbeddingTable
from gmeta.parallel.sharded_embedding import ShardedEmbeddingCollection, owned_rows

VOCABS = (101, 7, 1000, 3, 50)
NUM_SPARSE = 3

T = TypeVar("T")


@dataclass
class FakeComm:
    rank: int
    world_size: int
    timeout_s: float | None = None


class ThreadComm:
    """The collectives the sharded table uses, between ranks that are threads of this process."""

    def __init__(self, rank: int, world_size: int, barrier: threading.Barrier, slots: list[Any]) -> None:
        self.rank, self.world_size, self.timeout_s = rank, world_size, None
        self._barrier, self._slots = barrier, slots

    def _exchange(self, value: Any) -> list[Any]:
        self._slots[self.rank] = value
        self._barrier.wait()
        out = list(self._slots)
        self._barrier.wait()  # no rank overwrites its slot before every rank has read it
        return out

    def all_to_all(
        self, send: Tensor, send_counts: Sequence[int], recv_counts: Sequence[int], tag: str
    ) -> Tensor:
        blocks = self._exchange(send.split([int(c) for c in send_counts]))
        received = [b[self.rank] for b in blocks]
        assert [r.shape[0] for r in received] == list(recv_counts), tag
        return torch.cat(received)

    def all_gather_rows(self, tensor: Tensor, tag: str) -> list[Tensor]:
        return [t.clone() for t in self._exchange(tensor)]


def on_threads(world: int, fn: Callable[[ThreadComm], T]) -> list[T]:
    """``fn(comm)`` on ``world`` threads, one per rank; the first error of any rank is raised."""
    barrier, slots = threading.Barrier(world, timeout=60), [None] * world
    results: list[Any] = [None] * world
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            results[rank] = fn(ThreadComm(rank, world, barrier, slots))
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            errors.append(exc)
            barrier.abort()  # the other ranks stop waiting for this one

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    if real or errors:
        raise (real or errors)[0]
    return results


def local_table(optimizer: str = "adagrad", seed: int = 0) -> EmbeddingCollection:
    torch.manual_seed(seed)
    table = EmbeddingCollection(
        VOCABS, num_sparse=NUM_SPARSE, dim=4, optimizer=optimizer, optimizer_kwargs={"lr": 0.1}
    )
    for buf in table.optimizer.buffers():  # non-trivial optimizer state (Adam's step counts too)
        buf.copy_((torch.rand_like(buf.float()) * 10).to(buf.dtype))
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


def assert_rows_differ(shard: ShardedEmbeddingCollection, table: EmbeddingCollection) -> None:
    """Every row-indexed tensor of ``shard`` differs from the owned rows of ``table``: a load that
    left any of them alone would fail the test."""
    own = slice(shard.rank, None, shard.world_size)
    full = table.row_state()
    for name, value in shard.row_state().items():
        assert not torch.equal(value, full[name][own]), name


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "adam"])
def test_full_checkpoint_loads_on_any_world_size(optimizer):
    table = local_table(optimizer)
    state = table.state_dict()
    for world in (1, 2, 4):
        for rank in range(world):
            # another seed: other rows and other optimizer state, all replaced by the load
            shard = ShardedEmbeddingCollection(local_table(optimizer, seed=1), FakeComm(rank, world))
            assert_rows_differ(shard, table)
            shard.load_state_dict(state)
            assert torch.equal(shard.weight, table.weight[rank::world])
            for name, buf in table.optimizer.named_buffers():
                assert torch.equal(getattr(shard.optimizer, name), buf[rank::world])


def test_raw_shard_state_loads_only_on_the_same_rank_and_world():
    table = local_table()
    raw = ShardedEmbeddingCollection(table, FakeComm(1, 2)).state_dict()
    other = ShardedEmbeddingCollection(local_table(seed=1), FakeComm(1, 2))
    assert_rows_differ(other, table)
    other.load_state_dict(raw)  # same rank and world: loads as is
    for name, value in other.row_state().items():
        assert torch.equal(value, raw[name]), name
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


# -- the exchanges, ranks as threads ---------------------------------------------------------------


def probe_loss(lookup: EmbeddingLookup) -> Tensor:
    """A loss whose gradient w.r.t. each row depends on its global id (so misrouted gradients show)."""
    ids = lookup.unique_ids.to(lookup.rows.dtype)
    coeff = torch.sin(ids[:, None] * torch.arange(1, lookup.rows.shape[1] + 1, dtype=ids.dtype))
    return (lookup.rows * coeff).sum() * lookup.loss_share


def batches(world: int) -> list[Any]:
    """One batch per rank, with ids shared between ranks (rows several ranks update)."""
    return [
        random_batch(10 + r, [4, 2, 5], [3, 1, 2], vocab_sizes=VOCABS, num_sparse=NUM_SPARSE)
        for r in range(world)
    ]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("optimizer", ["adagrad", "adam"])
def test_a_sharded_step_equals_the_whole_table_step_on_all_ranks_batches(world, optimizer):
    whole = local_table(optimizer).double()
    data = batches(world)
    weights = [r + 1 for r in range(world)]  # unequal loss weights: loss_share = w_r / sum(w)

    # reference: the whole table looks up each rank's batch; one step on the per-row sum of grads
    ref = local_table(optimizer).double()
    ids, grads, want_rows = [], [], []
    for r in range(world):
        lk = ref.lookup(data[r])
        lk.loss_share = weights[r] / sum(weights)
        probe_loss(lk).backward()
        ids.append(lk.unique_ids)
        grads.append(lk.rows.grad)
        want_rows.append(lk.rows.detach().clone())
    unique, inverse = torch.unique(torch.cat(ids), return_inverse=True)
    summed = torch.zeros(unique.shape[0], 4, dtype=torch.float64).index_add_(0, inverse, torch.cat(grads))
    ref.apply_row_gradients(unique, summed)

    def step(comm: ThreadComm, with_routing: bool) -> tuple[EmbeddingLookup, dict[str, Tensor]]:
        shard = ShardedEmbeddingCollection(whole, comm)
        assert isinstance(shard, EmbeddingTable)
        lk = shard.lookup(data[comm.rank], loss_weight=weights[comm.rank])
        probe_loss(lk).backward()
        if with_routing:
            shard.apply_gradients(lk)
        else:  # the ids travel with the gradients
            shard.apply_row_gradients(lk.unique_ids, lk.rows.grad)
        return lk, shard.full_state_dict()

    for with_routing in (True, False):
        results = on_threads(world, lambda comm, w=with_routing: step(comm, w))
        for r, (lk, _) in enumerate(results):
            assert lk.loss_share == weights[r] / sum(weights)
            assert torch.equal(lk.rows.detach(), want_rows[r])  # the owners' rows, in unique-id order
        for r, (_, full) in enumerate(results):
            for name, value in ref.row_state().items():
                torch.testing.assert_close(full[name], value, rtol=1e-12, atol=0, msg=f"rank {r}: {name}")


def test_an_out_of_range_id_on_one_rank_fails_on_every_rank_naming_it():
    whole = local_table()
    data = batches(2)
    data[1].query.sparse[2, 0, 1] = 7  # field 1 has vocab 7: ids 0..6

    def lookup(comm: ThreadComm) -> str:
        with pytest.raises(ValueError) as info:
            ShardedEmbeddingCollection(whole, comm).lookup(data[comm.rank])
        return str(info.value)

    messages = on_threads(2, lookup)
    for rank, message in enumerate(messages):
        assert message == (
            f"rank 1's batch: query set, task 2, sample 0, field 'field1': id 7 outside [0, 7) "
            f"(reported on rank {rank} of 2)"
        )


def test_a_lookup_updates_only_the_table_kind_that_made_it():
    whole = local_table()
    data = batches(2)

    def sharded_lookup(comm: ThreadComm) -> EmbeddingLookup:
        shard = ShardedEmbeddingCollection(whole, comm)
        lk = shard.lookup(data[comm.rank])
        shard.apply_gradients(lk)  # no gradient: every rank still takes part, nothing moves
        assert torch.equal(shard.weight, whole.weight[comm.rank :: 2])
        return lk

    lk = on_threads(2, sharded_lookup)[0]
    with pytest.raises(ValueError, match=r"came from a row-sharded table"):
        whole.apply_gradients(lk)
    shard = ShardedEmbeddingCollection(whole, FakeComm(0, 1))
    with pytest.raises(ValueError, match=r"did not come from a ShardedEmbeddingCollection"):
        shard.apply_gradients(whole.lookup(data[0]))
