"""MetaConfig: the algorithms' defining settings come from one table, contradictions are refused."""

from __future__ import annotations

import pytest

from gmeta.errors import ConfigError
from gmeta.meta.config import ALGORITHMS, META_ALGORITHMS, MetaConfig


def test_algorithm_defaults_come_from_one_table():
    assert MetaConfig("anil").adapt_groups == ("top",)
    assert MetaConfig("fomaml").first_order and not MetaConfig("maml").first_order
    assert MetaConfig("maml", adapt_groups=["top"]).adapt_groups == ("top",)  # Hydra hands lists
    for name in META_ALGORITHMS:
        cfg = MetaConfig(name)
        assert cfg.first_order == ALGORITHMS[name].first_order
        assert cfg.adapt_groups == ALGORITHMS[name].adapt_groups
        # an explicit value equal to the default is the same config
        assert cfg == MetaConfig(name, first_order=cfg.first_order, adapt_groups=cfg.adapt_groups)
    assert MetaConfig("none").is_meta is False and MetaConfig("anil").is_meta


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"name": "fomaml", "first_order": False},
            "meta.name=fomaml with meta.first_order=False.*meta.name=maml",
        ),
        (
            {"name": "maml", "first_order": True},
            "meta.name=maml with meta.first_order=True.*meta.name=fomaml",
        ),
        (
            {"name": "anil", "adapt_groups": ["bottom", "top"]},
            r"meta.name=anil adapts \['top'\] by definition",
        ),
        ({"name": "none", "support_loss_weight": 0.5}, "only applies to meta algorithms"),
        ({"name": "reptile"}, "meta.name must be one of"),
        ({"adapt_groups": ("embedding",)}, "meta.adapt_groups"),
        ({"backend": "jit"}, "meta.backend must be one of"),
        ({"inner_steps": -1}, "meta.inner_steps"),
        ({"inner_lr": 0.0}, "meta.inner_lr"),
    ],
)
def test_contradictory_or_invalid_configs_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        MetaConfig(**kwargs)


def test_checkpoints_naming_the_backend_implementation_still_load():
    old = {"name": "maml", "inner_steps": 2, "inner_lr": 0.1, "first_order": False, "implementation": "vmap"}
    assert MetaConfig.from_dict(old) == MetaConfig("maml", inner_steps=2, inner_lr=0.1, backend="vmap")


def test_anil_may_adapt_the_task_rows_with_the_top_tower():
    """MeLU-style: the decision layers and the task's looked-up rows adapt."""
    cfg = MetaConfig("anil", adapt_embeddings=True, inner_steps=2)
    assert cfg.adapts and cfg.adapt_groups == ("top",)
    assert not MetaConfig("maml", inner_steps=0).adapts
    assert not MetaConfig("maml", adapt_groups=()).adapts


# -- the LightningModule's cold-start options ---------------------------------------------------

SCHEMA = {
    "task_key": "user",
    "label": "rating",
    "time": None,
    "fields": [
        {"name": "user", "kind": "sparse", "vocab_size": 5, "max_len": 1},
        {"name": "item", "kind": "sparse", "vocab_size": 7, "max_len": 1},
        {"name": "genre", "kind": "multi_hot", "vocab_size": 4, "max_len": 3},
        {"name": "d0", "kind": "dense"},
    ],
}


def module(**kwargs):
    from gmeta.meta.module import MetaDLRMModule

    meta = {"name": "maml", "inner_steps": 2, **kwargs.pop("meta", {})}
    return MetaDLRMModule(schema=SCHEMA, meta=meta, embedding_dim=4, bottom_mlp=(4,), top_mlp=(4,), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"id_dropout": {"movie": 0.3}},
            r"model.id_dropout: 'movie' is not a sparse field.*\['user', 'item'\]",
        ),
        ({"id_dropout": {"genre": 0.3}}, "'genre' is not a sparse field"),  # multi-hot: no single id
        ({"id_dropout": {"item": 1.5}}, r"model.id_dropout.item must be in \[0, 1\], got 1.5"),
        (
            {"meta": {"adapt_embeddings": True, "adapt_embedding_fields": ["movie"]}},
            r"meta.adapt_embedding_fields \['movie'\] are not id fields.*\['user', 'item', 'genre'\]",
        ),
    ],
)
def test_module_options_name_what_is_wrong(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        module(**kwargs)


def test_learned_inner_rates_are_trained_and_checkpointed_with_the_towers():
    m = module(meta={"learn_inner_lr": True, "inner_lr": 0.2})
    assert m.inner_lrs is not None and m.inner_lrs.values.shape == (2, len(m.inner_lrs.slots))
    optimized = {id(p) for group in m.configure_optimizers().param_groups for p in group["params"]}
    assert id(m.inner_lrs.values) in optimized
    assert "inner_lrs.values" in m.state_dict()
    assert module().inner_lrs is None and "inner_lrs.values" not in module().state_dict()
