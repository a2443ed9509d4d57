"""The fast meta step: the inner loop on every task's support set, then the query at the adapted weights."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

from gmeta.data.batch import SetBatch, TaskBatch
from gmeta.meta.backend import AdaptedLogits, InnerLoop, Pass
from gmeta.meta.fast.adapted import (
    Cache,
    State,
    bce_grad,
    forward_set,
    inner_backward,
    materialize_layer,
)
from gmeta.meta.fast.rows import TaskRows, cat_sets, emb_position_grads, task_rows
from gmeta.meta.fast.towers import Towers, generate
from gmeta.meta.inner_lr import EMBEDDING_SLOT
from gmeta.model.embedding import EmbeddingLookup, LocalIndex
from gmeta.model.gather import SetIndex, gather, gather_sets, set_index

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


def _embed(tw: Towers, rows: Tensor, ix: SetIndex) -> Tensor:
    """A set's (T, M, F, d) embeddings as the towers read them: gathered, then the generator's output
    added (``towers.generate``; the fast path has no generator with adapted rows)."""
    return generate(tw, gather(rows, ix))


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
    inner: InnerLoop,
    steps: int,
    second_order: bool,
    attach_s0: bool,
    train_rates: bool,
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
        inner: the inner loop's settings (its rate per step and layer: ``InnerLoop.lr_at``).
        train_rates: record the updates for the learned rates' gradients (training; first order too).
    """
    dtype = e_s0.dtype
    fs = s_ix.sparse.shape[-1]
    s_dense = sup.dense.to(dtype)
    learned = inner.learned is not None
    st = State(factor_lr=1.0 if learned else inner.lr)
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
                c = forward_set(tw if attach_s0 else inner_tw, st, e_s, s_dense)
                support_logits = c.logits
                if not second_order and attach_s0:
                    c = _detach_cache(c)
                if fixed_feats:
                    s_feats = (c.top_in[0], c.vecs, c.bottom_out)
            else:
                if tr is None:
                    e_s = e_s0
                else:
                    assert st.row_delta is not None  # set by step 0
                    e_s = e_s0 + gather(st.row_delta, tr.support)
                if not second_order:
                    e_s = e_s.detach()
                c = forward_set(inner_tw, st, e_s, s_dense, s_feats)
        with torch.enable_grad() if second_order else torch.no_grad():
            dlogit = bce_grad(c.logits, label_s, weight_s)
            g = inner_backward(inner_tw, st, c, dlogit, need_emb=tr is not None)
        with torch.enable_grad() if (second_order or train_rates) else torch.no_grad():
            for i, (x, dd) in g.layers.items():
                st.update(i, layers[i], x, dd, inner.lr_at(k, layers[i].name), i in materialized)
            if tr is not None and g.emb is not None:
                fields = inner.field_mask(g.emb.shape[-2], g.emb)  # only these fields' rows adapt
                idx, vals = emb_position_grads(g.emb if fields is None else g.emb * fields, tr.support, fs)
                d = e_s0.shape[-1]
                upd = torch.zeros(tr.num + 1, d, dtype=dtype, device=e_s0.device).index_add(0, idx, vals)
                step = -inner.lr_at(k, EMBEDDING_SLOT) * upd
                st.row_delta = step if st.row_delta is None else st.row_delta + step
    return st, support_logits


@_in_autocast_dtype
def run_meta(
    tw: Towers,
    rows: Tensor,
    lookup: EmbeddingLookup,
    batch: TaskBatch,
    inner: InnerLoop,
    mode: Pass,
    support_grad: bool = False,
) -> AdaptedLogits:
    """Inner loop on every task's support set, then the query logits at the adapted weights.

    Args:
        tw: towers at the (attached) params.
        rows: (U, d) looked-up rows.
        inner: the inner loop's settings.
        mode: what the result must be differentiable for (``Pass``).
        support_grad: the returned support logits must carry gradients (the support loss term).
    """
    dtype = rows.dtype
    second_order = mode.second_order
    track_grad = mode.training
    sup, qry = batch.support, batch.query
    s_ix = set_index(lookup.support, dtype)
    q_ix = set_index(lookup.query, dtype)
    adapts_dense = any(x.adapted for x in tw.bottom + tw.top)
    steps = inner.steps if (adapts_dense or inner.adapt_embeddings) else 0
    s_dense, q_dense = sup.dense.to(dtype), qry.dense.to(dtype)

    inner_tw = tw if second_order else tw.detached()
    inner_rows = rows if second_order else rows.detach()
    attach_s0 = second_order or support_grad

    # Embeddings: one gather for both sets when both carry gradients (one zero gradient table in
    # the backward), else the query's after the inner loop (not alive during it).
    e_s0 = e_q0 = None
    if attach_s0 and track_grad:
        e_s0, e_q0 = (generate(tw, e) for e in gather_sets(rows, s_ix, q_ix))
    tr = task_rows(s_ix, q_ix, rows.shape[0]) if (inner.adapt_embeddings and steps > 0) else None
    # adapted rows would change the generator's input inside the inner loop (``fast.supports``)
    assert tr is None or tw.generator_spec is None, "the fast path runs no generator with adapted rows"

    st = State(factor_lr=inner.lr)
    support_logits = None
    if steps > 0:
        if e_s0 is None:  # the inner loop's view: attached when the support loss needs gradients
            e_s0 = _embed(tw, rows, s_ix) if attach_s0 else _embed(inner_tw, inner_rows, s_ix)
        st, support_logits = _inner_loop(
            tw,
            inner_tw,
            inner_rows,
            s_ix,
            e_s0,
            tr,
            sup,
            inner=inner,
            steps=steps,
            second_order=second_order,
            attach_s0=attach_s0,
            # learned rates are trained in first order too: their updates are recorded
            train_rates=track_grad and inner.learned is not None,
        )
    elif support_grad:
        e_s0 = _embed(tw, rows, s_ix) if e_s0 is None else e_s0
        support_logits = forward_set(tw, st, e_s0, s_dense).logits
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
        e_q = e_q0 if e_q0 is not None else _embed(q_tw, rows if track_grad else rows.detach(), q_ix)
        if tr is not None and st.row_delta is not None:
            e_q = e_q + gather(st.row_delta, tr.query)
        cq = forward_set(q_tw, st, e_q, q_dense)
    return AdaptedLogits(cq.logits, support_logits)


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


@_in_autocast_dtype
def shared_logits(tw: Towers, rows: Tensor, idx: LocalIndex, s: SetBatch) -> Tensor:
    """(T, M) logits of one set at the shared weights."""
    emb = _embed(tw, rows, set_index(idx, rows.dtype))
    return forward_set(tw, State(), emb, s.dense.to(rows.dtype)).logits


@_in_autocast_dtype
def plain_logits(
    tw: Towers, rows: Tensor, lookup: EmbeddingLookup, batch: TaskBatch
) -> tuple[Tensor, Tensor]:
    """(T, S) support and (T, Q) query logits at the shared weights: one forward over both sets."""
    dtype = rows.dtype
    ix = cat_sets(set_index(lookup.support, dtype), set_index(lookup.query, dtype))
    S = batch.support.mask.shape[1]
    dense = torch.cat([batch.support.dense, batch.query.dense], dim=1).to(dtype)
    logits = forward_set(tw, State(), _embed(tw, rows, ix), dense).logits
    return logits[:, :S], logits[:, S:]
