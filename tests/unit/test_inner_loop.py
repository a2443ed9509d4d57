"""MetaLearner (default fast backend) against independent references, in float64: the per-task
reference backend, hand-written per-task loops, double backward and finite differences."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from tiny_tasks import random_batch, task_alone

from gmeta.data.batch import TaskBatch, pad_tasks
from gmeta.meta.config import MetaConfig
from gmeta.meta.learner import MetaLearner
from gmeta.meta.losses import masked_bce
from gmeta.model.dlrm import DLRM
from gmeta.model.embedding import EmbeddingCollection, LocalIndex
from gmeta.model.gather import gather, set_index

VOCAB = (7, 5, 9, 6)
DIM = 4
LR = 0.3  # large enough that adaptation (and the second-order term) matter


def make_models(seed: int = 0) -> tuple[EmbeddingCollection, DLRM]:
    torch.manual_seed(seed)
    emb = EmbeddingCollection(VOCAB, 2, DIM, init_std=0.5).double()
    model = DLRM(len(VOCAB), 3, DIM, bottom_mlp=(6,), top_mlp=(8,), interaction="dot").double()
    return emb, model


def embed(rows: torch.Tensor, idx: LocalIndex, t: int | None = None) -> torch.Tensor:
    """Embeddings of a set (or of its task ``t``) from looked-up rows."""
    ix = set_index(idx, rows.dtype)
    return gather(rows, ix if t is None else ix.task(t))


def run(objective, emb: EmbeddingCollection, model: DLRM, batch: TaskBatch):
    """Loss, dense grads by name, and row grads scattered to a (num_total_rows, d) table.

    ``objective``: a ``MetaConfig`` (the learner's loss) or a function (model, lookup, batch) -> loss.
    """
    model.zero_grad(set_to_none=True)
    lk = emb.lookup(batch)
    if isinstance(objective, MetaConfig):
        loss, _ = MetaLearner(model, objective).loss(batch, lk)
    else:
        loss = objective(model, lk, batch)
    loss.backward()
    row_grad = torch.zeros_like(emb.weight)
    if lk.rows.grad is not None:
        row_grad[lk.unique_ids] = lk.rows.grad
    grads = {
        k: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for k, p in model.named_parameters()
    }
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads, row_grad


def reference(cfg: MetaConfig) -> MetaConfig:
    return dataclasses.replace(cfg, backend="reference")


def assert_same(a, b, rtol=1e-6, atol=1e-12):
    (la, ga, ra), (lb, gb, rb) = a, b
    torch.testing.assert_close(la, lb, rtol=rtol, atol=atol)
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")
    torch.testing.assert_close(ra, rb, rtol=rtol, atol=atol, msg=lambda m: f"rows: {m}")


BATCH = random_batch(0, support_sizes=[5, 2, 4], query_sizes=[3, 1, 2])


@pytest.mark.parametrize("name", ["maml", "fomaml", "anil"])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("adapt_embeddings", [False, True])
def test_vectorized_meta_gradient_equals_per_task_loop(name, steps, adapt_embeddings):
    emb, model = make_models()
    cfg = MetaConfig(name, inner_steps=steps, inner_lr=LR, adapt_embeddings=adapt_embeddings)
    got = run(cfg, emb, model, BATCH)
    want = run(reference(cfg), emb, model, BATCH)
    assert_same(got, want)
    assert all(g.abs().sum() > 0 for g in got[1].values()) and got[2].abs().sum() > 0


def test_none_is_plain_training_on_support_and_query():
    emb, model = make_models()
    cfg = MetaConfig("none")
    got = run(cfg, emb, model, BATCH)
    assert_same(got, run(reference(cfg), emb, model, BATCH))
    # By hand: one BCE over every real sample of both sets.
    lk = emb.lookup(BATCH)
    logits, labels = [], []
    for idx, s in ((lk.support, BATCH.support), (lk.query, BATCH.query)):
        e = embed(lk.rows, idx)
        logits.append(model(e, s.dense.double())[s.mask])
        labels.append(s.label.double()[s.mask])
    torch.testing.assert_close(
        got[0], F.binary_cross_entropy_with_logits(torch.cat(logits), torch.cat(labels))
    )


def test_fomaml_drops_exactly_the_second_order_term():
    """One step: maml - fomaml = -lr * H_support(theta, rows) [g_query(theta'); 0], by double backward."""
    emb, model = make_models(1)
    maml = run(MetaConfig("maml", inner_lr=LR), emb, model, BATCH)
    fomaml = run(MetaConfig("fomaml", inner_lr=LR), emb, model, BATCH)

    lk = emb.lookup(BATCH)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    names = list(params)
    hv_sum = [torch.zeros_like(p) for p in params.values()] + [torch.zeros_like(lk.rows)]

    def set_loss(p, idx, s, t):
        e = embed(lk.rows, idx, t)
        return masked_bce(model.forward_with(p, e, s.dense[t].double()), s.label[t].double(), s.mask[t])

    for t in range(BATCH.num_tasks):
        g_s = torch.autograd.grad(
            set_loss(params, lk.support, BATCH.support, t), list(params.values()), create_graph=True
        )
        fast = {
            k: (params[k] - LR * g).detach().requires_grad_(True) for k, g in zip(names, g_s, strict=True)
        }
        g_q = torch.autograd.grad(set_loss(fast, lk.query, BATCH.query, t), list(fast.values()))
        dot = sum((a * b).sum() for a, b in zip(g_s, g_q, strict=True))
        hv = torch.autograd.grad(dot, [*params.values(), lk.rows])
        hv_sum = [a + b for a, b in zip(hv_sum, hv, strict=True)]
    n = BATCH.num_tasks
    for k, hv in zip(names, hv_sum, strict=False):
        torch.testing.assert_close(maml[1][k] - fomaml[1][k], -LR * hv / n, rtol=1e-6, atol=1e-12)
    rows_term = torch.zeros_like(emb.weight)
    rows_term[lk.unique_ids] = -LR * hv_sum[-1] / n
    torch.testing.assert_close(maml[2] - fomaml[2], rows_term, rtol=1e-6, atol=1e-12)
    assert (
        rows_term.abs().max() > 1e-4
        and (maml[1]["top.0.weight"] - fomaml[1]["top.0.weight"]).abs().max() > 1e-4
    )
    torch.testing.assert_close(maml[0], fomaml[0])  # same forward value


def test_maml_meta_gradient_matches_finite_differences():
    emb, model = make_models(2)
    batch = random_batch(3, support_sizes=[4, 3], query_sizes=[2, 3])
    cfg = MetaConfig("maml", inner_steps=2, inner_lr=LR, adapt_embeddings=True)
    lk = emb.lookup(batch)
    learner = MetaLearner(model, cfg)
    params = dict(model.named_parameters())
    loss, _ = learner.loss(batch, lk)
    loss.backward()
    gen = torch.Generator().manual_seed(0)
    eps = 1e-5

    def loss_at(dirs: dict[str, torch.Tensor], d_rows: torch.Tensor, step: float) -> torch.Tensor:
        with torch.no_grad():
            for k, d in dirs.items():
                params[k].add_(step * d)
            moved = dataclasses.replace(lk, rows=lk.rows.detach() + step * d_rows)
            value = learner.loss(batch, moved)[0].detach()
            for k, d in dirs.items():
                params[k].sub_(step * d)
        return value

    for _ in range(4):
        dirs = {k: torch.randn(p.shape, generator=gen, dtype=p.dtype) for k, p in params.items()}
        d_rows = torch.randn(lk.rows.shape, generator=gen, dtype=lk.rows.dtype)
        analytic = sum((params[k].grad * d).sum() for k, d in dirs.items()) + (lk.rows.grad * d_rows).sum()
        numeric = (loss_at(dirs, d_rows, eps) - loss_at(dirs, d_rows, -eps)) / (2 * eps)
        torch.testing.assert_close(analytic.detach(), numeric, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ["maml", "fomaml", "anil", "none"])
def test_dummy_tasks_contribute_nothing(name):
    emb, model = make_models()
    cfg = MetaConfig(name, inner_steps=2, inner_lr=LR, adapt_embeddings=name == "maml")
    base = run(cfg, emb, model, BATCH)
    padded = pad_tasks(BATCH, BATCH.num_tasks + 3)
    assert_same(run(cfg, emb, model, padded), base, rtol=0, atol=1e-15)

    all_dummy = random_batch(0, support_sizes=[5, 2, 4], query_sizes=[3, 1, 2])  # a copy: mutated below
    all_dummy.task_mask[:] = False
    all_dummy.support.mask[:] = False
    all_dummy.query.mask[:] = False
    loss, grads, rows = run(cfg, emb, model, all_dummy)
    assert loss == 0 and all((g == 0).all() for g in grads.values()) and (rows == 0).all()


@pytest.mark.parametrize("name", ["maml", "fomaml", "none"])
def test_padded_variable_size_tasks_equal_unpadded_tasks(name):
    """A padded batch (garbage in padded slots) == the mean of each task computed alone, unpadded."""
    emb, model = make_models()
    cfg = MetaConfig(name, inner_steps=2, inner_lr=LR, adapt_embeddings=True)
    if name == "none":  # a sample mean over the union, not a task mean: equal task totals make them agree
        batch = random_batch(4, support_sizes=[4, 2], query_sizes=[2, 4])
    else:
        batch = random_batch(4, support_sizes=[5, 1, 3], query_sizes=[1, 4, 2])
    assert not batch.support.mask.all()
    got = run(cfg, emb, model, batch)
    alone = [run(cfg, emb, model, task_alone(batch, t)) for t in range(batch.num_tasks)]
    n = len(alone)
    want = (
        sum(a[0] for a in alone) / n,
        {k: sum(a[1][k] for a in alone) / n for k in got[1]},
        sum(a[2] for a in alone) / n,
    )
    assert_same(got, want)


@pytest.mark.parametrize("name", ["maml", "none"])
def test_predict_adapts_on_support_without_keeping_a_graph(name):
    emb, model = make_models()
    cfg = MetaConfig(name, inner_steps=2, inner_lr=LR)
    lk = emb.lookup(BATCH)
    params = dict(model.named_parameters())
    learner = MetaLearner(model, cfg)
    with torch.no_grad():
        adapted = learner.predict(BATCH, lk, adapted=True)
        plain = learner.predict(BATCH, lk, adapted=False)
    assert not adapted.requires_grad and all(p.grad is None for p in params.values()) and lk.rows.grad is None
    assert adapted.shape == plain.shape == BATCH.query.label.shape

    q = BATCH.query
    e = embed(lk.rows, lk.query)
    torch.testing.assert_close(plain, model(e, q.dense.double()))
    # Reference: per task, two plain SGD steps on the support loss, then the query logits.
    for t in range(BATCH.num_tasks):
        fast = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        s, idx = BATCH.support, lk.support
        es = embed(lk.rows.detach(), idx, t)
        for _ in range(2):
            loss = masked_bce(
                model.forward_with(fast, es, s.dense[t].double()), s.label[t].double(), s.mask[t]
            )
            gs = torch.autograd.grad(loss, list(fast.values()))
            fast = {k: v - LR * g for (k, v), g in zip(fast.items(), gs, strict=True)}
        torch.testing.assert_close(adapted[t], model.forward_with(fast, e[t], q.dense[t].double()))
    assert not torch.allclose(adapted, plain)


def test_stats():
    emb, model = make_models()
    lk = emb.lookup(BATCH)
    _, stats = MetaLearner(model, MetaConfig("maml", inner_lr=LR)).loss(BATCH, lk)
    _, stats_none = MetaLearner(model, MetaConfig("none")).loss(BATCH, lk)
    # The pre-adaptation support loss is the shared-weight support loss.
    torch.testing.assert_close(stats["support_loss"], stats_none["support_loss"])
    assert stats["query_logits"].shape == BATCH.query.label.shape and not stats["query_logits"].requires_grad
    q = BATCH.query
    torch.testing.assert_close(
        stats["query_loss"], masked_bce(stats["query_logits"], q.label.double(), q.mask).mean()
    )


def test_support_loss_weight_adds_the_shared_support_loss():
    """loss(w) = loss(0) + w * (task-mean support BCE at the shared weights), gradients included."""
    emb, model = make_models(2)
    w = 0.7
    base = run(MetaConfig("maml", inner_lr=LR), emb, model, BATCH)
    got = run(MetaConfig("maml", inner_lr=LR, support_loss_weight=w), emb, model, BATCH)

    def support_only(model, lk, batch):
        params = dict(model.named_parameters())
        e = embed(lk.rows, lk.support)
        per_task = [
            F.binary_cross_entropy_with_logits(
                model.forward_with(params, e[t], batch.support.dense[t].double())[batch.support.mask[t]],
                batch.support.label[t].double()[batch.support.mask[t]],
            )
            for t in range(batch.num_tasks)
        ]
        return torch.stack(per_task).mean()

    extra = run(support_only, emb, model, BATCH)
    torch.testing.assert_close(got[0], base[0] + w * extra[0])
    for k in got[1]:
        torch.testing.assert_close(got[1][k], base[1][k] + w * extra[1][k])
    torch.testing.assert_close(got[2], base[2] + w * extra[2])
