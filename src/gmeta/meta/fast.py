"""Fast meta step: the inner loop of MAML / FOMAML / ANIL in closed form on the DLRM towers.

No per-task copy of any weight is ever built. For a linear layer ``z = W x + b`` one inner SGD step
on task t's support loss gives ``W_t = W - lr * D_t^T X_t`` and ``b_t = b - lr * 1^T D_t``, where
``X_t`` (S, in) are the layer's support inputs and ``D_t`` (S, out) the support loss gradients w.r.t.
its outputs. After k steps the per-task weight is ``W - lr * sum_j D_j^T X_j``, so the layer at the
adapted weights is

    z = W x + b - lr * (x X_t^T + 1) D_t        with X_t, D_t the (T, k*S, .) factors of all steps,

a shared matrix product for all tasks plus two small per-task (M x kS) products. The inner gradients
(``D``, and the embedding gradients for adapted rows) are written out by hand as ordinary tensor ops
(the backward pass of the towers), so second-order MAML is one plain ``loss.backward()`` through them
(no ``create_graph``, no ``vmap``); first order runs them without a graph at all.

Redundant passes are avoided: the support forward at the shared weights (inner step 0) gives the
support loss term and the stats; the inner backward only computes the input gradients a lower adapted
layer needs (for the bottom tower through a ``dot`` interaction that is d + n - 1 of the top tower's
input columns, not all of them); ANIL (bottom and embeddings shared) computes the interaction once;
the ``dot`` interaction's backward uses the symmetry of ``V V^T`` (one batched product instead of two,
a large share of a plain step on CPU).

Adapted embedding rows (``adapt_embeddings``) are kept per (task, row) pair that occurs in the task's
support set, not as a (U, d) copy per task: a query id of task t reads ``rows[id]`` plus the task's
delta for that id, or no delta if the task's support never used it.

Supported: ``DLRM`` towers built by ``gmeta.model.dlrm.mlp`` (Linear/ReLU stacks), ``dot`` or
``concat`` interaction, with or without a bottom tower, any ``adapt_groups``, ``inner_steps >= 0``,
first or second order, ``adapt_embeddings``. ``towers_of`` returns None for anything else, and the
caller (``gmeta.meta.inner``) then uses the vmap path.

Shapes: T tasks, S / Q / M padded samples per set, U looked-up rows, F id fields, d embedding dim,
n = F + 1 vectors in the interaction (F without a bottom tower), P the top tower's input width.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from gmeta.data.batch import SetBatch, TaskBatch
from gmeta.model.dlrm import DLRM
from gmeta.model.embedding import EmbeddingLookup, LocalIndex

# --------------------------------------------------------------------------------------------------
# The towers as a list of linear layers
# --------------------------------------------------------------------------------------------------


@dataclass
class Layer:
    """One linear layer: ``weight`` (out, in), ``bias`` (out,), whether the inner loop adapts it."""

    weight: Tensor
    bias: Tensor
    adapted: bool


@dataclass
class Towers:
    """The DLRM towers at some parameter values (attached or detached)."""

    bottom: list[Layer]  # ReLU after every layer (the last one too)
    top: list[Layer]  # ReLU between layers, the last one gives the logit
    interaction: str
    dim: int
    num_fields: int
    pairs: Tensor | None  # dot: (2, n(n-1)/2) flat indices i*n+j and j*n+i (i < j) of (n, n) products

    @property
    def has_bottom(self) -> bool:
        return bool(self.bottom)

    @property
    def n_vec(self) -> int:
        return self.num_fields + (1 if self.has_bottom else 0)

    def _map(self, f: Callable[[Tensor], Tensor]) -> Towers:
        def each(layers: list[Layer]) -> list[Layer]:
            return [Layer(f(x.weight), f(x.bias), x.adapted) for x in layers]

        return Towers(
            each(self.bottom), each(self.top), self.interaction, self.dim, self.num_fields, self.pairs
        )

    def detached(self) -> Towers:
        return self._map(Tensor.detach)

    def to(self, dtype: torch.dtype) -> Towers:
        """The towers with every weight cast to ``dtype`` (differentiable: gradients reach the
        original weights in their own dtype)."""
        return self._map(lambda t: t.to(dtype))


def _linear_names(seq: nn.Sequential | None, prefix: str, last_relu: bool) -> list[str] | None:
    """Param name prefixes of the Linear layers of a Linear/ReLU stack; None if it is not one."""
    if seq is None:
        return []
    mods = list(seq)
    names = []
    for i, m in enumerate(mods):
        if isinstance(m, nn.Linear):
            if m.bias is None:
                return None
            after = mods[i + 1] if i + 1 < len(mods) else None
            is_last = not any(isinstance(x, nn.Linear) for x in mods[i + 1 :])
            wants_relu = last_relu or not is_last
            if wants_relu != isinstance(after, nn.ReLU):
                return None
            names.append(f"{prefix}.{i}")
        elif not isinstance(m, nn.ReLU):
            return None
    return names


def towers_of(model: nn.Module, params: Mapping[str, Tensor], adapt_groups: tuple[str, ...]) -> Towers | None:
    """The towers of a ``DLRM`` at ``params`` (missing names: the module's own), or None if the model
    is not a structure the fast path knows (then use the vmap path)."""
    if not isinstance(model, DLRM) or model.interaction not in ("dot", "concat"):
        return None
    bottom = _linear_names(model.bottom, "bottom", last_relu=True)
    top = _linear_names(model.top, "top", last_relu=False)
    if bottom is None or top is None or not top:
        return None
    own = dict(model.named_parameters())

    def layers(names: list[str], group: str) -> list[Layer]:
        get = lambda k: params[k] if k in params else own[k]  # noqa: E731
        return [Layer(get(f"{p}.weight"), get(f"{p}.bias"), group in adapt_groups) for p in names]

    pairs = None
    if model.interaction == "dot":
        n = model.num_fields + (1 if model.bottom is not None else 0)
        i, j = model.triu_rows, model.triu_cols
        pairs = torch.stack([i * n + j, j * n + i])
    return Towers(
        layers(bottom, "bottom"), layers(top, "top"), model.interaction, model.dim, model.num_fields, pairs
    )


# --------------------------------------------------------------------------------------------------
# Dot interaction with a symmetric backward
# --------------------------------------------------------------------------------------------------


def _sym_from_pairs(g: Tensor, pairs: Tensor, n: int) -> Tensor:
    """(M, n(n-1)/2) pair values -> (M, n, n) symmetric matrix with them at (i, j) and (j, i).

    ``pairs``: (2, n(n-1)/2) flat indices i*n+j and j*n+i of the pairs (i < j).
    """
    m = g.new_zeros(g.shape[0], n * n)
    m.index_copy_(1, pairs[0], g)
    m.index_copy_(1, pairs[1], g)
    return m.view(-1, n, n)


_SYM_CHUNK = 1024  # rows of G built at a time by _sym_bmm


def _sym_bmm(gp: Tensor, pairs: Tensor, x: Tensor) -> Tensor:
    """``(G + G^T) x`` for (M, n(n-1)/2) pair values ``gp`` and (M, n, k) ``x``: (M, n, k).

    G is built ``_SYM_CHUNK`` rows at a time: the whole (M, n, n) matrix (11 MB for criteo's 4,096
    support samples) would be a temporary at the memory peak of the backward. Unchunked when a graph
    is recorded (``out=`` cannot be differentiated).
    """
    n, m = x.shape[1], x.shape[0]
    if torch.is_grad_enabled() or m <= _SYM_CHUNK:
        return torch.bmm(_sym_from_pairs(gp, pairs, n), x)
    out = x.new_empty(m, n, x.shape[2])
    for a in range(0, m, _SYM_CHUNK):
        b = min(a + _SYM_CHUNK, m)
        torch.bmm(_sym_from_pairs(gp[a:b], pairs, n), x[a:b], out=out[a:b])
    return out


class _DotFeatures(torch.autograd.Function):
    """(M, n, d) vectors -> (M, off + n(n-1)/2) top-tower inputs: ``v[:, 0]`` (the bottom output,
    ``off`` = d; 0 without a bottom tower), then the pairwise dot products (strict upper triangle).

    autograd's own backward of ``v @ v.mT`` does two batched products, one with a transposed operand
    (slow on CPU); this one uses ``dv = (G + G^T) v`` (``_DotGrad``).
    """

    @staticmethod
    def forward(v: Tensor, pairs: Tensor, off: int) -> Tensor:  # type: ignore[override]
        n = v.shape[1]
        prods = torch.bmm(v, v.transpose(1, 2)).view(-1, n * n).index_select(1, pairs[0])
        return torch.cat([v[:, 0], prods], dim=1) if off else prods

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        v, pairs, off = inputs
        ctx.save_for_backward(v, pairs)
        ctx.off = off

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        v, pairs = ctx.saved_tensors
        return _DotGrad.apply(v, g, pairs, ctx.off), None, None


class _DotGrad(torch.autograd.Function):
    """The backward of ``_DotFeatures`` as a differentiable op: (v, g) -> dv.

    ``dv = (G + G^T) v`` with G the pair gradients ``g[:, off:]`` placed at (i, j), plus ``g[:, :off]``
    on ``dv[:, 0]``. The inner loop calls it for the support gradients w.r.t. the interaction's
    inputs; the outer backward of second-order MAML differentiates it once: d v = (G + G^T) dout, and
    dg[(i, j)] = (dout v^T)[i, j] + (dout v^T)[j, i], dg[:, :off] = dout[:, 0].
    """

    @staticmethod
    def forward(v: Tensor, g: Tensor, pairs: Tensor, off: int) -> Tensor:  # type: ignore[override]
        out = _sym_bmm(g[:, off:], pairs, v)
        if off:
            out[:, 0] += g[:, :off]
        return out

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        v, g, pairs, off = inputs
        ctx.save_for_backward(v, g, pairs)
        ctx.off = off

    @staticmethod
    def backward(ctx, dout: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:  # type: ignore[override]
        v, g, pairs = ctx.saved_tensors
        n, off = v.shape[1], ctx.off
        dv = dg = None
        if ctx.needs_input_grad[0]:
            dv = _sym_bmm(g[:, off:], pairs, dout)
        if ctx.needs_input_grad[1]:
            p = torch.bmm(dout, v.transpose(1, 2)).view(-1, n * n)
            dp = p.index_select(1, pairs[0]) + p.index_select(1, pairs[1])
            dg = torch.cat([dout[:, 0], dp], dim=1) if off else dp
        return dv, dg, None, None


class _PairsOfFirst(torch.autograd.Function):
    """(M, n-1) weights, (M, n, d) vectors -> (M, d) weighted sum of vectors 1..n-1 (the bottom
    output's gradient from its dot pairs (0, j), whose derivative w.r.t. v_0 is v_j).

    It takes all n vectors, not the slice ``v[:, 1:]``: the interaction's backward saves ``v``
    anyway, and the gradient of a slice would be materialized as a second full-size tensor. The
    backward's outer product is a broadcast multiply: as a batched product with an inner dimension
    of 1 it is several times slower on CPU."""

    @staticmethod
    def forward(w: Tensor, v: Tensor) -> Tensor:  # type: ignore[override]
        return torch.bmm(w.unsqueeze(1), v[:, 1:]).squeeze(1)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, dout: Tensor) -> tuple[Tensor | None, Tensor | None]:  # type: ignore[override]
        w, v = ctx.saved_tensors
        dw = dv = None
        if ctx.needs_input_grad[0]:
            dw = torch.bmm(v[:, 1:], dout.unsqueeze(-1)).squeeze(-1)
        if ctx.needs_input_grad[1]:  # weight 0 for v_0: one (M, n, d) gradient, no slice to fill
            w0 = torch.nn.functional.pad(w, (1, 0))
            dv = w0.unsqueeze(-1) * dout.unsqueeze(1)
        return dw, dv


class _Gather(torch.autograd.Function):
    """Rows of a (R, d) table at several flat index tensors (one output each).

    The backward is one ``index_add`` per output into one zero (R, d) gradient: autograd's own
    ``index_select`` backward builds an expanded (N, d) index for a ``scatter_add``, and slicing one
    gathered tensor into parts would allocate a full-size zero gradient per part.
    """

    @staticmethod
    def forward(table: Tensor, *idx: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        return tuple(table.index_select(0, i) for i in idx)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        table, *idx = inputs
        ctx.save_for_backward(*idx)
        ctx.table_shape = table.shape
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        idx = ctx.saved_tensors
        out = None
        for i, g in zip(idx, grads, strict=True):
            if g is None:
                continue
            if out is None:
                out = g.new_zeros(ctx.table_shape)
            # out of place when a graph of the backward is asked for (double backward)
            out = out.index_add(0, i, g) if torch.is_grad_enabled() else out.index_add_(0, i, g)
        return (out, *([None] * len(idx)))


# --------------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------------


@dataclass
class SetIndex:
    """One set's ids as weighted row indices (multi-hot mean pooling as weights, padding weight 0).

    sparse: (T, M, Fs) int64; multi_hot: (T, M, Fm, L) int64 (padding clamped to a valid row);
    weight: (T, M, Fm, L) float, mask / count.
    """

    sparse: Tensor
    multi_hot: Tensor
    weight: Tensor

    @property
    def has_multi_hot(self) -> bool:
        return self.multi_hot.shape[-2] > 0 and self.multi_hot.shape[-1] > 0


def set_index(idx: LocalIndex, dtype: torch.dtype, pad_row: int = 0) -> SetIndex:
    mask = idx.multi_hot_mask
    count = mask.sum(-1, keepdim=True).clamp(min=1).to(dtype)
    weight = mask.to(dtype) / count
    mh = torch.where(mask, idx.multi_hot, pad_row)
    return SetIndex(idx.sparse, mh, weight)


def _pool(mh: Tensor, ix: SetIndex) -> Tensor:
    d = mh.shape[-1]
    return (mh.view(*ix.multi_hot.shape, d) * ix.weight.unsqueeze(-1)).sum(-2)


def gather(table: Tensor, ix: SetIndex) -> Tensor:
    """(T, M, F, d) embeddings from a (R, d) table: sparse rows, then weighted sums of multi-hot rows.

    Rows are gathered with ``index_select`` (``_Gather``: one ``index_add`` in the backward) rather
    than advanced indexing into a padded copy of the table.
    """
    return gather_sets(table, ix)[0]


def gather_sets(table: Tensor, *sets: SetIndex) -> tuple[Tensor, ...]:
    """``gather`` of several sets with one ``_Gather`` (one zero gradient table in the backward)."""
    d = table.shape[-1]
    idx = []
    for ix in sets:
        idx.append(ix.sparse.reshape(-1))
        if ix.has_multi_hot:
            idx.append(ix.multi_hot.reshape(-1))
    got = iter(_Gather.apply(table, *idx))
    out = []
    for ix in sets:
        sp = next(got).view(*ix.sparse.shape, d)
        out.append(torch.cat([sp, _pool(next(got), ix)], dim=-2) if ix.has_multi_hot else sp)
    return tuple(out)


@dataclass
class TaskRows:
    """Per-task adapted rows: the (task, row) pairs of the support sets, C of them.

    support / query: the sets' indices into the (C + 1, d) delta table (C = a zero row for query ids
    that the task's support never used, and for padding).
    """

    num: int
    support: SetIndex
    query: SetIndex


def task_rows(sup: SetIndex, qry: SetIndex, num_rows: int) -> TaskRows:
    T = sup.sparse.shape[0]
    stride = num_rows + 1
    base = torch.arange(T, device=sup.sparse.device) * stride

    def keys(ix: SetIndex) -> tuple[Tensor, Tensor]:
        return (
            ix.sparse + base.view(T, *([1] * (ix.sparse.dim() - 1))),
            ix.multi_hot + base.view(T, *([1] * (ix.multi_hot.dim() - 1))),
        )

    s_sp, s_mh = keys(sup)
    uniq, inv = torch.unique(torch.cat([s_sp.reshape(-1), s_mh.reshape(-1)]), return_inverse=True)
    c = int(uniq.numel())
    n_sp = s_sp.numel()
    s_ix = SetIndex(inv[:n_sp].view_as(s_sp), inv[n_sp:].view_as(s_mh), sup.weight)

    def lookup(k: Tensor) -> Tensor:
        if c == 0:
            return torch.zeros_like(k)
        pos = torch.searchsorted(uniq, k.reshape(-1)).clamp_(max=c - 1)
        return torch.where(uniq[pos] == k.reshape(-1), pos, c).view_as(k)

    q_sp, q_mh = keys(qry)
    q_ix = SetIndex(lookup(q_sp), lookup(q_mh), qry.weight)
    return TaskRows(c, s_ix, q_ix)


# --------------------------------------------------------------------------------------------------
# Forward and inner backward of the towers
# --------------------------------------------------------------------------------------------------

Factors = tuple[Tensor, Tensor]  # X (T, R, in), D (T, R, out)


@dataclass
class State:
    """What the inner loop has learned so far.

    factors: per low-rank adapted layer (index into bottom + top), the stacked (X, D) of all steps.
    weights: per materialized layer, the (T, out, in) weights and (T, out) biases of the tasks.
    row_delta: (C + 1, d) deltas of the tasks' own rows (``TaskRows``).
    """

    factors: dict[int, Factors] = field(default_factory=dict)
    weights: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    row_delta: Tensor | None = None

    def update(self, i: int, layer: Layer, x: Tensor, d: Tensor, lr: float, materialize: bool) -> None:
        """Add one SGD step with support inputs x (T, S, in) and output gradients d (T, S, out)."""
        if not materialize:
            self.factors[i] = _grow(self.factors.get(i), (x, d))
            return
        w, b = self.weights.get(i, (layer.weight.unsqueeze(0), layer.bias.unsqueeze(0)))
        self.weights[i] = (torch.baddbmm(w, d.transpose(1, 2), x, alpha=-lr), b - lr * d.sum(1))


def materialize_layer(layer: Layer, rows: int) -> bool:
    """Per-task weights beat the low-rank form when the factor rows (steps x support) cost more per
    sample than twice the weight: rows * (in + out) > 2 * in * out. The factor 2: per-task weights
    are (T, out, in) tensors built, kept and reduced (their gradient summed over tasks) at memory
    speed, while the factors only feed small GEMMs (criteo's 13->256 layer with 16 support rows:
    4,304 vs 3,328 per sample, measured ~5% faster as low-rank on CPU)."""
    out_f, in_f = layer.weight.shape
    return rows * (in_f + out_f) > 2 * in_f * out_f


def linear(x: Tensor, layer: Layer, st: State, i: int, lr: float) -> Tensor:
    """(T, M, in) -> (T, M, out) at each task's adapted weights (the shared ones if not adapted)."""
    T, M, _ = x.shape
    if i in st.weights:
        w, b = st.weights[i]
        return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))
    fac = st.factors.get(i)
    if fac is None:
        return torch.addmm(layer.bias, x.reshape(T * M, -1), layer.weight.t()).view(T, M, -1)
    z = _unsafe_view(torch.addmm(layer.bias, x.reshape(T * M, -1), layer.weight.t()), (T, M, -1))
    X, D = fac
    return _LowRank.apply(z, x, X, D, lr, True)


def linear_input_grad(delta: Tensor, layer: Layer, st: State, i: int, lr: float, cols: int | None) -> Tensor:
    """(T, S, out) output gradients -> (T, S, cols) gradients w.r.t. the first ``cols`` inputs."""
    T, S, _ = delta.shape
    if i in st.weights:
        w = st.weights[i][0]
        return torch.bmm(delta, w if cols is None else w[..., :cols])
    w = layer.weight if cols is None else layer.weight[:, :cols]
    fac = st.factors.get(i)
    if fac is None:
        return (delta.reshape(T * S, -1) @ w).view(T, S, -1)
    g = _unsafe_view(delta.reshape(T * S, -1) @ w, (T, S, -1))
    X, D = fac
    if cols is not None:
        X = X[..., :cols]
    return _LowRank.apply(g, delta, D, X, lr, False)


class _LowRank(torch.autograd.Function):
    """``base - lr * (x Y^T [+ 1]) V``, added in place to ``base`` (a fresh shared product): the
    per-task correction of a low-rank adapted layer. x: (T, M, k), Y: (T, R, k), V: (T, R, n).

    Its own backward so that every gradient is a batched product in row-major layout: autograd's
    backward of ``x @ Y.mT`` gives dY as the transpose of a product, and the strided gradients made
    the ops downstream (gradient sums, ReLU masks) several times slower (criteo MAML: ~13 ms of
    strided elementwise work per step).
    """

    @staticmethod
    def forward(ctx, base: Tensor, x: Tensor, Y: Tensor, V: Tensor, lr: float, plus_one: bool) -> Tensor:  # type: ignore[override]
        a = torch.bmm(x, Y.transpose(1, 2))
        if plus_one:
            a.add_(1.0)
        ctx.mark_dirty(base)
        ctx.save_for_backward(x, Y, V, a)  # a: (T, M, R), small
        ctx.lr = lr
        return base.baddbmm_(a, V, alpha=-lr)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, Y, V, a = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx = dY = dV = None
        if need[1] or need[2]:
            # -lr folded into the small (T, M, R) factor, not the large results
            da = torch.bmm(g, V.transpose(1, 2)).mul_(-ctx.lr)
            if need[1]:
                dx = torch.bmm(da, Y)
            if need[2]:
                dY = torch.bmm(da.transpose(1, 2), x)
        if need[3]:
            dV = torch.bmm(a.transpose(1, 2).mul(-ctx.lr), g)
        return g, dx, dY, dV, None, None


def _unsafe_view(x: Tensor, shape: tuple[int, ...]) -> Tensor:
    """``x.view(shape)`` that autograd does not track as a view (as ``torch.matmul`` does), so the
    low-rank correction can be added in place (``baddbmm_``) without copying the shared product:
    an in-place op on a tracked view would clone the gradient in the backward (``CopySlices``).
    Only for fresh results of ops that do not save their output (``mm``/``addmm``)."""
    return torch.ops.aten._unsafe_view(x, shape)


@dataclass
class Cache:
    """A set's forward at some state: each layer's input, the interaction's vectors, the logits."""

    bottom_in: list[Tensor]
    bottom_out: Tensor | None
    emb: Tensor
    top_in: list[Tensor]
    logits: Tensor
    vecs: Tensor | None = None  # dot: (T*M, n, d)


def interaction(tw: Towers, bottom_out: Tensor | None, emb: Tensor) -> tuple[Tensor, Tensor | None]:
    """(T, M, P) top-tower inputs, and the (T*M, n, d) vectors for ``dot``."""
    T, M, F, d = emb.shape
    vecs = emb if bottom_out is None else torch.cat([bottom_out.unsqueeze(-2), emb], dim=-2)
    if tw.interaction == "concat":
        return vecs.reshape(T, M, -1), None
    assert tw.pairs is not None
    v = vecs.reshape(T * M, vecs.shape[-2], d)
    feats = _DotFeatures.apply(v, tw.pairs, 0 if bottom_out is None else d).view(T, M, -1)
    return feats, v


def forward_set(
    tw: Towers,
    st: State,
    lr: float,
    emb: Tensor,
    dense: Tensor,
    feats: tuple[Tensor, Tensor | None, Tensor | None] | None = None,
) -> Cache:
    """Logits of a (T, M) set at the state's adapted weights; ``feats`` reuses a computed
    (top input, vecs, bottom output) when neither the bottom tower nor the embeddings adapt."""
    n_bottom = len(tw.bottom)
    bottom_in: list[Tensor] = []
    bottom_out = None
    if feats is None:
        if tw.has_bottom:
            h = dense
            for i, layer in enumerate(tw.bottom):
                bottom_in.append(h)
                h = torch.relu(linear(h, layer, st, i, lr))
            bottom_out = h
        x, vecs = interaction(tw, bottom_out, emb)
    else:
        x, vecs, bottom_out = feats
    top_in = []
    for j, layer in enumerate(tw.top):
        top_in.append(x)
        x = linear(x, layer, st, n_bottom + j, lr)
        if j < len(tw.top) - 1:
            x = torch.relu(x)
    return Cache(bottom_in, bottom_out, emb, top_in, x.squeeze(-1), vecs)


@dataclass
class InnerGrads:
    """Support-loss gradients of one inner step: per adapted layer (input, output-gradient) pairs,
    and the (T, S, F, d) gradients w.r.t. the support embeddings (if asked)."""

    layers: dict[int, Factors]
    emb: Tensor | None


def inner_backward(tw: Towers, st: State, lr: float, c: Cache, dlogit: Tensor, need_emb: bool) -> InnerGrads:
    """Backward of the support loss through the towers, by hand, down to the lowest adapted layer."""
    n_bottom = len(tw.bottom)
    need_bottom = any(x.adapted for x in tw.bottom)
    out: dict[int, Factors] = {}
    delta = dlogit.unsqueeze(-1)
    go_below_top = need_bottom or need_emb
    g_emb = None
    for j in range(len(tw.top) - 1, -1, -1):
        i = n_bottom + j
        layer = tw.top[j]
        if layer.adapted:
            out[i] = (c.top_in[j], delta)
        lower_top_adapted = any(x.adapted for x in tw.top[:j])
        if j > 0:
            if not (lower_top_adapted or go_below_top):
                break
            g = linear_input_grad(delta, layer, st, i, lr, None)
            delta = _relu_grad(g, c.top_in[j])
            continue
        if not go_below_top:
            break
        d = tw.dim
        n = tw.n_vec
        if need_emb:
            g_feat = linear_input_grad(delta, layer, st, i, lr, None)
        else:  # only what reaches the bottom output: its d direct columns (+ its n-1 dot pairs)
            cols = d if tw.interaction == "concat" else d + n - 1
            g_feat = linear_input_grad(delta, layer, st, i, lr, cols)
        T, S = g_feat.shape[:2]
        g_bottom = None
        if tw.interaction == "concat":
            if tw.has_bottom:
                g_bottom = g_feat[..., :d]
            if need_emb:
                g_emb = g_feat[..., (d if tw.has_bottom else 0) :].reshape(T, S, tw.num_fields, d)
        else:
            assert tw.pairs is not None and c.vecs is not None
            off = d if tw.has_bottom else 0
            if need_emb:
                g_v = _DotGrad.apply(c.vecs, g_feat.reshape(T * S, -1), tw.pairs, off).view(T, S, n, d)
                if tw.has_bottom:
                    g_bottom = g_v[:, :, 0]
                    g_emb = g_v[:, :, 1:]
                else:
                    g_emb = g_v
            elif tw.has_bottom:  # d(pair (0, j))/d v_0 = v_j
                pair0 = g_feat[..., d : d + n - 1].reshape(T * S, n - 1)
                # the interaction's vectors, which its backward saves anyway: saving the gathered
                # (T, S, F, d) embeddings too would keep a second copy alive until the backward
                g_pairs = _PairsOfFirst.apply(pair0, c.vecs)
                g_bottom = g_feat[..., :d] + g_pairs.view(T, S, d)
        if need_bottom and g_bottom is not None:
            assert c.bottom_out is not None
            delta = _relu_grad(g_bottom, c.bottom_out)
            for i in range(n_bottom - 1, -1, -1):
                layer = tw.bottom[i]
                if layer.adapted:
                    out[i] = (c.bottom_in[i], delta)
                if i == 0 or not any(x.adapted for x in tw.bottom[:i]):
                    break
                g = linear_input_grad(delta, layer, st, i, lr, None)
                delta = _relu_grad(g, c.bottom_in[i])
    return InnerGrads(out, g_emb)


def _relu_grad(g: Tensor, relu_out: Tensor) -> Tensor:
    """g * (relu_out > 0) in one op, differentiable w.r.t. g only (the mask is a constant: without the
    detach autograd would build and accumulate a zero gradient for relu_out)."""
    return torch.ops.aten.threshold_backward(g, relu_out.detach(), 0.0)


def bce_grad(logits: Tensor, label: Tensor, weight: Tensor) -> Tensor:
    """d(per-task masked-mean BCE)/d logits: (sigmoid(z) - y) * mask / count (0 at padding)."""
    return torch.where(weight > 0, torch.sigmoid(logits) - label, 0.0) * weight


def _emb_position_grads(g_emb: Tensor, ix: SetIndex, fs: int) -> tuple[Tensor, Tensor]:
    """(T, S, F, d) embedding gradients -> flat (index, gradient) pairs of the table rows they hit."""
    d = g_emb.shape[-1]
    idx = [ix.sparse.reshape(-1)]
    vals = [g_emb[:, :, :fs].reshape(-1, d)]
    if ix.has_multi_hot:
        idx.append(ix.multi_hot.reshape(-1))
        vals.append((g_emb[:, :, fs:].unsqueeze(-2) * ix.weight.unsqueeze(-1)).reshape(-1, d))
    return torch.cat(idx), torch.cat(vals)


def _grow(fac: Factors | None, new: Factors) -> Factors:
    if fac is None:
        return new
    return torch.cat([fac[0], new[0]], dim=1), torch.cat([fac[1], new[1]], dim=1)


# --------------------------------------------------------------------------------------------------
# The meta step
# --------------------------------------------------------------------------------------------------

_R = TypeVar("_R")


def _in_autocast_dtype(fn: Callable[..., _R]) -> Callable[..., _R]:
    """Mixed precision (``torch.autocast``, e.g. Lightning's ``precision="bf16-mixed"``): call
    ``fn(tw, rows, ...)`` with the towers and rows cast to the autocast dtype and autocast off.

    Under autocast only some ops change dtype (the matrix products), and the backward passes of
    custom autograd Functions run outside it, so the hand-written inner backward would mix bfloat16
    and float32 operands. Cast once at the entry, the whole step computes in the low precision (as
    autocast does for its products); autograd differentiates the casts back to the float32 params
    and rows, and the loss is computed outside, where autocast keeps it in float32.
    """

    @functools.wraps(fn)
    def wrapper(tw: Towers, rows: Tensor, *args: Any, **kwargs: Any) -> _R:
        device = rows.device.type
        if not torch.is_autocast_enabled(device):
            return fn(tw, rows, *args, **kwargs)
        low = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            return fn(tw.to(low), rows.to(low), *args, **kwargs)

    return wrapper


@dataclass
class FastResult:
    """query_logits (T, Q); support_logits (T, S) at the shared weights (attached when it carries a
    gradient), or None when the inner loop did not run a support forward."""

    query_logits: Tensor
    support_logits: Tensor | None
    inner_ran: bool


def _set_weight(s: SetBatch, dtype: torch.dtype) -> Tensor:
    m = s.mask
    return m.to(dtype) / m.sum(-1, keepdim=True).clamp(min=1).to(dtype)


def _inner_loop(
    tw: Towers,
    inner_tw: Towers,
    inner_rows: Tensor,
    s_ix: SetIndex,
    e_s0: Tensor,
    tr: TaskRows | None,
    sup: SetBatch,
    *,
    steps: int,
    lr: float,
    second_order: bool,
    attach_s0: bool,
) -> tuple[State, Tensor | None]:
    """``steps`` SGD steps on every task's support set: the learned ``State`` and the support logits
    at the shared weights (attached to ``tw`` when ``attach_s0``).

    A function of its own so that the support-side tensors it builds (the support forwards'
    activations, the inner gradients) are freed when it returns, before the query forward: what
    the outer backward needs of them, the graph has saved.

    Args:
        tw / inner_tw: the towers attached / as the inner loop sees them (detached for first order).
        inner_rows: the looked-up rows as the inner loop sees them.
        e_s0: (T, S, F, d) support embeddings at the shared rows.
        tr: the tasks' own adapted rows (``adapt_embeddings``), or None.
    """
    dtype = e_s0.dtype
    fs = s_ix.sparse.shape[-1]
    s_dense = sup.dense.to(dtype)
    st = State()
    layers = inner_tw.bottom + inner_tw.top
    S = sup.mask.shape[1]
    materialized = {i for i, x in enumerate(layers) if x.adapted and materialize_layer(x, steps * S)}
    # ANIL-like: neither the bottom tower nor the embeddings adapt -> the top input is fixed.
    fixed_feats = tr is None and not any(x.adapted for x in tw.bottom)
    support_logits = None
    s_feats = None
    weight_s = _set_weight(sup, dtype)
    label_s = sup.label.to(dtype)
    for k in range(steps):
        grad_ctx = torch.enable_grad() if (second_order or (k == 0 and attach_s0)) else torch.no_grad()
        with grad_ctx:
            if k == 0:
                e_s = e_s0
                c = forward_set(tw if attach_s0 else inner_tw, st, lr, e_s, s_dense)
                support_logits = c.logits
                if not second_order and attach_s0:
                    c = _detach_cache(c)
                if fixed_feats:
                    s_feats = (c.top_in[0], c.vecs, c.bottom_out)
            else:
                e_s = e_s0 if tr is None else e_s0 + gather(st.row_delta, tr.support)
                if not second_order:
                    e_s = e_s.detach()
                c = forward_set(inner_tw, st, lr, e_s, s_dense, s_feats)
        with torch.enable_grad() if second_order else torch.no_grad():
            dlogit = bce_grad(c.logits, label_s, weight_s)
            g = inner_backward(inner_tw, st, lr, c, dlogit, need_emb=tr is not None)
            for i, (x, dd) in g.layers.items():
                st.update(i, layers[i], x, dd, lr, i in materialized)
            if tr is not None and g.emb is not None:
                idx, vals = _emb_position_grads(g.emb, tr.support, fs)
                d = e_s0.shape[-1]
                upd = torch.zeros(tr.num + 1, d, dtype=dtype, device=e_s0.device).index_add(0, idx, vals)
                st.row_delta = -lr * upd if st.row_delta is None else st.row_delta - lr * upd
    return st, support_logits


@_in_autocast_dtype
def run_meta(
    tw: Towers,
    rows: Tensor,
    lookup: EmbeddingLookup,
    batch: TaskBatch,
    *,
    inner_steps: int,
    inner_lr: float,
    adapt_embeddings: bool,
    second_order: bool,
    track_grad: bool,
    support_logits_grad: bool,
) -> FastResult:
    """Inner loop on every task's support set, then the query logits at the adapted weights.

    Args:
        tw: towers at the (attached) params.
        rows: (U, d) looked-up rows.
        second_order: keep the graph through the inner gradients (MAML); else they are constants.
        track_grad: the query logits carry gradients to params/rows (training); False: evaluation.
        support_logits_grad: the returned support logits must carry gradients (support loss term).
    """
    dtype = rows.dtype
    lr = inner_lr
    sup, qry = batch.support, batch.query
    s_ix = set_index(lookup.support, dtype)
    q_ix = set_index(lookup.query, dtype)
    adapts_dense = any(x.adapted for x in tw.bottom + tw.top)
    steps = inner_steps if (adapts_dense or adapt_embeddings) else 0
    s_dense, q_dense = sup.dense.to(dtype), qry.dense.to(dtype)

    inner_tw = tw if second_order else tw.detached()
    inner_rows = rows if second_order else rows.detach()
    attach_s0 = second_order or support_logits_grad

    # Embeddings: one gather for both sets when both carry gradients (one zero gradient table in
    # the backward), else the query's after the inner loop (not alive during it).
    e_s0 = e_q0 = None
    if attach_s0 and track_grad:
        e_s0, e_q0 = gather_sets(rows, s_ix, q_ix)
    tr = task_rows(s_ix, q_ix, rows.shape[0]) if (adapt_embeddings and steps > 0) else None

    st = State()
    support_logits = None
    if steps > 0:
        st, support_logits = _inner_loop(
            tw,
            inner_tw,
            inner_rows,
            s_ix,
            e_s0 if e_s0 is not None else gather(rows if attach_s0 else inner_rows, s_ix),
            tr,
            sup,
            steps=steps,
            lr=lr,
            second_order=second_order,
            attach_s0=attach_s0,
        )
    elif support_logits_grad:
        e_s0 = gather(rows, s_ix) if e_s0 is None else e_s0
        support_logits = forward_set(tw, st, lr, e_s0, s_dense).logits
    e_s0 = None  # what the graph needs of the support side it has saved; free the rest now
    layers = inner_tw.bottom + inner_tw.top
    # The query forward: attached params (training) with the inner loop's factors.
    with torch.enable_grad() if track_grad else torch.no_grad():
        q_tw = tw if track_grad else tw.detached()
        if track_grad and not second_order and st.weights:
            # first order: value of the per-task weights, gradient of the identity to the shared ones
            q_layers = q_tw.bottom + q_tw.top
            st.weights = {
                i: (q_layers[i].weight + (w - layers[i].weight), q_layers[i].bias + (b - layers[i].bias))
                for i, (w, b) in st.weights.items()
            }
        e_q = e_q0 if e_q0 is not None else gather(rows if track_grad else rows.detach(), q_ix)
        if tr is not None and st.row_delta is not None:
            e_q = e_q + gather(st.row_delta, tr.query)
        cq = forward_set(q_tw, st, lr, e_q, q_dense)
    return FastResult(cq.logits, support_logits, steps > 0)


def _detach_cache(c: Cache) -> Cache:
    d = lambda t: None if t is None else t.detach()  # noqa: E731
    return Cache(
        [x.detach() for x in c.bottom_in],
        d(c.bottom_out),
        c.emb.detach(),
        [x.detach() for x in c.top_in],
        c.logits.detach(),
        d(c.vecs),
    )


def cat_sets(a: SetIndex, b: SetIndex) -> SetIndex:
    """Two sets' indices as one (T, Ma + Mb, ...) set (multi-hot lists padded to one length)."""
    la, lb = a.multi_hot.shape[-1], b.multi_hot.shape[-1]
    if la != lb:
        L = max(la, lb)

        def pad(ix: SetIndex) -> SetIndex:
            k = L - ix.multi_hot.shape[-1]
            return SetIndex(
                ix.sparse,
                torch.nn.functional.pad(ix.multi_hot, (0, k)),
                torch.nn.functional.pad(ix.weight, (0, k)),
            )

        a, b = pad(a), pad(b)
    return SetIndex(
        torch.cat([a.sparse, b.sparse], dim=1),
        torch.cat([a.multi_hot, b.multi_hot], dim=1),
        torch.cat([a.weight, b.weight], dim=1),
    )


@_in_autocast_dtype
def shared_logits(tw: Towers, rows: Tensor, idx: LocalIndex, s: SetBatch) -> Tensor:
    """(T, M) logits of one set at the shared weights."""
    emb = gather(rows, set_index(idx, rows.dtype))
    return forward_set(tw, State(), 0.0, emb, s.dense.to(rows.dtype)).logits


@_in_autocast_dtype
def plain_logits(
    tw: Towers, rows: Tensor, lookup: EmbeddingLookup, batch: TaskBatch
) -> tuple[Tensor, Tensor]:
    """(T, S) support and (T, Q) query logits at the shared weights: one forward over both sets."""
    dtype = rows.dtype
    ix = cat_sets(set_index(lookup.support, dtype), set_index(lookup.query, dtype))
    S = batch.support.mask.shape[1]
    dense = torch.cat([batch.support.dense, batch.query.dense], dim=1).to(dtype)
    logits = forward_set(tw, State(), 0.0, gather(rows, ix), dense).logits
    return logits[:, :S], logits[:, S:]
