"""Row-wise sharded embedding tables: each rank owns 1/W of the rows of every table.

Ownership rule: global row ``g`` (field offsets added, see ``EmbeddingCollection``) lives on rank
``g % W`` at local row ``g // W``. Modulo rather than contiguous blocks because (a) every table is
split about evenly (a contiguous split of the concatenated rows would put whole small tables on one
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

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gmeta.data.batch import TaskBatch
from gmeta.model.embedding import EmbeddingCollection, EmbeddingLookup
from gmeta.parallel.comm import Communicator

# Columns of the per-destination header row exchanged first in every lookup.
_COUNT, _WEIGHT, _BAD, _WHICH, _TASK, _SAMPLE, _FIELD, _ID = range(8)
_HEADER = 8
_SETS = ("support", "query")


def owned_rows(num_rows: int, world_size: int, rank: int) -> int:
    """How many of ``num_rows`` global rows rank ``rank`` owns under the ``g % W`` rule."""
    return (num_rows - rank + world_size - 1) // world_size


@dataclass
class Routing:
    """How one lookup's rows travelled, kept for the gradient exchange of the same step.

    Attributes:
        order: (U,) permutation of the unique ids that groups them by owner rank.
        send_counts: ids this rank requested from each rank.
        recv_counts: ids each rank requested from this rank.
        served_rows: (R,) local rows of this shard that were served, in receive order.
    """

    order: Tensor
    send_counts: list[int]
    recv_counts: list[int]
    served_rows: Tensor


class ShardedEmbeddingCollection(EmbeddingCollection):
    """The rows of an ``EmbeddingCollection`` owned by this rank; same interface (``lookup``,
    ``apply_gradients``), so the LightningModule does not know which one it holds.

    Built from an ``EmbeddingCollection`` that describes the table (vocab sizes, dim, init seed,
    optimizer). If that table is deferred (``device="meta"``, as ``MetaDLRMModule`` builds it), this
    rank allocates and initialises only its own rows ``rank, rank + W, ...`` and their optimizer state,
    with the same values a whole table would hold (``gmeta.model.row_init``): the full table never
    exists on any rank. If it is a built table, its owned rows and optimizer state are copied.

    Args:
        local: the table to shard (left untouched).
        comm: the communicator (its rank and world size define the shard).
    """

    def __init__(self, local: EmbeddingCollection, comm: Communicator) -> None:
        # Deliberately not EmbeddingCollection.__init__: that would allocate the full table again.
        nn.Module.__init__(self)
        self.comm = comm
        self.rank, self.world_size = comm.rank, comm.world_size
        for attr in (
            "vocab_sizes",
            "field_names",
            "num_sparse",
            "dim",
            "init_std",
            "check_ids",
            "init_seed",
            "optimizer_name",
            "optimizer_kwargs",
        ):
            setattr(self, attr, getattr(local, attr))
        self.num_total_rows = local.num_total_rows
        self.register_buffer("offsets", local.offsets.clone(), persistent=False)
        self.register_buffer("sizes", local.sizes.clone(), persistent=False)
        self.register_buffer(
            "shard_info", torch.tensor([self.world_size, self.rank, self.num_total_rows], dtype=torch.long)
        )
        for name, buf in local.optimizer.named_buffers(recurse=False):
            if buf.shape[0] != local.num_total_rows:
                raise ValueError(f"optimizer buffer {name!r} is not row-indexed: shape {tuple(buf.shape)}")
        num_local = owned_rows(self.num_total_rows, self.world_size, self.rank)
        if local.is_materialized:
            own = slice(self.rank, None, self.world_size)
            self.register_buffer("weight", local.weight[own].clone())
            self.optimizer = self.new_row_optimizer(num_local, like=local.optimizer)
            for name, buf in local.optimizer.named_buffers(recurse=False):
                setattr(self.optimizer, name, buf[own].clone())
        else:  # per-rank construction: only this rank's rows, initialised as the whole table would be
            self.register_buffer("weight", torch.empty(num_local, self.dim, dtype=local.weight.dtype))
            self.optimizer = self.new_row_optimizer(num_local, like=local.optimizer)
            self.reset_parameters()

    def global_rows(self) -> Tensor:
        """(R,) int64 global row id of each local row: ``rank, rank + W, ...``."""
        return torch.arange(self.rank, self.num_total_rows, self.world_size)

    @property
    def num_local_rows(self) -> int:
        return int(self.weight.shape[0])

    # -- lookup ---------------------------------------------------------------------------------
    def _header(self, loss_weight: int, send_counts: Tensor) -> Tensor:
        header = torch.zeros(self.world_size, _HEADER, dtype=torch.long)
        header[:, _COUNT] = send_counts
        header[:, _WEIGHT] = int(loss_weight)
        return header

    def _raise_bad_ids(self, headers: Tensor) -> None:
        """Every rank raises the same error naming the first rank with an out-of-range id."""
        bad_ranks = (headers[:, _BAD] != 0).nonzero().flatten().tolist()
        if not bad_ranks:
            return
        r = bad_ranks[0]
        h = headers[r].tolist()
        detail = self.bad_id_message(_SETS[h[_WHICH]], h[_TASK], h[_SAMPLE], h[_FIELD], h[_ID])
        raise ValueError(f"rank {r}'s batch: {detail} (reported on rank {self.rank} of {self.world_size})")

    def lookup(self, batch: TaskBatch, loss_weight: int = 1) -> EmbeddingLookup:
        """Rows of every id of the batch from their owners: three all_to_all exchanges, whatever the
        number of tasks, sets or fields. Every rank must call it the same number of times."""
        comm, w = self.comm, self.world_size
        bad = None
        if self.check_ids:
            for which, s in enumerate((batch.support, batch.query)):
                found = self.find_bad_id(s)
                if found is not None:
                    bad = (which, *found)
                    break
        if bad is None:
            unique, support, query = self.index(batch)
        else:  # don't index garbage: report it in the header, then every rank raises
            unique = torch.empty(0, dtype=torch.long, device=self.weight.device)
            support = query = None
        owner = unique % w
        order = torch.argsort(owner, stable=True)
        send_counts = torch.bincount(owner, minlength=w).cpu()
        header = self._header(loss_weight, send_counts)
        if bad is not None:
            header[:, _BAD] = 1
            header[:, _WHICH : _ID + 1] = torch.tensor(bad)
        headers = comm.all_to_all(header.to(self.weight.device), [1] * w, [1] * w, tag="lookup/header").cpu()
        self._raise_bad_ids(headers)
        recv_counts = headers[:, _COUNT].tolist()
        total_weight = int(headers[:, _WEIGHT].sum())
        send_list = send_counts.tolist()

        requested = comm.all_to_all(unique[order], send_list, recv_counts, tag="lookup/ids")
        served_rows = requested // w
        served = self.weight.index_select(0, served_rows)
        received = comm.all_to_all(served, recv_counts, send_list, tag="lookup/rows")
        rows = torch.empty_like(received)
        rows[order] = received
        assert support is not None and query is not None
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
    def apply_gradients(self, lookup: EmbeddingLookup) -> None:
        """Send each row's gradient to its owner (one all_to_all), sum per row, step the owned rows.

        Every rank must call it once per lookup that was differentiated, even with no gradient.
        """
        routing: Routing | None = lookup.routing
        if routing is None:
            raise ValueError("this lookup did not come from a ShardedEmbeddingCollection")
        grads = lookup.rows.grad if lookup.rows.grad is not None else torch.zeros_like(lookup.rows)
        received = self.comm.all_to_all(
            grads[routing.order], routing.send_counts, routing.recv_counts, tag="rows/grads"
        )
        if routing.served_rows.numel() == 0:
            return
        rows, inverse = torch.unique(routing.served_rows, return_inverse=True)
        summed = received.new_zeros(rows.shape[0], self.dim).index_add_(0, inverse, received)
        self.optimizer.step(self.weight, rows, summed.to(self.weight.dtype))

    def apply_row_gradients(self, unique_ids: Tensor, row_grads: Tensor | None) -> None:
        raise NotImplementedError("a sharded table updates rows through apply_gradients(lookup)")

    # -- checkpoints ----------------------------------------------------------------------------
    def full_state_dict(self, prefix: str = "") -> dict[str, Tensor]:
        """The full (unsharded) weight and optimizer state, as one process would hold them.

        A collective (all_gather): every rank must call it. Each rank briefly holds the full table.
        """
        state = {}
        own = dict(self.named_buffers())
        for name in self.row_buffers:
            shards = self.comm.all_gather_rows(own[name], tag=f"checkpoint/{name}")
            full = own[name].new_empty((self.num_total_rows, *own[name].shape[1:]))
            for r, shard in enumerate(shards):
                full[r :: self.world_size] = shard
            state[prefix + name] = full
        return state

    def _load_from_state_dict(  # type: ignore[no-untyped-def]
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
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
        else:  # a full table (single-process or gathered checkpoint): keep the owned rows.
            # In place: nn.Module.load_state_dict hands the same (copied) dict to the submodules.
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
        nn.Module._load_from_state_dict(
            self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return (
            f"rank={self.rank}/{self.world_size}, local_rows={self.num_local_rows} of {self.num_total_rows}, "
            f"dim={self.dim}, optimizer={type(self.optimizer).__name__}"
        )


def shard_embeddings(module: nn.Module, comm: Communicator) -> list[str]:
    """Replace every (unsharded) ``EmbeddingCollection`` inside ``module`` by its shard, in place.

    Returns the qualified names of the replaced submodules.
    """
    replaced = []
    for name, child in list(module.named_modules()):
        if isinstance(child, EmbeddingCollection) and not isinstance(child, ShardedEmbeddingCollection):
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
