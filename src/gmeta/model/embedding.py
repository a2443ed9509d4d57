"""Embedding tables for id fields: one concatenated weight, one lookup per meta-batch, row-wise optimizers.

All id fields (``schema.id_fields``: sparse then multi-hot) share one embedding dim ``d`` and live in
ONE weight of shape ``(sum(vocab_sizes), d)``; field ``f`` owns rows ``offsets[f] .. offsets[f] +
vocab_sizes[f] - 1`` (its row 0, the learned OOV row, at ``offsets[f]``). One ``torch.unique`` over the
global ids of a whole meta-batch (support AND query of every task) then serves every field, and a
row-wise sharded version can split these rows across ranks behind the same interface.

Initial rows are a pure function of (``init_seed``, field, row) (``gmeta.model.row_init``), so a table
built whole on one process and one built in row shards on N processes start identical. With
``device="meta"`` nothing is allocated at construction (``materialize`` builds the table later, or
``gmeta.parallel`` builds only a rank's rows): a table larger than one host never exists whole.

The weight is a buffer, not a parameter: ``module.parameters()`` holds only dense weights (for the
dense optimizer and its AllReduce) while the table is updated by its own sparse row-wise optimizer,
whose state is a submodule's buffers and so travels in ``state_dict`` with the weight.

Training flow (the same for the row-wise sharded table in ``gmeta.parallel``)::

    lookup = emb.lookup(batch, loss_weight=n)   # rows: (U, d) leaf tensor, requires_grad
    loss = f(lookup.rows, ...)                  # e.g. gmeta.meta.inner.meta_loss
    (loss * lookup.loss_share).backward()       # lookup.rows.grad: (U, d), summed per unique id
    emb.apply_gradients(lookup)                 # sparse row-wise optimizer step
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gmeta.data.batch import SetBatch, TaskBatch
from gmeta.data.schema import MULTI_HOT_PAD, Schema
from gmeta.model.row_init import fill_normal_rows_

# --------------------------------------------------------------------------------------------------
# Row-wise (sparse) optimizers
# --------------------------------------------------------------------------------------------------


def _subtract_rows_(weight: Tensor, ids: Tensor, update: Tensor, alpha: float = 1.0) -> None:
    """``weight[ids] -= alpha * update`` for unique ``ids``, in place.

    A gather, a subtract and a scatter: on CPU ``index_add_`` runs one thread and was ~6x slower
    (24 ms vs 4 ms for 86k rows of a 2.6M x 64 table, 2 cores). Same values bit for bit.
    """
    weight.index_put_((ids,), weight.index_select(0, ids).sub_(update, alpha=alpha))


class RowWiseOptimizer(nn.Module):
    """Sparse optimizer for the rows of one ``(num_rows, dim)`` table.

    State is kept in buffers indexed by row, so it is checkpointed with the owning module and a
    row-wise shard simply holds the state of its own rows. ``step`` updates exactly the given rows.
    """

    def __init__(self, num_rows: int, dim: int, lr: float) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"{type(self).__name__}: lr must be > 0, got {lr}")
        self.num_rows = num_rows
        self.dim = dim
        self.lr = lr

    def step(self, weight: Tensor, ids: Tensor, grads: Tensor) -> None:
        """Update ``weight[ids]`` in place.

        Args:
            weight: (num_rows, dim) the table.
            ids: (U,) int64 unique row ids (duplicates would be updated once, with one of the grads).
            grads: (U, dim) gradient of each row, already summed over its occurrences.
        """
        raise NotImplementedError


class RowWiseSGD(RowWiseOptimizer):
    """Plain SGD on the touched rows: ``w[r] -= lr * g[r]``."""

    @torch.no_grad()
    def step(self, weight: Tensor, ids: Tensor, grads: Tensor) -> None:
        _subtract_rows_(weight, ids, grads, alpha=self.lr)


class RowWiseAdagrad(RowWiseOptimizer):
    """Row-wise Adagrad (fbgemm's EXACT_ROWWISE_ADAGRAD): one accumulator per row, not per element.

    ``acc[r] += mean(g[r]**2)``; ``w[r] -= lr * g[r] / (sqrt(acc[r]) + eps)``. One scalar per row keeps
    the optimizer state at ``num_rows`` floats instead of a second copy of the table.
    """

    def __init__(
        self,
        num_rows: int,
        dim: int,
        lr: float = 0.05,
        eps: float = 1e-8,
        initial_accumulator_value: float = 0.0,
    ) -> None:
        super().__init__(num_rows, dim, lr)
        self.eps = eps
        self.register_buffer("sum_sq", torch.full((num_rows,), float(initial_accumulator_value)))

    @torch.no_grad()
    def step(self, weight: Tensor, ids: Tensor, grads: Tensor) -> None:
        acc = self.sum_sq[ids] + grads.pow(2).mean(dim=1).to(self.sum_sq.dtype)
        self.sum_sq[ids] = acc
        scale = (self.lr / (acc.sqrt() + self.eps)).to(grads.dtype)
        _subtract_rows_(weight, ids, grads * scale[:, None])


class RowWiseAdam(RowWiseOptimizer):
    """Lazy Adam: element-wise moments, updated only for touched rows, bias-corrected per row.

    Each row counts its own steps, so a row touched k times gets exactly the update dense Adam would
    give it after k steps (rows not touched keep their moments frozen, like ``torch.optim.SparseAdam``
    but with per-row bias correction).
    """

    def __init__(
        self,
        num_rows: int,
        dim: int,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        super().__init__(num_rows, dim, lr)
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = eps
        self.register_buffer("exp_avg", torch.zeros(num_rows, dim))
        self.register_buffer("exp_avg_sq", torch.zeros(num_rows, dim))
        self.register_buffer("steps", torch.zeros(num_rows, dtype=torch.long))

    @torch.no_grad()
    def step(self, weight: Tensor, ids: Tensor, grads: Tensor) -> None:
        b1, b2 = self.betas
        g = grads.to(self.exp_avg.dtype)
        m = self.exp_avg[ids].mul_(b1).add_(g, alpha=1 - b1)
        v = self.exp_avg_sq[ids].mul_(b2).addcmul_(g, g, value=1 - b2)
        t = self.steps[ids] + 1
        self.exp_avg[ids], self.exp_avg_sq[ids], self.steps[ids] = m, v, t
        tf = t.to(m.dtype)[:, None]
        m_hat = m / (1 - b1**tf)
        denom = (v / (1 - b2**tf)).sqrt().add_(self.eps)
        _subtract_rows_(weight, ids, (m_hat / denom).to(weight.dtype), alpha=self.lr)


ROW_OPTIMIZERS: dict[str, type[RowWiseOptimizer]] = {
    "sgd": RowWiseSGD,
    "adagrad": RowWiseAdagrad,
    "adam": RowWiseAdam,
}


def make_row_optimizer(name: str, num_rows: int, dim: int, **kwargs: Any) -> RowWiseOptimizer:
    """Build a row-wise optimizer by name (``sgd``, ``adagrad``, ``adam``)."""
    try:
        cls = ROW_OPTIMIZERS[name]
    except KeyError:
        raise ValueError(
            f"unknown row-wise optimizer {name!r}; expected one of {sorted(ROW_OPTIMIZERS)}"
        ) from None
    return cls(num_rows, dim, **kwargs)


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
    #: how rows travelled (the sharded table keeps its exchange plan here for the backward)
    routing: Any = None

    @property
    def num_rows(self) -> int:
        return int(self.unique_ids.shape[0])


def gather_embeddings(
    rows: Tensor, sparse_idx: Tensor, multi_hot_idx: Tensor, multi_hot_mask: Tensor
) -> Tensor:
    """Embeddings of all id fields from looked-up rows; pure indexing, so it works inside ``vmap``
    and is twice differentiable w.r.t. ``rows`` (no ``embedding_bag``).

    Args:
        rows: (U, d) looked-up rows (or a per-task fast copy of them).
        sparse_idx: (..., Fs) int64 indices into rows.
        multi_hot_idx: (..., Fm, L) int64 indices into rows, U for padding.
        multi_hot_mask: (..., Fm, L) bool, True for real ids.

    Returns:
        (..., Fs + Fm, d): sparse embeddings, then multi-hot fields mean-pooled over their real ids
        (an all-padding list pools to zeros).
    """
    # The appended zero row is what padding indices (U) point at, so a plain sum over L is the
    # masked sum; the mask is only needed for the count.
    padded = torch.cat([rows, rows.new_zeros(1, rows.shape[-1])])
    sparse = padded[sparse_idx]
    summed = padded[multi_hot_idx].sum(dim=-2)
    count = multi_hot_mask.sum(dim=-1, keepdim=True).clamp(min=1).to(rows.dtype)
    return torch.cat([sparse, summed / count], dim=-2)


# --------------------------------------------------------------------------------------------------
# The collection
# --------------------------------------------------------------------------------------------------


class EmbeddingCollection(nn.Module):
    """One embedding table per id field (sparse then multi-hot), stored as one concatenated weight.

    Args:
        vocab_sizes: rows per field, OOV row 0 included, in ``schema.id_fields`` order.
        num_sparse: how many of the leading fields are sparse (the rest are multi-hot).
        dim: embedding dim ``d`` shared by all fields.
        init_std: rows (OOV rows too: they are learned "unknown" rows) start as N(0, init_std^2).
        optimizer: row-wise optimizer name (see ``ROW_OPTIMIZERS``).
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
        self.dim = dim
        self.init_std = init_std
        self.check_ids = check_ids
        self.num_total_rows = sum(self.vocab_sizes)
        self.optimizer_name = optimizer
        self.optimizer_kwargs = dict(optimizer_kwargs or {})
        # drawn outside any device context: a meta "random" number would carry no value
        self.init_seed = int(torch.randint(0, 2**62, ()).item()) if init_seed is None else int(init_seed)

        sizes = torch.tensor(self.vocab_sizes, dtype=torch.long)
        # Derived from the config, so not checkpointed.
        self.register_buffer("offsets", torch.cumsum(sizes, 0) - sizes, persistent=False)
        self.register_buffer("sizes", sizes, persistent=False)
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.register_buffer("weight", torch.empty(self.num_total_rows, dim))
            self.optimizer = make_row_optimizer(optimizer, self.num_total_rows, dim, **self.optimizer_kwargs)
        if not self.weight.is_meta:
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

    @property
    def num_fields(self) -> int:
        return len(self.vocab_sizes)

    # -- construction ---------------------------------------------------------------------------
    def global_rows(self) -> Tensor:
        """(R,) int64 global row id of each row this module holds (all of them here)."""
        return torch.arange(self.num_total_rows)

    @property
    def row_buffers(self) -> list[str]:
        """state_dict keys (relative to this module) of the row-indexed tensors: weight, optimizer state."""
        return ["weight"] + [f"optimizer.{n}" for n, _ in self.optimizer.named_buffers(recurse=False)]

    @property
    def is_materialized(self) -> bool:
        return not self.weight.is_meta

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Every held row to its initial value, N(0, init_std^2) drawn from (init_seed, field, row)."""
        fill_normal_rows_(self.weight, self.init_seed, self.offsets.cpu(), self.global_rows(), self.init_std)

    def new_row_optimizer(self, num_rows: int, like: RowWiseOptimizer) -> RowWiseOptimizer:
        """A fresh row-wise optimizer for ``num_rows`` rows, its state in the dtypes of ``like``'s."""
        optimizer = make_row_optimizer(self.optimizer_name, num_rows, self.dim, **self.optimizer_kwargs)
        dtypes = {n: b.dtype for n, b in like.named_buffers(recurse=False)}
        for name, buf in list(optimizer.named_buffers(recurse=False)):
            setattr(optimizer, name, buf.to(dtypes[name]))
        return optimizer

    @torch.no_grad()
    def materialize(self, init: bool = True) -> None:
        """Allocate a deferred (meta) table and its optimizer state on the CPU, in their dtypes, and
        initialise the rows (``init``; else they are left uninitialised, to be loaded). No-op when built."""
        if self.is_materialized:
            return
        self.weight = torch.empty(self.weight.shape, dtype=self.weight.dtype)
        self.optimizer = self.new_row_optimizer(self.weight.shape[0], like=self.optimizer)
        if init:
            self.reset_parameters()

    # -- lookup ---------------------------------------------------------------------------------
    def find_bad_id(self, s: SetBatch) -> tuple[int, int, int, int] | None:
        """First id of a set outside its field's vocabulary, as (task, sample, field, id), or None.

        One reduction per set; an out-of-range id would otherwise silently read another field's rows.
        """
        sp_sizes = self.sizes[: self.num_sparse]
        mh_sizes = self.sizes[self.num_sparse :]
        sp_bad = (s.sparse < 0) | (s.sparse >= sp_sizes)
        mh_bad = (s.multi_hot < MULTI_HOT_PAD) | (s.multi_hot >= mh_sizes[:, None])
        for bad, base, ids in ((sp_bad, 0, s.sparse), (mh_bad, self.num_sparse, s.multi_hot)):
            if bad.any():
                where = bad.nonzero()[0].tolist()
                return where[0], where[1], base + where[2], int(ids[tuple(where)])
        return None

    def bad_id_message(self, which: str, task: int, sample: int, field: int, value: int) -> str:
        return (
            f"{which} set, task {task}, sample {sample}, field {self.field_names[field]!r}: id "
            f"{value} outside [0, {self.vocab_sizes[field]})"
        )

    def _check(self, s: SetBatch, which: str) -> None:
        bad = self.find_bad_id(s)
        if bad is not None:
            raise ValueError(self.bad_id_message(which, *bad))

    def index(self, batch: TaskBatch) -> tuple[Tensor, LocalIndex, LocalIndex]:
        """The sorted unique global row ids of a batch (support and query, all fields) and each set's
        indices into them (no id validation: see ``find_bad_id``)."""
        fs = self.num_sparse
        sentinel = self.num_total_rows  # larger than any real id, so it sorts last in unique()

        def globalize(s: SetBatch) -> tuple[Tensor, Tensor, Tensor]:
            sparse = s.sparse + self.offsets[:fs]
            valid = s.multi_hot != MULTI_HOT_PAD
            mh = torch.where(valid, s.multi_hot + self.offsets[fs:, None], sentinel)
            return sparse, mh, valid

        parts = [globalize(batch.support), globalize(batch.query)]
        flat = torch.cat([t.reshape(-1) for p in parts for t in p[:2]])
        unique, inverse = torch.unique(flat, sorted=True, return_inverse=True)
        # If padding occurred, the sentinel is the last unique id and its inverse index is already
        # len(real ids) = U, i.e. exactly the pad row gather_embeddings appends.
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

    def lookup(self, batch: TaskBatch, loss_weight: int = 1) -> EmbeddingLookup:
        """Gather the rows of every id in the batch (support and query, all fields) at once.

        Args:
            batch: the meta-batch.
            loss_weight: how many units (real tasks, or samples for plain training) this process's
                loss averages over; the sharded table sums it over ranks so that ``loss_share`` makes
                the ranks' losses add up to the global mean. On one process ``loss_share`` is 1.

        Returns an ``EmbeddingLookup`` whose ``rows`` is a fresh leaf (U, d) tensor with
        ``requires_grad=True``: differentiate the loss w.r.t. it, then ``apply_gradients``.
        """
        if self.check_ids:
            self._check(batch.support, "support")
            self._check(batch.query, "query")
        unique, support, query = self.index(batch)
        rows = self.weight.index_select(0, unique).detach().requires_grad_(True)
        return EmbeddingLookup(unique_ids=unique, rows=rows, support=support, query=query)

    # -- update ---------------------------------------------------------------------------------
    @torch.no_grad()
    def apply_row_gradients(self, unique_ids: Tensor, row_grads: Tensor | None) -> None:
        """Sparse optimizer step on exactly the rows ``unique_ids`` (U,) with grads (U, d).

        ``row_grads`` of ``None`` (rows unused by the loss) is a no-op.
        """
        if row_grads is None or unique_ids.numel() == 0:
            return
        if row_grads.shape != (unique_ids.shape[0], self.dim):
            raise ValueError(
                f"row_grads shape {tuple(row_grads.shape)} != ({unique_ids.shape[0]}, {self.dim})"
            )
        self.optimizer.step(self.weight, unique_ids, row_grads.to(self.weight.dtype))

    def apply_gradients(self, lookup: EmbeddingLookup) -> None:
        """Sparse optimizer step on the rows of ``lookup`` with their gradient ``lookup.rows.grad``."""
        self.apply_row_gradients(lookup.unique_ids, lookup.rows.grad)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        if prefix + "shard_info" in state_dict:
            world, rank, _ = state_dict[prefix + "shard_info"].tolist()
            raise ValueError(
                f"{prefix}: the state holds only the row shard of rank {rank} of {world} (a raw per-rank "
                "state_dict); one process needs the full table: save checkpoints through "
                "HybridParallelStrategy (it gathers the shards) and load those"
            )
        if not self.is_materialized:  # a deferred table: allocate it (initialise only what is not loaded)
            self.materialize(init=prefix + "weight" not in state_dict)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"fields={self.num_fields} (sparse={self.num_sparse}), rows={self.num_total_rows}, dim={self.dim}, "
            f"optimizer={type(self.optimizer).__name__}"
        )
