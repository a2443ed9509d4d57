"""Embedding tables for id fields: one concatenated weight, one lookup per meta-batch, row-wise updates.

All id fields (``schema.id_fields``: sparse then multi-hot) share one embedding dim ``d`` and live in
ONE table of ``sum(vocab_sizes)`` rows (``RowLayout``); field ``f`` owns rows ``offsets[f] ..
offsets[f] + vocab_sizes[f] - 1`` (its row 0, the learned OOV row, at ``offsets[f]``). One
``torch.unique`` over the global ids of a whole meta-batch (support AND query of every task) then
serves every field.

``EmbeddingTable`` is the interface the model, the parallel strategy and checkpoints use. Two
implementations: ``EmbeddingCollection`` holds every row; ``gmeta.parallel.ShardedEmbeddingCollection``
holds one rank's rows (``g % world_size == rank``) and exchanges rows and gradients with AlltoAll.

Initial rows are a pure function of (``init_seed``, field, row) (``gmeta.model.row_init``), so a table
built whole on one process and one built in row shards on N processes start identical. With
``device="meta"`` nothing is allocated at construction (``materialize`` builds the table later, or
``gmeta.parallel`` builds only a rank's rows): a table larger than one host never exists whole.

The weight is a buffer, not a parameter: ``module.parameters()`` holds only dense weights (for the
dense optimizer and its AllReduce) while the table is updated by its own sparse row-wise optimizer
(``gmeta.model.row_optim``), whose state is a submodule's buffers and so travels in ``state_dict``
with the weight.

Training flow (the same for both implementations)::

    lookup = emb.lookup(batch, loss_weight=n)   # rows: (U, d) leaf tensor, requires_grad
    loss = f(lookup, ...)                       # e.g. gmeta.meta.learner.MetaLearner.loss
    (loss * lookup.loss_share).backward()       # lookup.rows.grad: (U, d), summed per unique id
    emb.apply_gradients(lookup)                 # sparse row-wise optimizer step
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from gmeta.data.batch import SetBatch, TaskBatch
from gmeta.data.schema import MULTI_HOT_PAD, Schema
from gmeta.model.row_init import fill_normal_rows_
from gmeta.model.row_optim import RowWiseOptimizer, make_row_optimizer

# --------------------------------------------------------------------------------------------------
# Lookup result and the functional gather
# --------------------------------------------------------------------------------------------------


@dataclass
class LocalIndex:
    """Indices of one set's ids into ``EmbeddingLookup.rows`` (``U`` = the all-zero pad row).

    Attributes:
        sparse: (T, N, Fs) int64 in [0, U).
        multi_hot: (T, N, Fm, L) int64 in [0, U]; U where the batch had padding (-1).
        multi_hot_mask: (T, N, Fm, L) bool, True for real ids.
    """

    sparse: Tensor
    multi_hot: Tensor
    multi_hot_mask: Tensor


@dataclass
class Routing:
    """How one lookup's rows travelled between ranks, kept for the gradient exchange of the same step
    (set by a row-sharded table; None for a table held whole).

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


@dataclass
class EmbeddingLookup:
    """One lookup for a whole meta-batch (support and query of all tasks).

    Attributes:
        unique_ids: (U,) int64 global row ids (field offsets added), sorted.
        rows: (U, d) leaf tensor with ``requires_grad``: ``rows[i]`` is ``weight[unique_ids[i]]``.
            After the outer backward ``rows.grad`` holds each row's gradient summed over all its uses.
        support: local indices of the support set.
        query: local indices of the query set.
    """

    unique_ids: Tensor
    rows: Tensor
    support: LocalIndex
    query: LocalIndex
    #: this process's share of the global loss normaliser (``loss_weight`` of ``lookup`` over the
    #: sum of all ranks' weights); 1.0 on one process. Scale the local mean loss by it before backward.
    loss_share: float = 1.0
    #: how rows travelled (a row-sharded table keeps its exchange plan here for the backward)
    routing: Routing | None = None

    @property
    def num_rows(self) -> int:
        return int(self.unique_ids.shape[0])


# --------------------------------------------------------------------------------------------------
# Row layout: where each field's rows lie, and a batch's ids as rows
# --------------------------------------------------------------------------------------------------

#: the sets of a meta-batch, in the order lookups read them (``BadId.set_index`` counts in it)
SETS = ("support", "query")


def owned_rows(num_rows: int, world_size: int, rank: int) -> int:
    """How many of ``num_rows`` global rows rank ``rank`` holds: the rows ``g`` with ``g % world_size
    == rank`` (every row for a table held whole, rank 0 of 1)."""
    return (num_rows - rank + world_size - 1) // world_size


class BadId(NamedTuple):
    """The first id of a batch outside its field's vocabulary (all ints, so it fits a tensor row)."""

    set_index: int  # into SETS
    task: int
    sample: int
    field: int  # index into the layout's fields
    value: int


class RowLayout(nn.Module):
    """The rows of all id fields (sparse then multi-hot) concatenated into one table of ``num_rows``.

    Field ``f`` owns global rows ``offsets[f] .. offsets[f] + vocab_sizes[f] - 1``. Turns the ids of a
    batch into global rows (``index``) and finds ids outside their field (``first_bad_id``). A module
    only so that ``offsets`` and ``sizes`` follow the table's device; it saves no state (both derive
    from the vocab sizes).

    Args:
        vocab_sizes: rows per field, OOV row 0 included, in ``schema.id_fields`` order.
        num_sparse: how many of the leading fields are sparse (the rest are multi-hot).
        field_names: for error messages (defaults to ``field0``, ``field1``, ...).
    """

    offsets: Tensor
    sizes: Tensor

    def __init__(
        self, vocab_sizes: Sequence[int], num_sparse: int, field_names: Sequence[str] | None = None
    ) -> None:
        super().__init__()
        self.vocab_sizes = tuple(int(v) for v in vocab_sizes)
        self.field_names = (
            tuple(field_names)
            if field_names is not None
            else tuple(f"field{i}" for i in range(len(self.vocab_sizes)))
        )
        if len(self.field_names) != len(self.vocab_sizes):
            raise ValueError(f"{len(self.field_names)} field names for {len(self.vocab_sizes)} vocab sizes")
        bad = [n for n, v in zip(self.field_names, self.vocab_sizes, strict=True) if v < 1]
        if bad:
            raise ValueError(
                f"id field(s) {bad} have vocab_size < 1: encode the data (schema.with_vocab_sizes)"
            )
        if not 0 <= num_sparse <= len(self.vocab_sizes):
            raise ValueError(f"num_sparse={num_sparse} out of range for {len(self.vocab_sizes)} id fields")
        self.num_sparse = num_sparse
        self.num_rows = sum(self.vocab_sizes)
        sizes = torch.tensor(self.vocab_sizes, dtype=torch.long)
        self.register_buffer("offsets", torch.cumsum(sizes, 0) - sizes, persistent=False)
        self.register_buffer("sizes", sizes, persistent=False)

    @property
    def num_fields(self) -> int:
        return len(self.vocab_sizes)

    def _first_bad_id_in(self, s: SetBatch) -> tuple[int, int, int, int] | None:
        """(task, sample, field, id) of the first id of one set outside its field, or None."""
        sp_sizes = self.sizes[: self.num_sparse]
        mh_sizes = self.sizes[self.num_sparse :]
        sp_bad = (s.sparse < 0) | (s.sparse >= sp_sizes)
        mh_bad = (s.multi_hot < MULTI_HOT_PAD) | (s.multi_hot >= mh_sizes[:, None])
        for bad, base, ids in ((sp_bad, 0, s.sparse), (mh_bad, self.num_sparse, s.multi_hot)):
            if bad.any():
                where = bad.nonzero()[0].tolist()
                return where[0], where[1], base + where[2], int(ids[tuple(where)])
        return None

    def first_bad_id(self, batch: TaskBatch) -> BadId | None:
        """The first id of the batch (support, then query) outside its field's vocabulary, or None.

        One reduction per set; an out-of-range id would otherwise silently read another field's rows.
        """
        for set_index, s in enumerate((batch.support, batch.query)):
            found = self._first_bad_id_in(s)
            if found is not None:
                return BadId(set_index, *found)
        return None

    def bad_id_message(self, bad: BadId) -> str:
        return (
            f"{SETS[bad.set_index]} set, task {bad.task}, sample {bad.sample}, field "
            f"{self.field_names[bad.field]!r}: id {bad.value} outside [0, {self.vocab_sizes[bad.field]})"
        )

    def index(self, batch: TaskBatch) -> tuple[Tensor, LocalIndex, LocalIndex]:
        """The sorted unique global row ids of a batch (support and query, all fields) and each set's
        indices into them (no id validation: see ``first_bad_id``)."""
        fs = self.num_sparse
        sentinel = self.num_rows  # larger than any real id, so it sorts last in unique()

        def globalize(s: SetBatch) -> tuple[Tensor, Tensor, Tensor]:
            sparse = s.sparse + self.offsets[:fs]
            valid = s.multi_hot != MULTI_HOT_PAD
            mh = torch.where(valid, s.multi_hot + self.offsets[fs:, None], sentinel)
            return sparse, mh, valid

        parts = [globalize(batch.support), globalize(batch.query)]
        flat = torch.cat([t.reshape(-1) for p in parts for t in p[:2]])
        unique, inverse = torch.unique(flat, sorted=True, return_inverse=True)
        # If padding occurred, the sentinel is the last unique id and its inverse index is already
        # len(real ids) = U: the index one past the rows, which gmeta.model.gather masks out.
        if unique.numel() and int(unique[-1]) == sentinel:
            unique = unique[:-1]

        locals_: list[LocalIndex] = []
        start = 0
        for sparse, mh, valid in parts:
            n_sp, n_mh = sparse.numel(), mh.numel()
            sp_idx = inverse[start : start + n_sp].view_as(sparse)
            mh_idx = inverse[start + n_sp : start + n_sp + n_mh].view_as(mh)
            start += n_sp + n_mh
            locals_.append(LocalIndex(sparse=sp_idx, multi_hot=mh_idx, multi_hot_mask=valid))
        return unique, locals_[0], locals_[1]

    def extra_repr(self) -> str:
        return f"fields={self.num_fields} (sparse={self.num_sparse}), rows={self.num_rows}"


# --------------------------------------------------------------------------------------------------
# The table interface
# --------------------------------------------------------------------------------------------------


class EmbeddingTable(nn.Module, ABC):
    """An embedding table for the id fields of a schema, held whole or in row shards.

    The model, ``HybridParallelStrategy`` and the checkpoint code use only this interface. Rows: the
    table of rank ``rank`` of ``world_size`` holds the global rows ``g`` with ``g % world_size ==
    rank``, local row ``g // world_size`` (a table held whole is rank 0 of 1). ``weight`` (num_local_rows,
    d) holds them and ``optimizer`` (a ``RowWiseOptimizer``) their state: buffers, saved in
    ``state_dict``, never in ``parameters()``.

    Implementations provide ``lookup``, ``apply_gradients``, ``apply_row_gradients``,
    ``full_state_dict`` and ``_prepare_load``; the layout, the initial rows, the row optimizer and
    (deferred) allocation are shared here.

    Args:
        layout: the fields' rows.
        dim: embedding dim ``d`` shared by all fields.
        init_std: rows (OOV rows too: they are learned "unknown" rows) start as N(0, init_std^2).
        optimizer: row-wise optimizer name (see ``gmeta.model.row_optim.ROW_OPTIMIZERS``).
        optimizer_kwargs: its hyper-parameters (e.g. ``lr``, ``eps``).
        check_ids: validate ids against the vocab sizes in ``lookup``.
        init_seed: key of the per-row initial values; None draws one from torch's generator (so
            ``seed_everything`` fixes it).
        rank, world_size: which rows this table holds.
    """

    weight: Tensor
    optimizer: RowWiseOptimizer

    def __init__(
        self,
        layout: RowLayout,
        dim: int,
        *,
        init_std: float,
        optimizer: str,
        optimizer_kwargs: Mapping[str, Any] | None,
        check_ids: bool,
        init_seed: int | None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"{type(self).__name__}: dim must be >= 1, got {dim}")
        if not 0 <= rank < world_size:
            raise ValueError(f"{type(self).__name__}: rank {rank} outside a world of {world_size}")
        self.layout = layout
        self.dim = dim
        self.init_std = init_std
        self.check_ids = check_ids
        self.optimizer_name = optimizer
        self.optimizer_kwargs = dict(optimizer_kwargs or {})
        self.rank, self.world_size = rank, world_size
        # drawn outside any device context: a meta "random" number would carry no value
        self.init_seed = int(torch.randint(0, 2**62, ()).item()) if init_seed is None else int(init_seed)

    # -- layout ---------------------------------------------------------------------------------
    @property
    def vocab_sizes(self) -> tuple[int, ...]:
        return self.layout.vocab_sizes

    @property
    def field_names(self) -> tuple[str, ...]:
        return self.layout.field_names

    @property
    def num_sparse(self) -> int:
        return self.layout.num_sparse

    @property
    def num_fields(self) -> int:
        return self.layout.num_fields

    @property
    def num_total_rows(self) -> int:
        """Rows of the whole table, all ranks together."""
        return self.layout.num_rows

    @property
    def offsets(self) -> Tensor:
        """(F,) int64 first global row of each field."""
        return self.layout.offsets

    @property
    def num_local_rows(self) -> int:
        """Rows this table holds."""
        return owned_rows(self.num_total_rows, self.world_size, self.rank)

    def global_rows(self) -> Tensor:
        """(R,) int64 global row id of each local row: ``rank, rank + world_size, ...``."""
        return torch.arange(self.rank, self.num_total_rows, self.world_size)

    def index(self, batch: TaskBatch) -> tuple[Tensor, LocalIndex, LocalIndex]:
        """See ``RowLayout.index``."""
        return self.layout.index(batch)

    # -- rows and their optimizer state ---------------------------------------------------------
    def row_state(self) -> dict[str, Tensor]:
        """The row-indexed tensors (weight, optimizer state) by ``state_dict`` key relative to this
        module: what shards, gathers and checkpoints move row by row."""
        state = {"weight": self.weight}
        state.update({f"optimizer.{n}": b for n, b in self.optimizer.named_buffers(recurse=False)})
        return state

    @property
    def row_buffers(self) -> list[str]:
        """The keys of ``row_state``."""
        return list(self.row_state())

    @property
    def row_bytes(self) -> int:
        """Bytes of one row: its weight and its optimizer state."""
        return sum(math.prod(t.shape[1:]) * t.element_size() for t in self.row_state().values())

    @property
    def is_materialized(self) -> bool:
        return not self.weight.is_meta

    def new_row_optimizer(self, num_rows: int, like: RowWiseOptimizer | None = None) -> RowWiseOptimizer:
        """A fresh row-wise optimizer for ``num_rows`` rows, its state in the dtypes of ``like``'s."""
        optimizer = make_row_optimizer(self.optimizer_name, num_rows, self.dim, **self.optimizer_kwargs)
        if like is not None:
            dtypes = {n: b.dtype for n, b in like.named_buffers(recurse=False)}
            for name, buf in list(optimizer.named_buffers(recurse=False)):
                setattr(optimizer, name, buf.to(dtypes[name]))
        return optimizer

    def _allocate_rows(
        self,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        like: RowWiseOptimizer | None = None,
    ) -> None:
        """New, uninitialised ``weight`` (num_local_rows, d) and fresh optimizer state for it."""
        with torch.device(device) if device is not None else contextlib.nullcontext():
            weight = torch.empty(self.num_local_rows, self.dim, dtype=dtype)
            self.optimizer = self.new_row_optimizer(self.num_local_rows, like=like)
        self.register_buffer("weight", weight)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Every held row to its initial value, N(0, init_std^2) drawn from (init_seed, field, row)."""
        fill_normal_rows_(self.weight, self.init_seed, self.offsets.cpu(), self.global_rows(), self.init_std)

    @torch.no_grad()
    def materialize(self, init: bool = True) -> None:
        """Allocate a deferred (meta) table's rows and optimizer state on the CPU, in their dtypes, and
        initialise the rows (``init``; else they are left uninitialised, to be loaded). No-op when built."""
        if self.is_materialized:
            return
        self._allocate_rows(dtype=self.weight.dtype, like=self.optimizer)
        if init:
            self.reset_parameters()

    def _check_row_grads(self, unique_ids: Tensor, row_grads: Tensor) -> None:
        if unique_ids.dim() != 1 or row_grads.shape != (unique_ids.shape[0], self.dim):
            raise ValueError(
                f"{type(self).__name__}.apply_row_gradients: row_grads shape {tuple(row_grads.shape)} != "
                f"({unique_ids.shape[0]}, {self.dim}) for unique_ids of shape {tuple(unique_ids.shape)}"
            )

    # -- what implementations provide -----------------------------------------------------------
    @abstractmethod
    def lookup(self, batch: TaskBatch, loss_weight: int = 1) -> EmbeddingLookup:
        """Gather the rows of every id in the batch (support and query, all fields) at once.

        Args:
            batch: the meta-batch.
            loss_weight: how many units (real tasks, or samples for plain training) this process's
                loss averages over; a sharded table sums it over ranks so that ``loss_share`` makes
                the ranks' losses add up to the global mean. On one process ``loss_share`` is 1.

        Returns an ``EmbeddingLookup`` whose ``rows`` is a fresh leaf (U, d) tensor with
        ``requires_grad=True``: differentiate the loss w.r.t. it, then ``apply_gradients``.
        Raises ``ValueError`` naming the set, task, sample and field of an id outside its vocabulary.
        """

    @abstractmethod
    def apply_gradients(self, lookup: EmbeddingLookup) -> None:
        """Row-wise optimizer step on the rows of ``lookup`` (of this table) with ``lookup.rows.grad``
        (None: the loss did not use them), summed per row over everything that looked them up."""

    @abstractmethod
    def apply_row_gradients(self, unique_ids: Tensor, row_grads: Tensor | None) -> None:
        """Row-wise optimizer step on the global rows ``unique_ids`` (U,), unique, with their
        gradients ``row_grads`` (U, d); None is a step with no gradient."""

    @abstractmethod
    def full_state_dict(self, prefix: str = "") -> dict[str, Tensor]:
        """``row_state`` of the whole table (every rank's rows, in global row order), keyed
        ``prefix + key``: what one process holding the whole table would save."""

    @abstractmethod
    def _prepare_load(self, state_dict: dict[str, Any], prefix: str) -> None:
        """Check the rows of ``state_dict`` under ``prefix`` and turn them into this table's own, in
        place (``load_state_dict`` then copies them)."""

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        self._prepare_load(state_dict, prefix)
        if not self.is_materialized:  # a deferred table: allocate it (initialise only what is not loaded)
            self.materialize(init=prefix + "weight" not in state_dict)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


# --------------------------------------------------------------------------------------------------
# The table held whole
# --------------------------------------------------------------------------------------------------


class EmbeddingCollection(EmbeddingTable):
    """Every row of the table on this process (torchrec's name for a set of embedding tables).

    Args:
        vocab_sizes: rows per field, OOV row 0 included, in ``schema.id_fields`` order.
        num_sparse: how many of the leading fields are sparse (the rest are multi-hot).
        dim: embedding dim ``d`` shared by all fields.
        init_std: rows (OOV rows too: they are learned "unknown" rows) start as N(0, init_std^2).
        optimizer: row-wise optimizer name (see ``gmeta.model.row_optim.ROW_OPTIMIZERS``).
        optimizer_kwargs: its hyper-parameters (e.g. ``lr``, ``eps``).
        field_names: for error messages (defaults to ``field0``, ``field1``, ...).
        check_ids: validate ids against the vocab sizes in ``lookup`` (one reduction per set; an
            out-of-range id would otherwise silently read another field's rows).
        init_seed: key of the per-row initial values; None draws one from torch's generator (so
            ``seed_everything`` fixes it). ``HybridParallelStrategy`` makes every rank use rank 0's.
        device: ``"meta"`` defers allocation of the table and its optimizer state (``materialize``).
    """

    def __init__(
        self,
        vocab_sizes: Sequence[int],
        num_sparse: int,
        dim: int,
        init_std: float = 0.01,
        optimizer: str = "adagrad",
        optimizer_kwargs: Mapping[str, Any] | None = None,
        field_names: Sequence[str] | None = None,
        check_ids: bool = True,
        init_seed: int | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__(
            RowLayout(vocab_sizes, num_sparse, field_names),
            dim,
            init_std=init_std,
            optimizer=optimizer,
            optimizer_kwargs=optimizer_kwargs,
            check_ids=check_ids,
            init_seed=init_seed,
        )
        self._allocate_rows(device=device)
        if self.is_materialized:
            self.reset_parameters()

    @classmethod
    def from_schema(cls, schema: Schema, dim: int, **kwargs: Any) -> EmbeddingCollection:
        """Tables for ``schema.id_fields`` (vocab sizes must be set)."""
        fields = schema.id_fields
        return cls(
            vocab_sizes=[f.vocab_size for f in fields],
            num_sparse=len(schema.sparse),
            dim=dim,
            field_names=[f.name for f in fields],
            **kwargs,
        )

    def lookup(self, batch: TaskBatch, loss_weight: int = 1) -> EmbeddingLookup:
        """See ``EmbeddingTable.lookup``: an index_select of the held rows (``loss_weight`` unused)."""
        if self.check_ids:
            bad = self.layout.first_bad_id(batch)
            if bad is not None:
                raise ValueError(self.layout.bad_id_message(bad))
        unique, support, query = self.layout.index(batch)
        rows = self.weight.index_select(0, unique).detach().requires_grad_(True)
        return EmbeddingLookup(unique_ids=unique, rows=rows, support=support, query=query)

    @torch.no_grad()
    def apply_row_gradients(self, unique_ids: Tensor, row_grads: Tensor | None) -> None:
        """Sparse optimizer step on exactly the rows ``unique_ids`` (U,) with grads (U, d).

        ``row_grads`` of ``None`` (rows unused by the loss) is a no-op.
        """
        if row_grads is None or unique_ids.numel() == 0:
            return
        self._check_row_grads(unique_ids, row_grads)
        self.optimizer.step(self.weight, unique_ids, row_grads.to(self.weight.dtype))

    def apply_gradients(self, lookup: EmbeddingLookup) -> None:
        """Sparse optimizer step on the rows of ``lookup`` with their gradient ``lookup.rows.grad``."""
        if lookup.routing is not None:
            raise ValueError(
                "this lookup came from a row-sharded table (it carries a Routing): apply its gradients "
                "through that table"
            )
        self.apply_row_gradients(lookup.unique_ids, lookup.rows.grad)

    def full_state_dict(self, prefix: str = "") -> dict[str, Tensor]:
        """The held rows are the whole table."""
        return {prefix + key: value for key, value in self.row_state().items()}

    def _prepare_load(self, state_dict: dict[str, Any], prefix: str) -> None:
        if prefix + "shard_info" in state_dict:
            world, rank, _ = state_dict[prefix + "shard_info"].tolist()
            raise ValueError(
                f"{prefix}: the state holds only the row shard of rank {rank} of {world} (a raw per-rank "
                "state_dict); one process needs the full table: save checkpoints through "
                "HybridParallelStrategy (it gathers the shards) and load those"
            )

    def extra_repr(self) -> str:  # the fields and rows: the layout's
        return f"dim={self.dim}, optimizer={type(self.optimizer).__name__}"
