"""Learned per-layer, per-step inner learning rates (meta.learn_inner_lr, gmeta.meta.inner_lr).

The fast closed-form path must stay exact: with a different random rate for every layer and step, its
loss, its meta-gradients (dense params, rows AND the rates) and its adapted predictions equal the
vmap path's and the per-task reference loop's (float64, 1e-10 relative); the rates' gradient also
matches finite differences.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_fast_inner import (
    LR,
    fast_equal_to_vmap_and_loop,
    make_batch,
    make_models,
)
from test_fast_inner import run as run_learner

from gmeta.errors import ConfigError
from gmeta.meta.config import MetaConfig
from gmeta.meta.inner_lr import EMBEDDING_SLOT, InnerLearningRates, lr_slots
from gmeta.meta.learner import MetaLearner
from gmeta.meta.schedule import InnerSetting


def learner_with_random_rates(model, cfg: MetaConfig, seed: int = 0) -> MetaLearner:
    learner = MetaLearner(model, cfg)
    assert learner.inner_lrs is not None
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a different rate per layer and step, around LR
        values = learner.inner_lrs.values
        values.copy_(LR * (0.5 + torch.rand(values.shape, generator=g, dtype=torch.float64)))
    learner.inner_lrs.to(next(model.parameters()).dtype)
    return learner


def run(emb, model, batch, cfg: MetaConfig) -> dict[str, torch.Tensor]:
    """Loss and gradients w.r.t. the dense params, the (whole-table) rows and the learned rates."""
    return run_learner(emb, model, batch, cfg, learner_with_random_rates(model, cfg))


@pytest.mark.parametrize("interaction", ["dot", "concat"])
@pytest.mark.parametrize("name", ["maml", "fomaml", "anil"])
@pytest.mark.parametrize("adapt_embeddings", [False, True])
def test_fast_equals_vmap_and_loop_with_a_rate_per_layer_and_step(
    interaction, name, adapt_embeddings, layer_form
):
    emb, model = make_models(interaction, torch.float64)
    batch = make_batch()
    cfg = MetaConfig(name, inner_steps=3, inner_lr=LR, adapt_embeddings=adapt_embeddings, learn_inner_lr=True)
    got = fast_equal_to_vmap_and_loop(emb, model, batch, cfg, run)
    # every rate that is used gets a signal; the rest (anil: the bottom tower's) stay at 0
    rates = got["rates"]
    slots = lr_slots(model)
    for j, slot in enumerate(slots):
        used = (slot == EMBEDDING_SLOT and adapt_embeddings) or (
            slot != EMBEDDING_SLOT and slot.split(".")[0] in cfg.groups
        )
        assert bool((rates[:, j] != 0).all()) == used, (slot, rates[:, j])


def test_adapted_predictions_and_schedule_scaling_equal_the_loop():
    """Evaluation: adapted predictions at the learned rates, and a schedule setting with more steps
    than were trained (the last trained step's rates again) and its lr scaling them, on all backends."""
    emb, model = make_models("dot", torch.float64, seed=1)
    batch = make_batch(1)
    cfg = MetaConfig("maml", inner_steps=2, inner_lr=LR, adapt_embeddings=True, learn_inner_lr=True)
    lk = emb.lookup(batch)
    real = batch.query.mask & batch.task_mask[:, None]
    setting = InnerSetting(steps=4, lr=LR / 3, groups=("top",))
    results = {}
    for backend in ("fast", "vmap", "reference"):
        learner = learner_with_random_rates(model, dataclasses.replace(cfg, backend=backend), seed=1)
        adapted = learner.predict(batch, lk, adapted=True)
        scheduled = learner.predict_with(setting, batch, lk)
        assert not adapted.requires_grad and not scheduled.requires_grad
        results[backend] = (adapted[real], scheduled[real])
    for backend in ("vmap", "reference"):
        for got, want in zip(results["fast"], results[backend], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # the scaled 4-step setting is another inner loop than the trained one
    assert not torch.allclose(results["fast"][0], results["fast"][1])


def test_rate_gradient_matches_finite_differences():
    emb, model = make_models("concat", torch.float64, seed=2)
    batch = make_batch(2)
    cfg = MetaConfig("maml", inner_steps=2, inner_lr=LR, adapt_embeddings=True, learn_inner_lr=True)
    learner = learner_with_random_rates(model, cfg, seed=2)
    assert learner.inner_lrs is not None
    values = learner.inner_lrs.values
    lk = emb.lookup(batch)

    def loss_at(v: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            values.copy_(v)
        return learner.loss(batch, lk)[0]

    start = values.detach().clone()
    loss_at(start).backward()
    assert values.grad is not None
    analytic = values.grad.clone()
    eps = 1e-6
    for idx in [(0, 0), (1, 1), (0, len(learner.inner_lrs.slots) - 1), (1, 3)]:
        up, down = start.clone(), start.clone()
        up[idx] += eps
        down[idx] -= eps
        with torch.no_grad():
            numeric = (loss_at(up) - loss_at(down)) / (2 * eps)
        assert float(analytic[idx]) == pytest.approx(float(numeric), rel=1e-5, abs=1e-9), idx


def test_config_and_table():
    with pytest.raises(ConfigError, match="learn_inner_lr"):
        MetaConfig("none", learn_inner_lr=True)
    with pytest.raises(ConfigError, match="learn_inner_lr"):
        MetaConfig("maml", inner_steps=0, learn_inner_lr=True)
    assert MetaLearner(make_models("dot", torch.float64)[1], MetaConfig()).inner_lrs is None
    rates = InnerLearningRates(("top.0", EMBEDDING_SLOT), steps=2, init=0.1)
    assert rates.table() == {"top.0": [0.1, 0.1], EMBEDDING_SLOT: [0.1, 0.1]}
    assert float(rates.at(5, "top.0").detach()) == pytest.approx(0.1)  # beyond the trained steps: the last
    with pytest.raises(KeyError, match="bottom.9"):
        rates.at(0, "bottom.9")
