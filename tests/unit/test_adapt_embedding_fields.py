"""Adapting only some id fields' rows (meta.adapt_embedding_fields, e.g. the task key's row, MeLU-style).

The fast path must equal vmap and the per-task reference loop (loss, meta-gradients, adapted
predictions; float64, 1e-10 relative), and the restriction must really restrict: the rows of the other
fields get exactly the gradient they would get if the embeddings did not adapt at all.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_fast_inner import (
    LR,
    assert_close,
    fast_equal_to_vmap_and_loop,
    make_batch,
    make_models,
    reference,
)
from test_fast_inner import run as run_learner

from gmeta.errors import ConfigError
from gmeta.meta.config import MetaConfig
from gmeta.meta.learner import MetaLearner

FIELDS = ("user_id", "item_id", "genre", "tag")  # test_fast_inner.VOCAB: 2 sparse, 2 multi-hot


def run(emb, model, batch, cfg: MetaConfig) -> dict[str, torch.Tensor]:
    return run_learner(emb, model, batch, cfg, MetaLearner(model, cfg, FIELDS))


@pytest.mark.parametrize(
    ("interaction", "name", "fields"),
    [
        ("dot", "maml", ("user_id",)),
        ("concat", "maml", ("user_id",)),
        ("concat", "fomaml", ("item_id", "tag")),
        ("dot", "anil", ("item_id", "tag")),
    ],
)
def test_fast_equals_vmap_and_loop(interaction, name, fields, layer_form):
    emb, model = make_models(interaction, torch.float64)
    batch = make_batch()
    cfg = MetaConfig(name, inner_steps=3, inner_lr=LR, adapt_embeddings=True, adapt_embedding_fields=fields)
    fast_equal_to_vmap_and_loop(emb, model, batch, cfg, run)

    lk = emb.lookup(batch)
    real = batch.query.mask & batch.task_mask[:, None]
    fast = MetaLearner(model, cfg, FIELDS).predict(batch, lk, adapted=True)[real]
    loop = MetaLearner(model, reference(cfg), FIELDS).predict(batch, lk, adapted=True)[real]
    torch.testing.assert_close(fast, loop, rtol=1e-10, atol=1e-12)
    # a real restriction: adapting every field's rows is another inner loop
    every = MetaLearner(model, dataclasses.replace(cfg, adapt_embedding_fields=None)).predict(
        batch, lk, adapted=True
    )[real]
    assert not torch.allclose(fast, every)


def test_naming_every_field_is_adapting_every_row():
    emb, model = make_models("concat", torch.float64, seed=3)
    batch = make_batch(3)
    cfg = MetaConfig("maml", inner_steps=2, inner_lr=LR, adapt_embeddings=True, adapt_embedding_fields=FIELDS)
    every = dataclasses.replace(cfg, adapt_embedding_fields=None)
    assert_close(run(emb, model, batch, cfg), run(emb, model, batch, every), 1e-12)


def test_config_errors():
    with pytest.raises(ConfigError, match="adapt_embeddings=true"):
        MetaConfig("maml", adapt_embedding_fields=("user_id",))
    with pytest.raises(ConfigError, match="adapt_embeddings=true"):
        MetaConfig("maml", adapt_embeddings=True, adapt_embedding_fields=())
    model = make_models("dot", torch.float64)[1]
    cfg = MetaConfig("maml", adapt_embeddings=True, adapt_embedding_fields=("user",))
    with pytest.raises(ConfigError, match=r"\['user'\] are not id fields"):
        MetaLearner(model, cfg, FIELDS)
    with pytest.raises(ValueError, match="id_fields"):
        MetaLearner(model, cfg)
