"""Meta-learning algorithms (MAML, FOMAML, ANIL, none) on looked-up embedding rows; pure torch.

The inner loop is vectorized over tasks: ``torch.func.vmap`` over tasks of a function doing
``inner_steps`` SGD steps with ``torch.func.grad`` on the task's support loss. There is no Python
loop over tasks and no collective. Second-order MAML needs nothing special: ``torch.func.grad``
inside ``vmap`` is differentiable by the ordinary outer autograd whenever its inputs require grad,
so one plain ``loss.backward()`` gives the meta-gradient w.r.t. the dense params and the looked-up
rows (DDP-friendly: no ``create_graph`` backward).

Shapes: T tasks, S / Q padded support / query samples, U looked-up rows, d embedding dim.

Algorithms (``MetaConfig.name``):
    maml    second order; adapts ``adapt_groups`` (default bottom and top towers).
    fomaml  first order: fast = params - lr * sum(grad.detach()), so d(fast)/d(params) = I.
    anil    adapt only the top tower (MeLU-style), second order.
    none    no inner loop in training: plain BCE over support+query at the shared weights (the
            baseline); at evaluation "adapted" fine-tunes on the support set with the same inner loop.

``adapt``, ``query_logits``, ``meta_loss`` and ``predict`` are the interface a faster fused
implementation can replace; ``meta_loss_reference`` is a per-task Python loop for tests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import grad, vmap

from gmeta.data.batch import SetBatch, TaskBatch
from gmeta.meta import fast
from gmeta.model.dlrm import DLRM
from gmeta.model.embedding import EmbeddingLookup, LocalIndex, gather_embeddings

META_ALGORITHMS: tuple[str, ...] = ("maml", "fomaml", "anil", "none")
IMPLEMENTATIONS: tuple[str, ...] = ("fast", "vmap")
PARAM_GROUPS: tuple[str, ...] = ("bottom", "top")


@dataclass(frozen=True)
class MetaConfig:
    """Inner-loop settings.

    Attributes:
        name: one of ``META_ALGORITHMS`` (use ``make_meta_config`` for per-name defaults).
        inner_steps: SGD steps on the support set per task (>= 0).
        inner_lr: inner SGD learning rate.
        adapt_groups: dense parameter groups (name prefixes) adapted per task.
        adapt_embeddings: also adapt each task's copy of the looked-up embedding rows.
        first_order: drop second-order terms (gradient through the inner gradients).
        support_loss_weight: meta algorithms only: add this times the support loss at the shared
            (un-adapted) weights to the query loss. MAML alone learns from query labels only (a
            quarter of MovieLens' training labels); this auxiliary term lets every label train the
            embeddings, while the query term still trains for post-adaptation performance.
        implementation: ``fast`` (``gmeta.meta.fast``: the inner loop in closed form on the DLRM
            towers, no per-task weights; models it does not know fall back to ``vmap``) or ``vmap``
            (``torch.func.vmap`` over tasks of ``torch.func.grad`` steps: the simple reference).
    """

    name: str = "maml"
    inner_steps: int = 1
    inner_lr: float = 0.01
    adapt_groups: tuple[str, ...] = ("bottom", "top")
    adapt_embeddings: bool = False
    first_order: bool = False
    support_loss_weight: float = 0.0
    implementation: str = "fast"

    def __post_init__(self) -> None:
        if self.name not in META_ALGORITHMS:
            raise ValueError(f"meta algorithm must be one of {META_ALGORITHMS}, got {self.name!r}")
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"meta implementation must be one of {IMPLEMENTATIONS}, got {self.implementation!r}"
            )
        if self.inner_steps < 0:
            raise ValueError(f"inner_steps must be >= 0, got {self.inner_steps}")
        unknown = set(self.adapt_groups) - set(PARAM_GROUPS)
        if unknown:
            raise ValueError(f"adapt_groups {sorted(unknown)} unknown; expected a subset of {PARAM_GROUPS}")
        # Hydra hands lists: normalise so the config stays hashable and comparable.
        object.__setattr__(self, "adapt_groups", tuple(self.adapt_groups))


def make_meta_config(name: str, **overrides: Any) -> MetaConfig:
    """``MetaConfig`` with the defaults that define each algorithm, then ``overrides``.

    ``fomaml`` sets ``first_order=True``; ``anil`` sets ``adapt_groups=("top",)``.
    """
    defaults: dict[str, dict[str, Any]] = {
        "maml": {},
        "fomaml": {"first_order": True},
        "anil": {"adapt_groups": ("top",)},
        "none": {},
    }
    if name not in defaults:
        raise ValueError(f"meta algorithm must be one of {META_ALGORITHMS}, got {name!r}")
    return MetaConfig(name=name, **{**defaults[name], **overrides})


@dataclass
class FastWeights:
    """Per-task weights after the inner loop.

    Attributes:
        adapted: name -> (T, *shape) per-task fast weights of the adapted params.
        shared: name -> (*shape) params every task shares (not adapted).
        rows: (T, U, d) per-task rows if ``rows_adapted`` else the shared (U, d) rows.
        rows_adapted: whether ``rows`` has a task dim.
        support_loss: (T,) support loss before adaptation (detached; a free by-product), or None.
    """

    adapted: dict[str, Tensor]
    shared: dict[str, Tensor]
    rows: Tensor
    rows_adapted: bool
    support_loss: Tensor | None = None


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def adapted_names(params: Mapping[str, Tensor], groups: Sequence[str]) -> list[str]:
    """Names of the params in the given groups (name prefixes ``group.``)."""
    return [n for n in params if n.split(".", 1)[0] in groups]


def masked_bce(logits: Tensor, label: Tensor, mask: Tensor) -> Tensor:
    """Masked-mean BCE over the last dim: (..., N) -> (...); all-masked rows give exactly 0."""
    per = F.binary_cross_entropy_with_logits(logits, label, reduction="none")
    # where, not multiply: a padded sample's loss can never leak in, even as inf * 0 = nan.
    per = torch.where(mask, per, torch.zeros_like(per))
    return per.sum(-1) / mask.sum(-1).clamp(min=1).to(per.dtype)


def masked_task_mean(values: Tensor, task_mask: Tensor) -> Tensor:
    """Mean of (T,) per-task values over real tasks; 0 if there are none."""
    values = torch.where(task_mask, values, torch.zeros_like(values))
    return values.sum() / task_mask.sum().clamp(min=1).to(values.dtype)


def _set_inputs(idx: LocalIndex, s: SetBatch, dtype: torch.dtype) -> tuple[Tensor, ...]:
    """Per-set tensors with a leading task dim, in the order the vmapped functions take them."""
    return (idx.sparse, idx.multi_hot, idx.multi_hot_mask, s.dense.to(dtype), s.label.to(dtype), s.mask)


# --------------------------------------------------------------------------------------------------
# Vectorized inner loop
# --------------------------------------------------------------------------------------------------


def adapt(
    model: DLRM,
    params: Mapping[str, Tensor],
    rows: Tensor,
    lookup: EmbeddingLookup,
    support: SetBatch,
    cfg: MetaConfig,
    create_graph: bool = True,
) -> FastWeights:
    """Run the inner loop on every task's support set at once.

    Args:
        model: the towers (its ``forward_with`` is evaluated at the fast weights).
        params: name -> dense parameter (e.g. ``dict(model.named_parameters())``).
        rows: (U, d) looked-up rows (``lookup.rows``).
        lookup: local indices of the support ids into ``rows``.
        support: (T, S, ...) support set.
        cfg: inner-loop settings.
        create_graph: keep the fast weights differentiable w.r.t. ``params`` and ``rows`` (training).
            With ``cfg.first_order`` only the identity path is kept; without ``create_graph`` the fast
            weights are detached (evaluation).

    Returns:
        ``FastWeights`` of the T tasks.
    """
    names = adapted_names(params, cfg.adapt_groups)
    second_order = create_graph and not cfg.first_order
    # First order and evaluation run the loop on detached inputs: no graph through it at all.
    p = dict(params) if second_order else {k: v.detach() for k, v in params.items()}
    r = rows if second_order else rows.detach()
    shared = {k: v for k, v in p.items() if k not in names}
    init = {k: p[k] for k in names}
    # What the outer graph sees of the weights that are not adapted.
    outer_params = params if create_graph else p
    outer_rows = rows if create_graph else r
    if cfg.inner_steps == 0 or not (names or cfg.adapt_embeddings):
        return FastWeights(adapted={}, shared=dict(outer_params), rows=outer_rows, rows_adapted=False)

    lr, steps, adapt_rows = cfg.inner_lr, cfg.inner_steps, cfg.adapt_embeddings

    def task_loss(
        fast: dict[str, Tensor], fast_rows: Tensor, data: tuple[Tensor, ...]
    ) -> tuple[Tensor, Tensor]:
        sp, mh, mh_mask, dense, label, mask = data
        emb = gather_embeddings(fast_rows, sp, mh, mh_mask)  # (S, F, d)
        loss = masked_bce(model.forward_with({**shared, **fast}, emb, dense), label, mask)
        return loss, loss.detach()

    def task_adapt(fast: dict[str, Tensor], fast_rows: Tensor, *data: Tensor) -> tuple[Any, ...]:
        # One task (vmapped): fast (*shape) per name, fast_rows (U, d), data without the T dim.
        pre_loss = None
        for step in range(steps):
            if adapt_rows:
                (g, g_rows), loss = grad(task_loss, argnums=(0, 1), has_aux=True)(fast, fast_rows, data)
                fast_rows = fast_rows - lr * g_rows
            else:
                g, loss = grad(task_loss, has_aux=True)(fast, fast_rows, data)
            fast = {k: fast[k] - lr * g[k] for k in fast}
            if step == 0:
                pre_loss = loss
        return (fast, pre_loss, fast_rows) if adapt_rows else (fast, pre_loss)

    data = _set_inputs(lookup.support, support, rows.dtype)
    out = vmap(task_adapt, in_dims=(None, None, *([0] * len(data))))(init, r, *data)
    fast, pre_loss = out[0], out[1]
    fast_rows = out[2] if adapt_rows else outer_rows

    if cfg.first_order and create_graph:
        # Straight-through: value of the adapted weights, gradient of the identity to params/rows.
        fast = {k: params[k] + (v - params[k].detach()) for k, v in fast.items()}
        if adapt_rows:
            fast_rows = rows + (fast_rows - rows.detach())
    return FastWeights(
        adapted=fast,
        shared={k: v for k, v in outer_params.items() if k not in names},
        rows=fast_rows,
        rows_adapted=adapt_rows,
        support_loss=pre_loss,
    )


def query_logits(model: DLRM, fast: FastWeights, lookup: EmbeddingLookup, query: SetBatch) -> Tensor:
    """(T, Q) logits of each task's query samples at its fast weights (vectorized over tasks)."""
    shared = fast.shared

    def task_logits(
        adapted: dict[str, Tensor], rows_t: Tensor, sp: Tensor, mh: Tensor, mh_mask: Tensor, dense: Tensor
    ) -> Tensor:
        emb = gather_embeddings(rows_t, sp, mh, mh_mask)  # (Q, F, d)
        return model.forward_with({**shared, **adapted}, emb, dense)

    sp, mh, mh_mask, dense, _, _ = _set_inputs(lookup.query, query, fast.rows.dtype)
    rows_dim = 0 if fast.rows_adapted else None
    return vmap(task_logits, in_dims=(0, rows_dim, 0, 0, 0, 0))(
        fast.adapted, fast.rows, sp, mh, mh_mask, dense
    )


def _run_fast(
    towers: fast.Towers,
    rows: Tensor,
    lookup: EmbeddingLookup,
    batch: TaskBatch,
    cfg: MetaConfig,
    *,
    training: bool,
) -> fast.FastResult:
    """``fast.run_meta`` with ``cfg``'s inner loop: the training objective (second order unless
    ``first_order``, gradients to params and rows), or evaluation (first order, no gradients)."""
    return fast.run_meta(
        towers,
        rows,
        lookup,
        batch,
        inner_steps=cfg.inner_steps,
        inner_lr=cfg.inner_lr,
        adapt_embeddings=cfg.adapt_embeddings,
        second_order=training and not cfg.first_order,
        track_grad=training,
        support_logits_grad=training and cfg.support_loss_weight > 0,
    )


def _shared_logits(
    model: DLRM, params: Mapping[str, Tensor], rows: Tensor, idx: LocalIndex, s: SetBatch
) -> Tensor:
    """(T, N) logits at the shared weights (no task dim in the weights, so no vmap needed)."""
    emb = gather_embeddings(rows, idx.sparse, idx.multi_hot, idx.multi_hot_mask)  # (T, N, F, d)
    return model.forward_with(params, emb, s.dense.to(rows.dtype))


# --------------------------------------------------------------------------------------------------
# Objective and evaluation
# --------------------------------------------------------------------------------------------------


def meta_loss(
    model: DLRM,
    params: Mapping[str, Tensor],
    rows: Tensor,
    lookup: EmbeddingLookup,
    batch: TaskBatch,
    cfg: MetaConfig,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The training objective; ``loss.backward()`` fills ``params[*].grad`` and ``rows.grad``.

    Meta algorithms: mean over real tasks of each task's masked-mean query BCE at its fast weights.
    ``none``: masked-mean BCE over all real support+query samples of real tasks at the shared weights.
    Dummy tasks (``task_mask`` False) contribute exactly zero. ``cfg.implementation`` picks the fast
    path (``gmeta.meta.fast``) or the vmap reference; both compute the same numbers.

    Returns:
        loss: scalar.
        stats: detached ``support_loss`` (before adaptation) and ``query_loss`` (mean over real
            tasks), and ``query_logits`` (T, Q) (for training metrics).
    """
    tm = batch.task_mask
    q, s = batch.query, batch.support
    dtype = rows.dtype
    towers = fast.towers_of(model, params, cfg.adapt_groups) if cfg.implementation == "fast" else None
    if cfg.name == "none":
        if towers is not None:
            s_logits, q_logits = fast.plain_logits(towers, rows, lookup, batch)
        else:
            s_logits = _shared_logits(model, params, rows, lookup.support, s)
            q_logits = _shared_logits(model, params, rows, lookup.query, q)
        s_mask = s.mask & tm[:, None]
        q_mask = q.mask & tm[:, None]
        s_bce = F.binary_cross_entropy_with_logits(s_logits, s.label.to(dtype), reduction="none")
        q_bce = F.binary_cross_entropy_with_logits(q_logits, q.label.to(dtype), reduction="none")
        total = torch.where(s_mask, s_bce, 0.0).sum() + torch.where(q_mask, q_bce, 0.0).sum()
        loss = total / (s_mask.sum() + q_mask.sum()).clamp(min=1).to(total.dtype)
        support_loss = masked_task_mean(masked_bce(s_logits, s.label.to(dtype), s.mask), tm)
        query_loss = masked_task_mean(masked_bce(q_logits, q.label.to(dtype), q.mask), tm)
    elif towers is not None:
        res = _run_fast(towers, rows, lookup, batch, cfg, training=True)
        q_logits = res.query_logits
        loss = query_loss = masked_task_mean(masked_bce(q_logits, q.label.to(dtype), q.mask), tm)
        shared_support = None
        if res.support_logits is not None:  # the inner loop's step-0 forward, reused
            shared_support = masked_task_mean(masked_bce(res.support_logits, s.label.to(dtype), s.mask), tm)
        if cfg.support_loss_weight > 0:
            assert shared_support is not None
            loss = query_loss + cfg.support_loss_weight * shared_support
        support_loss = (
            shared_support
            if res.inner_ran and shared_support is not None
            else torch.full_like(loss, float("nan"))
        )
    else:
        fw = adapt(model, params, rows, lookup, s, cfg, create_graph=True)
        q_logits = query_logits(model, fw, lookup, q)
        loss = query_loss = masked_task_mean(masked_bce(q_logits, q.label.to(dtype), q.mask), tm)
        if cfg.support_loss_weight > 0:
            s_logits = _shared_logits(model, params, rows, lookup.support, s)
            shared_support = masked_task_mean(masked_bce(s_logits, s.label.to(dtype), s.mask), tm)
            loss = query_loss + cfg.support_loss_weight * shared_support
        support_loss = (
            masked_task_mean(fw.support_loss, tm)
            if fw.support_loss is not None
            else torch.full_like(loss, float("nan"))
        )
    stats = {
        "support_loss": support_loss.detach(),
        "query_loss": query_loss.detach(),
        "query_logits": q_logits.detach(),
    }
    return loss, stats


def predict(
    model: DLRM,
    params: Mapping[str, Tensor],
    rows: Tensor,
    lookup: EmbeddingLookup,
    batch: TaskBatch,
    cfg: MetaConfig,
    adapted: bool,
) -> Tensor:
    """(T, Q) query logits for evaluation (apply ``sigmoid`` for probabilities); no graph is kept.

    ``adapted``: first run the inner loop on each task's support set (first order; for ``none`` this
    is fine-tuning with the configured inner_lr / inner_steps / adapt_groups, the fair comparison);
    otherwise score the query at the shared weights.
    """
    towers = fast.towers_of(model, params, cfg.adapt_groups) if cfg.implementation == "fast" else None
    if towers is not None:
        with torch.no_grad():
            if not adapted:
                return fast.shared_logits(towers.detached(), rows.detach(), lookup.query, batch.query)
            return _run_fast(towers, rows, lookup, batch, cfg, training=False).query_logits
    if not adapted:
        with torch.no_grad():
            return _shared_logits(model, params, rows, lookup.query, batch.query)
    # Evaluation loops usually run under no_grad; the inner loop needs gradients.
    with torch.enable_grad():
        fw = adapt(model, params, rows, lookup, batch.support, cfg, create_graph=False)
    with torch.no_grad():
        return query_logits(model, fw, lookup, batch.query)


# --------------------------------------------------------------------------------------------------
# Reference (tests only)
# --------------------------------------------------------------------------------------------------


def meta_loss_reference(
    model: DLRM,
    params: Mapping[str, Tensor],
    rows: Tensor,
    lookup: EmbeddingLookup,
    batch: TaskBatch,
    cfg: MetaConfig,
) -> Tensor:
    """``meta_loss`` computed the obvious way: a Python loop over real tasks, unpadded samples,
    ``torch.autograd.grad(..., create_graph=not first_order)`` per inner step. Slow; for tests."""

    def task_set(idx: LocalIndex, s: SetBatch, t: int) -> tuple[Tensor, Tensor, Tensor]:
        keep = s.mask[t]  # drop padded samples instead of masking them
        emb_args = (idx.sparse[t][keep], idx.multi_hot[t][keep], idx.multi_hot_mask[t][keep])
        return emb_args, s.dense[t][keep].to(rows.dtype), s.label[t][keep].to(rows.dtype)

    def set_loss(
        p: Mapping[str, Tensor],
        r: Tensor,
        emb_args: tuple,
        dense: Tensor,
        label: Tensor,
        reduction: str = "mean",
    ) -> Tensor:
        logits = model.forward_with(p, gather_embeddings(r, *emb_args), dense)
        return F.binary_cross_entropy_with_logits(logits, label, reduction=reduction)

    real = [t for t in range(batch.num_tasks) if bool(batch.task_mask[t])]
    if cfg.name == "none":
        total, count = rows.new_zeros(()), 0
        for t in real:
            for idx, s in ((lookup.support, batch.support), (lookup.query, batch.query)):
                emb_args, dense, label = task_set(idx, s, t)
                total = total + set_loss(params, rows, emb_args, dense, label, reduction="sum")
                count += label.shape[0]
        return total / max(count, 1)

    names = adapted_names(params, cfg.adapt_groups)
    losses = []
    for t in real:
        s_args = task_set(lookup.support, batch.support, t)
        q_args = task_set(lookup.query, batch.query, t)
        fast = {k: params[k] for k in names}
        fast_rows = rows
        for _ in range(cfg.inner_steps):
            p = {**params, **fast}
            inputs = list(fast.values()) + ([fast_rows] if cfg.adapt_embeddings else [])
            grads = torch.autograd.grad(
                set_loss(p, fast_rows, *s_args), inputs, create_graph=not cfg.first_order, retain_graph=True
            )
            fast = {k: v - cfg.inner_lr * g for (k, v), g in zip(fast.items(), grads, strict=False)}
            if cfg.adapt_embeddings:
                fast_rows = fast_rows - cfg.inner_lr * grads[-1]
        losses.append(set_loss({**params, **fast}, fast_rows, *q_args))
    return torch.stack(losses).mean() if losses else rows.new_zeros(())
