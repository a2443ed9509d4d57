"""Row-wise sharded embedding tables: each rank owns 1/W of the rows of every table.

Ownership rule (``EmbeddingTable``): global row ``g`` (field offsets added, see ``RowLayout``) lives
on rank ``g % W`` at local row ``g // W``. Modulo rather than contiguous blocks because (a) every table
is split about evenly (a contiguous split of the concatenated rows would put whole small tables on one
rank) and (b) popular ids, which tend to be small numbers after frequency-sorted encoding, spread over
all ranks instead of loading one.

One meta-step, on every rank (``Communicator`` tags in brackets)::

    lookup:   unique ids of support+query of all local tasks --[lookup/header]-> counts, loss weights,
              bad-id reports;  ids --[lookup/ids]-> owners;  owners' rows --[lookup/rows]-> back
    inner loop and query loss: local, on the looked-up (U, d) rows (no collective)
    backward: rows.grad (U, d) --[rows/grads]-> owners, summed per row, row-wise optimizer step

The optimizer state (Adagrad accumulators, Adam moments) is row-indexed, so it is sharded by the same
rule. A deferred (meta) table is built per rank: each rank allocates and initialises only its rows.
Checkpoints either hold full tables (``full_state_dict`` gathers them; ``load_state_dict`` takes the
owned rows of a full table) or are sharded directories (``sharded_checkpoint.py``); both load on any
number of ranks.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from gmeta.data.batch import TaskBatch
from gmeta.model.embedding import (
    BadId,
    EmbeddingCollection,
    EmbeddingLookup,
    EmbeddingTable,
    Routing,
    owned_rows,
)
from gmeta.parallel.comm import RowExchange

__all__ = [
    "Routing",
    "ShardedEmbeddingCollection",
    "gathered_state_dict",
    "owned_rows",
    "shard_embeddings",
    "sharded_tables",
]

# Columns of the per-destination header row exchanged first in every lookup: the ids sent, the loss
# weight, then a bad-id report (a flag and the ``BadId`` fields).
_COUNT, _WEIGHT, _BAD, _WHICH, _TASK, _SAMPLE, _FIELD, _ID = range(8)
_HEADER = 8


class ShardedEmbeddingCollection(EmbeddingTable):
    """The rows of a table that this rank owns; lookups and gradient steps exchange rows with the
    other ranks' shards (``Communicator.all_to_all``), so the LightningModule does not know which
    ``EmbeddingTable`` it holds. Every collective method must be called by every rank, in the same
    order: ``lookup``, ``apply_gradients``, ``apply_row_gradients``, ``full_state_dict``.

    Built from an ``EmbeddingCollection`` that describes the table (vocab sizes, dim, init seed,
    optimizer). If that table is deferred (``device="meta"``, as ``MetaDLRMModule`` builds it), this
    rank allocates and initialises only its own rows ``rank, rank + W, ...`` and their optimizer state,
    with the same values a whole table would hold (``gmeta.model.row_init``): the full table never
    exists on any rank. If it is a built table, its owned rows and optimizer state are copied.

    Args:
        local: the table to shard (left untouched).
        comm: the communicator (its rank and world size define the shard), normally a ``Communicator``.
    """

    shard_info: Tensor

    def __init__(self, local: EmbeddingCollection, comm: RowExchange) -> None:
        super().__init__(
            copy.deepcopy(local.layout),  # on the local table's device
            local.dim,
            init_std=local.init_std,
            optimizer=local.optimizer_name,
            optimizer_kwargs=local.optimizer_kwargs,
            check_ids=local.check_ids,
            init_seed=local.init_seed,
            rank=comm.rank,
            world_size=comm.world_size,
        )
        self.comm = comm
        self.register_buffer(
            "shard_info", torch.tensor([self.world_size, self.rank, self.num_total_rows], dtype=torch.long)
        )
        for name, buf in local.optimizer.named_buffers(recurse=False):
            if buf.shape[0] != local.num_total_rows:
                raise ValueError(f"optimizer buffer {name!r} is not row-indexed: shape {tuple(buf.shape)}")
        # Layout and dtypes first, on the meta device: nothing of the size of the table is allocated.
        self._allocate_rows(device="meta", dtype=local.weight.dtype, like=local.optimizer)
        if local.is_materialized:  # copy the owned rows and their state
            own = slice(self.rank, None, self.world_size)
            self.weight = local.weight[own].clone()
            for name, buf in local.optimizer.named_buffers(recurse=False):
                setattr(self.optimizer, name, buf[own].clone())
        else:  # per-rank construction: only this rank's rows, initialised as the whole table would be
            self.materialize()

    # -- lookup ---------------------------------------------------------------------------------
    def _exchange_headers(self, loss_weight: int, send_counts: Tensor, bad: BadId | None) -> Tensor:
        """(W, _HEADER) int64 on the CPU: row r is what rank r sent this rank (counts, weight, report)."""
        header = torch.zeros(self.world_size, _HEADER, dtype=torch.long)
        header[:, _COUNT] = send_counts
        header[:, _WEIGHT] = int(loss_weight)
        if bad is not None:
            header[:, _BAD] = 1
            header[:, _WHICH : _ID + 1] = torch.tensor(list(bad))
        ones = [1] * self.world_size
        return self.comm.all_to_all(header.to(self.weight.device), ones, ones, tag="lookup/header").cpu()

    def _bad_id_error(self, headers: Tensor) -> ValueError | None:
        """The same error on every rank, naming the first rank with an out-of-range id (None if none)."""
        bad_ranks = (headers[:, _BAD] != 0).nonzero().flatten().tolist()
        if not bad_ranks:
            return None
        r = bad_ranks[0]
        detail = self.layout.bad_id_message(BadId(*headers[r, _WHICH : _ID + 1].tolist()))
        return ValueError(f"rank {r}'s batch: {detail} (reported on rank {self.rank} of {self.world_size})")

    def lookup(self, batch: TaskBatch, loss_weight: int = 1) -> EmbeddingLookup:
        """Rows of every id of the batch from their owners: three all_to_all exchanges, whatever the
        number of tasks, sets or fields (see ``EmbeddingTable.lookup``). A collective."""
        comm, w = self.comm, self.world_size
        bad = self.layout.first_bad_id(batch) if self.check_ids else None
        if bad is not None:  # don't index garbage: report it in the header, so that every rank raises
            headers = self._exchange_headers(loss_weight, torch.zeros(w, dtype=torch.long), bad)
            raise self._bad_id_error(headers) or ValueError(self.layout.bad_id_message(bad))
        unique, support, query = self.layout.index(batch)
        owner = unique % w
        order = torch.argsort(owner, stable=True)
        send_counts = torch.bincount(owner, minlength=w).cpu()
        headers = self._exchange_headers(loss_weight, send_counts, None)
        error = self._bad_id_error(headers)
        if error is not None:  # another rank's batch
            raise error
        recv_counts = headers[:, _COUNT].tolist()
        total_weight = int(headers[:, _WEIGHT].sum())
        send_list = send_counts.tolist()

        requested = comm.all_to_all(unique[order], send_list, recv_counts, tag="lookup/ids")
        served_rows = requested // w
        served = self.weight.index_select(0, served_rows)
        received = comm.all_to_all(served, recv_counts, send_list, tag="lookup/rows")
        rows = torch.empty_like(received)
        rows[order] = received
        return EmbeddingLookup(
            unique_ids=unique,
            rows=rows.detach().requires_grad_(True),
            support=support,
            query=query,
            loss_share=loss_weight / total_weight if total_weight > 0 else 0.0,
            routing=Routing(order, send_list, recv_counts, served_rows),
        )

    # -- update ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _step_received(self, local_rows: Tensor, grads: Tensor) -> None:
        """Sum the gradients received for each local row (several ranks may send one row) and step
        those rows."""
        if local_rows.numel() == 0:
            return
        rows, inverse = torch.unique(local_rows, return_inverse=True)
        summed = grads.new_zeros(rows.shape[0], self.dim).index_add_(0, inverse, grads)
        self.optimizer.step(self.weight, rows, summed.to(self.weight.dtype))

    @torch.no_grad()
    def apply_gradients(self, lookup: EmbeddingLookup) -> None:
        """Send each row's gradient to its owner along the lookup's routing (one all_to_all), sum per
        row, step the owned rows. A collective: every rank calls it once per lookup that was
        differentiated, even with no gradient."""
        routing = lookup.routing
        if routing is None:
            raise ValueError(
                "this lookup did not come from a ShardedEmbeddingCollection (it has no Routing): apply "
                "its gradients through the table that made it"
            )
        grads = lookup.rows.grad if lookup.rows.grad is not None else torch.zeros_like(lookup.rows)
        received = self.comm.all_to_all(
            grads[routing.order], routing.send_counts, routing.recv_counts, tag="rows/grads"
        )
        self._step_received(routing.served_rows, received)

    @torch.no_grad()
    def apply_row_gradients(self, unique_ids: Tensor, row_grads: Tensor | None) -> None:
        """Send each row's gradient to its owner, sum per row over all ranks, step the owned rows.

        A collective (three all_to_all: counts, ids, gradients): every rank calls it, with its own
        rows, none (``row_grads`` None or no ids) included. Without a lookup's routing, the ids travel
        too; after a lookup, ``apply_gradients`` needs one exchange only.
        """
        if row_grads is None:
            unique_ids = unique_ids[:0]
            row_grads = self.weight.new_zeros(0, self.dim)
        self._check_row_grads(unique_ids, row_grads)
        comm, w = self.comm, self.world_size
        unique_ids = unique_ids.to(self.weight.device)
        owner = unique_ids % w
        order = torch.argsort(owner, stable=True)
        send_counts = torch.bincount(owner, minlength=w)
        recv_counts = comm.all_to_all(send_counts, [1] * w, [1] * w, tag="rows/counts").tolist()
        send_list = send_counts.tolist()
        ids = comm.all_to_all(unique_ids[order], send_list, recv_counts, tag="rows/ids")
        grads = comm.all_to_all(row_grads[order], send_list, recv_counts, tag="rows/grads")
        self._step_received(ids // w, grads)

    # -- checkpoints ----------------------------------------------------------------------------
    def full_state_dict(self, prefix: str = "") -> dict[str, Tensor]:
        """The full (unsharded) weight and optimizer state, as one process would hold them.

        A collective (all_gather): every rank must call it. Each rank briefly holds the full table.
        """
        state = {}
        for name, own in self.row_state().items():
            shards = self.comm.all_gather_rows(own, tag=f"checkpoint/{name}")
            full = own.new_empty((self.num_total_rows, *own.shape[1:]))
            for r, shard in enumerate(shards):
                full[r :: self.world_size] = shard
            state[prefix + name] = full
        return state

    def _prepare_load(self, state_dict: dict[str, Any], prefix: str) -> None:
        """A shard of the same rank and world loads as is; a full table is cut to the owned rows."""
        info_key = prefix + "shard_info"
        if info_key in state_dict:
            world, rank, rows = state_dict[info_key].tolist()
            if (world, rank, rows) != (self.world_size, self.rank, self.num_total_rows):
                raise ValueError(
                    f"{prefix or 'embedding'}: the state holds the row shard of rank {rank} of a world of "
                    f"{world} ({rows} rows); this is rank {self.rank} of {self.world_size} "
                    f"({self.num_total_rows} rows). Resharding needs a full-table checkpoint: save "
                    "through HybridParallelStrategy (it gathers the shards) and load that"
                )
            return
        # a full table (single-process or gathered checkpoint): keep the owned rows. In place:
        # nn.Module.load_state_dict hands the same (copied) dict to the submodules.
        for name in self.row_buffers:
            key = prefix + name
            if key not in state_dict:
                continue
            full = state_dict[key]
            if full.shape[0] != self.num_total_rows:
                raise ValueError(
                    f"{key}: checkpoint has {full.shape[0]} rows, the table has {self.num_total_rows} "
                    "(different vocabularies?)"
                )
            state_dict[key] = full[self.rank :: self.world_size]
        state_dict[info_key] = self.shard_info

    def extra_repr(self) -> str:
        return (
            f"rank={self.rank}/{self.world_size}, local_rows={self.num_local_rows} of {self.num_total_rows}, "
            f"dim={self.dim}, optimizer={type(self.optimizer).__name__}"
        )


def shard_embeddings(module: nn.Module, comm: RowExchange) -> list[str]:
    """Replace every ``EmbeddingCollection`` (a table held whole) inside ``module`` by this rank's
    shard of it, in place.

    Returns the qualified names of the replaced submodules.
    """
    replaced = []
    for name, child in list(module.named_modules()):
        if isinstance(child, EmbeddingCollection):
            parent_name, _, attr = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, attr, ShardedEmbeddingCollection(child, comm))
            replaced.append(name)
    return replaced


def sharded_tables(module: nn.Module) -> dict[str, ShardedEmbeddingCollection]:
    """Qualified name -> sharded table, for every sharded table inside ``module``."""
    return {n: m for n, m in module.named_modules() if isinstance(m, ShardedEmbeddingCollection)}


def gathered_state_dict(module: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """``state`` (``module.state_dict()``) with every sharded table replaced by its full table.

    A collective: every rank must call it.
    """
    state = dict(state)
    for name, table in sharded_tables(module).items():
        prefix = f"{name}." if name else ""
        state.pop(prefix + "shard_info", None)
        state.update(table.full_state_dict(prefix))
    return state
